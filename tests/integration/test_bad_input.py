"""Bad input and faults in a real ComfyUI (issue 11): ComfyUI's single-file text encoders, sizes and values refused
at validation (a 400 with node_errors) instead of after sampling, files outside the model folders, and messages
that name the input and the fix instead of raw exceptions."""

from __future__ import annotations

import comfy_graphs as graphs
import numpy as np
import pytest
from comfy_server import CLIP_FILE, FLUX_VAE, QWEN_FILE, QWEN_FP8_FILE, H, W
from PIL import Image
from test_comfyui import PROMPT, dit_name

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("qwen", [QWEN_FILE, QWEN_FP8_FILE])
def test_single_file_text_encoders_run_with_comfyuis_bundled_tokenizers(comfyui, qwen):
    """ComfyUI's comfy/ has no __init__.py (comfy.__file__ is None): the tokenizers are found all the same."""
    g = graphs.text2x(dit_name(comfyui, "t2i-lite"), FLUX_VAE, qwen, CLIP_FILE, PROMPT, W, H, 1, seed=3,
                      prefix=f"single_{qwen[:-12]}")  # fmt: skip
    files = comfyui.output_files(comfyui.run(g), "7")
    assert len(files) == 1
    image = np.asarray(Image.open(files[0]).convert("RGB"))
    assert image.shape == (H, W, 3) and image.std() > 5
