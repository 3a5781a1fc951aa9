"""End to end on tiny random weights, on the CPU, through `python -m kandinsky_core generate` (in process).

The models folder has the real layouts: a DiT safetensors with the official key names in diffusion_models/, the
official Qwen2.5-VL and CLIP folders (sharded weights, config.json, tokenizer files) in text_encoders/, and the
diffusers `vae/` folders of HunyuanVideo and FLUX.1-dev in vae/. Every loader is the real one.

Tiny DiTs have a tiny architecture, which no released variant has, so `load_dit` (rightly) would refuse them for
the real variants. The `tiny_variants` fixture therefore swaps the `arch` of the variants under test in the
variants table for the tiny one (monkeypatched, test only); every other number of the variant (steps, guidance,
scheduler scale, rope scale, text template and length, VAE, latent scale) stays the released one.
"""

import dataclasses
import shutil
import weakref

import av
import numpy as np
import pytest
import tiny_flux_vae
import tiny_text
import tiny_vae
import torch
from PIL import Image
from tiny import TINY_ARCHS, make_tiny_dit_file

from kandinsky_core import cli, download, loading, media, pipeline, sampling, text_encoders, variants
from kandinsky_core.errors import InputError, MissingFilesError, WeightsError
from kandinsky_core.hunyuan_vae import HunyuanVideoVAE

TEXT_DIM = 32  # tiny Qwen hidden size and tiny CLIP hidden size
TINY = {
    "t2v-lite-sft-5s": dataclasses.replace(TINY_ARCHS["lite"], in_text_dim=TEXT_DIM, in_text_dim2=TEXT_DIM),
    "t2v-lite-sft-10s": dataclasses.replace(TINY_ARCHS["lite"], in_text_dim=TEXT_DIM, in_text_dim2=TEXT_DIM),
    "i2v-lite-5s": dataclasses.replace(TINY_ARCHS["lite"], in_text_dim=TEXT_DIM, in_text_dim2=TEXT_DIM),
    "t2i-lite": dataclasses.replace(TINY_ARCHS["image"], in_text_dim=TEXT_DIM, in_text_dim2=TEXT_DIM),
    "i2i-lite": dataclasses.replace(TINY_ARCHS["image_i2i"], in_text_dim=TEXT_DIM, in_text_dim2=TEXT_DIM),
}
W, H = 96, 64  # not square, so a swapped width / height shows


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy")
    models = root / "models"
    t = tiny_text.make_tiny_text_encoders(root / "official", "folder", qwen_hidden=TEXT_DIM, clip_hidden=TEXT_DIM)
    (models / "text_encoders").mkdir(parents=True)
    shutil.move(t.qwen, models / "text_encoders" / download.QWEN_DIR)
    shutil.move(t.clip, models / "text_encoders" / download.CLIP_DIR)
    tiny_vae.write_diffusers_folder(models / "vae" / download.HUNYUAN_VAE_DIR / "vae", seed=0)
    tiny_flux_vae.write_tiny_flux_vae(models / "vae" / download.FLUX_VAE_DIR, "diffusers_folder", seed=0)
    for i, (name, arch) in enumerate(TINY.items()):
        filename = variants.VARIANTS[name].hf_filename.split("/")[-1]
        make_tiny_dit_file(models / "diffusion_models" / filename, arch, seed=i)
    return models


@pytest.fixture(autouse=True)
def tiny_variants(monkeypatch):
    for name, arch in TINY.items():
        monkeypatch.setitem(variants.VARIANTS, name, dataclasses.replace(variants.VARIANTS[name], arch=arch))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything must be found on disk


@pytest.fixture
def start_image(tmp_path):
    """Already W x H, so the resize + crop is the identity and the reference below needs neither."""
    g = np.random.default_rng(0)
    pixels = g.integers(0, 256, (H, W, 3), dtype=np.uint8)
    path = tmp_path / "start.png"
    Image.fromarray(pixels).save(path)
    return path, pixels


