"""Tiny Kandinsky 5 DiTs for tests: small architectures and random-weight checkpoints with the official key names."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from kandinsky_core.model import Kandinsky5DiT
from kandinsky_core.variants import DiTArch, Variant, get_variant

TEXT_DIM = 3584
POOLED_DIM = 768

TINY_ARCHS: dict[str, DiTArch] = {
    # Lite-like: head_dim 32 (8+12+12), 2 heads, visual_cond (33 input channels)
    "lite": DiTArch(
        time_dim=32, model_dim=64, ff_dim=128, num_text_blocks=1, num_visual_blocks=2, axes_dims=(8, 12, 12),
        visual_cond=True,
    ),
    # Pro-like: head_dim 32 (8+8+16), 3 heads, more blocks, time_dim != model_dim / 2
    "pro": DiTArch(
        time_dim=48, model_dim=96, ff_dim=160, num_text_blocks=2, num_visual_blocks=3, axes_dims=(8, 8, 16),
        visual_cond=True,
    ),
    # Image-like T2I: 16 input channels; I2I: instruct channels (33)
    "image": DiTArch(time_dim=32, model_dim=80, ff_dim=96, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 8, 8)),
    "image_i2i": DiTArch(
        time_dim=32, model_dim=80, ff_dim=96, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 8, 8),
        instruct=True,
    ),
    "lite_t2v_16ch": DiTArch(
        time_dim=32, model_dim=64, ff_dim=128, num_text_blocks=1, num_visual_blocks=1, axes_dims=(8, 12, 12),
    ),
}  # fmt: skip


def random_state_dict(arch: DiTArch, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every parameter random (modulation included, which the official init zeroes), fp32, official key names."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Kandinsky5DiT(arch).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):  # LayerNorm / RMSNorm gains near 1
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.2 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        sd[name] = t.contiguous()
    return sd


def make_tiny_dit(arch: DiTArch, seed: int = 0, dtype: torch.dtype = torch.float32) -> Kandinsky5DiT:
    model = Kandinsky5DiT(arch, dtype=dtype)
    model.load_state_dict(random_state_dict(arch, seed))
    return model.eval().requires_grad_(False)


def make_tiny_dit_file(path: str | Path, arch: DiTArch, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Save a random tiny DiT as safetensors with the official key names; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype) for k, v in random_state_dict(arch, seed).items()}, str(path))
    return path


def make_inputs(
    arch: DiTArch, batch: int = 1, grid: tuple[int, int, int] = (2, 4, 6), text_len: int = 5, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random forward() inputs: latent grid (T, H, W) in latent pixels (H and W even)."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    return dict(
        x=torch.randn(batch, arch.in_channels, t, h, w, generator=g),
        text_embeds=torch.randn(batch, text_len, arch.in_text_dim, generator=g),
        pooled_text_embeds=torch.randn(batch, arch.in_text_dim2, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
    )


def tiny_variant(arch: DiTArch, base: str | None = None, **changes) -> Variant:
    """A table variant with its architecture swapped for a tiny one (for load_dit(..., variant=...))."""
    if base is None:
        base = "i2i-lite" if arch.instruct else "t2v-lite-sft-5s" if arch.visual_cond else "t2i-lite"
    return dataclasses.replace(get_variant(base), arch=arch, **changes)
