"""The speed nodes inside a real ComfyUI: MagCache, MagCache Calibrate, Compile and fp8 weights, each
run in the same prompt as the plain graph (same DiT file, prompt and seed) and compared with it.

Exact where the feature must not change the result (MagCache with threshold 0, Calibrate: the sampled
LATENTs, written with ComfyUI's SaveLatent, are bit-identical), within float noise for Compile, and a measured,
bounded error where the feature trades accuracy for speed (MagCache on, fp8 weights). Those two also equal
kandinsky_core's own MagCache / fp8 run, so the bound is the feature's error, not the node's.

Tiny random DiTs are far less smooth over the steps than the released ones, so the errors measured here are larger
than on real models; the bounds only pin down today's behaviour (see the figures in each test).
"""

from __future__ import annotations

import json
import re

import comfy_graphs as graphs
import numpy as np
import pytest
import torch
from comfy_server import CLIP, FRAMES, HUNYUAN_VAE, QWEN, H, W
from safetensors.torch import load_file
from test_comfyui import PROMPT, assert_frames_match, dit_name, read_frames

from kandinsky_core import pipeline
from kandinsky_core.download import ModelPaths
from kandinsky_core.magcache import MagCacheParams, MagCalibration

pytestmark = pytest.mark.integration

VARIANT = "t2v-lite-sft-5s"  # CFG (guidance 5): both branches, official MagCache ratios
STEPS, SEED = 8, 21


def speed_graph(comfyui, prefix: str, nodes: dict, model: list, weight_dtype: str = "fp32") -> dict:
    """The plain T2V graph (sampler 5 -> decode 6 -> SaveImage 7, SaveLatent "L") plus a second sampler "s5" on
    `model` (the output of `nodes`) with the same inputs -> decode "s6" -> SaveImage "s7", SaveLatent "sL"."""
    g = graphs.text2x(
        dit_name(comfyui, VARIANT), HUNYUAN_VAE, QWEN, CLIP, PROMPT, W, H, FRAMES, seed=SEED, steps=STEPS,
        prefix="speed_plain",
    )  # fmt: skip
    g["L"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "speed_plain"}}
    g.update(nodes)
    g["s5"] = {"class_type": "K5Sampler", "inputs": {**g["5"]["inputs"], "model": model}}
    if weight_dtype != "fp32":  # its own Load DiT "s1", and bf16 text encoders as kandinsky_core uses with fp8
        g["s1"] = {**g["1"], "inputs": {**g["1"]["inputs"], "weight_dtype": weight_dtype}}
        g["s2"] = {**g["2"], "inputs": {**g["2"]["inputs"], "dtype": "bf16"}}
        g["s4"] = {**g["4"], "inputs": {**g["4"]["inputs"], "text_encoders": ["s2", 0], "model": ["s1", 0]}}
        g["s5"]["inputs"].update(positive=["s4", 0], negative=["s4", 1])
    g["s6"] = {"class_type": "K5VAEDecode", "inputs": {**g["6"]["inputs"], "samples": ["s5", 0]}}
    g["s7"] = {"class_type": "SaveImage", "inputs": {"images": ["s6", 0], "filename_prefix": prefix}}
    g["sL"] = {"class_type": "SaveLatent", "inputs": {"samples": ["s5", 0], "filename_prefix": prefix}}
    return g


def run(comfyui, g: dict) -> tuple[dict, str]:
    """Runs the graph; returns {"plain"/"speed": (frames, latent)} and what the server logged meanwhile."""
    start = len(comfyui.log.read_text(errors="replace"))
    entry = comfyui.run(g)
    log = comfyui.log.read_text(errors="replace")[start:]
    out = {}
    for key, image_node, latent_node in (("plain", "7", "L"), ("speed", "s7", "sL")):
        frames = read_frames(comfyui.output_files(entry, image_node))
        (info,) = entry["outputs"][latent_node]["latents"]
        latent = load_file(str(comfyui.base / "output" / info["subfolder"] / info["filename"]))["latent_tensor"]
        out[key] = (frames, latent)
    return out, log


