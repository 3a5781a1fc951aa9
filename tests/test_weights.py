"""weights.py: the one place the four weights readers (DiT, HunyuanVideo VAE, FLUX VAE, text encoders) share."""

import pytest
import torch
from safetensors.torch import save_file

from kandinsky_core import weights
from kandinsky_core.errors import MissingFilesError, WeightsError
from kandinsky_core.flux_vae import load_flux_vae
from kandinsky_core.hunyuan_vae import load_hunyuan_vae
from kandinsky_core.loading import load_dit
from kandinsky_core.text_encoders.clip import CLIP_L_TEXT_CONFIG, load_clip
from kandinsky_core.text_encoders.qwen import QWEN25_VL_7B_CONFIG, load_qwen

# Wrong files, by what they are; each reader that does not read that kind must say what it is, in the same words.
WRONG = {
    "dit": {"visual_transformer_blocks.0.self_attention.to_query.weight": (4, 4), "time_embeddings.in_layer.w": (4,)},
    "text_encoder": {"model.embed_tokens.weight": (10, 4), "model.layers.0.self_attn.q_proj.weight": (4, 4)},
    "clip": {"text_model.embeddings.token_embedding.weight": (10, 4), "text_model.final_layer_norm.weight": (4,)},
    "image_vae": {"decoder.conv_in.weight": (8, 4, 3, 3), "encoder.conv_in.weight": (8, 3, 3, 3)},
    "lora": {"visual_transformer_blocks.0.self_attention.to_query.lora_A.weight": (4, 64)},
}


def _readers():
    device = torch.device("cpu")
    return {
        "dit": lambda p: load_dit(p),
        "hunyuan_vae": lambda p: load_hunyuan_vae(p),
        "flux_vae": lambda p: load_flux_vae(p),
        "qwen": lambda p: load_qwen(p, QWEN25_VL_7B_CONFIG, torch.float32, device),
        "clip": lambda p: load_clip(p, CLIP_L_TEXT_CONFIG, torch.float32, device),
    }


# (reader, kind of file) pairs where the reader reads that kind, or stops earlier with its own, more precise message
SKIP = {("dit", "dit"), ("clip", "clip"), ("flux_vae", "image_vae")}


@pytest.mark.parametrize("kind", list(WRONG))
def test_every_reader_describes_a_wrong_file_in_the_same_words(tmp_path, kind):
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: torch.zeros(s) for k, s in WRONG[kind].items()}, str(path))
    guess = weights.what_is_it(WRONG[kind])
    assert guess.kind == kind
    for name, read in _readers().items():
        if (name, kind) in SKIP:
            continue
        with pytest.raises(WeightsError) as e:
            read(path)
        assert guess.text in str(e.value), (name, str(e.value))
        assert path.name in str(e.value), (name, str(e.value))


def test_what_is_it_reads_headers_tensors_and_shapes_alike(tmp_path):
    shapes = {"decoder.conv_in.conv.weight": (8, 32, 3, 3, 3), "decoder.up.0.block.0.norm1.weight": (4,)}
    path = tmp_path / "hv15.safetensors"
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    from_header = weights.what_is_it(weights.read_safetensors_header(path))
    from_tensors = weights.what_is_it({k: torch.zeros(s) for k, s in shapes.items()})
    assert from_header == from_tensors == weights.what_is_it(shapes)
    assert from_header.kind == "video_vae" and "32 latent channels" in from_header.text


def test_split_prefix_finds_the_wrapper_in_front_of_the_model_names():
    names = ["model.diffusion_model.text_embeddings.in_layer.weight", "model.diffusion_model.out.w", "vae.x"]
    prefix, rename = weights.split_prefix(names, ("model.", "model.diffusion_model."), ("text_embeddings.",))
    assert prefix == "model.diffusion_model."  # "model." carries no model name directly: it is not taken
    assert rename == {"text_embeddings.in_layer.weight": names[0], "out.w": names[1]}
    assert weights.split_prefix(["a.b"], ("model.",), ("a.",)) == ("", {"a.b": "a.b"})


def test_compare_shapes_lists_missing_unexpected_and_mis_shaped():
    diff = weights.compare_shapes({"a": (2, 2), "b": (3,), "c": (1,)}, {"a": torch.zeros(2, 3), "b": ("F32", (3,))})
    assert (diff.missing, diff.unexpected, diff.wrong) == (["c"], [], ["a (2, 3) != (2, 2)"])
    assert not weights.compare_shapes({"a": (1,)}, {"a": (1,)})


def test_dequantize_applies_per_tensor_and_per_channel_scales():
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]]).to(weights.FP8_DTYPE)
    torch.testing.assert_close(weights.dequantize(w, torch.tensor(0.5), torch.float32), w.float() * 0.5)
    per_row = torch.tensor([2.0, 3.0])
    torch.testing.assert_close(weights.dequantize(w, per_row, torch.float32), w.float() * per_row[:, None])
    stored, scale = weights.to_scaled_fp8(torch.full((3,), 0.01))
    assert stored.dtype == weights.FP8_DTYPE
    torch.testing.assert_close(weights.dequantize(stored, scale, torch.float32), torch.full((3,), 0.01))


def test_scaled_fp8_markers_name_their_layers():
    names = ["a.weight", "a.scale_weight", "scaled_fp8", "b.weight"]
    assert weights.scaled_fp8_layers(names) == {"a": "float8_e4m3fn"}
    assert weights.scaled_fp8_layers(["a.weight", "a.scale_weight"]) == {}  # no marker: not ComfyUI scaled fp8
    assert weights.scale_name("a", set(names)) == "a.scale_weight" and weights.scale_name("b", set(names)) is None
    assert all(weights.is_quant_aux(n) for n in ("a.scale_weight", "scaled_fp8", "x.comfy_quant", "x.input_scale"))


def test_refused_paths_name_the_reader_and_the_fix(tmp_path):
    pickled = tmp_path / "vae.ckpt"
    pickled.write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match=r"HunyuanVideo VAE: vae.ckpt is not a .safetensors file.*hunyuan_video"):
        weights.require_safetensors(pickled, "HunyuanVideo VAE", "Use hunyuan_video_vae_bf16.safetensors.")
    with pytest.raises(MissingFilesError, match="FLUX VAE: .* does not exist"):
        weights.require_safetensors(tmp_path / "nowhere.safetensors", "FLUX VAE", "")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00")
    with pytest.raises(WeightsError, match="CLIP-L text encoder: cannot read .*broken.safetensors.*download it again"):
        weights.load_safetensors(broken, "CLIP-L text encoder")
    with pytest.raises(WeightsError, match="Qwen2.5-VL text encoder: cannot read"):
        with weights.open_safetensors(broken, "Qwen2.5-VL text encoder"):
            pass
