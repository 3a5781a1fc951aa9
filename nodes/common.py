"""Shared bits of the node layer: the category and how user-facing errors reach ComfyUI."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from kandinsky_core.errors import KandinskyError

CATEGORY = "Kandinsky 5"


@contextmanager
def fail(node: str) -> Iterator[None]:
    """Put the node's display name in front of user-facing errors (their message already names the input and
    the fix); the exception keeps its class, so ComfyUI's execution_error shows e.g. InputError."""
    try:
        yield
    except KandinskyError as e:
        if getattr(e, "node", None):
            raise
        err = type(e)(f"{node}: {e}")
        err.node = node
        raise err from e
