"""LoRA / LoKr / LoHa files in every trainer's key format: made by the real libraries (peft, lycoris-lora) on the tiny
DiT, or renamed from them as each trainer writes its keys; the patched weights equal a hand merge and the DiT output
equals the library's own adapted forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import TINY_ARCHS, make_inputs, make_tiny_dit, make_tiny_dit_file, tiny_variant

from kandinsky_core.errors import WeightsError
from kandinsky_core.loading import load_dit
from kandinsky_core.lora import apply_lora, read_lora
from kandinsky_core.variants import get_variant

ARCH = TINY_ARCHS["lite"]
# what the official trainer targets (configs/trainer/lora_video.yaml of the kandinsky-5 LoRA trainer)
OFFICIAL_TARGETS = [
    f"{att}.{proj}" for att in ("self_attention", "cross_attention") for proj in ("to_query", "to_key", "to_value",
                                                                              "out_layer")
] + ["feed_forward.in_layer", "feed_forward.out_layer"]  # fmt: skip
RANK, ALPHA = 4, 8.0  # scale 2: a wrong alpha default shows


def forward(model, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_inputs(ARCH, seed=seed))


def peft_model(seed: int = 1):
    """A PEFT-adapted tiny DiT with random (non-zero) A and B, rounded to bf16 so the saved file holds them exactly."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=OFFICIAL_TARGETS, init_lora_weights=False)
    pm = get_peft_model(make_tiny_dit(ARCH), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_((p * 0.5).bfloat16().float())
    return pm.eval(), cfg


def save_official(pm, cfg, folder: Path, trigger: str = "k5style") -> Path:
    """As the official trainer's save_adapter_model: the lora_A / lora_B entries of the PEFT model's state dict in
    bf16, the trigger in the safetensors metadata, the LoRA config as config_lora.json beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.bfloat16().contiguous() for k, v in pm.state_dict().items() if "lora_A" in k or "lora_B" in k}
    path = folder / "model.safetensors"
    save_file(sd, str(path), {"trigger": trigger})
    (folder / "config_lora.json").write_text(
        json.dumps({"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules)})
    )
    return path


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    pm, cfg = peft_model()
    path = save_official(pm, cfg, tmp_path_factory.mktemp("official"))
    return pm, path


def hand_merge(base: dict[str, torch.Tensor], factors: dict[str, tuple], strength: float) -> dict[str, torch.Tensor]:
    """{module.weight: W + strength * scale * B @ A} for {module: (B, A, scale)}."""
    out = dict(base)
    for m, (b, a, scale) in factors.items():
        out[f"{m}.weight"] = base[f"{m}.weight"] + strength * scale * (b.float() @ a.float())
    return out


def official_factors(path: Path) -> dict[str, tuple]:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    mods = {k[len("base_model.model.") : k.index(".lora_A")] for k in sd if ".lora_A" in k}
    return {
        m: (sd[f"base_model.model.{m}.lora_B.default.weight"], sd[f"base_model.model.{m}.lora_A.default.weight"])
        for m in mods
    }


def scales(lora) -> set[float]:
    return {round(t.scale, 6) for t in lora.targets.values()}


def assert_weights(model, expected: dict[str, torch.Tensor]) -> None:
    sd = model.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------------------------------
# official kandinsky-5 trainer (PEFT)


def test_official_format_equals_peft_forward_and_hand_merge_and_reads_the_trigger(official):
    pm, path = official
    lora = read_lora(path)
    assert lora.format.startswith("official") and lora.trigger == "k5style" and not lora.notes
    assert len(lora.targets) == len(OFFICIAL_TARGETS) * (ARCH.num_visual_blocks) + 4 * ARCH.num_text_blocks + 2
    assert {t.scale for t in lora.targets.values()} == {ALPHA / RANK}

    base = make_tiny_dit(ARCH)
    expected = hand_merge(
        base.state_dict(), {m: (*ba, ALPHA / RANK) for m, ba in official_factors(path).items()}, strength=1.0
    )
    apply_lora(base, lora, 1.0)
    assert_weights(base, expected)
    # PEFT's own adapted forward (lora_alpha / r scaling) is the reference for what the LoRA means
    torch.testing.assert_close(forward(base), forward(pm), rtol=1e-4, atol=1e-4)


def test_strength_zero_is_unchanged_and_weights_are_linear_in_strength(official):
    _, path = official
    lora = read_lora(path)
    ref = make_tiny_dit(ARCH)
    models = {}
    for s in (0.0, 1.0, -0.5, 2.5):
        models[s] = make_tiny_dit(ARCH)
        apply_lora(models[s], lora, s)
    torch.testing.assert_close(forward(models[0.0]), forward(ref), rtol=0, atol=0)
    assert not torch.allclose(forward(models[1.0]), forward(ref), atol=1e-3)
    w0, w1 = ref.state_dict(), models[1.0].state_dict()
    for s in (-0.5, 2.5):
        ws = models[s].state_dict()
        for k in w0:
            torch.testing.assert_close(ws[k] - w0[k], s * (w1[k] - w0[k]), rtol=1e-5, atol=1e-6)


def test_loras_stack(official, tmp_path):
    pm2, cfg = peft_model(seed=7)
    other = read_lora(save_official(pm2, cfg, tmp_path / "b"))
    lora = read_lora(official[1])
    stacked = make_tiny_dit(ARCH)
    apply_lora(stacked, lora, 0.7)
    apply_lora(stacked, other, -1.2)
    base = make_tiny_dit(ARCH).state_dict()
    f1 = {m: (*ba, 0.7 * ALPHA / RANK) for m, ba in official_factors(official[1]).items()}
    f2 = official_factors(tmp_path / "b" / "model.safetensors")
    expected = hand_merge(hand_merge(base, f1, 1.0), {m: (*ba, -1.2 * ALPHA / RANK) for m, ba in f2.items()}, 1.0)
    assert_weights(stacked, expected)


def test_official_without_config_uses_scale_one_and_says_so(official, tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "lone.safetensors"
    save_file(load_file(str(official[1])), str(path))
    lora = read_lora(path)
    assert {t.scale for t in lora.targets.values()} == {1.0}
    assert lora.trigger == "" and "config_lora.json" in lora.notes[0]


def test_peft_config_default_alpha_is_peft_default(official, tmp_path):
    """A config_lora.json without lora_alpha means peft.LoraConfig's default (8), whatever r is."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    path = tmp_path / "model.safetensors"
    save_file(load_file(str(official[1])), str(path))
    (tmp_path / "config_lora.json").write_text(json.dumps({"r": RANK, "use_rslora": True}))
    cfg = LoraConfig(r=RANK, use_rslora=True)
    assert scales(read_lora(path)) == {round(cfg.lora_alpha / RANK**0.5, 6)}


# ---------------------------------------------------------------------------------------------------------------------
# the other LoRA formats: the official file's factors renamed as each trainer writes its keys


def _factors(official_path: Path):
    return {m: (b.float(), a.float()) for m, (b, a) in official_factors(official_path).items()}


def kohya_name(module: str) -> str:
    return module.replace(".", "_")


FORMATS = {
    # name: (key builder {module: (B, A)} -> state dict, alpha written (None = absent), expected scale, extra files)
    "diffusers": (lambda m, b, a: {f"transformer.{m}.lora_A.weight": a, f"transformer.{m}.lora_B.weight": b}, None,
                  1.0),
    "musubi": (lambda m, b, a: {f"lora_unet_{kohya_name(m)}.lora_down.weight": a,
                                f"lora_unet_{kohya_name(m)}.lora_up.weight": b}, 2.0, 2.0 / RANK),
    "musubi_no_alpha": (lambda m, b, a: {f"lora_unet_{kohya_name(m)}.lora_down.weight": a,
                                         f"lora_unet_{kohya_name(m)}.lora_up.weight": b}, None, 1.0),
    "musubi_alpha_zero": (lambda m, b, a: {f"lora_unet_{kohya_name(m)}.lora_down.weight": a,
                                           f"lora_unet_{kohya_name(m)}.lora_up.weight": b}, 0.0, 1.0),
    "comfyui": (lambda m, b, a: {f"diffusion_model.{m}.lora_down.weight": a, f"diffusion_model.{m}.lora_up.weight": b},
                1.0, 1.0 / RANK),
    "comfyui_no_alpha": (lambda m, b, a: {f"diffusion_model.{m}.lora_down.weight": a,
                                          f"diffusion_model.{m}.lora_up.weight": b}, None, 1.0),
    "bare_peft": (lambda m, b, a: {f"{m}.lora_A.default.weight": a, f"{m}.lora_B.default.weight": b}, None,
                  ALPHA / RANK),
    "bare_peft_no_adapter_name": (lambda m, b, a: {f"{m}.lora_A.weight": a, f"{m}.lora_B.weight": b}, None,
                                  ALPHA / RANK),
}  # fmt: skip
ALPHA_PREFIX = {"musubi": "lora_unet_", "comfyui": "diffusion_model."}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_trainer_format_patches_as_a_hand_merge(fmt, official, tmp_path):
    build, alpha, scale = FORMATS[fmt]
    factors = _factors(official[1])
    sd = {}
    for m, (b, a) in factors.items():
        sd.update(build(m, b, a))
        if alpha is not None:
            prefix = ALPHA_PREFIX[fmt.split("_")[0]]
            sd[f"{prefix}{kohya_name(m) if prefix == 'lora_unet_' else m}.alpha"] = torch.tensor(alpha)
    path = tmp_path / f"{fmt}.safetensors"
    save_file(sd, str(path))
    if fmt.startswith("bare_peft"):  # PEFT's save_pretrained writes adapter_config.json beside the weights
        (tmp_path / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA}))
    lora = read_lora(path)
    assert scales(lora) == {round(scale, 6)}, lora.format
    assert set(lora.targets) == set(factors)
    model = make_tiny_dit(ARCH)
    apply_lora(model, lora, 0.8)
    assert_weights(model, hand_merge(make_tiny_dit(ARCH).state_dict(), {m: (*f, scale) for m, f in factors.items()},
                                     0.8))  # fmt: skip


