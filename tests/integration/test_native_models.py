"""Our model patches on ComfyUI's own Kandinsky 5 model (v0.33.0's Load Diffusion Model; v0.3.64 has none)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# float32 noise of two implementations of the same forward at model_dim 1792 (measured 2.4e-6 dense, 2.6e-6 NABLA
# on outputs of magnitude 5.7); NABLA changes the output by 2.2e-2 there, so the bound separates the two
NOISE = 1e-4


def run_check(plant: str = "", *extra: str) -> dict:
    if not os.environ.get("COMFYUI_DIR"):
        pytest.skip("COMFYUI_DIR is not set")
    src = Path(os.environ["COMFYUI_DIR"])
    if not (src / "comfy" / "ldm" / "kandinsky5").is_dir():
        pytest.skip(f"ComfyUI at {src} has no native Kandinsky 5 model (it came with v0.4; use v0.33.0)")
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    cmd = [python, str(Path(__file__).parent / "native_nabla_check.py"), *extra] + ([f"plant={plant}"] if plant else [])
    with tempfile.TemporaryDirectory() as tmp:  # the check writes ~1 GB real-width files: none may stay behind
        env = dict(os.environ, OMP_NUM_THREADS="1", K5_SCRATCH_DIR=tmp)
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        left = [p.name for p in Path(tmp).iterdir()]
    lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, run.stderr[-3000:]
    assert not left, f"native_nabla_check.py left {left} in the temporary folder"
    return json.loads(lines[-1][len("RESULT ") :])


def test_nabla_patch_on_comfyuis_native_model_equals_our_dit_with_nabla():
    """A Lite-width, 2-block random DiT file that ComfyUI's own loader detects as Kandinsky 5: the native model with
    our NABLA patch (auto) gives our Kandinsky5DiT's NABLA velocity within float32 noise and the same block masks
    (tokens reordered into tiles inside the attention override and back); auto took the Lite 10 s variant and said
    so; on with P / windows equals ours with them; off is the native model untouched."""
    r = run_check()
    assert r["kind"] == "Kandinsky5", r
    assert r["dense_diff"] < NOISE, r  # the two models agree before any patch
    assert r["masks"] == r["our_masks"] == 2 and r["masks_equal"], r
    assert r["nabla_diff"] < NOISE and r["on_diff"] < NOISE, r
    assert r["nabla_vs_dense"] > 100 * NOISE, r  # NABLA really ran
    assert r["off_diff"] == 0.0, r
    assert r["auto"] == "t2v-lite-sft-10s" and "P=0.9, windows wT=11 wH=3 wW=3" in r["said"], r
    assert r["calls"] == 4, r  # 2 visual self-attentions per sparse forward (auto, on); no text / cross attention


def test_magcache_patch_on_comfyuis_native_model_skips_the_official_schedule_through_ksampler():
    """KSampler's own sampling code (50 steps, cfg 5, positive and negative batched) on ComfyUI's native model with our
    MagCache option (Lite 10 s official ratios): the calls that reused the cached residual are exactly the ones the
    official magcache_forward loop skips; a second run starts afresh and gives the same latent."""
    from magcache_reference import official_rule

    from kandinsky_core.magcache import official_mag_ratios

    r = run_check("", "magcache")
    want = official_rule(official_mag_ratios("t2v-lite-sft-10s"), 50, True)
    assert sorted(map(tuple, r["skipped"])) == sorted(want), r
    # what really ran: the first visual block did not run exactly at those KSampler steps and branches
    assert [tuple(s) for s in r["not_run"]] == sorted(want), r
    assert len(want) > 40 and r["skipped_again"] == r["skipped"] and r["repeat_diff"] == 0.0, r


def test_i2i_edit_checkpoint_is_misdetected_by_comfyui_and_read_by_our_loader():
    """The I2I edit DiT (Image Lite width, 33 input channels: the edit latent and a mask are concatenated) is taken by
    ComfyUI's own loader for a video model (HunyuanVideo latents, shift 10: its Kandinsky5Image needs 16 input
    channels); our loader reads it as I2I Lite (FLUX latents, shift 3). docs/comfyui.md says to load it with Load
    Kandinsky 5 DiT; if ComfyUI starts detecting it, this test says so."""
    r = run_check("", "i2i")
    assert (r["comfy_class"], r["comfy_latent"], r["comfy_shift"]) == ("Kandinsky5", "HunyuanVideo", 10.0), r
    assert (r["ours"], r["ours_vae"], r["ours_shift"]) == ("i2i-lite", "flux", 3.0), r


def test_our_sampler_runs_comfyuis_native_model_as_it_runs_ours():
    """The Kandinsky 5 Sampler on ComfyUI's own model (comfy.sd.load_diffusion_model of a Lite-width, 2-block file)
    gives the latent it gives on Load Kandinsky 5 DiT's model of the same file: T2V with NABLA on (which moves the
    latent by 0.16, so NABLA is applied on both) and I2V with a start latent, within float32 noise (measured 3e-5 on
    latents of magnitude 51); ComfyUI's own unpadded CONDITIONING (no attention_mask) gives the same latent as ours
    with padding and a mask; a LoRA loaded by ComfyUI's loader and float8 weights stored by ComfyUI's loader apply."""
    r = run_check("", "sampler")
    bound = 1e-6 * r["scale"] * 10  # relative float32 noise of 3 steps through two implementations
    assert r["t2v_diff"] < bound and r["i2v_diff"] < bound, r
    assert r["nabla_vs_dense"] > 1e-2, r
    assert r["bare_diff"] == 0.0, r
    # a LoRA applied by ComfyUI's own loader to its model equals our loader's model of the hand-merged file
    assert r["lora_diff"] < bound and r["lora_effect"] > 1.0, r
    # float8 weights stored by ComfyUI's loader run (measured 4.7 from the float32 run on latents of magnitude 51)
    assert r["fp8_storage"] == "torch.float8_e4m3fn" and r["fp8_finite"] and 0 < r["fp8_diff"] < 0.25 * r["scale"], r


def test_ksampler_graph_on_comfyuis_own_model_with_our_nabla_node_is_sparse(comfyui):
    """Load Diffusion Model (UNETLoader) of a Lite-width, 1-block file -> Kandinsky 5 NABLA (on, P 0.5, windows 1;
    on random weights the official 0.9 / 11, 3, 3 keep 93% of this small grid) -> KSampler (2 steps, cfg 5) ->
    SaveLatent runs end to end in the real ComfyUI; every forward put the visual self-attention through NABLA (one
    per visual block, logged by the patch) and visited a measured share of the key blocks, well below all of them;
    the same graph without the NABLA node gives another latent."""
    import re

    from safetensors.torch import load_file, save_file
    from tiny import random_state_dict

    from kandinsky_core import variants

    if "Kandinsky5ImageToVideo" not in comfyui.request("/object_info")[1]:
        pytest.skip("this ComfyUI has no native Kandinsky 5 model")
    arch = dataclasses.replace(variants.LITE_VIDEO, num_text_blocks=1, num_visual_blocks=1)
    name = "k5_lite_width_for_native_nabla.safetensors"
    sd = {k: v.to(torch.bfloat16) for k, v in random_state_dict(arch, seed=3).items()}
    save_file(sd, str(comfyui.base / "models" / "diffusion_models" / name))

    def graph(prefix: str, nabla: bool) -> dict:
        g = {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}},
            "2": {"class_type": "K5TestRandomConditioning", "inputs": {"seed": 1, "tokens": 8}},
            "3": {"class_type": "K5TestRandomConditioning", "inputs": {"seed": 2, "tokens": 6}},
            "4": {"class_type": "EmptyHunyuanLatentVideo",
                  "inputs": {"width": 768, "height": 256, "length": 9, "batch_size": 1}},
            "5": {"class_type": "KSampler",
                  "inputs": {"model": ["6", 0] if nabla else ["1", 0], "seed": 5, "steps": 2, "cfg": 5.0,
                             "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0],
                             "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
            "7": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}},
        }  # fmt: skip
        if nabla:  # P and the windows are the DynamicCombo's mode.P ... where ComfyUI has it
            mode = comfyui.request("/object_info/K5Nabla")[1]["K5Nabla"]["input"]["required"]["mode"][0]
            prefix = "mode." if mode == "COMFY_DYNAMICCOMBO_V3" else ""
            tuning = {prefix + k: v for k, v in {"P": 0.5, "wT": 1, "wH": 1, "wW": 1}.items()}
            g["6"] = {"class_type": "K5Nabla", "inputs": {"model": ["1", 0], "mode": "on", **tuning}}
        return g

    def saved(entry: dict) -> torch.Tensor:
        item = entry["outputs"]["7"]["latents"][0]
        return load_file(str(comfyui.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]

    before = len(comfyui.log.read_text())
    sparse = saved(comfyui.run(graph("native_nabla", True)))
    log = comfyui.log.read_text()[before:]
    visits = re.findall(r"Kandinsky 5 NABLA: (\d+) visual self-attentions sparse, (\d+) of (\d+) key blocks", log)
    # 2 steps x (positive, negative): batched or not, every visual self-attention ran through NABLA
    assert visits and sum(int(n) for n, _, _ in visits) >= 2, log[-3000:]
    kept, total = sum(int(k) for _, k, _ in visits), sum(int(t) for _, _, t in visits)
    assert 0 < kept < 0.8 * total, (kept, total)
    print(f"NABLA on ComfyUI's own model in KSampler: {kept} of {total} key blocks visited ({kept / total:.1%})")
    dense = saved(comfyui.run(graph("native_dense", False)))
    assert sparse.shape == dense.shape and float((sparse - dense).abs().max()) > 1e-3
