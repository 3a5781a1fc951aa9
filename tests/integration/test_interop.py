"""LATENT and IMAGE interoperate with ComfyUI's own HunyuanVideo VAE nodes (VAELoader, VAEDecode, VAEEncode).

ComfyUI builds its HunyuanVideo VAE with the released architecture whatever the file holds (comfy/sd.py: ch 128,
ch_mult 1-2-4-4, 2 res blocks), so a tiny VAE cannot be used here: this module writes a random VAE of the real
size (bf16, ~0.5 GB, in ComfyUI's original latent-diffusion key layout) and keeps the videos small (32x32, 5 frames).
"""

from __future__ import annotations

import math
import re

import comfy_graphs as graphs
import numpy as np
import pytest
import torch
from comfy_server import CLIP, QWEN
from PIL import Image
from safetensors.torch import save_file

from kandinsky_core.hunyuan_vae import HUNYUAN_VAE_CONFIG, HunyuanVideoVAE

pytestmark = pytest.mark.integration

VAE_FILE = "hunyuan_video_vae_random_full_size.safetensors"
SIZE, FRAMES = 32, 5


def write_full_size_vae(path) -> None:
    """Random weights for the released HunyuanVideo VAE, keyed as ComfyUI stores it (mid.attn_1 as 1x1x1 convs)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in HunyuanVideoVAE(HUNYUAN_VAE_CONFIG).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in shapes.items():
        if len(shape) > 1:
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif "norm" in name and name.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.05 * torch.randn(shape, generator=g)
        if re.fullmatch(r".*\.mid\.attn_1\.(q|k|v|proj_out)\.weight", name):
            t = t.reshape(*t.shape, 1, 1, 1)
        state[name] = t.to(torch.bfloat16)
    save_file(state, str(path))


@pytest.fixture(scope="module")
def full_vae(comfyui):
    path = comfyui.base / "models" / "vae" / VAE_FILE
    if not path.exists():
        write_full_size_vae(path)
    return VAE_FILE


def decode_both(g: dict, latent_link: list) -> dict:
    """Native VAELoader + VAEDecode -> SaveImage "n_out", and Kandinsky 5 VAE Decode of the same latent -> "k_out"."""
    g["n_vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": VAE_FILE}}
    g["n_dec"] = {"class_type": "VAEDecode", "inputs": {"samples": latent_link, "vae": ["n_vae", 0]}}
    g["n_out"] = {"class_type": "SaveImage", "inputs": {"images": ["n_dec", 0], "filename_prefix": "native"}}
    g["k_vae"] = {"class_type": "Kandinsky5LoadVAE", "inputs": {"vae_name": VAE_FILE, "dtype": "fp32"}}
    g["k_dec"] = {
        "class_type": "Kandinsky5VAEDecode",
        "inputs": {
            "vae": ["k_vae", 0],
            "samples": latent_link,
            "tiling": "off",
            "tile_px": 256,
            "overlap_px": 64,
            "tile_frames": 16,
            "overlap_frames": 8,
        },
    }
    g["k_out"] = {"class_type": "SaveImage", "inputs": {"images": ["k_dec", 0], "filename_prefix": "ours"}}
    return g


def frames(comfyui, entry, node) -> np.ndarray:
    files = comfyui.output_files(entry, node)
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(np.int16)


def assert_same_video(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape == (FRAMES, SIZE, SIZE, 3)
    diff = np.abs(a - b)
    assert diff.max() <= 2 and diff.mean() < 0.5, f"max {diff.max()}, mean {diff.mean():.3f}"
    assert a.std() > 5


def test_native_vae_decode_reads_our_sampler_latent(comfyui, full_vae):
    """Our LATENT (unscaled HunyuanVideo space) decodes in ComfyUI's VAEDecode to what our VAE Decode gives."""
    dit = comfyui.models["dit"]["t2v-lite-sft-5s"].name
    g = graphs.text2x(dit, "HunyuanVideo/vae/", QWEN, CLIP, "a fox", SIZE, SIZE, FRAMES, seed=5)
    del g["6"], g["7"]
    entry = comfyui.run(decode_both(g, ["5", 0]), timeout=400)
    assert_same_video(frames(comfyui, entry, "n_out"), frames(comfyui, entry, "k_out"))


def test_our_vae_decode_reads_a_native_video_latent(comfyui, full_vae):
    """ComfyUI's VAEEncode of a 5-frame clip gives a LATENT our VAE Decode turns into the same frames as ComfyUI's."""
    pixels = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(comfyui.base / "input" / "interop.png")
    g = {
        "img": {"class_type": "LoadImage", "inputs": {"image": "interop.png"}},
        "rep": {"class_type": "RepeatImageBatch", "inputs": {"image": ["img", 0], "amount": FRAMES}},
        "n_vae": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_FILE}},
        "n_enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["rep", 0], "vae": ["n_vae", 0]}},
    }
    entry = comfyui.run(decode_both(g, ["n_enc", 0]), timeout=400)
    assert_same_video(frames(comfyui, entry, "n_out"), frames(comfyui, entry, "k_out"))
