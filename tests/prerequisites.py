"""What a test does when something it needs from outside the project is missing (a ComfyUI tree, Chromium,
ComfyUI's tokenizer files): with CI=true that is a failure, since `make test` provides all of them; elsewhere the test
is skipped with a warning that says what did not run and how to get it."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NEWEST_COMFYUI = "v0.33.0"  # scripts/comfyui_runtime.py NEWEST


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str, module_level: bool = False) -> None:
    """Fail (CI) or skip loudly: `what` names the missing prerequisite and how to provide it. module_level: called
    while a test module is imported (skips / fails the whole module)."""
    if in_ci():
        pytest.fail(f"CI=true and a prerequisite is missing, so this test did NOT run: {what}", pytrace=False)
    warnings.warn(UserWarning(f"did NOT run: {what}"), stacklevel=2)
    pytest.skip(what, allow_module_level=module_level)


def comfyui_source() -> Path | None:
    """A ComfyUI source tree with comfy_api.latest (the V3 node API our nodes are written in): COMFYUI_DIR, else the
    runtime scripts/comfyui_runtime.py caches for the newest release. None when there is none."""
    given = os.environ.get("COMFYUI_DIR")
    for src in ([Path(given)] if given else []) + [REPO / ".cache" / "comfyui" / NEWEST_COMFYUI / "src"]:
        if (src / "comfy_api" / "latest" / "__init__.py").is_file():
            return src
    return None


COMFY_API_MISSING = (
    "the node tests import ComfyUI's comfy_api (V3 nodes) and no ComfyUI source was found: set COMFYUI_DIR to a "
    f"ComfyUI tree, or build the cached one with `make comfyui` (.cache/comfyui/{NEWEST_COMFYUI}/src)"
)


def require_comfy_api(module_level: bool = False) -> None:
    """Skip / fail (see missing) unless ComfyUI's comfy_api is importable (tests/conftest.py puts it on sys.path)."""
    try:
        import comfy_api.latest  # noqa: F401
    except ImportError as e:
        missing(f"{COMFY_API_MISSING} ({e})", module_level=module_level)
