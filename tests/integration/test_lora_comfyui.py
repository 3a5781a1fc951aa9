"""Load Kandinsky 5 LoRA inside a real headless ComfyUI: an official-trainer-format LoRA and a LyCORIS LoKr (made by
lycoris-lora) change the sampler's output exactly as a DiT file merged by hand does; stacking works too."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import comfy_graphs as graphs
import numpy as np
import pytest
import torch
from comfy_server import CLIP, FRAMES, HUNYUAN_VAE, QWEN, H, W, tiny_archs
from PIL import Image
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.integration

VARIANT = "t2v-lite-sft-5s"
PROMPT = "a lighthouse in a storm"
RANK, ALPHA = 2, 6.0


def write_official(folder: Path, base: dict[str, torch.Tensor], seed: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """Official-trainer layout (PEFT keys, bf16, trigger in the metadata, config_lora.json); returns the file and
    {weight key: alpha/r * B @ A} computed here."""
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for key, w in base.items():
        if not key.endswith(("to_query.weight", "feed_forward.in_layer.weight")):
            continue
        m = key[: -len(".weight")]
        a = (torch.randn(RANK, w.shape[1], generator=g) * 0.5).bfloat16()
        b = (torch.randn(w.shape[0], RANK, generator=g) * 0.5).bfloat16()
        sd[f"base_model.model.{m}.lora_A.default.weight"] = a
        sd[f"base_model.model.{m}.lora_B.default.weight"] = b
        deltas[key] = ALPHA / RANK * (b.float() @ a.float())
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"), {"trigger": "lighthouse_style"})
    (folder / "config_lora.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA}))
    return folder / "model.safetensors", deltas


def write_lokr(path: Path, arch, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoKr made by lycoris-lora on the DiT; returns {weight key: its delta} from the kron of the saved factors."""
    from lycoris import create_lycoris
    from tiny import make_tiny_dit

    torch.manual_seed(5)
    model = make_tiny_dit(arch)
    model.load_state_dict(base)
    net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2.0, algo="lokr", factor=4)
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    path.parent.mkdir(parents=True, exist_ok=True)
    net.save_weights(str(path), torch.float32, {})
    sd = load_file(str(path))
    deltas = {}
    for key in base:
        stem = "lycoris_" + key[: -len(".weight")].replace(".", "_")
        if f"{stem}.alpha" not in sd:
            continue
        f = {k[len(stem) + 1 :]: v for k, v in sd.items() if k.startswith(stem + ".")}
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
        scale = 1.0 if "lokr_w2" in f and "lokr_w1" in f else float(f["alpha"]) / f["lokr_w2_b"].shape[0]
        deltas[key] = scale * torch.kron(w1, w2)
    return deltas


