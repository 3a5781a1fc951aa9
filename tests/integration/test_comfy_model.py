"""The Kandinsky 5 DiT as a ComfyUI MODEL, in a real headless ComfyUI: ComfyUI's LoRA loader, KSampler and
SamplerCustomAdvanced run it (T2V and T2I) and match our Sampler, and a MODEL that is not ours is refused.

Latents are compared exactly through ComfyUI's SaveLatent. KSampler (euler, simple, cfg = the variant's guidance)
and the Kandinsky 5 Sampler take the same noise (ComfyUI's prepare_noise and our make_noise draw the same CPU
generator) and, at step counts dividing 1000, the same sigmas; ksampler_check.py measures both in one process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import comfy_graphs as graphs
import pytest
import torch
from comfy_server import CLIP, FLUX_VAE, FRAMES, HUNYUAN_VAE, QWEN, H, W
from safetensors.torch import load_file, save_file
from test_lora_comfyui import write_comfy_format_lora

pytestmark = pytest.mark.integration

T2V, T2I = "t2v-lite-sft-5s", "t2i-lite"
PROMPT = "a red fox in the snow"
STEPS = 4  # divides 1000: ComfyUI's simple scheduler gives exactly our flow_timesteps
GUIDANCE = {T2V: 5.0, T2I: 3.5}  # the variants' official guidance (what the Sampler's -1 means)
# what ksampler_check.py measures for KSampler vs our Sampler in one process, with a margin (it saw 1.7e-5 on
# latents of magnitude ~40)
LATENT_BOUND = 1e-3


def dit_name(comfyui, variant: str) -> str:
    return comfyui.models["dit"][variant].name


def base_graph(comfyui, variant: str, prefix: str, length: int) -> dict:
    """Our loaders + Text Encode (node 4) + our Sampler (node 5) -> SaveLatent (node 7); node 1 is the DiT loader."""
    vae = HUNYUAN_VAE if variant == T2V else FLUX_VAE
    g = graphs.text2x(dit_name(comfyui, variant), vae, QWEN, CLIP, PROMPT, W, H, length, seed=5, steps=STEPS,
                      variant=variant)  # fmt: skip
    del g["6"]
    g["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}}
    return g


def with_ksampler(g: dict, variant: str, model: list) -> dict:
    """Replace our Sampler (node 5) by an empty latent (node 10) -> KSampler on `model`."""
    if variant == T2V:
        g["10"] = {"class_type": "EmptyHunyuanLatentVideo",
                   "inputs": {"width": W, "height": H, "length": FRAMES, "batch_size": 1}}  # fmt: skip
    else:  # ComfyUI's 4-channel SD latent: KSampler widens it to the model's 16 channels
        g["10"] = {"class_type": "EmptyLatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}}
    g["5"] = {
        "class_type": "KSampler",
        "inputs": {"model": model, "seed": 5, "steps": STEPS, "cfg": GUIDANCE[variant], "sampler_name": "euler",
                   "scheduler": "simple", "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["10", 0],
                   "denoise": 1.0},
    }  # fmt: skip
    return g


def latent(comfyui, entry: dict, node: str = "7") -> torch.Tensor:
    item = entry["outputs"][node]["latents"][0]
    path = comfyui.base / "output" / item["subfolder"] / item["filename"]
    x = load_file(str(path))["latent_tensor"]
    return x if x.ndim == 5 else x[:, :, None]  # image latents from KSampler: [B, 16, H, W]


def test_comfyuis_lora_loader_into_our_sampler_matches_a_hand_merged_dit(comfyui):
    """our loader -> LoraLoaderModelOnly -> our Sampler gives the latent of the DiT merged by hand."""
    dit = comfyui.models["dit"][T2V]
    base = load_file(str(dit))
    deltas = write_comfy_format_lora(comfyui.base / "models" / "loras" / "k5_comfy_format.safetensors", base, 3)
    strength = 0.6
    merged = {k: (v + strength * deltas[k] if k in deltas else v).contiguous() for k, v in base.items()}
    merged_name = "k5_lite_t2v_merged_for_comfy_lora.safetensors"
    save_file(merged, str(dit.parent / merged_name))

    plain = latent(comfyui, comfyui.run(base_graph(comfyui, T2V, "m_plain", FRAMES)))
    g = base_graph(comfyui, T2V, "m_merged", FRAMES)
    g["1"]["inputs"]["dit_name"] = merged_name
    want = latent(comfyui, comfyui.run(g))
    g = base_graph(comfyui, T2V, "m_lora", FRAMES)
    g["20"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["1", 0], "lora_name": "k5_comfy_format.safetensors", "strength_model": strength},
    }
    g["5"]["inputs"]["model"] = ["20", 0]  # fmt: skip
    got = latent(comfyui, comfyui.run(g))
    assert (want - plain).abs().max() > 0.5  # the LoRA changes the output: the comparison can fail
    assert (got - want).abs().max() < 1e-3, float((got - want).abs().max())


def test_magcache_lora_and_compile_stacked_give_the_hand_merged_dit(comfyui):
    """our loader -> MagCache (threshold 0: every block runs) -> Load Kandinsky 5 LoRA -> Compile (eager) -> our
    Sampler: the MODEL clones keep each other's options and the LoRA, and the latent is the hand-merged DiT's."""
    dit = comfyui.models["dit"][T2V]
    base = load_file(str(dit))
    deltas = write_comfy_format_lora(comfyui.base / "models" / "loras" / "k5_stacked.safetensors", base, 6)
    merged = {k: (v + 0.9 * deltas[k] if k in deltas else v).contiguous() for k, v in base.items()}
    save_file(merged, str(dit.parent / "k5_lite_t2v_merged_for_stack.safetensors"))
    g = base_graph(comfyui, T2V, "s_merged", FRAMES)
    g["1"]["inputs"]["dit_name"] = "k5_lite_t2v_merged_for_stack.safetensors"
    want = latent(comfyui, comfyui.run(g))
    g = base_graph(comfyui, T2V, "s_stacked", FRAMES)
    g["20"] = {
        "class_type": "K5MagCache",
        "inputs": {"model": ["1", 0], "threshold": 0.0, "K": 2, "retention": 0.2, "ratios": ""},
    }
    g["21"] = {
        "class_type": "K5LoadLoRA",
        "inputs": {"model": ["20", 0], "lora_name": "k5_stacked.safetensors", "strength": 0.9},
    }
    g["22"] = {"class_type": "K5Compile", "inputs": {"model": ["21", 0], "mode": "default", "backend": "eager"}}
    g["5"]["inputs"]["model"] = ["22", 0]  # fmt: skip
    entry = comfyui.run(g)
    got = latent(comfyui, entry)
    assert (got - want).abs().max() < 1e-3, float((got - want).abs().max())
    assert "Kandinsky 5 MagCache: 0 of" in comfyui.log.read_text()  # MagCache ran (and skipped nothing)


def test_our_lora_node_into_ksampler_t2v_matches_our_sampler(comfyui):
    """our loader -> Load Kandinsky 5 LoRA -> KSampler (T2V, euler / simple / cfg 5) equals our Sampler on the same
    LoRA'd model and seed."""
    dit = comfyui.models["dit"][T2V]
    write_comfy_format_lora(comfyui.base / "models" / "loras" / "k5_for_ksampler.safetensors", load_file(str(dit)), 4)
    lora = {"class_type": "K5LoadLoRA",
            "inputs": {"model": ["1", 0], "lora_name": "k5_for_ksampler.safetensors", "strength": 0.8}}  # fmt: skip
    ours = base_graph(comfyui, T2V, "k_ours", FRAMES)
    ours["20"] = lora
    ours["5"]["inputs"]["model"] = ["20", 0]
    want = latent(comfyui, comfyui.run(ours))
    g = with_ksampler(base_graph(comfyui, T2V, "k_ksampler", FRAMES), T2V, ["20", 0])
    g["20"] = lora
    got = latent(comfyui, comfyui.run(g))
    assert got.shape == want.shape == (1, 16, (FRAMES - 1) // 4 + 1, H // 8, W // 8)
    assert (got - want).abs().max() < LATENT_BOUND, float((got - want).abs().max())


def test_ksampler_t2i_from_comfyuis_empty_latent_image_matches_our_sampler(comfyui):
    want = latent(comfyui, comfyui.run(base_graph(comfyui, T2I, "i_ours", 1)))
    got = latent(comfyui, comfyui.run(with_ksampler(base_graph(comfyui, T2I, "i_ksampler", 1), T2I, ["1", 0])))
    assert got.shape == want.shape == (1, 16, 1, H // 8, W // 8)
    assert (got - want).abs().max() < LATENT_BOUND, float((got - want).abs().max())


def test_sampler_custom_advanced_runs_the_model_as_ksampler_does(comfyui):
    g = with_ksampler(base_graph(comfyui, T2V, "c_ksampler", FRAMES), T2V, ["1", 0])
    want = latent(comfyui, comfyui.run(g))
    g = base_graph(comfyui, T2V, "c_custom", FRAMES)
    g["10"] = {
        "class_type": "EmptyHunyuanLatentVideo",
        "inputs": {"width": W, "height": H, "length": FRAMES, "batch_size": 1},
    }
    g["11"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}}
    g["12"] = {
        "class_type": "CFGGuider",
        "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["4", 1], "cfg": GUIDANCE[T2V]},
    }
    g["13"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["14"] = {
        "class_type": "BasicScheduler",
        "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": STEPS, "denoise": 1.0},
    }
    g["5"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["11", 0], "guider": ["12", 0],
              "sampler": ["13", 0], "sigmas": ["14", 0], "latent_image": ["10", 0]}}  # fmt: skip
    got = latent(comfyui, comfyui.run(g))
    assert (got - want).abs().max() < 1e-5, float((got - want).abs().max())


