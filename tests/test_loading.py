"""Safetensors header reading, variant detection on real shapes (meta device) and strict loading of tiny files."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import TINY_ARCHS, make_inputs, make_tiny_dit, make_tiny_dit_file, random_state_dict, tiny_variant

from kandinsky_core.errors import InputError, MissingFilesError, WeightsError
from kandinsky_core.loading import chosen_variant, detect_variant, load_dit, read_safetensors_header
from kandinsky_core.model import Kandinsky5DiT
from kandinsky_core.variants import VARIANTS, get_variant

torch.set_num_threads(2)


def real_header(name: str) -> dict:
    """The header of the released checkpoint for this variant: real names and shapes, no memory (meta device)."""
    with torch.device("meta"):
        sd = Kandinsky5DiT(get_variant(name).arch).state_dict()
    return {k: ("BF16", tuple(v.shape)) for k, v in sd.items()}


# ---------------------------------------------------------------- header
def test_header_reads_names_dtypes_shapes(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(2, 3, dtype=torch.bfloat16), "y": torch.zeros(4)}, str(p))
    assert read_safetensors_header(p) == {"x": ("BF16", (2, 3)), "y": ("F32", (4,))}


def test_header_errors(tmp_path):
    with pytest.raises(MissingFilesError, match="does not exist"):
        read_safetensors_header(tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError, match="is a folder"):
        read_safetensors_header(tmp_path)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(WeightsError, match=r"'short.safetensors' is 2 bytes long.*incomplete"):
        read_safetensors_header(short)
    big = tmp_path / "big.safetensors"
    big.write_bytes(struct.pack("<Q", 5000) + b'{"a": 1}')
    with pytest.raises(WeightsError, match=r"header length is 5000 bytes but the file has only 8 bytes"):
        read_safetensors_header(big)
    pt = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(3)}, pt)  # a zip pickle renamed to .safetensors
    with pytest.raises(WeightsError, match=r"not a safetensors file.*zip archive"):
        read_safetensors_header(pt)
    txt = tmp_path / "page.safetensors"
    txt.write_text("<html>404 Not Found</html>")
    with pytest.raises(WeightsError, match=r"not a safetensors file.*text file"):
        read_safetensors_header(txt)


def test_truncated_file_is_reported(tmp_path):
    p = make_tiny_dit_file(tmp_path / "kandinsky5lite_t2v_sft_5s.safetensors", TINY_ARCHS["lite"])
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"truncated: its tensors need \d+ bytes but the file has \d+"):
        read_safetensors_header(p)
    with pytest.raises(WeightsError, match="truncated"):
        load_dit(p, variant=tiny_variant(TINY_ARCHS["lite"]))


# ---------------------------------------------------------------- detection
def _expected_filename(name: str) -> str:
    v = get_variant(name)
    stem = Path(v.hf_filename).stem
    return f"{stem}_{v.quality}.safetensors" if v.family == "pro" else f"{stem}.safetensors"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_detects_every_variant_from_real_shapes(name):
    v = get_variant(name)
    header = real_header(name)
    det = detect_variant(header, filename=_expected_filename(name))
    assert det.variant == name
    assert det.arch == v.arch and name in det.candidates
    # same shapes, official file name: SD and HD Pro variants share a file, so both stay candidates
    det = detect_variant(header, filename=Path(v.hf_filename).name)
    if v.family == "pro":
        assert det.variant.replace("-hd", "-sd") == name.replace("-hd", "-sd")
        assert {name.replace("-hd", "-sd"), name.replace("-sd", "-hd")} <= set(det.candidates)
    else:
        assert det.variant == name


def test_candidates_share_shapes():
    det = detect_variant(real_header("t2v-lite-sft-5s"))
    assert det.variant == "t2v-lite-sft-5s"  # no file name: the table's first match
    assert set(det.candidates) == {n for n, v in VARIANTS.items() if v.family == "lite"}
    assert set(detect_variant(real_header("i2i-lite")).candidates) == {"i2i-lite", "i2i-lite-pretrain"}
    assert set(detect_variant(real_header("t2i-lite")).candidates) == {"t2i-lite", "t2i-lite-pretrain"}


@pytest.mark.parametrize(
    "family_of,filename,expected",
    [
        ("t2v-lite-sft-5s", "Kandinsky5-Lite-T2V-distilled-10s-fp8.safetensors", "t2v-lite-distilled16steps-10s"),
        ("t2v-lite-sft-5s", "k5_lite_no_cfg_5s_bf16.safetensors", "t2v-lite-nocfg-5s"),
        ("t2v-lite-sft-5s", "kandinsky5lite_i2v_5s.safetensors", "i2v-lite-5s"),
        ("t2v-lite-sft-5s", "kandinsky5LiteT2VPretrain10s.safetensors", "t2v-lite-pretrain-10s"),
        ("t2v-lite-sft-5s", "my_favourite_dit.safetensors", "t2v-lite-sft-5s"),
        ("t2v-pro-sft-5s-sd", "kandinsky5pro_i2v_sft_5s_HD.safetensors", "i2v-pro-5s-hd"),
        ("t2v-pro-sft-5s-sd", "K5 Pro pretrain 10s 1024.safetensors", "t2v-pro-pretrain-10s-hd"),
        ("t2i-lite", "kandinsky5lite_t2i_pretrain.safetensors", "t2i-lite-pretrain"),
        ("i2i-lite", "kandinsky5_image_edit.safetensors", "i2i-lite"),
    ],
)
def test_file_name_breaks_ties(family_of, filename, expected):
    assert detect_variant(real_header(family_of), filename=filename).variant == expected


def test_comfyui_prefixed_keys():
    header = {f"model.diffusion_model.{k}": v for k, v in real_header("i2i-lite").items()}
    det = detect_variant(header, filename="kandinsky5lite_i2i.safetensors")
    assert det.variant == "i2i-lite" and det.prefix == "model.diffusion_model."


def _save(tmp_path, name, tensors) -> Path:
    p = tmp_path / name
    save_file({k: torch.zeros(s) for k, s in tensors.items()}, str(p))
    return p


WRONG_FILES = {
    "hunyuan_video_vae.safetensors": (
        {"encoder.conv_in.conv.weight": (8, 3, 3, 3, 3), "decoder.conv_out.conv.weight": (3, 8, 3, 3, 3),
         "encoder.down_blocks.0.resnets.0.conv1.conv.weight": (8, 8, 3, 3, 3)},
        r"video VAE \(3D convolutions, e.g. the HunyuanVideo VAE\)",
    ),
    "ae.safetensors": (
        {"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_out.weight": (3, 8, 3, 3),
         "encoder.down.0.block.0.conv1.weight": (8, 8, 3, 3)},
        r"image VAE \(2D convolutions, e.g. the FLUX VAE\)",
    ),
    "qwen.safetensors": (
        {"model.embed_tokens.weight": (10, 4), "model.layers.0.self_attn.q_proj.weight": (4, 4),
         "lm_head.weight": (10, 4)},
        r"Qwen / LLM text encoder",
    ),
    "clip_l.safetensors": (
        {"text_model.embeddings.token_embedding.weight": (10, 4), "text_model.final_layer_norm.weight": (4,)},
        r"CLIP text encoder",
    ),
    "camera_lora.safetensors": (
        {"visual_transformer_blocks.0.self_attention.to_query.lora_A.weight": (4, 64),
         "visual_transformer_blocks.0.self_attention.to_query.lora_B.weight": (64, 4)},
        r"a LoRA",
    ),
    "wan.safetensors": ({"blocks.0.self_attn.q.weight": (4, 4), "patch_embedding.weight": (4, 16, 1, 2, 2)}, r"Wan"),
    "mystery.safetensors": ({"foo.weight": (4,)}, r"an unknown model"),
}  # fmt: skip


@pytest.mark.parametrize("filename", list(WRONG_FILES))
def test_wrong_files_are_refused_with_what_they_are(tmp_path, filename):
    tensors, pattern = WRONG_FILES[filename]
    p = _save(tmp_path, filename, tensors)
    with pytest.raises(WeightsError, match=pattern) as e:
        load_dit(p)
    msg = str(e.value)
    assert filename in msg and "not a Kandinsky 5 DiT" in msg
    assert sorted(tensors)[0] in msg  # names a few of the keys it found


def test_unknown_kandinsky_like_architecture(tmp_path):
    p = make_tiny_dit_file(tmp_path / "tiny.safetensors", TINY_ARCHS["lite"])
    with pytest.raises(WeightsError, match=r"64-wide DiT.*model_dim=64.*no released Kandinsky 5 variant has"):
        load_dit(p)


# ---------------------------------------------------------------- strict loading
def test_round_trip_gives_identical_outputs(tmp_path):
    arch = TINY_ARCHS["pro"]
    p = make_tiny_dit_file(tmp_path / "kandinsky5pro_t2v_sft_5s.safetensors", arch, seed=4)
    model, v = load_dit(p, variant=tiny_variant(arch, "t2v-pro-sft-5s-hd"), dtype=torch.float32)
    assert v.name == "t2v-pro-sft-5s-hd" and v.arch == arch
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert not any(t.requires_grad for t in model.parameters())
    ref = make_tiny_dit(arch, seed=4)
    inp = make_inputs(arch, batch=2, grid=(2, 4, 4), seed=1)
    assert torch.equal(model(**inp, rope_scale=v.rope_scale), ref(**inp, rope_scale=v.rope_scale))


def test_prefixed_file_loads(tmp_path):
    arch = TINY_ARCHS["image"]
    sd = {f"model.diffusion_model.{k}": v for k, v in random_state_dict(arch, 2).items()}
    p = tmp_path / "comfy_export.safetensors"
    save_file(sd, str(p))
    model, _ = load_dit(p, variant=tiny_variant(arch), dtype=torch.float32)
    inp = make_inputs(arch, grid=(1, 4, 4))
    assert torch.equal(model(**inp), make_tiny_dit(arch, 2)(**inp))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    arch = TINY_ARCHS["lite"]
    sd = random_state_dict(arch)
    del sd["visual_transformer_blocks.1.cross_attention.key_norm.weight"]
    sd["visual_transformer_blocks.1.extra_gate.weight"] = torch.zeros(3)
    p = tmp_path / "broken.safetensors"
    save_file(sd, str(p))
    with pytest.raises(WeightsError) as e:
        load_dit(p, variant=tiny_variant(arch))
    msg = str(e.value)
    assert "missing 1 tensors (visual_transformer_blocks.1.cross_attention.key_norm.weight)" in msg
    assert "unexpected 1 tensors (visual_transformer_blocks.1.extra_gate.weight)" in msg


def test_scaled_fp8_export_is_named(tmp_path):
    arch = TINY_ARCHS["lite"]
    sd = random_state_dict(arch)
    sd["visual_transformer_blocks.0.feed_forward.in_layer.scale_weight"] = torch.ones(1)
    p = tmp_path / "k5_fp8_scaled.safetensors"
    save_file(sd, str(p))
    with pytest.raises(WeightsError, match=r"scaled-fp8 export.*in_layer.scale_weight.*fp8=True"):
        load_dit(p, variant=tiny_variant(arch))


def test_override_that_does_not_match_is_refused(tmp_path):
    arch = TINY_ARCHS["lite"]
    p = make_tiny_dit_file(tmp_path / "t.safetensors", arch)
    with pytest.raises(WeightsError, match=r"variant 'i2i-lite' does not fit 't.safetensors'.*64-wide.*2560-wide"):
        load_dit(p, variant="i2i-lite")
    with pytest.raises(WeightsError, match=r"33 input channels.*16 input channels"):
        load_dit(p, variant=tiny_variant(TINY_ARCHS["lite_t2v_16ch"]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_and_runs(tmp_path, dtype):
    arch = TINY_ARCHS["lite"]
    p = make_tiny_dit_file(tmp_path / "t.safetensors", arch, seed=6)
    model, _ = load_dit(p, variant=tiny_variant(arch), dtype=dtype)
    assert {t.dtype for t in model.state_dict().values()} == {dtype}
    inp = make_inputs(arch, grid=(1, 4, 4))
    out, ref = model(**inp), make_tiny_dit(arch, 6)(**inp)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_fp8_storage(tmp_path):
    arch = TINY_ARCHS["lite"]
    p = make_tiny_dit_file(tmp_path / "t.safetensors", arch, seed=7)
    model, _ = load_dit(p, variant=tiny_variant(arch), dtype=torch.bfloat16, fp8=True)
    sd = model.state_dict()
    assert sd["visual_transformer_blocks.0.feed_forward.in_layer.weight"].dtype == torch.float8_e4m3fn
    assert sd["visual_transformer_blocks.0.self_attention.to_query.bias"].dtype == torch.bfloat16
    assert sd["visual_transformer_blocks.0.self_attention.query_norm.weight"].dtype == torch.bfloat16
    assert sd["out_layer.out_layer.weight"].dtype == torch.bfloat16
    assert model.compute_dtype == torch.bfloat16
    inp = make_inputs(arch, grid=(1, 4, 4))
    out, ref = model(**inp), make_tiny_dit(arch, 7)(**inp)
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 0.2 * ref.abs().max()

    # a file already stored in float8 keeps that storage without fp8=True
    stored = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 and "transformer_blocks" in k else v
              for k, v in random_state_dict(arch, 7).items()}  # fmt: skip
    p8 = tmp_path / "t_fp8.safetensors"
    save_file(stored, str(p8))
    assert read_safetensors_header(p8)["text_transformer_blocks.0.feed_forward.out_layer.weight"][0] == "F8_E4M3"
    model8, _ = load_dit(p8, variant=tiny_variant(arch), dtype=torch.bfloat16)
    w = model8.state_dict()["text_transformer_blocks.0.feed_forward.out_layer.weight"]
    assert w.dtype == torch.float8_e4m3fn
    assert torch.equal(w, stored["text_transformer_blocks.0.feed_forward.out_layer.weight"])
    assert torch.isfinite(model8(**inp)).all()


def test_bad_dtype(tmp_path):
    p = make_tiny_dit_file(tmp_path / "t.safetensors", TINY_ARCHS["lite"])
    with pytest.raises(InputError, match="bfloat16, float16 or float32"):
        load_dit(p, dtype=torch.int8)


def test_hand_written_header(tmp_path):
    # built byte by byte from the format: 8-byte little-endian length, JSON header, then the data
    blob = json.dumps(
        {"__metadata__": {"format": "pt"}, "t": {"dtype": "F16", "shape": [2, 1], "data_offsets": [0, 4]}}
    ).encode()
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 4)
    assert read_safetensors_header(p) == {"t": ("F16", (2, 1))}
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 3)  # one data byte short
    with pytest.raises(WeightsError, match="truncated"):
        read_safetensors_header(p)


def test_fp8_storage_keeps_small_weights_accurate(tmp_path):
    """Real block weights have std ~0.01, mostly below float8_e4m3's smallest normal (2**-6): an unscaled cast
    rounds them in its coarse subnormal range (5.7% output error). With a per-tensor scale the error is that of
    float8's 3 mantissa bits."""
    arch = TINY_ARCHS["lite"]
    g = torch.Generator().manual_seed(40)
    state = {
        k: torch.randn(v.shape, generator=g) * 0.01 if v.ndim == 2 and "transformer_blocks" in k else v
        for k, v in random_state_dict(arch, 8).items()
    }
    path = tmp_path / "small.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(path))
    full, _ = load_dit(path, variant=tiny_variant(arch), dtype=torch.bfloat16)
    fp8, _ = load_dit(path, variant=tiny_variant(arch), dtype=torch.bfloat16, fp8=True)
    assert fp8.state_dict()["visual_transformer_blocks.0.feed_forward.in_layer.weight"].dtype == torch.float8_e4m3fn
    assert set(fp8.state_dict()) == set(full.state_dict())  # the scales are not checkpoint keys
    name = "visual_transformer_blocks.0.feed_forward.in_layer"
    x = torch.randn(64, arch.model_dim, generator=g).bfloat16()
    ref = full.get_submodule(name)(x).float()
    out = fp8.get_submodule(name)(x).float()
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.035, f"block linear output error {rel:.2%} with float8 storage"
    inp = {k: v.bfloat16() if v.is_floating_point() and k != "timestep" else v
           for k, v in make_inputs(arch, grid=(2, 4, 4)).items()}  # fmt: skip
    whole = float((fp8(**inp).float() - full(**inp).float()).norm() / full(**inp).float().norm())
    assert whole < 0.03, whole


