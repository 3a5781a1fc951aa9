"""Empty stand-ins for the four model files of a CLI run whose pipeline is faked: the CLI checks that the paths
exist; nothing reads them."""

from __future__ import annotations

from pathlib import Path


def fake_model_args(folder: Path) -> list[str]:
    """Creates dit.safetensors (a file) and the qwen / clip / vae folders in `folder`; returns the CLI arguments
    that name them."""
    (folder / "dit.safetensors").write_bytes(b"")
    for name in ("qwen", "clip", "vae"):
        (folder / name).mkdir()
    return ["--dit", str(folder / "dit.safetensors"), "--text-encoder", str(folder / "qwen"),
            "--clip", str(folder / "clip"), "--vae", str(folder / "vae")]  # fmt: skip
