"""Shared set-up of every test: the node layer is written in ComfyUI's V3 API, so the real `comfy_api` from a ComfyUI
source tree (COMFYUI_DIR, or the cached runtime of `make comfyui`) goes on sys.path, AFTER the repository, so that our
`nodes` package is not shadowed by ComfyUI's nodes.py. Tests that import the nodes call
prerequisites.require_comfy_api() (or use the `comfy_api` fixture): without a ComfyUI source they fail under CI=true
and are skipped loudly elsewhere."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
for path in (str(REPO), str(TESTS)):
    if path not in sys.path:
        sys.path.insert(0, path)

from prerequisites import comfyui_source, require_comfy_api  # noqa: E402

_src = comfyui_source()
if _src is not None and str(_src) not in sys.path:
    sys.path.append(str(_src))


@pytest.fixture
def comfy_api() -> None:
    """For tests that import the node layer inside the test."""
    require_comfy_api()