def test_detection_says_when_it_had_to_guess():
    """Variants with the same tensors that the file name does not tell apart: the result names them all, the one
    taken with its settings, and how to choose; an official file name leaves no guess."""
    renamed = detect_variant(real_header("t2v-lite-sft-5s"), filename="my_favourite_dit.safetensors")
    lite = [n for n, v in VARIANTS.items() if v.family == "lite" and v.is_video]
    assert set(renamed.tied) == set(lite)
    assert renamed.guess is not None
    assert f"fit {len(lite)} variants" in renamed.guess and "t2v-lite-distilled16steps-5s" in renamed.guess
    assert "took t2v-lite-sft-5s (50 steps, guidance 5)" in renamed.guess and "pick it in variant" in renamed.guess
    partly = detect_variant(real_header("t2v-lite-sft-5s"), filename="k5_lite_t2v_10s.safetensors")
    assert set(partly.tied) == {"t2v-lite-sft-10s", "t2v-lite-pretrain-10s", "t2v-lite-nocfg-10s",
                                "t2v-lite-distilled16steps-10s"}  # fmt: skip
    for name in ("t2v-lite-distilled16steps-5s", "i2v-lite-5s", "t2i-lite"):
        official = detect_variant(real_header(name), filename=_expected_filename(name))
        assert official.guess is None and official.tied == ()