def execution_error(comfyui, graph: dict) -> dict:
    status, body = comfyui.queue(graph)
    assert status == 200, body
    entry = comfyui.wait(body["prompt_id"])
    assert entry["status"]["status_str"] == "error", entry["status"]
    return dict(entry["status"]["messages"])["execution_error"]


def test_i2v_model_in_ksampler_points_at_our_sampler(comfyui):
    g = with_ksampler(base_graph(comfyui, T2V, "i2v_ksampler", FRAMES), T2V, ["1", 0])
    g["1"]["inputs"].update(dit_name=dit_name(comfyui, "i2v-lite-5s"), variant="i2v-lite-5s")
    err = execution_error(comfyui, g)
    assert err["exception_type"].endswith("InputError"), err
    assert "i2v-lite-5s is an I2V model and needs its start image" in err["exception_message"]
    assert "Kandinsky 5 Sampler" in err["exception_message"]


def test_comfyuis_own_kandinsky5_model_of_no_released_architecture_is_refused_by_our_sampler(comfyui):
    """ComfyUI's native Kandinsky 5 (v0.33.0's UNETLoader recognises the official keys) is a MODEL our Sampler runs
    (tests/integration/test_native_models.py); one whose tensors fit no released variant gets a message saying so
    (the Sampler needs the variant's settings)."""
    from tiny import TINY_ARCHS, make_tiny_dit_file

    if "Kandinsky5ImageToVideo" not in comfyui.request("/object_info")[1]:
        pytest.skip("this ComfyUI has no native Kandinsky 5 model")
    # the native model reads its head size and text widths as the released ones: 64-wide heads, 3584 / 768 text
    arch = dataclasses.replace(TINY_ARCHS["lite"], model_dim=128, time_dim=64, ff_dim=256, axes_dims=(16, 24, 24))
    name = "k5_tiny_for_native.safetensors"
    make_tiny_dit_file(comfyui.base / "models" / "diffusion_models" / name, arch)
    g = base_graph(comfyui, T2V, "native", FRAMES)
    g["30"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}
    g["5"]["inputs"]["model"] = ["30", 0]
    err = execution_error(comfyui, g)
    assert err["exception_type"].endswith("WeightsError"), err
    message = err["exception_message"]
    assert message.startswith("Kandinsky 5 Sampler: ") and "no released Kandinsky 5 variant has" in message, message


