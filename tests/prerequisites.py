"""What a test does when something it needs from outside the project is missing (a ComfyUI tree, Chromium,
ComfyUI's tokenizer files): with CI=true that is a failure, since `make test` provides all of them; elsewhere the test
is skipped with a warning that says what did not run and how to get it."""

from __future__ import annotations

import os
import warnings

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """Fail (CI) or skip loudly: `what` names the missing prerequisite and how to provide it."""
    if in_ci():
        pytest.fail(f"CI=true and a prerequisite is missing, so this test did NOT run: {what}", pytrace=False)
    warnings.warn(UserWarning(f"did NOT run: {what}"), stacklevel=2)
    pytest.skip(what)
