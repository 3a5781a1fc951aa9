"""Text encoders: Qwen2.5-VL-7B (last hidden state under the official prompt templates) and CLIP ViT-L/14 (pooled).

Both are built with transformers from configs shipped here and loaded from safetensors in any layout users have:
the official Hugging Face folders (`text_encoder/` sharded Qwen, `text_encoder2/` full CLIP) and ComfyUI's single
files (`qwen_2.5_vl_7b.safetensors`, `qwen_2.5_vl_7b_fp8_scaled.safetensors`, `clip_l.safetensors`).
The Qwen vision tower and LM head are read from disk only when an image must be seen or a prompt expanded.

One concern a module:

| module | what it holds |
| --- | --- |
| `templates.py` | the official prompt templates, content kinds, crop starts |
| `sources.py` | a text encoder's safetensors file(s): shards, fp8 layers, dequantised reading, strict checks |
| `qwen.py` | Qwen2.5-VL-7B config, key layouts, loading (language model; vision tower and LM head on demand) |
| `clip.py` | CLIP ViT-L/14 text config, key layouts, loading |
| `tokenizers.py` | finding and building both tokenizers |
| `images.py` | images for Qwen's vision tower (its image processor, in torch) |
| `encoders.py` | `TextEncoders`: prompts -> the DiT's text conditioning |
| `expansion.py` | prompt expansion: the official instructions, generation settings, the beautifier |

This file states the public surface and `load_text_encoders`, which reads the default configs from here (so a
test harness may replace `QWEN25_VL_7B_CONFIG` / `CLIP_L_TEXT_CONFIG` on this package).
"""

import json
import os
from pathlib import Path

import torch

from .clip import CLIP_L_TEXT_CONFIG, CLIP_MAX_LENGTH, load_clip
from .encoders import TextEncoders
from .expansion import EXPAND_INSTRUCTIONS, QWEN_GENERATION, expand_prompt
from .images import QWEN_IMAGE_PROCESSING, qwen_image_patches, smart_size
from .qwen import QWEN25_VL_7B_CONFIG, load_qwen
from .sources import check_weight_files
from .templates import CONTENT_KINDS, OFFICIAL_CROP_START, PROMPT_TEMPLATES, crop_starts_for
from .tokenizers import load_clip_tokenizer, load_qwen_tokenizer

__all__ = [
    "CLIP_L_TEXT_CONFIG",
    "CLIP_MAX_LENGTH",
    "CONTENT_KINDS",
    "EXPAND_INSTRUCTIONS",
    "OFFICIAL_CROP_START",
    "PROMPT_TEMPLATES",
    "QWEN25_VL_7B_CONFIG",
    "QWEN_GENERATION",
    "QWEN_IMAGE_PROCESSING",
    "TextEncoders",
    "check_weight_files",
    "crop_starts_for",
    "expand_prompt",
    "load_clip_tokenizer",
    "load_qwen_tokenizer",
    "load_text_encoders",
    "qwen_image_patches",
    "smart_size",
]


def _config_for(path: Path, override: dict | None, default: dict) -> dict:
    if override is not None:
        return override
    if path.is_dir() and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    return default


def load_text_encoders(
    qwen_path: str | os.PathLike,
    clip_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    tokenizer_dir: str | os.PathLike | None = None,
    qwen_config: dict | None = None,
    clip_config: dict | None = None,
    clip_dtype: torch.dtype = torch.float32,
) -> TextEncoders:
    """Loads Qwen2.5-VL-7B (`qwen_path`: HF `text_encoder/` folder or ComfyUI single file, bf16 or fp8 scaled,
    dequantised to `dtype`) and CLIP-L (`clip_path`: HF `text_encoder2/` folder or `clip_l.safetensors`, run in
    `clip_dtype`, float32 as the official code does). Tokenizers come from `tokenizer_dir`, the weight folders or
    the local Hugging Face cache. `qwen_config` / `clip_config` replace the shipped configs (tests, other sizes)."""
    device = torch.device(device)
    qwen_path, clip_path = Path(qwen_path), Path(clip_path)
    qwen_tokenizer = load_qwen_tokenizer(tokenizer_dir, qwen_path)
    clip_tokenizer = load_clip_tokenizer(tokenizer_dir, clip_path)
    qwen, source = load_qwen(qwen_path, _config_for(qwen_path, qwen_config, QWEN25_VL_7B_CONFIG), dtype, device)
    clip = load_clip(clip_path, _config_for(clip_path, clip_config, CLIP_L_TEXT_CONFIG), clip_dtype, device)
    return TextEncoders(qwen, clip, qwen_tokenizer, clip_tokenizer, source, dtype)
