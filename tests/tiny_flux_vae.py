"""Tiny random-weight FLUX VAE files in the layouts users have, for tests.

The weights come from a diffusers `AutoencoderKL` (the reference implementation). The BFL / ComfyUI
`ae.safetensors` layout is produced by walking the diffusers modules here, independently of the renaming in
`kandinsky_core.flux_vae`, so a test that loads both layouts checks that renaming against this walk.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from kandinsky_core.flux_vae import FluxVAEConfig

# Same shape ratios as the real FLUX VAE (ch_mult 1,2,4,4; 2 res blocks; 16 latent channels; 8x downscale).
TINY_FLUX_VAE_CONFIG = FluxVAEConfig(ch=8, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16, norm_groups=4)

LAYOUTS = ("bfl", "diffusers", "diffusers_folder")


def diffusers_config(cfg: FluxVAEConfig = TINY_FLUX_VAE_CONFIG) -> dict:
    """The diffusers `AutoencoderKL` config.json for `cfg`, as black-forest-labs/FLUX.1-dev `vae/` writes it."""
    n = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "force_upcast": True,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "latent_channels": cfg.z_channels,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_add_attention": True,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": 1024,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    }


def tiny_diffusers_vae(seed: int = 0, cfg: FluxVAEConfig = TINY_FLUX_VAE_CONFIG):
    """A diffusers AutoencoderKL with every parameter random (norm scales and biases too, so a swapped name shows)."""
    from diffusers import AutoencoderKL

    config = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    vae = AutoencoderKL(**config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:  # GroupNorm scale
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return vae


def bfl_state_dict(vae) -> dict[str, torch.Tensor]:
    """The `ae.safetensors` (BFL / ComfyUI) names and shapes for a diffusers AutoencoderKL's weights."""
    out: dict[str, torch.Tensor] = {}

    def put(prefix: str, module: torch.nn.Module) -> None:
        for name, t in module.state_dict().items():
            out[f"{prefix}.{name}"] = t.detach().clone().contiguous()

    def put_resnet(prefix: str, r) -> None:
        for name in ("norm1", "conv1", "norm2", "conv2"):
            put(f"{prefix}.{name}", getattr(r, name))
        if r.conv_shortcut is not None:
            put(f"{prefix}.nin_shortcut", r.conv_shortcut)

    def put_mid(prefix: str, mid) -> None:
        put_resnet(f"{prefix}.block_1", mid.resnets[0])
        put_resnet(f"{prefix}.block_2", mid.resnets[1])
        attn = mid.attentions[0]
        put(f"{prefix}.attn_1.norm", attn.group_norm)
        for ours, linear in (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v), ("proj_out", attn.to_out[0])):
            out[f"{prefix}.attn_1.{ours}.weight"] = linear.weight.detach().clone()[:, :, None, None].contiguous()
            out[f"{prefix}.attn_1.{ours}.bias"] = linear.bias.detach().clone()

    enc, dec = vae.encoder, vae.decoder
    put("encoder.conv_in", enc.conv_in)
    for i, block in enumerate(enc.down_blocks):
        for j, r in enumerate(block.resnets):
            put_resnet(f"encoder.down.{i}.block.{j}", r)
        if block.downsamplers is not None:
            put(f"encoder.down.{i}.downsample.conv", block.downsamplers[0].conv)
    put_mid("encoder.mid", enc.mid_block)
    put("encoder.norm_out", enc.conv_norm_out)
    put("encoder.conv_out", enc.conv_out)

    put("decoder.conv_in", dec.conv_in)
    put_mid("decoder.mid", dec.mid_block)
    levels = len(dec.up_blocks)
    for i, block in enumerate(dec.up_blocks):
        level = levels - 1 - i  # BFL numbers decoder levels by resolution, diffusers by execution order
        for j, r in enumerate(block.resnets):
            put_resnet(f"decoder.up.{level}.block.{j}", r)
        if block.upsamplers is not None:
            put(f"decoder.up.{level}.upsample.conv", block.upsamplers[0].conv)
    put("decoder.norm_out", dec.conv_norm_out)
    put("decoder.conv_out", dec.conv_out)
    return out


def diffusers_state_dict(vae) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}


def write_tiny_flux_vae(
    directory: Path, layout: str = "bfl", seed: int = 0, cfg: FluxVAEConfig = TINY_FLUX_VAE_CONFIG
) -> Path:
    """Write a tiny FLUX VAE under `directory` and return the path to give `load_flux_vae`.

    `layout`: "bfl" (`ae.safetensors`), "diffusers" (single diffusers-layout file), or "diffusers_folder"
    (a repo root with `vae/config.json` + `vae/diffusion_pytorch_model.safetensors`; the root is returned).
    """
    vae = tiny_diffusers_vae(seed, cfg)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "bfl":
        path = directory / "ae.safetensors"
        save_file(bfl_state_dict(vae), str(path))
        return path
    if layout == "diffusers":
        path = directory / "flux_vae_diffusers.safetensors"
        save_file(diffusers_state_dict(vae), str(path))
        return path
    if layout == "diffusers_folder":
        folder = directory / "vae"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2))
        save_file(diffusers_state_dict(vae), str(folder / "diffusion_pytorch_model.safetensors"))
        return directory
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