def test_a_released_file_runs_as_what_was_released_under_its_name():
    """Lite's 5 s / 10 s, sft / pretrain / nocfg / distilled and T2V / I2V files hold the same tensors. Under its
    released name a file is run as its release: the 10 s file with the 5 s variant's settings (121 frames, dense
    attention) or the sft file with the distilled 16 steps is refused, naming both settings and the fix. Renamed,
    the choice is the user's; SD and HD Pro share one released file, and both are accepted."""
    lite = real_header("t2v-lite-sft-10s")
    with pytest.raises(WeightsError) as e:
        chosen_variant(lite, "kandinsky5lite_t2v_sft_10s.safetensors", "t2v-lite-sft-5s")
    msg = str(e.value)
    assert msg.startswith(
        "variant 't2v-lite-sft-5s' does not fit 'kandinsky5lite_t2v_sft_10s.safetensors': that is the released "
        "t2v-lite-sft-10s file, and t2v-lite-sft-5s would run it with t2v-lite-sft-5s's settings (up to 121 frames, "
        "50 steps, guidance 5, dense attention) instead of its own (up to 241 frames, 50 steps, guidance 5, NABLA)."
    ), msg
    assert "Set variant to auto (or t2v-lite-sft-10s); for t2v-lite-sft-5s, load its own file " \
        "kandinsky5lite_t2v_sft_5s.safetensors." in msg  # fmt: skip
    assert chosen_variant(lite, "kandinsky5lite_t2v_sft_10s.safetensors", "t2v-lite-sft-10s").name == "t2v-lite-sft-10s"
    with pytest.raises(WeightsError, match="16 steps, guidance 1"):
        chosen_variant(lite, "kandinsky5lite_t2v_sft_5s.safetensors", "t2v-lite-distilled16steps-5s")
    assert chosen_variant(lite, "my_lite.safetensors", "t2v-lite-distilled16steps-5s").name.endswith("steps-5s")
    pro = real_header("t2v-pro-sft-5s-sd")
    for name in ("t2v-pro-sft-5s-sd", "t2v-pro-sft-5s-hd"):
        assert chosen_variant(pro, "kandinsky5pro_t2v_sft_5s.safetensors", name).name == name
    assert detect_variant(lite, filename="kandinsky5lite_t2v_sft_10s.safetensors").accepted == ("t2v-lite-sft-10s",)
    assert len(detect_variant(lite, filename="my_lite.safetensors").accepted) > 1