def generate(models_dir, out, variant, *extra):
    args = ["generate", "--variant", variant, "--prompt", "a red fox in the snow", "--models-dir", str(models_dir)]
    args += ["--width", str(W), "--height", str(H), "--steps", "2", "--quiet", "--output", str(out), *extra]
    assert cli.main(args) == 0


def test_t2v_mp4_has_requested_frames_and_size_and_is_seeded(models_dir, tmp_path, monkeypatch):
    """The seed is checked on the frames handed to the MP4 writer: libx264 now and then encodes the same frames to
    another MP4 (issue 13: up to 26/255 apart after decoding, at CRF 16, on the tiny models' noise-like frames)."""
    written = []
    write_output = media.write_output
    monkeypatch.setattr(media, "write_output", lambda frames, *a, **k: written.append(frames) or write_output(
        frames, *a, **k))  # fmt: skip
    a, b, c = tmp_path / "a.mp4", tmp_path / "b.mp4", tmp_path / "c.mp4"
    generate(models_dir, a, "t2v-lite-sft-5s", "--frames", "5", "--seed", "3")
    generate(models_dir, b, "t2v-lite-sft-5s", "--frames", "5", "--seed", "3")
    generate(models_dir, c, "t2v-lite-sft-5s", "--frames", "5", "--seed", "4", "--guidance", "1")
    va, vb, vc = (media.read_video(p) for p in (a, b, c))
    assert va.shape == (5, H, W, 3)
    with av.open(str(a)) as container:
        assert container.streams.video[0].average_rate == 24
    fa, fb, fc = written
    assert fa.shape == va.shape and fa.dtype == torch.uint8
    assert torch.equal(fa, fb)  # same seed, same video
    assert not torch.equal(fa, fc)
    assert va.float().std() > 1  # not a blank video


