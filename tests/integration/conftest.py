"""Fixtures of the integration tests: one headless ComfyUI per session (see comfy_server.py and docs/comfyui.md).
`make test` provides COMFYUI_DIR. Without it every test here is skipped and the run ends with a warning saying so;
with CI=true each of them fails instead (tests/prerequisites.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from comfy_server import (  # noqa: E402
    PACK,
    REPO,
    SKIP_REASON,
    START_TIMEOUT,
    ComfyUI,
    ensure_requirements,
    free_port,
    tiny_archs,
    write_models,
)
from prerequisites import in_ci, missing  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    if not os.environ.get("COMFYUI_DIR") and not in_ci():
        terminalreporter.write_line(f"WARNING: {SKIP_REASON}", yellow=True, bold=True)


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        missing(SKIP_REASON)
    comfy_dir = Path(comfy_dir)
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    if not (comfy_dir / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={comfy_dir} has no main.py: point it at a ComfyUI tree (docs/comfyui.md).")
    ensure_requirements(python)

    base = tmp_path_factory.mktemp("comfyui-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    shutil.copytree(Path(__file__).parent / "tiny_variants_pack", base / "custom_nodes" / "kandinsky5_tiny_variants")
    (base / "input").mkdir()
    models = write_models(base / "models")
    spec = base / "tiny_variants.json"
    spec.write_text(json.dumps({k: dataclasses.asdict(v) for k, v in tiny_archs().items()}))

    env = dict(os.environ, K5_TINY_VARIANTS=str(spec), K5_PACK_DIR=str(REPO), HF_HUB_OFFLINE="1")
    env.update(OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost")
    port = free_port()
    log = base / "comfyui.log"
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base)]
    cmd += ["--database-url", "sqlite:///:memory:", "--preview-method", "latent2rgb"]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=comfy_dir, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = ComfyUI(base, port, process, log, models)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited during start-up ({process.returncode}):\n{server.log_tail()}")
            try:
                if server.request("/system_stats", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT} s:\n{server.log_tail()}")
            time.sleep(0.3)
        from comfy_ws import ComfyWebSocket

        server.ws = ComfyWebSocket(port, server.client_id)
        yield server
        server.ws.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def tiny_variants(monkeypatch):
    """The same architecture swap as the test pack does in the server, for reference runs in this process."""
    from kandinsky_core import variants

    for name, arch in tiny_archs().items():
        monkeypatch.setitem(variants.VARIANTS, name, dataclasses.replace(variants.VARIANTS[name], arch=arch))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
