"""Text encoders: official templates, loading every layout, embeddings equal to transformers run the official way."""

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from prerequisites import missing
from safetensors.torch import save_file
from tiny_text import make_tiny_text_encoders, quantize_fp8_scaled

from kandinsky_core.errors import InputError, MissingFilesError, WeightsError
from kandinsky_core.text_encoders import (
    EXPAND_INSTRUCTIONS,
    OFFICIAL_CROP_START,
    PROMPT_TEMPLATES,
    QWEN_GENERATION,
    QWEN_IMAGE_PROCESSING,
    crop_starts_for,
    load_text_encoders,
    qwen_image_patches,
    smart_size,
)

PROMPTS = ["A cat sits on a red chair.", "A red fox runs through a snowy forest at dawn, the camera follows it."]

# sha256 of the official strings (kandinsky-5 text_embedders.py PROMPT_TEMPLATE joined with "\n", and the expansion
# instructions of t2v_pipeline / text_embedders INSTRUCTION_I2V_EXPAND / t2i_pipeline / i2i_pipeline).
OFFICIAL_TEMPLATE_SHA256 = {
    "video": "09efacd0c7584e236b605dfa1d8b76e87051f5d4ca99f79243e46cbec993c3bc",
    "image2video": "34c9ab571d1bc007e2da89695c50964604906dfb78f39c37f6a08ba4d7e9cd5b",
    "image": "04de998d6e835997641241c6d0ec3dc0fab9e8c70f87dccf98333822ccdff04f",
    "image_edit": "8cd783f4ed62c3dd395209b429809f5fe5ef9fb9ef684bc4d17d611503757db9",
}
OFFICIAL_EXPAND_SHA256 = {
    "video": "649330473e6f09911bfa189523fbf6b300853a74c315f9234db26802a29179bf",
    "image2video": "22a201aa6decaffd4ff2e8bef3ad45f65f13a4c9a473cb1f6908dfe03980854b",
    "image": "8a97261c967a0f437860b1de4c644fc0ed89286ab90beb712e2f0ef6dc15c051",
    "image_edit": "721734b0b02091ebe9efe2bb2a8567601afc2585e50bf59900b586bf67eeb9a8",
}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_text_encoders(tmp_path_factory.mktemp("folder"), "folder")


@pytest.fixture(scope="module")
def folder_encoders(folder):
    return load_text_encoders(folder.qwen, folder.clip, dtype=torch.float32)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    return make_tiny_text_encoders(tmp_path_factory.mktemp("comfy"), "comfy", lm_head=False)