def test_t2i_png_size_and_seed(models_dir, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    generate(models_dir, a, "t2i-lite", "--seed", "11")
    generate(models_dir, b, "t2i-lite", "--seed", "11")
    with Image.open(a) as ia, Image.open(b) as ib:
        assert ia.size == (W, H) and ia.mode == "RGB"
        assert np.array_equal(np.asarray(ia), np.asarray(ib))


def test_i2v_first_latent_frame_is_the_encoded_start_image(models_dir, tmp_path, start_image, monkeypatch):
    """The latent handed to the VAE decoder starts with the start image as diffusers' HunyuanVideo VAE encodes it."""
    path, pixels = start_image
    seen = {}
    real_decode = HunyuanVideoVAE.decode

    def spy(self, latent, **kw):
        seen["latent"] = latent.detach().clone()
        return real_decode(self, latent, **kw)

    monkeypatch.setattr(HunyuanVideoVAE, "decode", spy)
    out = tmp_path / "i2v.mp4"
    generate(models_dir, out, "i2v-lite-5s", "--image", str(path), "--frames", "5")
    assert media.read_video(out).shape == (5, H, W, 3)

    ref_vae = tiny_vae.diffusers_vae(seed=0)
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    with torch.no_grad():
        ref = ref_vae.encode(x[None, :, None]).latent_dist.mean
    latent = seen["latent"]
    assert latent.shape == (1, 16, 2, H // 8, W // 8)
    torch.testing.assert_close(latent[:, :, :1].float(), ref, rtol=1e-4, atol=1e-4)


def test_i2i_dit_sees_the_encoded_edit_image(models_dir, tmp_path, start_image, monkeypatch):
    """Instruct channels hold the FLUX latent of the edit image (diffusers AutoencoderKL mean * 0.3611), mask ones."""
    path, pixels = start_image
    inputs = []
    real_load = loading.load_dit

    def load_spy(*a, **k):
        dit, v = real_load(*a, **k)
        real_forward = dit.forward
        dit.forward = lambda x, *fa, **fk: (inputs.append(x.detach().clone()), real_forward(x, *fa, **fk))[1]
        return dit, v

    monkeypatch.setattr(loading, "load_dit", load_spy)
    out = tmp_path / "edit.png"
    generate(models_dir, out, "i2i-lite", "--image", str(path))
    with Image.open(out) as im:
        assert im.size == (W, H)

    ref_vae = tiny_flux_vae.tiny_diffusers_vae(seed=0)
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    with torch.no_grad():
        ref = ref_vae.encode(x[None]).latent_dist.mean * 0.3611
    assert len(inputs) == 4  # 2 steps x (positive, negative)
    x_in = inputs[0]
    assert x_in.shape == (1, 33, 1, H // 8, W // 8)
    torch.testing.assert_close(x_in[:, 16:32, 0], ref, rtol=1e-4, atol=1e-4)
    assert torch.all(x_in[:, 32] == 1)


def test_stages_free_each_model_before_the_next_loads(models_dir, monkeypatch):
    """Only one large model at a time: the text encoders are gone when the DiT loads, the DiT when the VAE decodes."""
    refs = {}
    real_te, real_dit = text_encoders.load_text_encoders, loading.load_dit

    def te_spy(*a, **k):
        enc = real_te(*a, **k)
        refs["text"] = weakref.ref(enc.qwen)
        return enc

    def dit_spy(*a, **k):
        assert refs["text"]() is None, "text encoders still alive when the DiT loads"
        dit, v = real_dit(*a, **k)
        refs["dit"] = weakref.ref(dit)
        return dit, v

    real_decode = HunyuanVideoVAE.decode

    def decode_spy(self, latent, **kw):
        assert refs["dit"]() is None, "DiT still alive during VAE decode"
        return real_decode(self, latent, **kw)

    monkeypatch.setattr(text_encoders, "load_text_encoders", te_spy)
    monkeypatch.setattr(loading, "load_dit", dit_spy)
    monkeypatch.setattr(HunyuanVideoVAE, "decode", decode_spy)
    frames = pipeline.generate(
        "t2v-lite-sft-5s", "a fox", models=models_dir, width=W, height=H, frames=1, steps=1, progress=False
    )
    assert frames.shape == (1, H, W, 3) and frames.dtype == torch.uint8


def test_generate_validates_before_touching_files(tmp_path):
    nowhere = download.ModelPaths(*(tmp_path / n for n in ("dit", "qwen", "clip", "vae")))
    with pytest.raises(InputError, match="needs a start image"):
        pipeline.generate("i2v-lite-5s", "a fox", models=nowhere)
    with pytest.raises(InputError, match="4k\\+1"):
        pipeline.generate("t2v-lite-sft-5s", "a fox", models=nowhere, frames=6)
    with pytest.raises(MissingFilesError, match="do not exist"):
        pipeline.generate("t2v-lite-sft-5s", "a fox", models=nowhere, frames=5)


def test_expand_prompt_feeds_the_expansion_to_the_encoder(models_dir, monkeypatch):
    """--expand-prompt: Qwen rewrites the prompt (seeded), and that text, not the user's, is encoded."""
    encoded, expanded = [], []
    real_expand, real_encode = text_encoders.TextEncoders.expand_prompt, text_encoders.TextEncoders.encode

    def expand_spy(self, prompt, kind, **kw):
        expanded.append((prompt, kind, kw.get("seed"), real_expand(self, prompt, kind, **kw)))
        return expanded[-1][-1]

    def encode_spy(self, prompts, *a, **kw):
        encoded.append(list(prompts))
        return real_encode(self, prompts, *a, **kw)

    monkeypatch.setattr(text_encoders.TextEncoders, "expand_prompt", expand_spy)
    monkeypatch.setattr(text_encoders.TextEncoders, "encode", encode_spy)
    pipeline.generate(
        "t2i-lite", "a cat", models=models_dir, width=W, height=H, steps=1, seed=5, expand_prompt=True, progress=False
    )
    assert [e[:3] for e in expanded] == [("a cat", "image", 5)]
    assert encoded == [[expanded[0][3]], [""]]  # expansion, then the (empty) image negative prompt


@pytest.mark.parametrize("variant", ["i2v-lite-5s", "i2i-lite"])
def test_prompt_expansion_is_on_by_default_and_sees_the_image_as_given(models_dir, tmp_path, monkeypatch, variant):
    """The official I2V / I2I pipelines expand the prompt by default (expand_prompts=True) and show Qwen the input
    image as given (get_first_frame_from_image returns the original PIL image; I2I quarters it itself), not the
    image resized to the output size."""
    seen = []
    real_expand = text_encoders.TextEncoders.expand_prompt

    def expand_spy(self, prompt, kind, image=None, **kw):
        seen.append((kind, None if image is None else tuple(image.shape)))
        return real_expand(self, prompt, kind, image=image, **kw)

    monkeypatch.setattr(text_encoders.TextEncoders, "expand_prompt", expand_spy)
    path = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 150, 3), dtype=np.uint8)).save(path)
    video = variant == "i2v-lite-5s"
    extra = ["--frames", "5"] if video else []
    out = "out.mp4" if video else "out.png"
    generate(models_dir, tmp_path / out, variant, "--image", str(path), *extra)
    assert seen == [(variants.VARIANTS[variant].text_template, (3, 90, 150))]
    seen.clear()
    generate(models_dir, tmp_path / f"plain-{out}", variant, "--image", str(path), "--no-expand-prompt", *extra)
    assert seen == []


