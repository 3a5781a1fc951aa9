"""Options are model patches and compose (issue 12): in a real ComfyUI, MagCache + LoRA + Compile + NABLA stacked in
one order and in the reverse order give the same latent, equal to the equivalent single settings (the LoRA merged
into the DiT file by hand, then MagCache and NABLA), and the loaded model that another branch of the same prompt uses
as is keeps its own options and weights: its latent is the plain run's, bit for bit."""

from __future__ import annotations

import re

import comfy_graphs as graphs
import pytest
import torch
from comfy_server import CLIP, FRAMES, HUNYUAN_VAE, QWEN
from safetensors.torch import load_file, save_file
from test_lora_comfyui import write_official

pytestmark = pytest.mark.integration

VARIANT = "t2v-lite-sft-5s"  # CFG (both branches) and official MagCache ratios
W, H = 256, 128  # NABLA tiles: 2 x 1 per frame
STEPS, SEED, STRENGTH = 8, 11, 0.8
PROMPT = "a paper boat on a puddle"
NABLA = {"P": 0.1, "wT": 1, "wH": 1, "wW": 1}  # sparse enough that NABLA changes the result


def dynamic_nabla(comfyui) -> bool:
    status, info = comfyui.request("/object_info/K5Nabla")
    assert status == 200, info
    return info["K5Nabla"]["input"]["required"]["mode"][0] == "COMFY_DYNAMICCOMBO_V3"


def nabla_inputs(comfyui, model: list) -> dict:
    """Kandinsky 5 NABLA, mode on: P and the windows are the DynamicCombo's `mode.P` ... on v0.33.0, plain inputs on
    releases without DynamicCombo."""
    prefix = "mode." if dynamic_nabla(comfyui) else ""
    return {"model": model, "mode": "on", **{prefix + k: v for k, v in NABLA.items()}}


def option(kind: str, comfyui, model: list, lora: str) -> dict:
    if kind == "magcache":
        return {"class_type": "K5MagCache", "inputs": {"model": model, "threshold": 0.12, "K": 2, "retention": 0.2,
                                                        "ratios": ""}}  # fmt: skip
    if kind == "lora":
        return {"class_type": "K5LoadLoRA", "inputs": {"model": model, "lora_name": lora, "strength": STRENGTH}}
    if kind == "compile":
        return {"class_type": "K5Compile", "inputs": {"model": model, "mode": "default", "backend": "eager"}}
    return {"class_type": "K5Nabla", "inputs": nabla_inputs(comfyui, model)}


def branch(g: dict, comfyui, name: str, chain: list[str], lora: str) -> None:
    """Loader 1 -> the option nodes of `chain` in that order -> a sampler like node 5 -> SaveLatent `L<name>`."""
    source = ["1", 0]
    for i, kind in enumerate(chain):
        node = f"{name}{i}"
        g[node] = option(kind, comfyui, source, lora)
        source = [node, 0]
    g[f"{name}s"] = {"class_type": "K5Sampler", "inputs": {**g["5"]["inputs"], "model": source}}
    g[f"L{name}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"{name}s", 0], "filename_prefix": name}}


def base_graph(dit: str, prefix: str, variant: str = VARIANT) -> dict:
    g = graphs.text2x(dit, HUNYUAN_VAE, QWEN, CLIP, PROMPT, W, H, FRAMES, seed=SEED, steps=STEPS, prefix=prefix,
                      variant=variant)  # fmt: skip
    g["L5"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"{prefix}_plain"}}
    return g


def latents(comfyui, g: dict) -> tuple[dict[str, torch.Tensor], str]:
    start = len(comfyui.log.read_text(errors="replace"))
    entry = comfyui.run(g, timeout=600)
    out = {}
    for node in g:
        if node.startswith("L"):
            (info,) = entry["outputs"][node]["latents"]
            path = comfyui.base / "output" / info["subfolder"] / info["filename"]
            out[node] = load_file(str(path))["latent_tensor"]
    return out, comfyui.log.read_text(errors="replace")[start:]


def reused(log: str) -> list[str]:
    return re.findall(r"Kandinsky 5 MagCache: (\d+ of \d+) DiT calls reused", log)


def test_options_stack_in_any_order_as_single_settings_and_leave_the_shared_model_alone(comfyui, tiny_variants):
    dit = comfyui.models["dit"][VARIANT]
    base = load_file(str(dit))
    lora_path, deltas = write_official(comfyui.base / "models" / "loras" / "k5_compose", base, seed=3)
    lora = "k5_compose/model.safetensors"
    merged = {k: (v + STRENGTH * deltas[k] if k in deltas else v).contiguous() for k, v in base.items()}
    merged_name = "k5_lite_t2v_compose_merged.safetensors"
    save_file(merged, str(dit.parent / merged_name))

    # first the plain graph alone, before any LoRA or option exists (variant auto: another loader signature, so
    # ComfyUI's cache cannot hand this result to the next prompt's plain sampler)
    plain, _ = latents(comfyui, base_graph(dit.name, "plain", variant="auto"))
    # one prompt: the plain sampler 5 on loader 1, and two stacks on the same loader in opposite orders
    g = base_graph(dit.name, "compose")
    branch(g, comfyui, "a", ["magcache", "lora", "compile", "nabla"], lora)
    branch(g, comfyui, "b", ["nabla", "compile", "lora", "magcache"], lora)
    got, log = latents(comfyui, g)
    assert len(reused(log)) == 2 and reused(log)[0] == reused(log)[1] != f"0 of {2 * STEPS}", reused(log)

    # the equivalent single settings: the LoRA merged into the file, MagCache, NABLA (no Compile: eager math)
    single = base_graph(merged_name, "single")
    branch(single, comfyui, "m", ["magcache", "nabla"], lora)
    branch(single, comfyui, "n", ["magcache"], lora)  # the same without NABLA
    want, single_log = latents(comfyui, single)

    assert torch.equal(got["La"], got["Lb"]), float((got["La"] - got["Lb"]).abs().max())
    assert reused(single_log)[-1] == reused(log)[0]
    diff = (got["La"] - want["Lm"]).abs().max().item()
    scale = want["Lm"].abs().max().item()
    print(f"stacked vs single settings: latent max diff {diff:.2e} (latent max {scale:.2f})")
    assert diff < 1e-3 * scale, diff
    # the options and the LoRA change the result, so the comparisons above can fail (measured: 42.4 and 0.48)
    changed, by_nabla = (got["La"] - plain["L5"]).abs().max().item(), (want["Lm"] - want["Ln"]).abs().max().item()
    print(f"stacked vs plain: {changed:.3f}; with vs without NABLA: {by_nabla:.3f}")
    assert changed > 1.0 and by_nabla > 0.05  # NABLA is on in the stacks
    # the loader's own model, used as is in the same prompt: no option, no LoRA leaked into it
    assert torch.equal(got["L5"], plain["L5"]), float((got["L5"] - plain["L5"]).abs().max())
    assert lora_path.is_file()