def _load(t, **kwargs):
    return load_text_encoders(
        t.qwen,
        t.clip,
        dtype=torch.float32,
        tokenizer_dir=t.tokenizer_dir,
        qwen_config=t.qwen_config,
        clip_config=t.clip_config,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Templates and crops


def test_templates_and_instructions_are_the_official_strings():
    for kind in OFFICIAL_TEMPLATE_SHA256:
        assert _sha("\n".join(PROMPT_TEMPLATES[kind])) == OFFICIAL_TEMPLATE_SHA256[kind], kind
        assert _sha(EXPAND_INSTRUCTIONS[kind]) == OFFICIAL_EXPAND_SHA256[kind], kind
    video = "\n".join(PROMPT_TEMPLATES["video"])
    assert video.startswith("<|im_start|>system\nYou are a promt engineer. Describe the video in detail.\n")
    assert "video game or scren content.\n" in video
    assert video.endswith("<|im_start|>user\n{}<|im_end|>")
    assert PROMPT_TEMPLATES["image_edit"][-1] == "<|im_start|>user\n{}"
    assert (
        "IImportantly! These are just examples from a large training dataset of 20 mln videos."
        in (EXPAND_INSTRUCTIONS["image2video"])
    )
    assert "how to change  camera potision" in EXPAND_INSTRUCTIONS["image_edit"]
    assert "with 911 and 'Police' text \n" in EXPAND_INSTRUCTIONS["image"]
    assert OFFICIAL_CROP_START == {"video": 129, "image": 41, "image_edit": 55, "image2video": 132}


def test_crop_removes_exactly_the_template_prefix(folder_encoders):
    assert_crop_keeps_the_prompt(folder_encoders.qwen_tokenizer, folder_encoders.crop_starts)


def assert_crop_keeps_the_prompt(tokenizer, starts: dict[str, int]) -> None:
    """Cropping a templated prompt at `starts` keeps the prompt and the template's suffix, nothing of the prefix."""
    prompt = PROMPTS[0]
    for kind in PROMPT_TEMPLATES:
        template = "\n".join(PROMPT_TEMPLATES[kind])
        prefix, suffix = template.split("{}")
        ids = tokenizer(template.format(prompt))["input_ids"]
        assert ids[: starts[kind]][: len(tokenizer(prefix)["input_ids"])] == tokenizer(prefix)["input_ids"]
        kept = tokenizer.decode(ids[starts[kind] :])
        if kind == "image_edit":  # the official crop (55) is 3 tokens past the 52-token prefix
            dropped = tokenizer.decode(ids[starts[kind] - 3 : starts[kind]])
            assert dropped + kept == prompt + suffix
        else:
            assert kept == prompt + suffix


def _real_qwen_tokenizer_dir() -> Path | None:
    root = os.environ.get("COMFYUI_DIR")
    d = Path(root) / "comfy" / "text_encoders" / "qwen25_tokenizer" if root else None
    return d if d is not None and (d / "vocab.json").is_file() else None


def test_official_crop_starts_with_the_real_tokenizer():
    from kandinsky_core.text_encoders import load_qwen_tokenizer

    if _real_qwen_tokenizer_dir() is None:
        missing("ComfyUI's Qwen2.5 tokenizer (COMFYUI_DIR/comfy/text_encoders/qwen25_tokenizer; `make test` sets it)")
    tokenizer = load_qwen_tokenizer(_real_qwen_tokenizer_dir())
    assert crop_starts_for(tokenizer) == OFFICIAL_CROP_START
    assert_crop_keeps_the_prompt(tokenizer, OFFICIAL_CROP_START)
    for kind, length in {"video": 129, "image2video": 132, "image": 41, "image_edit": 52}.items():
        prefix = "\n".join(PROMPT_TEMPLATES[kind]).split("{}")[0]
        assert len(tokenizer(prefix)["input_ids"]) == length


# ---------------------------------------------------------------------------------------------------------------------
# Embeddings against transformers, run as the official Kandinsky5TextEmbedder does


def _official_qwen(folder, kind: str, max_length: int):
    """Official text path: template, padding="max_length" to max_length+crop_start, last hidden state, crop."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder.qwen))
    template = "\n".join(PROMPT_TEMPLATES[kind])
    extra = {"image_edit": 3}.get(kind, 0)
    crop = len(tokenizer(template.split("{}")[0])["input_ids"]) + extra
    inputs = tokenizer(
        [template.format(p) for p in PROMPTS],
        max_length=max_length + crop,
        truncation=True,
        return_tensors="pt",
        padding="max_length" if kind != "image_edit" else True,
    )
    with torch.no_grad():
        out = folder.qwen_reference(input_ids=inputs["input_ids"], return_dict=True, output_hidden_states=True)
    return out["hidden_states"][-1][:, crop:], inputs["attention_mask"][:, crop:].bool()


def _official_clip(folder):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(folder.clip))
    inputs = tokenizer(
        PROMPTS, max_length=77, truncation=True, add_special_tokens=True, padding="max_length", return_tensors="pt"
    )
    with torch.no_grad():
        return folder.clip_reference.text_model(**inputs)["pooler_output"]


@pytest.mark.parametrize("kind,max_length", [("video", 24), ("image2video", 24), ("image", 40), ("image_edit", 40)])
def test_encode_equals_official_transformers_computation(folder, folder_encoders, kind, max_length):
    cond = folder_encoders.encode(PROMPTS, kind, max_length)
    embeds, mask = _official_qwen(folder, kind, max_length)
    if kind != "image_edit":
        assert cond.text_embeds.shape == (2, max_length, 32)
    assert cond.text_mask.dtype == torch.bool
    assert torch.equal(cond.text_mask, mask)
    assert 0 < int(mask[0].sum()) < int(mask[1].sum())  # the short prompt is padded, and masked
    torch.testing.assert_close(cond.text_embeds, embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.pooled, _official_clip(folder), rtol=1e-5, atol=1e-5)
    assert cond.pooled.shape == (2, 32)


def test_long_prompt_is_truncated_to_max_length(folder_encoders):
    cond = folder_encoders.encode([" ".join(PROMPTS * 20)], "video", 16)
    assert cond.text_embeds.shape[1] == 16 and bool(cond.text_mask.all())


def test_comfy_single_files_equal_the_hf_folder(folder_encoders, comfy):
    encoders = _load(comfy)
    for kind in ("video", "image"):
        a, b = folder_encoders.encode(PROMPTS, kind, 20), encoders.encode(PROMPTS, kind, 20)
        assert torch.equal(a.text_embeds, b.text_embeds)
        assert torch.equal(a.text_mask, b.text_mask)
        assert torch.equal(a.pooled, b.pooled)


def test_clip_inside_a_checkpoint_prefix_loads(tmp_path, folder_encoders, comfy):
    from safetensors.torch import load_file

    prefixed = tmp_path / "sd_clip.safetensors"
    save_file({"cond_stage_model.transformer." + k: v for k, v in load_file(comfy.clip).items()}, prefixed)
    encoders = _load(replace(comfy, clip=prefixed))
    assert torch.equal(encoders.encode_clip(PROMPTS), folder_encoders.encode_clip(PROMPTS))


@pytest.mark.parametrize("style", ["scaled_fp8", "comfy_quant"])
def test_fp8_scaled_weights_are_dequantised(tmp_path, folder, folder_encoders, style):
    t = make_tiny_text_encoders(tmp_path, "comfy", fp8=style)
    encoders = _load(t)
    cond = encoders.encode(PROMPTS, "video", 20)
    # Exactly what the file holds: the reference model with each weight quantised and dequantised the same way.
    quantised = quantize_fp8_scaled(folder.qwen_reference.state_dict(), style)  # the rest stored in bf16
    assert any(v.dtype == torch.float8_e4m3fn for v in quantised.values())
    reference = {}
    for key, value in quantised.items():
        if key.endswith(".weight") and value.dtype == torch.float8_e4m3fn:
            scale = quantised[key[: -len("weight")] + ("scale_weight" if style == "scaled_fp8" else "weight_scale")]
            reference[key] = value.float() * scale
        elif not key.endswith((".scale_weight", ".weight_scale", ".comfy_quant", "scaled_fp8")):
            reference[key] = value.float()
    model = type(folder.qwen_reference)(folder.qwen_reference.config).eval()
    model.load_state_dict(reference)
    template = "\n".join(PROMPT_TEMPLATES["video"])
    tokens = encoders.qwen_tokenizer(
        [template.format(p) for p in PROMPTS],
        max_length=20 + encoders.crop_starts["video"],
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = model(**tokens, output_hidden_states=True).hidden_states[-1][:, encoders.crop_starts["video"] :]
    real = cond.text_mask
    torch.testing.assert_close(cond.text_embeds[real], expected[real], rtol=1e-4, atol=1e-4)
    # ...and close to the unquantised model: fp8 e4m3 keeps 3 mantissa bits.
    full = folder_encoders.encode(PROMPTS, "video", 20).text_embeds
    cosine = torch.nn.functional.cosine_similarity(cond.text_embeds[real], full[real], dim=-1)
    assert float(cosine.min()) > 0.97
    assert not torch.equal(cond.text_embeds, full)


# ---------------------------------------------------------------------------------------------------------------------
# Images (I2I edit) and prompt expansion


def _image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = QWEN_IMAGE_PROCESSING
    return Qwen2VLImageProcessorPil(min_pixels=cfg["min_pixels"], max_pixels=cfg["max_pixels"])


def test_image_patches_equal_the_qwen_image_processor():
    image = torch.randint(0, 256, (3, 56, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    patches, grid = qwen_image_patches(image)
    expected = _image_processor()(images=[image], return_tensors="pt")
    assert torch.equal(grid, expected["image_grid_thw"])
    torch.testing.assert_close(patches, expected["pixel_values"], rtol=1e-5, atol=1e-5)


def test_smart_size_equals_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    for h, w in [(512, 512), (1024, 640), (37, 91), (4000, 3000), (10, 30)]:
        assert smart_size(h, w) == smart_resize(h, w, 28, 3136, 12845056), (h, w)


def test_image_edit_reads_the_halved_image_like_the_official_processor(folder, folder_encoders):
    from transformers import AutoTokenizer

    image = torch.randint(0, 256, (3, 112, 168), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    cond = folder_encoders.encode(PROMPTS[:1], "image_edit", 40, images=[image])

    # Official: template + one image block + <|im_end|>, image halved (torchvision's antialiased bilinear resize,
    # i.e. torch's `interpolate(antialias=True)` rounded to uint8), the processor expands <|image_pad|>.
    half = torch.nn.functional.interpolate(image[None].float(), size=(56, 84), mode="bilinear", antialias=True)
    half = half[0].round().clamp(0, 255).to(torch.uint8)
    pixels = _image_processor()(images=[half], return_tensors="pt")
    tokenizer = AutoTokenizer.from_pretrained(str(folder.qwen))
    count = int(pixels["image_grid_thw"].prod()) // 4
    text = "\n".join(PROMPT_TEMPLATES["image_edit"]).format(PROMPTS[0])
    text += "<|vision_start|>" + "<|image_pad|>" * count + "<|vision_end|><|im_end|>"
    inputs = tokenizer([text], return_tensors="pt", padding=True)
    crop = folder_encoders.crop_starts["image_edit"]
    with torch.no_grad():
        out = folder.qwen_reference(**inputs, **pixels, output_hidden_states=True)["hidden_states"][-1][:, crop:]
    assert count == 6
    assert cond.text_embeds.shape == out.shape
    assert bool(cond.text_mask.all())
    torch.testing.assert_close(cond.text_embeds, out, rtol=1e-4, atol=1e-4)


def _reference_generate(folder, encoders, text, seed, max_new_tokens, **extra):
    tokenizer = encoders.qwen_tokenizer
    inputs = tokenizer([text], return_tensors="pt")
    stop = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    torch.manual_seed(seed)
    with torch.no_grad():
        out = folder.qwen_reference.generate(
            **inputs,
            **extra,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop,
            pad_token_id=stop[1],
            **QWEN_GENERATION,
        )
    return out[0, inputs["input_ids"].shape[1] :]


def test_expand_prompt_returns_the_whole_generated_text(folder, folder_encoders):
    expanded = folder_encoders.expand_prompt("a cat", "video", seed=3, max_new_tokens=24)
    assert expanded == folder_encoders.expand_prompt("a cat", "video", seed=3, max_new_tokens=24)
    chat = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + EXPAND_INSTRUCTIONS["video"].replace("{prompt}", "a cat")
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    new = _reference_generate(folder, folder_encoders, chat, 3, 24)
    assert len(new) > 4
    assert expanded == folder_encoders.qwen_tokenizer.decode(new, skip_special_tokens=True)
    assert len(expanded.strip()) > 4 and expanded.strip() != "A"


def test_expand_prompt_image2video_sees_the_image(folder, folder_encoders):
    image = torch.rand(3, 56, 56, generator=torch.Generator().manual_seed(2))
    expanded = folder_encoders.expand_prompt("a cat", "image2video", image=image, seed=0, max_new_tokens=12)
    pixels = _image_processor()(images=[(image * 255).round().to(torch.uint8)], return_tensors="pt")
    count = int(pixels["image_grid_thw"].prod()) // 4
    chat = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        + "<|image_pad|>" * count
        + "<|vision_end|>"
        + EXPAND_INSTRUCTIONS["image2video"].replace("{prompt}", "a cat")
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    new = _reference_generate(folder, folder_encoders, chat, 0, 12, **pixels)
    assert expanded == folder_encoders.qwen_tokenizer.decode(new, skip_special_tokens=True)
    # I2V encodes with the "video" template (as the official pipeline does); given the image, it expands as I2V.
    assert folder_encoders.expand_prompt("a cat", "video", image=image, seed=0, max_new_tokens=12) == expanded
    with pytest.raises(InputError, match="needs the input image"):
        folder_encoders.expand_prompt("a cat", "image2video")


def test_expand_prompt_image_edit_shows_a_quarter_size_image_after_the_text(folder, folder_encoders):
    image = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(4))
    expanded = folder_encoders.expand_prompt("make it red", "image_edit", image=image, seed=0, max_new_tokens=12)
    full = (image * 255).round().to(torch.uint8)
    quarter = Image.fromarray(full.permute(1, 2, 0).numpy()).resize((56, 56))  # official: PIL resize, default filter
    pixels = _image_processor()(images=[quarter], return_tensors="pt")
    count = int(pixels["image_grid_thw"].prod()) // 4
    chat = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + EXPAND_INSTRUCTIONS["image_edit"].replace("{prompt}", "make it red")
        + "<|vision_start|>"
        + "<|image_pad|>" * count
        + "<|vision_end|><|im_end|>\n<|im_start|>assistant\n"
    )
    new = _reference_generate(folder, folder_encoders, chat, 0, 12, **pixels)
    assert count == 4
    assert expanded == folder_encoders.qwen_tokenizer.decode(new, skip_special_tokens=True)


def test_expand_prompt_without_lm_head_names_the_fix(comfy):
    encoders = _load(comfy)
    with pytest.raises(WeightsError, match="lm_head"):
        encoders.expand_prompt("a cat", "video", max_new_tokens=4)


# ---------------------------------------------------------------------------------------------------------------------
# User errors


def test_missing_tokenizer_names_the_files_and_where(tmp_path, comfy, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))  # whatever this machine cached
    with pytest.raises(MissingFilesError, match="vocab.json.*tokenizer_dir"):
        load_text_encoders(comfy.qwen, comfy.clip, qwen_config=comfy.qwen_config, clip_config=comfy.clip_config)


def test_wrong_files_are_named(tmp_path, comfy):
    dit = tmp_path / "kandinsky5lite_t2v.safetensors"
    save_file({"visual_transformer_blocks.0.attn.weight": torch.zeros(2, 2), "time_embeddings.w": torch.zeros(2)}, dit)
    vae = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(2, 2), "encoder.down_blocks.0.w": torch.zeros(2)}, vae)
    with pytest.raises(WeightsError, match="kandinsky5lite_t2v.safetensors is a Kandinsky 5 DiT, not a Qwen2.5-VL"):
        _load(replace(comfy, qwen=dit))
    with pytest.raises(WeightsError, match=r"vae.safetensors is an image VAE \(2D convolutions.*\), not a CLIP"):
        _load(replace(comfy, clip=vae))
    with pytest.raises(WeightsError, match="clip_l.safetensors is a CLIP text encoder, not a Qwen2.5-VL") as e:
        _load(replace(comfy, qwen=comfy.clip))
    assert "Pick a Qwen2.5-VL-7B text encoder instead" in str(e.value) and "the a " not in str(e.value)
    with pytest.raises(WeightsError, match="is not a .safetensors file. Only safetensors"):
        ckpt = tmp_path / "qwen.ckpt"
        ckpt.write_bytes(b"not safetensors")
        _load(replace(comfy, qwen=ckpt))


def test_truncated_and_partial_files(tmp_path, comfy, folder):
    truncated = tmp_path / "qwen_2.5_vl_7b.safetensors"
    truncated.write_bytes(comfy.qwen.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match="truncated"):
        _load(replace(comfy, qwen=truncated))

    partial = tmp_path / "partial.safetensors"
    from safetensors.torch import load_file

    state = load_file(comfy.qwen)
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, partial)
    with pytest.raises(WeightsError, match="lacks 1 of the .* layers.1.mlp.down_proj.weight"):
        _load(replace(comfy, qwen=partial))

    bigger = {**comfy.qwen_config, "hidden_size": 64, "intermediate_size": 128}
    with pytest.raises(WeightsError, match="shape"):
        _load(replace(comfy, qwen_config=bigger))


def test_missing_shard_is_named(tmp_path, folder):
    import shutil

    copy = tmp_path / "text_encoder"
    shutil.copytree(folder.qwen, copy)
    (copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MissingFilesError, match="model-00002-of-00002.safetensors"):
        load_text_encoders(copy, folder.clip)


def test_encode_input_errors(folder_encoders):
    with pytest.raises(InputError, match="content_kind='movie'"):
        folder_encoders.encode(PROMPTS, "movie", 16)
    with pytest.raises(InputError, match="only image_edit"):
        folder_encoders.encode(PROMPTS[:1], "video", 16, images=[torch.zeros(3, 56, 56)])
    with pytest.raises(InputError, match="one image per prompt"):
        folder_encoders.encode(PROMPTS, "image_edit", 16, images=[torch.zeros(3, 56, 56)])


def test_single_files_use_the_default_configs_this_package_holds_at_call_time(comfy, monkeypatch):
    # The integration test pack swaps tiny configs into `kandinsky_core.text_encoders` for ComfyUI's single files,
    # which carry no config.json: load_text_encoders must read the package's names when called.
    from kandinsky_core import text_encoders

    monkeypatch.setattr(text_encoders, "QWEN25_VL_7B_CONFIG", comfy.qwen_config)
    monkeypatch.setattr(text_encoders, "CLIP_L_TEXT_CONFIG", comfy.clip_config)
    enc = load_text_encoders(comfy.qwen, comfy.clip, dtype=torch.float32, tokenizer_dir=comfy.tokenizer_dir)
    assert enc.qwen.config.get_text_config().hidden_size == comfy.qwen_config["hidden_size"]
    assert enc.clip.config.hidden_size == comfy.clip_config.get("text_config", comfy.clip_config)["hidden_size"]