@pytest.mark.parametrize("frames, template", [(1, "image"), (5, "video")])
def test_one_frame_of_a_video_model_is_encoded_under_the_image_template(models_dir, monkeypatch, frames, template):
    """generation_utils.generate_sample: duration 1 -> type_of_content "image", else "video" (both prompts)."""
    kinds = []
    real_encode = text_encoders.TextEncoders.encode

    def encode_spy(self, prompts, kind, *a, **kw):
        kinds.append(kind)
        return real_encode(self, prompts, kind, *a, **kw)

    monkeypatch.setattr(text_encoders.TextEncoders, "encode", encode_spy)
    pipeline.generate(
        "t2v-lite-sft-5s", "a cat", models=models_dir, width=W, height=H, frames=frames, steps=1, progress=False
    )
    assert kinds == [template, template]


def test_nabla_variant_runs_sparse_and_no_nabla_runs_dense(models_dir, monkeypatch):
    """A NABLA variant (Lite 10 s) passes its NablaParams to every DiT call; --no-nabla (nabla=False) passes None."""
    seen = []
    real_load = loading.load_dit

    def load_spy(*a, **k):
        dit, v = real_load(*a, **k)
        real_forward = dit.forward
        dit.forward = lambda *fa, **fk: (seen.append(fk.get("nabla")), real_forward(*fa, **fk))[1]
        return dit, v

    monkeypatch.setattr(loading, "load_dit", load_spy)
    kw = dict(models=models_dir, width=128, height=128, frames=5, steps=1, guidance=1.0, progress=False)
    frames = pipeline.generate("t2v-lite-sft-10s", "a fox", **kw)
    assert frames.shape == (5, 128, 128, 3)
    assert seen == [variants.VARIANTS["t2v-lite-sft-10s"].nabla] and seen[0].P == 0.9
    seen.clear()
    pipeline.generate("t2v-lite-sft-10s", "a fox", nabla=False, **kw)
    assert seen == [None]