def test_ksampler_matches_our_sampler_in_one_process_with_the_measured_bounds():
    """ksampler_check.py in ComfyUI's interpreter: sigmas equal ours where the step count divides 1000 (4, 50), the
    latents of 4 steps within LATENT_BOUND, process_in / process_out exactly latent_to_dit / dit_to_latent, the
    flow shift the variant's scheduler scale, memory_required our estimate, NABLA applied by KSampler."""
    if not os.environ.get("COMFYUI_DIR"):
        pytest.skip("COMFYUI_DIR is not set")
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    cmd = [python, str(Path(__file__).parent / "ksampler_check.py")]
    run = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, run.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    for variant, shift in ((T2V, 10.0), (T2I, 3.0)):
        r = result[variant]
        assert r["noise_equal"] and r["shift"] == shift, r
        assert r["sigma_diff"] == 0.0 and r["schedules"]["50"] < 1e-6, r
        assert r["process_in_diff"] == 0.0 and r["process_out_diff"] == 0.0, r
        assert r["latent_diff"] < LATENT_BOUND, r
        assert r["memory_required"] == r["our_estimate"] > 0, r
    # NABLA auto in KSampler: the 10 s variant samples with its NABLA (not dense), and a size NABLA cannot tile is
    # a clear InputError
    n = result["nabla"]
    assert n["ok"]["diff_nabla"] < 1e-4 and n["ok"]["diff_dense"] > 1e-2, n
    assert n["bad"].startswith("InputError: width=96 must be a multiple of 128 px"), n
    assert "set NABLA off with the Kandinsky 5 NABLA node" in n["bad"], n
    print(json.dumps(result))
