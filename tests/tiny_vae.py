"""Tiny random HunyuanVideo VAEs written to disk in the key layouts users have, for tests.

The diffusers layout comes from diffusers' own AutoencoderKLHunyuanVideo (so its names are real). The same
layout is the original Tencent one that `hunyuan_video_vae_bf16.safetensors` uses. The latent-diffusion ("ldm")
layout is what ComfyUI converts it to (comfy/diffusers_convert.py); it is produced here by our own mapping,
independent of the loader's.
"""

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from kandinsky_core.hunyuan_vae import HunyuanVAEConfig

TINY_DIFFUSERS_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "scaling_factor": 0.476986,
    "spatial_compression_ratio": 8,
    "temporal_compression_ratio": 4,
    "mid_block_add_attention": True,
}

TINY_CONFIG = HunyuanVAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)


def diffusers_vae(seed: int = 0):
    """diffusers' AutoencoderKLHunyuanVideo with the tiny config and every parameter random (norms included),
    scaled so activations stay O(1). Built-in tiling and frame-wise paths are switched off."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(**TINY_DIFFUSERS_CONFIG).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    vae.use_tiling = False
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return vae


def diffusers_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in diffusers_vae(seed).state_dict().items()}


def write_diffusers_folder(folder: Path, seed: int = 0) -> Path:
    """A diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors), as save_pretrained writes it."""
    diffusers_vae(seed).save_pretrained(folder, safe_serialization=True)
    return folder


def write_diffusers_file(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """One .safetensors in the diffusers / original HunyuanVideo layout (like hunyuan_video_vae_bf16.safetensors)."""
    save_file({k: v.to(dtype) for k, v in diffusers_state(seed).items()}, str(path))
    return path


def write_ldm_file(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """One .safetensors in ComfyUI's latent-diffusion layout (decoder.up.N.block.M, mid.attn_1 as 1x1x1 convs)."""
    save_file({k: v.to(dtype) for k, v in diffusers_to_ldm(diffusers_state(seed)).items()}, str(path))
    return path


def diffusers_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    levels = len(TINY_DIFFUSERS_CONFIG["block_out_channels"])
    out = {}
    for key, value in state.items():
        new = key
        m = re.match(r"decoder\.up_blocks\.(\d+)\.", new)
        if m:  # diffusers counts decoder levels from the bottom, ldm from the top
            new = f"decoder.up.{levels - 1 - int(m.group(1))}." + new[m.end() :]
        new = re.sub(r"^encoder\.down_blocks\.", "encoder.down.", new)
        new = new.replace(".resnets.", ".block.").replace(".downsamplers.0.", ".downsample.")
        new = new.replace(".upsamplers.0.", ".upsample.")
        new = new.replace("mid_block.block.0.", "mid.block_1.").replace("mid_block.block.1.", "mid.block_2.")
        new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
        for a, b in (
            ("group_norm.", "norm."),
            ("to_q.", "q."),
            ("to_k.", "k."),
            ("to_v.", "v."),
            ("to_out.0.", "proj_out."),
        ):
            new = new.replace(f"attn_1.{a}", f"attn_1.{b}")
        new = new.replace("conv_shortcut.", "nin_shortcut.").replace("conv_norm_out.", "norm_out.")
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", new):
            value = value.reshape(*value.shape, 1, 1, 1)
        out[new] = value
    return out