@pytest.mark.parametrize("variant", ["t2i-lite", "i2i-lite"])
def test_image_variants_encode_and_decode_as_diffusers_flux_vae(models_dir, start_image, monkeypatch, variant):
    """The image pipeline's FLUX latent handling against diffusers' AutoencoderKL with the FLUX.1 config (scaling
    0.3611, shift 0.1159) on the same weights, as diffusers' Kandinsky 5 image pipelines use it: the DiT works on
    `mean * scaling_factor` (no shift) and its 16 output channels decode as `x / scaling_factor` (no shift); the
    RGB channels land in the frame's last axis in order."""
    path, pixels = start_image
    ref_vae = tiny_flux_vae.tiny_diffusers_vae(seed=0)
    scale = ref_vae.config.scaling_factor
    assert (scale, ref_vae.config.shift_factor) == (0.3611, 0.1159)  # a config where a wrong shift shows

    dit_inputs, sampled = [], []
    real_load, real_sample = loading.load_dit, sampling.sample

    def load_spy(*a, **k):
        dit, v = real_load(*a, **k)
        real_forward = dit.forward
        dit.forward = lambda x, *fa, **fk: (dit_inputs.append(x.detach().clone()), real_forward(x, *fa, **fk))[1]
        return dit, v

    def sample_spy(*a, **k):
        sampled.append(real_sample(*a, **k))
        return sampled[-1].clone()

    monkeypatch.setattr(loading, "load_dit", load_spy)
    monkeypatch.setattr(sampling, "sample", sample_spy)
    image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous() if variant == "i2i-lite" else None
    request = pipeline.resolve_request(variant, "a red fox", width=W, height=H, seed=4, steps=2, image=image)
    paths = download.ModelPaths(
        dit=models_dir / "diffusion_models" / variants.VARIANTS[variant].hf_filename.split("/")[-1],
        qwen=models_dir / "text_encoders" / download.QWEN_DIR,
        clip=models_dir / "text_encoders" / download.CLIP_DIR,
        vae=models_dir / "vae" / download.FLUX_VAE_DIR,
    )
    frames = pipeline.run(request, paths, device="cpu", dtype=torch.float32, progress=False)

    with torch.no_grad():
        if image is not None:  # encode: instruct channels 16..31 = diffusers' posterior mean * scaling_factor
            x = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 127.5 - 1
            edit = ref_vae.encode(x).latent_dist.mean * scale
            assert dit_inputs[0].shape == (1, 33, 1, H // 8, W // 8)
            torch.testing.assert_close(dit_inputs[0][:, 16:32, 0], edit, rtol=1e-4, atol=1e-4)
        (x,) = sampled
        assert x.shape == (1, 16, 1, H // 8, W // 8)
        decoded = ref_vae.decode(x[:, :, 0] / scale).sample  # [1, 3, H, W]
    want = ((decoded[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0)
    assert frames.shape == (1, H, W, 3) and frames.dtype == torch.uint8
    diff = (frames[0].float() - want).abs()
    worst, mean = float(diff.max()), float(diff.mean())
    assert worst <= 1 and mean < 0.01, f"8-bit difference from diffusers: max {worst}, mean {mean:.4f}"
    assert want.std() > 5  # a real image, not a flat one any decoding would match


def test_a_released_file_run_as_another_variant_is_refused_before_the_text_encoders_load(models_dir, monkeypatch):
    """--dit kandinsky5lite_t2v_sft_10s.safetensors --variant t2v-lite-sft-5s would run the 10 s model with the 5 s
    variant's frames and dense attention: refused from the DiT's header before minutes of text encoding."""
    monkeypatch.setattr(text_encoders, "load_text_encoders", lambda *a, **k: pytest.fail("text encoders loaded"))
    request = pipeline.resolve_request("t2v-lite-sft-5s", "a red fox", width=W, height=H, frames=5, steps=1)
    paths = download.ModelPaths(
        dit=models_dir / "diffusion_models" / "kandinsky5lite_t2v_sft_10s.safetensors",
        qwen=models_dir / "text_encoders" / download.QWEN_DIR,
        clip=models_dir / "text_encoders" / download.CLIP_DIR,
        vae=models_dir / "vae" / download.HUNYUAN_VAE_DIR,
    )
    with pytest.raises(WeightsError, match="that is the released t2v-lite-sft-10s file"):
        pipeline.run(request, paths, device="cpu", dtype=torch.float32, progress=False)