def frame_error(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    diff = np.abs(a - b)
    return int(diff.max()), float(diff.mean())


def reference(comfyui, **kw) -> torch.Tensor:
    """kandinsky_core on the same files, prompt, seed and steps: uint8 frames [F, H, W, 3]."""
    m = comfyui.models
    request = pipeline.resolve_request(
        VARIANT, PROMPT, negative=graphs.NEGATIVE, width=W, height=H, frames=FRAMES, seed=SEED, steps=STEPS
    )
    paths = ModelPaths(dit=m["dit"][VARIANT], qwen=m["qwen"], clip=m["clip"], vae=m["hunyuan_vae"])
    kw.setdefault("dtype", torch.float32)
    return pipeline.run(request, paths, device="cpu", vae_dtype=torch.float32, progress=False, **kw)


def reused_calls(log: str) -> list[tuple[int, int]]:
    """(reused, total) DiT calls of each MagCache run, as the node logs them."""
    return [(int(a), int(b)) for a, b in re.findall(r"Kandinsky 5 MagCache: (\d+) of (\d+) DiT calls reused", log)]


def magcache_node(threshold: float) -> dict:
    inputs = {"model": ["1", 0], "threshold": threshold, "K": 2, "retention": 0.2, "ratios": ""}
    return {"mc": {"class_type": "K5MagCache", "inputs": inputs}}


def test_magcache_threshold_zero_skips_nothing_and_is_exact(comfyui):
    out, log = run(comfyui, speed_graph(comfyui, "speed_mc0", magcache_node(0.0), ["mc", 0]))
    assert reused_calls(log) == [(0, 2 * STEPS)]
    assert torch.equal(out["speed"][1], out["plain"][1])
    assert np.array_equal(out["speed"][0], out["plain"][0])


def test_magcache_on_matches_kandinsky_core_and_its_error_is_bounded(comfyui, tiny_variants):
    """Official ratios and controls (threshold 0.12, K 2, retention 0.2) over 8 steps: 8 of the 16 DiT calls reuse
    the cached residual. Measured against the plain run (tiny random DiT, whose residuals are far less steady than
    a trained model's): 8-bit frames max 108, mean 14.8; latent max 9.5. The node equals kandinsky_core's MagCache
    run (same skips, same frames)."""
    out, log = run(comfyui, speed_graph(comfyui, "speed_mc", magcache_node(0.12), ["mc", 0]))
    assert reused_calls(log) == [(8, 2 * STEPS)]
    worst, mean = frame_error(out["speed"][0], out["plain"][0])
    latent_worst = float((out["speed"][1] - out["plain"][1]).abs().max())
    print(f"MagCache vs plain: frames max {worst}, mean {mean:.2f}; latent max {latent_worst:.3f}")
    assert 0 < mean and worst <= 120 and mean < 16.5, (worst, mean)
    assert_frames_match(out["speed"][0], reference(comfyui, magcache=MagCacheParams.for_variant(VARIANT)))


def test_magcache_calibrate_measures_the_ratios_without_changing_the_result(comfyui, tiny_variants):
    inputs = {"model": ["1", 0], "filename_prefix": "speed_cal"}
    nodes = {"cal": {"class_type": "K5MagCacheCalibrate", "inputs": inputs}}
    out, log = run(comfyui, speed_graph(comfyui, "speed_cal_frames", nodes, ["cal", 0]))
    assert torch.equal(out["speed"][1], out["plain"][1])
    written = json.loads((comfyui.base / "output" / f"speed_cal_{VARIANT}_{STEPS}steps.json").read_text())
    assert written["variant"] == VARIANT and written["steps"] == STEPS and written["cfg"] is True
    calibration = MagCalibration()
    reference(comfyui, magcache=calibration)
    assert len(written["ratios"]) == 2 * (STEPS - 1)
    np.testing.assert_allclose(written["ratios"], calibration.ratios(), rtol=1e-4)
    assert all(r > 0 for r in written["ratios"])


def test_compile_matches_the_plain_run_within_float_noise(comfyui):
    """torch.compile (inductor, C++ on the CPU) really compiles here (no fallback warning in the server log) and
    the sampled latent equals the eager one within float noise (measured: max 1.2e-5)."""
    inputs = {"model": ["1", 0], "mode": "default", "backend": "inductor"}
    nodes = {"co": {"class_type": "K5Compile", "inputs": inputs}}
    out, log = run(comfyui, speed_graph(comfyui, "speed_compile", nodes, ["co", 0]))
    assert "torch.compile failed" not in log, log[-3000:]
    print(f"Compile vs plain: latent max {float((out['speed'][1] - out['plain'][1]).abs().max()):.2e}")
    torch.testing.assert_close(out["speed"][1], out["plain"][1], rtol=0, atol=1e-4)
    worst, _ = frame_error(out["speed"][0], out["plain"][0])
    assert worst <= 1


def test_fp8_weights_match_kandinsky_core_and_their_error_is_bounded(comfyui, tiny_variants):
    """Load DiT with weight dtype fp8_e4m3fn: block matrices stored in float8 and computed in bf16 through
    comfy.ops layers (text encoders in bf16 too). Equal to kandinsky_core's fp8 run; against the plain fp32 run
    (measured, float8 weights and bf16 compute together): 8-bit frames max 39, mean 4.4."""
    g = speed_graph(comfyui, "speed_fp8", {}, ["s1", 0], weight_dtype="fp8_e4m3fn")  # "s1": an fp8 Load DiT
    out, log = run(comfyui, g)
    worst, mean = frame_error(out["speed"][0], out["plain"][0])
    print(f"fp8 vs plain: frames max {worst}, mean {mean:.2f}")
    assert 0 < mean and worst <= 45 and mean < 5, (worst, mean)
    assert_frames_match(out["speed"][0], reference(comfyui, fp8=True, dtype=torch.bfloat16))
