"""Bad input and faults in a real ComfyUI (issue 11): ComfyUI's single-file text encoders, sizes and values refused
at validation (a 400 with node_errors) instead of after sampling, files outside the model folders, and messages
that name the input and the fix instead of raw exceptions."""

from __future__ import annotations

import comfy_graphs as graphs
import numpy as np
import pytest
from comfy_server import CLIP, CLIP_FILE, FLUX_VAE, FRAMES, HUNYUAN_VAE, QWEN, QWEN_FILE, QWEN_FP8_FILE, H, W
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


def validation_errors(comfyui, graph: dict) -> str:
    """The node_errors of a refused prompt (400), as one string to search."""
    status, body = comfyui.queue(graph)
    assert status == 400, (status, str(body)[:2000])
    assert body["error"]["type"] == "prompt_outputs_failed_validation", body
    return " | ".join(
        f"{node}: {e['message']} {e.get('details', '')}"
        for node, errs in body["node_errors"].items()
        for e in errs["errors"]
    )


def t2v(comfyui, **sampler) -> dict:
    return graphs.text2x(dit_name(comfyui, "t2v-lite-sft-5s"), HUNYUAN_VAE, QWEN, CLIP, PROMPT, W, H, FRAMES, seed=0,
                         prefix="never_written", **sampler)  # fmt: skip


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(guidance=float("nan")), "guidance=nan is not allowed: give a finite number from -1 to 30"),
        (dict(scheduler_scale=float("nan")), "scheduler_scale=nan is not allowed: give a finite number from 0 to 50"),
        (dict(guidance=float("inf")), "guidance=inf is not allowed"),
    ],
)
def test_non_finite_guidance_or_scheduler_scale_is_refused_at_validation(comfyui, change, expected):
    errors = validation_errors(comfyui, t2v(comfyui, **change))
    assert "5:" in errors and expected in errors, errors
    assert not list((comfyui.base / "output").glob("never_written*"))
