"""A real, headless ComfyUI for the integration tests: the tiny model files, the server and a client for it.
The server is started once per session (conftest.py) on 127.0.0.1 (a free port), with
this repository installed as a custom node pack and tiny random weights in its model folders.

Set COMFYUI_DIR (a ComfyUI tree) and COMFYUI_PYTHON (its interpreter); see docs/comfyui.md. Without COMFYUI_DIR
every test here is skipped, loudly.

Everything lives in a temporary --base-directory (custom_nodes, models, input, output, user), so the ComfyUI tree
itself is never modified. Tiny DiTs have no released architecture: the test-only pack in tiny_variants_pack/ swaps
the tiny architectures into the variants under test inside the server (see its docstring); the same swap is made
in this process (monkeypatch) for the reference runs of kandinsky_core.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

SKIP_REASON = (
    "COMFYUI_DIR is not set: the ComfyUI integration tests (tests/integration) did NOT run. Build a CPU ComfyUI "
    "and export COMFYUI_DIR and COMFYUI_PYTHON as docs/comfyui.md explains, then run them again."
)
START_TIMEOUT = 120  # s until /system_stats answers
TEXT_DIM = 32  # tiny Qwen and CLIP hidden sizes
W, H, FRAMES = 96, 64, 5
QWEN, CLIP = "Qwen2.5-VL-7B-Instruct/", "clip-vit-large-patch14/"
# ComfyUI's single files, tiny but sized for the tokenizers ComfyUI bundles (Qwen2.5 152064, CLIP 49408 ids)
QWEN_FILE, QWEN_FP8_FILE = "qwen_2.5_vl_7b.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors"
CLIP_FILE = "clip_l.safetensors"
COMFY_VOCAB = (152064, 49408)
QWEN_WIDE = "Qwen2.5-VL-wide/"  # a Qwen folder twice as wide as the DiTs take (a wrong model for them)
TINY_TEXT_CONFIGS = "tiny_text_configs.json"  # next to the --base-directory's models/, read by tiny_variants_pack
HUNYUAN_VAE, FLUX_VAE = "HunyuanVideo/vae/", "FLUX.1-dev/vae/"
PACK = "comfyui-kandinsky5"


def tiny_archs() -> dict:
    from tiny import TINY_ARCHS

    dims = dict(in_text_dim=TEXT_DIM, in_text_dim2=TEXT_DIM)
    return {
        "t2v-lite-sft-5s": dataclasses.replace(TINY_ARCHS["lite"], **dims),
        "i2v-lite-5s": dataclasses.replace(TINY_ARCHS["lite"], **dims),
        "t2i-lite": dataclasses.replace(TINY_ARCHS["image"], **dims),
        "i2i-lite": dataclasses.replace(TINY_ARCHS["image_i2i"], **dims),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_requirements(python: str) -> None:
    """Install our requirements into ComfyUI's venv the way a user does (never upgrading its torch)."""
    check = "import einops, safetensors, transformers, tokenizers, av, huggingface_hub"
    if subprocess.run([python, "-c", check], capture_output=True).returncode == 0:
        return
    reqs, constraints = str(REPO / "requirements.txt"), str(REPO / "constraints.txt")
    cmd = [python, "-m", "pip", "install", "-q", "-r", reqs, "-c", constraints]
    subprocess.run(cmd, check=True, timeout=600)