def test_diffusers_alpha_from_its_adapter_metadata(official, tmp_path):
    sd = {}
    for m, (b, a) in _factors(official[1]).items():
        sd.update(FORMATS["diffusers"][0](m, b, a))
    path = tmp_path / "pytorch_lora_weights.safetensors"
    meta = {"transformer.r": RANK, "transformer.lora_alpha": 2.0}
    save_file(sd, str(path), {"lora_adapter_metadata": json.dumps(meta)})
    assert {t.scale for t in read_lora(path).targets.values()} == {2.0 / RANK}


# ---------------------------------------------------------------------------------------------------------------------
# LyCORIS LoKr / LoHa, made by lycoris-lora


def lycoris_model(algo: str, strength: float, seed: int = 3, **kw):
    from lycoris import create_lycoris

    torch.manual_seed(seed)
    model = make_tiny_dit(ARCH)
    net = create_lycoris(model, strength, linear_dim=4, linear_alpha=2.0, algo=algo, **kw)
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval(), net


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_lycoris_file_equals_lycoris_forward_and_hand_merge(algo, tmp_path):
    kw = {"factor": 4} if algo == "lokr" else {}
    adapted, net = lycoris_model(algo, 1.0, **kw)
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    lora = read_lora(path)
    assert lora.format == "LyCORIS" and {t.kind for t in lora.targets.values()} == {algo}
    if algo == "lokr":  # both LoKr layouts occur on the tiny DiT: full w2 (scale 1) and factorised w2 (alpha / rank)
        assert {t.scale for t in lora.targets.values()} == {1.0, 0.5}

    sd = net.state_dict()
    base = make_tiny_dit(ARCH).state_dict()
    expected = dict(base)
    for m in lora.targets:
        key = f"lycoris_{m.replace('.', '_')}"
        f = {k.split(".")[-1]: v for k, v in sd.items() if k.startswith(key + ".")}
        if algo == "lokr":
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
            d = torch.kron(w1, w2) * (1.0 if "lokr_w2" in f else float(f["alpha"]) / f["lokr_w2_b"].shape[0])
        else:
            d = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
            d = d * float(f["alpha"]) / f["hada_w1_b"].shape[0]
        expected[f"{m}.weight"] = base[f"{m}.weight"] + 0.6 * d
    model = make_tiny_dit(ARCH)
    apply_lora(model, lora, 0.6)
    assert_weights(model, expected)
    # strength 1 gives LyCORIS's own adapted forward
    full = make_tiny_dit(ARCH)
    apply_lora(full, lora, 1.0)
    torch.testing.assert_close(forward(full), forward(adapted), rtol=1e-4, atol=1e-4)
    zero = make_tiny_dit(ARCH)
    apply_lora(zero, lora, 0.0)
    torch.testing.assert_close(forward(zero), forward(make_tiny_dit(ARCH)), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# wrong files: clear errors naming what the LoRA fits


def test_a_pro_lora_on_lite_names_both_sizes(tmp_path):
    path = tmp_path / "pro_lora.safetensors"
    m = "visual_transformer_blocks.0.self_attention.to_query"
    save_file({f"base_model.model.{m}.lora_A.default.weight": torch.zeros(2, 4096),
               f"base_model.model.{m}.lora_B.default.weight": torch.zeros(4096, 2)}, str(path))  # fmt: skip
    lora = read_lora(path)
    with pytest.raises(WeightsError, match=r"model_dim 4096 \(Kandinsky 5 Pro\).*Video Lite \(model_dim 1792\)"):
        lora.check(get_variant("t2v-lite-sft-5s").arch)
    lora.check(get_variant("t2v-pro-sft-5s-sd").arch)  # fits Pro


def test_a_lora_for_another_model_is_refused(tmp_path):
    path = tmp_path / "flux_lora.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(24, 2)}, str(path))  # fmt: skip
    with pytest.raises(WeightsError, match="not a LoRA for the Kandinsky 5 DiT.*another model"):
        read_lora(path)


def test_a_lora_for_more_blocks_and_a_damaged_lora_are_refused(official, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(official[1]))
    more = {k.replace("visual_transformer_blocks.1.", "visual_transformer_blocks.5."): v for k, v in sd.items()}
    save_file(more, str(tmp_path / "more.safetensors"))
    with pytest.raises(WeightsError, match="visual_transformer_blocks.5.* does not exist.*another\\s+Kandinsky"):
        apply_lora(make_tiny_dit(ARCH), read_lora(tmp_path / "more.safetensors"))
    broken = {k: v for k, v in sd.items() if "visual_transformer_blocks.0.feed_forward.in_layer.lora_B" not in k}
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(WeightsError, match="lacks its lora_B / lora_up factor.*incomplete"):
        read_lora(tmp_path / "broken.safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# the core loaders' DiT, float8 storage included


def test_apply_to_load_dit_result_bf16_and_fp8(official, tmp_path):
    dit = make_tiny_dit_file(tmp_path / "dit.safetensors", ARCH)
    lora = read_lora(official[1])
    ref, _ = load_dit(dit, variant=tiny_variant(ARCH), dtype=torch.float32)
    expected = hand_merge(ref.state_dict(), {m: (*ba, ALPHA / RANK) for m, ba in official_factors(official[1]).items()},
                          1.0)  # fmt: skip
    model, v = load_dit(dit, variant=tiny_variant(ARCH), dtype=torch.float32)
    apply_lora(model, lora, 1.0)
    assert_weights(model, expected)

    fp8, _ = load_dit(dit, variant=tiny_variant(ARCH), dtype=torch.bfloat16, fp8=True)
    apply_lora(fp8, lora, 1.0)
    m = "visual_transformer_blocks.0.self_attention.to_query"
    layer = fp8.get_submodule(m)
    assert layer.weight.dtype == torch.float8_e4m3fn
    got = layer.weight.float() * layer.weight_scale
    want = expected[f"{m}.weight"]
    assert (got - want).abs().max() < 0.07 * want.abs().max()  # float8's 3 mantissa bits


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_musubi_loha_lokr_keys_read_as_lycoris(algo, tmp_path):
    """musubi-tuner's LoHa / LoKr for Kandinsky 5 use LyCORIS's factor names under its lora_unet_ prefix."""
    from safetensors.torch import load_file

    _, net = lycoris_model(algo, 1.0, **({"factor": 4} if algo == "lokr" else {}))
    net.save_weights(str(tmp_path / "ly.safetensors"), torch.float32, {})
    sd = load_file(str(tmp_path / "ly.safetensors"))
    save_file({"lora_unet_" + k[len("lycoris_") :]: v for k, v in sd.items()}, str(tmp_path / "musubi.safetensors"))
    ly, mu = read_lora(tmp_path / "ly.safetensors"), read_lora(tmp_path / "musubi.safetensors")
    assert mu.format == "musubi-tuner" and set(mu.targets) == set(ly.targets)
    for m, t in ly.targets.items():
        assert mu.targets[m].kind == t.kind and mu.targets[m].scale == t.scale
        torch.testing.assert_close(mu.targets[m].delta(), t.delta(), rtol=0, atol=0)
