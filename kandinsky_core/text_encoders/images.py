"""Images for Qwen2.5-VL's vision tower: what its image processor does to a picture, in torch."""

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor

from ..errors import InputError

IMAGE_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"

# Qwen2.5-VL-7B-Instruct preprocessor_config.json: what its image processor does to a picture.
QWEN_IMAGE_PROCESSING = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": (0.48145466, 0.4578275, 0.40821073),
    "image_std": (0.26862954, 0.26130258, 0.27577711),
}


def as_uint8(image: Tensor) -> Tensor:
    """`[3, H, W]` (or `[1, 3, H, W]`) in 0..1 float or 0..255 uint8 -> uint8 `[3, H, W]`."""
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[0] != 3:
        raise InputError(f"image of shape {tuple(image.shape)} is not allowed: pass [3, H, W] RGB (0..1 or uint8).")
    if image.dtype == torch.uint8:
        return image
    return (image.float().clamp(0, 1) * 255).round().to(torch.uint8)


def resize(image: Tensor, height: int, width: int, mode: str) -> Tensor:
    """Antialiased resize of a uint8 image, rounded back to uint8 (torchvision's tensor resize)."""
    if (height, width) == tuple(image.shape[-2:]):
        return image
    out = torch.nn.functional.interpolate(image[None].float(), size=(height, width), mode=mode, antialias=True)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def pil_quarter(image: Tensor) -> Tensor:
    """PIL's default (bicubic) resize to a quarter of each side, as the official i2i expansion does."""
    import numpy as np
    from PIL import Image

    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    pil = pil.resize((pil.width // 4, pil.height // 4), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def smart_size(height: int, width: int) -> tuple[int, int]:
    """Qwen2-VL's resize target: multiples of patch*merge (28) with the pixel count inside [min, max]."""
    cfg = QWEN_IMAGE_PROCESSING
    factor = cfg["patch_size"] * cfg["merge_size"]
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"image of {width}x{height} is not allowed: the aspect ratio must be under 200.")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > cfg["max_pixels"]:
        beta = math.sqrt(height * width / cfg["max_pixels"])
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < cfg["min_pixels"]:
        beta = math.sqrt(cfg["min_pixels"] / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def qwen_image_patches(image: Tensor) -> tuple[Tensor, Tensor]:
    """uint8 `[3, H, W]` -> (pixel_values `[N, 3*2*14*14]` float32, image_grid_thw `[1, 3]`) for the vision tower."""
    cfg = QWEN_IMAGE_PROCESSING
    p, m, tp = cfg["patch_size"], cfg["merge_size"], cfg["temporal_patch_size"]
    image = resize(image, *smart_size(*image.shape[-2:]), mode="bicubic")
    mean = torch.tensor(cfg["image_mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["image_std"]).view(3, 1, 1)
    pixels = (image.float() / 255 - mean) / std
    frames = pixels[None].expand(tp, -1, -1, -1)  # a still image fills the temporal patch with copies
    patches = rearrange(
        frames, "(t tp) c (hb m1 p1) (wb m2 p2) -> (t hb wb m1 m2) (c tp p1 p2)", tp=tp, m1=m, m2=m, p1=p, p2=p
    )
    grid = torch.tensor([[1, image.shape[-2] // p, image.shape[-1] // p]])
    return patches.contiguous(), grid


def expand_image_pads(text: str, grids: Sequence[Tensor]) -> str:
    """One `<|image_pad|>` per image becomes as many as the vision tower outputs for it (grid / merge^2)."""
    parts = text.split("<|image_pad|>")
    if len(parts) - 1 != len(grids):
        raise InputError(f"{len(parts) - 1} image placeholders but {len(grids)} images were given.")
    merge = QWEN_IMAGE_PROCESSING["merge_size"] ** 2
    out = parts[0]
    for grid, part in zip(grids, parts[1:], strict=True):
        out += "<|image_pad|>" * (int(grid.prod()) // merge) + part
    return out