def write_models(models: Path) -> dict:
    """Tiny weights in ComfyUI's model folders; returns the paths the reference runs use."""
    import tiny_flux_vae
    import tiny_text
    import tiny_vae
    from tiny import make_tiny_dit_file

    from kandinsky_core import variants

    text_root = models.parent / "text_src"
    t = tiny_text.make_tiny_text_encoders(text_root, "folder", qwen_hidden=TEXT_DIM, clip_hidden=TEXT_DIM)
    (models / "text_encoders").mkdir(parents=True)
    shutil.move(t.qwen, models / "text_encoders" / QWEN.rstrip("/"))
    shutil.move(t.clip, models / "text_encoders" / CLIP.rstrip("/"))
    single = tiny_text.make_tiny_text_encoders(
        models.parent / "text_single", "comfy", qwen_hidden=TEXT_DIM, clip_hidden=TEXT_DIM, vocab=COMFY_VOCAB
    )
    shutil.move(single.qwen, models / "text_encoders" / QWEN_FILE)
    shutil.move(single.clip, models / "text_encoders" / CLIP_FILE)
    fp8 = tiny_text.make_tiny_text_encoders(
        models.parent / "text_single_fp8",
        "comfy",
        fp8="scaled_fp8",
        qwen_hidden=TEXT_DIM,
        clip_hidden=TEXT_DIM,
        vocab=COMFY_VOCAB,
    )
    shutil.move(fp8.qwen, models / "text_encoders" / QWEN_FP8_FILE)
    wide = tiny_text.make_tiny_text_encoders(models.parent / "text_wide", "folder", qwen_hidden=2 * TEXT_DIM)
    shutil.move(wide.qwen, models / "text_encoders" / QWEN_WIDE.rstrip("/"))
    # for the path-escape tests: Qwen folders whose index names a shard outside the model folders
    for name, outside in (("qwen_escape_relative", "../../../outside"), ("qwen_escape_absolute", None)):
        folder = models / "text_encoders" / name
        shutil.copytree(models / "text_encoders" / QWEN.rstrip("/"), folder)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shard = sorted(set(index["weight_map"].values()))[0]
        target = models.parent / "outside" / name / shard
        target.parent.mkdir(parents=True)
        shutil.move(folder / shard, target)
        named = f"{outside}/{name}/{shard}" if outside else str(target)
        index["weight_map"] = {k: (named if v == shard else v) for k, v in index["weight_map"].items()}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        assert (folder / named).resolve() == target.resolve()
    configs = {"qwen": single.qwen_config, "clip": single.clip_config}
    (models.parent / TINY_TEXT_CONFIGS).write_text(json.dumps(configs))
    tiny_vae.write_diffusers_folder(models / "vae" / HUNYUAN_VAE.rstrip("/"), seed=0)
    tiny_flux_vae.write_tiny_flux_vae(models / "vae" / "FLUX.1-dev", "diffusers_folder", seed=0)
    dits = {}
    for i, (name, arch) in enumerate(tiny_archs().items()):
        filename = variants.VARIANTS[name].hf_filename.split("/")[-1]
        dits[name] = make_tiny_dit_file(models / "diffusion_models" / filename, arch, seed=i)
    # for the bad-input tests: a Qwen folder without its tokenizer, a VAE where a DiT should be
    shutil.copytree(
        models / "text_encoders" / QWEN.rstrip("/"),
        models / "text_encoders" / "qwen_without_tokenizer",
        ignore=shutil.ignore_patterns("vocab.json", "merges.txt", "tokenizer*.json"),
    )
    shutil.copy(
        models / "vae" / FLUX_VAE.rstrip("/") / "diffusion_pytorch_model.safetensors",
        models / "diffusion_models" / "flux_vae_by_mistake.safetensors",
    )
    return {
        "dit": dits,
        "qwen": models / "text_encoders" / QWEN.rstrip("/"),
        "clip": models / "text_encoders" / CLIP.rstrip("/"),
        "hunyuan_vae": models / "vae" / HUNYUAN_VAE.rstrip("/"),
        "flux_vae": models / "vae" / FLUX_VAE.rstrip("/"),
    }


class ComfyUI:
    """A running server and a small client for it (loopback only, every wait bounded)."""

    def __init__(self, base: Path, port: int, process: subprocess.Popen, log: Path, models: dict):
        self.base, self.port, self.process, self.log, self.models = base, port, process, log, models
        self.url = f"http://127.0.0.1:{port}"
        self.client_id = uuid.uuid4().hex

    def request(self, path: str, data: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw.strip() else {})
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, {"raw": raw.decode(errors="replace")}

    def queue(self, graph: dict) -> tuple[int, dict]:
        return self.request("/prompt", {"prompt": graph, "client_id": self.client_id})

    def wait(self, prompt_id: str, timeout: float = 240) -> dict:
        """The /history entry of a finished prompt (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, hist = self.request(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.process.poll() is not None:
                raise AssertionError(f"ComfyUI exited ({self.process.returncode}):\n{self.log_tail()}")
            time.sleep(0.2)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 240) -> dict:
        status, body = self.queue(graph)
        assert status == 200, f"POST /prompt answered {status}: {json.dumps(body)[:3000]}"
        entry = self.wait(body["prompt_id"], timeout)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000] + self.log_tail()
        return entry

    def progress(self, node: str, since: float = 0.0) -> list[tuple[float, int, int]]:
        """(time, value, max) of the WebSocket progress events of `node` that arrived after `since`."""
        return [
            (t, m["data"]["value"], m["data"]["max"])
            for t, kind, m in self.ws.snapshot()
            if kind == "json" and t > since and m.get("type") == "progress" and m["data"].get("node") == node
        ]

    def previews(self, since: float = 0.0) -> list[bytes]:
        """Binary WebSocket messages (preview images) that arrived after `since`."""
        return [m for t, kind, m in self.ws.snapshot() if kind == "binary" and t > since]

    def output_files(self, entry: dict, node: str) -> list[Path]:
        images = entry["outputs"][node]["images"]
        return [self.base / "output" / i["subfolder"] / i["filename"] for i in images]

    def saved_latent(self, entry: dict, node: str) -> torch.Tensor:
        """The LATENT written by ComfyUI's SaveLatent node `node`, as a torch tensor: lossless, unlike an MP4."""
        from safetensors.torch import load_file

        (info,) = entry["outputs"][node]["latents"]
        return load_file(str(self.base / "output" / info["subfolder"] / info["filename"]))["latent_tensor"]

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
