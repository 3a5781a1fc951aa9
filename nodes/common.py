"""Shared bits of the node layer: the category, the pack's link types, V3 schema helpers and how user-facing errors
reach ComfyUI."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from comfy_api.latest import io

from kandinsky_core.errors import KandinskyError

CATEGORY = "Kandinsky 5"

# The pack's own link types (what flows between our loaders and our other nodes)
K5_TEXT_ENCODERS = io.Custom("K5_TEXT_ENCODERS")
K5_VAE = io.Custom("K5_VAE")


def _takes_advanced() -> bool:
    return "advanced" in inspect.signature(io.Int.Input.__init__).parameters


ADVANCED: dict[str, Any] = {"advanced": True} if _takes_advanced() else {}
"""`**ADVANCED` on an input: ComfyUI from v0.33.0 folds it into the node's advanced section (fine-tuning a user
rarely changes); older releases show it as a plain widget."""


@contextmanager
def fail(node: str) -> Iterator[None]:
    """Put the node's display name in front of user-facing errors (their message already names the input and
    the fix); the exception keeps its class, so ComfyUI's execution_error shows e.g. InputError."""
    try:
        yield
    except KandinskyError as e:
        if getattr(e, "node", None):
            raise
        err = copy.copy(e)  # the same class and attributes (SettingsInputError.problems), the message prefixed
        err.args = (f"{node}: {e}",)
        err.node = node
        raise err from e


def validation_result(problems: list) -> str | bool:
    """What validate_inputs returns for kandinsky_core.settings problems: True, or every problem, one per line
    (each message names its input)."""
    return "\n".join(p.message for p in problems) or True


def widget_range_problem(node: type[io.ComfyNode], **values) -> str | None:
    """The min / max of the node's own widgets, for the inputs its validate_inputs takes: ComfyUI skips its range
    check for those (and passes values it could not convert unchanged). None when every value is in range."""
    spec = {i.id: i for i in node.define_schema().inputs}
    for name, value in values.items():
        widget = spec[name]
        ok_type = isinstance(value, int) if isinstance(widget, io.Int.Input) else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            return f"{name}={value!r} is not a number. Allowed: {widget.min} to {widget.max}."
        if not widget.min <= value <= widget.max:
            return f"{name}={value!r} is out of range. Allowed: {widget.min} to {widget.max}."
    return None
