"""Shared bits of the node layer: the category and how user-facing errors reach ComfyUI."""

from __future__ import annotations

import copy
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
        err = copy.copy(e)  # the same class and attributes (e.g. SettingsError.problems), the message prefixed
        err.args = (f"{node}: {e}",)
        err.node = node
        raise err from e


def validation_result(problems: list) -> str | bool:
    """What VALIDATE_INPUTS returns for kandinsky_core.settings problems: True, or every problem, one per line
    (each message names its input)."""
    return "\n".join(p.message for p in problems) or True


def widget_range_problem(node: type, **values) -> str | None:
    """The min / max of the node's own widgets, for the inputs its VALIDATE_INPUTS takes: ComfyUI skips its range
    check for those (and passes values it could not convert unchanged). None when every value is in range."""
    spec = node.INPUT_TYPES()["required"]
    for name, value in values.items():
        opts = spec[name][1]
        kind = spec[name][0]
        ok_type = isinstance(value, int) if kind == "INT" else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            return f"{name}={value!r} is not a number. Allowed: {opts['min']} to {opts['max']}."
        if not opts["min"] <= value <= opts["max"]:
            return f"{name}={value!r} is out of range. Allowed: {opts['min']} to {opts['max']}."
    return None