def write_comfy_format_lora(path: Path, base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A LoRA in ComfyUI's own trainer layout (diffusion_model.<module>.lora_up / lora_down / alpha), which
    LoraLoaderModelOnly reads through its model_lora_keys_unet map; returns {weight key: alpha/r * up @ down}."""
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    rank, alpha = 2, 3.0
    for key, w in base.items():
        if not key.endswith(("to_query.weight", "to_value.weight", "feed_forward.out_layer.weight")):
            continue
        stem = "diffusion_model." + key[: -len(".weight")]
        down = torch.randn(rank, w.shape[1], generator=g) * 0.5
        up = torch.randn(w.shape[0], rank, generator=g) * 0.5
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = down, up
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
        deltas[key] = alpha / rank * (up @ down)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return deltas


def graph(dit: str, loras: list[tuple[str, float]], seed: int, prefix: str) -> dict:
    g = graphs.text2x(dit, HUNYUAN_VAE, QWEN, CLIP, PROMPT, W, H, FRAMES, seed=seed, prefix=prefix, variant=VARIANT)
    source = ["1", 0]
    for i, (name, strength) in enumerate(loras):
        node = str(20 + i)
        g[node] = {"class_type": "K5LoadLoRA", "inputs": {"model": source, "lora_name": name,
                                                                   "strength": strength}}  # fmt: skip
        source = [node, 0]
    g["5"]["inputs"]["model"] = source
    g["4"]["inputs"]["model"] = source
    return g


def frames(comfyui, g: dict) -> tuple[np.ndarray, dict]:
    entry = comfyui.run(g)
    files = comfyui.output_files(entry, "7")
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(np.int16), entry


def test_official_and_lycoris_loras_change_the_output_as_a_hand_merged_dit(comfyui, tiny_variants):
    dit = comfyui.models["dit"][VARIANT]
    base = load_file(str(dit))
    loras = comfyui.base / "models" / "loras"
    official, d_official = write_official(loras / "k5_official", base, seed=1)
    d_lokr = write_lokr(loras / "k5_lokr.safetensors", dataclasses.replace(tiny_archs()[VARIANT]), base)
    s1, s2 = 0.8, -0.6
    merged = dict(base)
    for k, d in d_official.items():
        merged[k] = merged[k] + s1 * d
    for k, d in d_lokr.items():
        merged[k] = merged[k] + s2 * d
    merged_name = "k5_lite_t2v_hand_merged.safetensors"
    save_file({k: v.contiguous() for k, v in merged.items()}, str(dit.parent / merged_name))

    plain, _ = frames(comfyui, graph(dit.name, [], 4, "lora_plain"))
    want, _ = frames(comfyui, graph(merged_name, [], 4, "lora_merged"))
    got, entry = frames(comfyui, graph(dit.name, [("k5_official/model.safetensors", s1),
                                                   ("k5_lokr.safetensors", s2)], 4, "lora_nodes"))  # fmt: skip
    assert np.abs(want - plain).mean() > 2  # the LoRAs change the output visibly: the comparison can fail
    diff = np.abs(got - want)
    assert diff.max() <= 1 and diff.mean() < 0.05, f"max {diff.max()}, mean {diff.mean():.4f}"
    assert entry["outputs"]["20"]["text"] == ["lighthouse_style"]
    # strength 0 leaves the output unchanged (and ComfyUI restored the weights the patched runs changed)
    zero, _ = frames(comfyui, graph(dit.name, [("k5_official/model.safetensors", 0.0)], 4, "lora_zero"))
    assert np.array_equal(zero, plain)


def test_lora_patches_through_comfyuis_full_lowvram_and_prefetch_paths(tmp_path):
    """ComfyUI's own code applies the node's patches: a full load (patch_model), the per-layer low-VRAM patch that
    partial loading uses, and the adapter as its GPU prefetch rebuilds it all give kandinsky_core's merge; unpatching
    restores the weights exactly."""
    import os
    import subprocess
    import sys

    from tiny import TINY_ARCHS, make_tiny_dit

    if not os.environ.get("COMFYUI_DIR"):
        pytest.skip("COMFYUI_DIR is not set")
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    base = make_tiny_dit(TINY_ARCHS["lite"]).state_dict()
    official, _ = write_official(tmp_path / "official", base, seed=2)
    lokr = tmp_path / "lokr.safetensors"
    write_lokr(lokr, TINY_ARCHS["lite"], base)
    comfy_format = tmp_path / "comfy_format.safetensors"
    write_comfy_format_lora(comfy_format, base, 3)
    for path, how in ((official, "ours"), (lokr, "ours"), (comfy_format, "comfy"), (comfy_format, "ours")):
        cmd = [python, str(Path(__file__).parent / "lora_patch_check.py"), str(path), "0.7", how]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
        assert lines, run.stderr[-3000:]
        r = json.loads(lines[-1][len("RESULT ") :])
        assert r["keys"] == r["targets"] > 0, r
        assert r["full"] < 1e-5 and r["lowvram"] < 1e-5 and r.get("prefetch", 0.0) < 1e-5, r
        assert r["restored"] == 0.0, r
        print(path.name, how, r)
