"""The same seed gives the same latent in one server (issue 13): the I2V Sampler queued again, with VAE Encode's
start latent and the rest upstream cached, writes the same LATENT bit for bit. Two MP4s of it may still differ:
ComfyUI's SaveVideo encodes with libx264 (PyAV), which now and then codes the same frames differently (seen up to
57/255 on the tiny models' noise-like frames), so the runs are compared on their latents, saved with ComfyUI's
SaveLatent."""

from __future__ import annotations

import comfy_graphs as graphs
import numpy as np
import pytest
import torch
from comfy_server import CLIP, FRAMES, HUNYUAN_VAE, QWEN, H, W
from PIL import Image
from test_comfyui import PROMPT, dit_name

pytestmark = pytest.mark.integration


def cached_nodes(entry: dict) -> set[str]:
    return set(dict(entry["status"]["messages"]).get("execution_cached", {}).get("nodes", []))


def test_the_same_i2v_sampler_queued_again_gives_the_same_latent(comfyui):
    image = comfyui.base / "input" / "same_seed_start.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(image)
    # The sampler runs again each time (one input written otherwise, the same setting); everything upstream of it
    # is cached: width = height = 0 follow the start latent (W x H), guidance 5 / scheduler scale 10 are
    # i2v-lite-5s's own (-1 / 0 say "the variant's").
    changes = [{}, {"width": 0, "height": 0}, {"guidance": 5.0}, {"scheduler_scale": 10.0}, {}]
    latents, starts = [], []
    for k, change in enumerate(changes):
        g = graphs.text2x(dit_name(comfyui, "i2v-lite-5s"), HUNYUAN_VAE, QWEN, CLIP, PROMPT, W, H, FRAMES, seed=7,
                          prefix=f"same_seed/{k}")  # fmt: skip
        graphs.with_start_image(g, image.name, W, H)
        g["5"]["inputs"].update(change)
        if k == len(changes) - 1:
            g["5"]["inputs"]["seed"] = 8  # the comparison can tell latents apart
        g["L"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"same_seed/L{k}"}}
        g["S"] = {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": f"same_seed/S{k}"}}
        entry = comfyui.run(g, timeout=300)
        if k:
            assert {"1", "2", "3", "4", "8", "9"} <= cached_nodes(entry) and "5" not in cached_nodes(entry)
        latents.append(comfyui.saved_latent(entry, "L"))
        starts.append(comfyui.saved_latent(entry, "S"))
    differ = {k: float((latents[k] - latents[0]).abs().max()) for k in range(1, len(changes) - 1)}
    assert not any(differ.values()), f"same seed, other latents (run: max |diff|): {differ}"
    changed = [k for k in range(1, len(changes)) if not torch.equal(starts[k], starts[0])]
    assert not changed, f"runs {changed}: VAE Encode's cached start latent was changed"
    assert (latents[-1] - latents[0]).abs().mean() > 0.05
