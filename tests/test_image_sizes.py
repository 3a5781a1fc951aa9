"""Sizes of I2V / I2I runs as the official pipelines choose them (issue 13), and the one-frame text template.

The official rules (kandinskylab/kandinsky-5):

- I2V, i2v_pipeline.py `resize_image`: with max_area = 512*768 = 393,216 px and d = 16 at resolution 512 (SD), or
  1024*1024 = 1,048,576 px and d = 128 at resolution 1024 (HD), k = sqrt(max_area / (h * w)) / d and each side
  becomes round(side * k) * d (Python's round). The start image is resized to that size, never cropped.
- I2I, i2i_pipeline.py `find_nearest`: the trained (height, width) whose height / width is nearest the image's
  (the first in table order on a tie), then generation_utils.resize_video scales the image to cover it and cuts
  the centre.
- generation_utils.generate_sample / generate_sample_i2v: duration 1 encodes under "image", else "video".

Every expected size below is worked out by hand from those formulas in the parametrisation's comment.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from fake_model_files import fake_model_args
from PIL import Image

from kandinsky_core import cli, media, pipeline
from kandinsky_core.variants import encode_template, i2i_size, i2v_size, size_for_image

GEN = ["generate", "--prompt", "a fox", "--quiet"]

# (variant, image WxH, expected WxH)
I2V_CASES = [
    # SD: k = sqrt(393216 / 2073600) / 16 = 0.43546 / 16 = 0.027217; 1920k = 52.26 -> 52*16 = 832, 1080k = 29.39 -> 464
    ("i2v-lite-5s", (1920, 1080), (832, 464)),
    ("i2v-lite-5s", (1080, 1920), (464, 832)),  # portrait: the same numbers swapped
    # square: k = sqrt(393216 / 1e6) / 16 = 0.62708 / 16 = 0.039192; 1000k = 39.19 -> 39*16 = 624
    ("i2v-lite-5s", (1000, 1000), (624, 624)),
    # 500x300: k = sqrt(393216 / 150000) / 16 = 1.61909 / 16 = 0.101193; 500k = 50.60 -> 816, 300k = 30.36 -> 480
    ("i2v-pro-5s-sd", (500, 300), (816, 480)),
    # HD: k = sqrt(1048576 / 2073600) / 128 = (1024 / 1440) / 128; 1920k = 10.67 -> 11*128 = 1408, 1080k = 6 -> 768
    ("i2v-pro-5s-hd", (1920, 1080), (1408, 768)),
    ("i2v-pro-5s-hd", (1080, 1920), (768, 1408)),
    # square: k = sqrt(1048576 / 1e6) / 128 = 1.024 / 128; 1000k = 8 -> 1024
    ("i2v-pro-5s-hd", (1000, 1000), (1024, 1024)),
]

# trained (h, w) -> h / w: 1024x1024 1, 640x1408 0.4545, 1408x640 2.2, 768x1280 0.6, 1280x768 1.667,
# 896x1152 0.7778, 1152x896 1.2857
I2I_CASES = [
    ((1920, 1080), (1280, 768)),  # h/w 0.5625: |0.6 - 0.5625| = 0.0375 is the least -> h 768, w 1280
    ((1080, 1920), (768, 1280)),  # h/w 1.778: |1.667 - 1.778| = 0.111 (2.2: 0.422) -> h 1280, w 768
    ((500, 500), (1024, 1024)),  # h/w 1: exact
    # h/w 0.52: |0.4545 - 0.52| = 0.065 < |0.6 - 0.52| = 0.08 -> 1408x640. By w/h (1.923) it would be 1280x768:
    # the official rule compares height / width.
    ((1250, 650), (1408, 640)),
]


@pytest.mark.parametrize("variant, image, expected", I2V_CASES)
def test_i2v_size_is_the_official_resize_image_rule(variant, image, expected):
    """i2v_pipeline.py resize_image: k = sqrt(max_area / area) / d, side -> round(side * k) * d (see the cases)."""
    assert i2v_size(variant, *image) == expected
    assert size_for_image(variant, *image) == expected


@pytest.mark.parametrize("image, expected", I2I_CASES)
def test_i2i_size_is_the_nearest_trained_height_over_width(image, expected):
    """i2i_pipeline.py find_nearest: argmin |h/w (trained) - h/w (image)| over RESOLUTIONS[1024] (see the cases)."""
    assert i2i_size("i2i-lite", *image) == expected
    assert size_for_image("i2i-lite-pretrain", *image) == expected


def framed_png(path, w: int, h: int) -> str:
    """Random grey-ish picture with a pure red frame 6 % of each side wide: a crop would cut a frame away."""
    g = np.random.default_rng(0)
    a = g.integers(100, 156, (h, w, 3), dtype=np.uint8)
    bw, bh = max(2, w * 6 // 100), max(2, h * 6 // 100)
    for sl in (np.s_[:, :bw], np.s_[:, -bw:], np.s_[:bh, :], np.s_[-bh:, :]):
        a[sl] = (255, 0, 0)
    Image.fromarray(a).save(path)
    return str(path)


def red_edges(image: torch.Tensor) -> list[bool]:
    """Whether the outermost column / row on each side (left, right, top, bottom) of uint8 [3, H, W] is red."""
    edges = (image[:, :, 0], image[:, :, -1], image[:, 0, :], image[:, -1, :])
    return [bool((e[0].float().mean() > 200) and (e[1:].float().mean() < 60)) for e in edges]


@pytest.fixture
def fake_run(monkeypatch, tmp_path):
    """pipeline.run replaced by one that records the request; explicit (empty) model paths."""
    seen: dict = {}

    def run(request, models, **kw):
        seen["request"] = request
        return torch.zeros((request.frames, request.height, request.width, 3), dtype=torch.uint8)

    monkeypatch.setattr(pipeline, "run", run)
    seen["args"] = fake_model_args(tmp_path)
    return seen


def run_cli(tmp_path, capsys, fake_run, variant: str, png: str, *extra: str):
    out = tmp_path / ("o.png" if variant.startswith("i2i") else "o.mp4")
    frames = [] if variant.startswith("i2i") else ["--frames", "1"]
    rc = cli.main(
        GEN + ["--variant", variant, "--image", png, "--output", str(out), *frames, *extra, *fake_run["args"]]
    )
    assert rc == 0, capsys.readouterr().err
    return fake_run["request"]


@pytest.mark.parametrize("variant, image, expected", [c for c in I2V_CASES if c[1] != (500, 300)])
def test_cli_i2v_takes_the_official_size_and_keeps_the_whole_image(
    tmp_path, capsys, fake_run, variant, image, expected
):
    """The CLI without --width/--height: the size of i2v_pipeline.py resize_image (cases above), and the start image
    is the whole picture scaled to it (the red frame shows on all four edges), not a crop."""
    png = framed_png(tmp_path / "in.png", *image)
    r = run_cli(tmp_path, capsys, fake_run, variant, png)
    assert (r.width, r.height) == expected
    assert r.image.shape == (3, expected[1], expected[0])
    assert red_edges(r.image) == [True] * 4
    torch.testing.assert_close(r.image, media.resize(media.read_image(png), *expected), rtol=0, atol=0)


@pytest.mark.parametrize("image, expected", I2I_CASES)
def test_cli_i2i_takes_the_nearest_trained_aspect_and_cover_crops(tmp_path, capsys, fake_run, image, expected):
    """The CLI without --width/--height on I2I: find_nearest's size (cases above), the image cover-cropped to it."""
    png = framed_png(tmp_path / "in.png", *image)
    r = run_cli(tmp_path, capsys, fake_run, "i2i-lite", png)
    assert (r.width, r.height) == expected
    torch.testing.assert_close(r.image, media.resize_center_crop(media.read_image(png), *expected), rtol=0, atol=0)


def test_cli_i2v_with_a_size_set_by_the_user_still_cover_crops(tmp_path, capsys, fake_run):
    """--width/--height win over the image: 1920x1080 into 512x512 covers and cuts the left and right sides."""
    png = framed_png(tmp_path / "in.png", 1920, 1080)
    r = run_cli(tmp_path, capsys, fake_run, "i2v-lite-5s", png, "--width", "512", "--height", "512")
    assert (r.width, r.height) == (512, 512)
    assert red_edges(r.image) == [False, False, True, True]


def test_cli_i2v_image_too_elongated_names_the_image_and_the_fix(tmp_path, capsys, fake_run):
    """A 100:1 strip (10000x100: k = 0.039192, 10000k = 391.9 -> 6272 px) passes 4096 px: refused with the image's
    size and what to do."""
    png = framed_png(tmp_path / "in.png", 10000, 100)
    rc = cli.main(GEN + ["--variant", "i2v-lite-5s", "--image", png, "--output", str(tmp_path / "o.mp4"),
                         *fake_run["args"]])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "The input image (10000x100) gives 6272x64" in err and "set --width and --height" in err, err


# --- the one-frame template ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant, frames, expected",
    [
        ("t2v-lite-sft-5s", 1, "image"),  # generate_sample: duration 1 -> "image"
        ("t2v-lite-sft-5s", 5, "video"),
        ("i2v-lite-5s", 1, "image"),  # generate_sample_i2v: duration 1 -> "image"
        ("i2v-pro-5s-hd", 121, "video"),
        ("t2i-lite", 1, "image"),
        ("i2i-lite", 1, "image_edit"),
    ],
)
def test_encode_template_follows_the_number_of_frames(variant, frames, expected):
    assert encode_template(variant, frames) == expected


def test_template_tooltip_says_i2v_uses_video(comfy_api):
    from nodes.text import TEMPLATE_TOOLTIP

    assert "video for T2V and I2V" in TEMPLATE_TOOLTIP and "image2video for I2V" not in TEMPLATE_TOOLTIP


# --- the nodes: VAE Encode sizes from the image for the connected model, the sampler follows the latent ---------------


class SpyVAE(torch.nn.Module):
    """Stands in for the VAE model: records the pixels it is given, returns a zero latent of the right size."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return torch.zeros(x.shape[0], 16, 1, x.shape[-2] // 8, x.shape[-1] // 8)


@pytest.fixture
def encode_node(monkeypatch, comfy_api):
    from nodes import comfy_glue
    from nodes import vae as vae_node

    monkeypatch.setattr(comfy_glue, "load", lambda *a, **k: None)
    monkeypatch.setattr(comfy_glue, "load_device", lambda: torch.device("cpu"))
    spy = SpyVAE()
    vae = types.SimpleNamespace(kind="hunyuan", vae=spy, patcher=None)

    def encode(image: torch.Tensor, variant: str | None, width: int = 0, height: int = 0):
        model = None if variant is None else types.SimpleNamespace(variant=pipeline.get_variant(variant))
        latent, encoded = vae_node.VAEEncode.execute(vae, image, width, height, model=model)
        pixels = spy.seen[-1][:, :, 0]
        # the second output is the image as encoded (for Text Encode's edit_image)
        torch.testing.assert_close(encoded, ((pixels + 1) / 2).permute(0, 2, 3, 1))
        return latent["samples"], pixels

    return encode


def comfy_image(png: str) -> torch.Tensor:
    return media.read_image(png).permute(1, 2, 0)[None].float() / 255


@pytest.mark.parametrize("variant, image, expected", [c for c in I2V_CASES if c[0] == "i2v-lite-5s"])
def test_vae_encode_node_sizes_an_i2v_start_image_as_the_official_pipeline(tmp_path, encode_node, variant, image,
                                                                           expected):  # fmt: skip
    """width = height = 0 with an I2V model connected: resize_image's size, whole image (red frame on every edge)."""
    png = framed_png(tmp_path / "in.png", *image)
    latent, pixels = encode_node(comfy_image(png), variant)
    assert latent.shape == (1, 16, 1, expected[1] // 8, expected[0] // 8)
    u8 = ((pixels[0] + 1) * 127.5).round().to(torch.uint8)
    assert red_edges(u8) == [True] * 4
    torch.testing.assert_close(u8, media.resize(media.read_image(png), *expected), rtol=0, atol=0)


@pytest.mark.parametrize("image, expected", I2I_CASES)
def test_vae_encode_node_sizes_an_i2i_image_as_the_official_pipeline(tmp_path, encode_node, image, expected):
    png = framed_png(tmp_path / "in.png", *image)
    latent, pixels = encode_node(comfy_image(png), "i2i-lite")
    assert latent.shape == (1, 16, 1, expected[1] // 8, expected[0] // 8)
    u8 = ((pixels[0] + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(u8, media.resize_center_crop(media.read_image(png), *expected), rtol=0, atol=0)


def test_vae_encode_node_without_a_model_keeps_the_old_meaning(tmp_path, encode_node):
    """No model: 0 keeps the image's own size; a set size cover-crops."""
    png = framed_png(tmp_path / "in.png", 96, 64)
    assert encode_node(comfy_image(png), None)[0].shape == (1, 16, 1, 8, 12)
    latent, pixels = encode_node(comfy_image(png), "i2v-lite-5s", 64, 64)
    assert latent.shape == (1, 16, 1, 8, 8)
    assert red_edges(((pixels[0] + 1) * 127.5).round().to(torch.uint8)) == [False, False, True, True]


def test_sampler_zero_size_follows_the_input_latent_else_the_variant_default(comfy_api):
    from nodes import sampler as sampler_node

    v = pipeline.get_variant("i2v-lite-5s")
    latent = {"samples": torch.zeros(1, 16, 1, 58, 104)}  # 832x464, as VAE Encode made it from a 1920x1080 image
    assert sampler_node.follow_size(v, 0, 0, latent) == (832, 464)
    assert sampler_node.follow_size(v, 0, 0, None) == v.default_size
    assert sampler_node.follow_size(v, 512, 512, latent) == (512, 512)
    assert sampler_node.Sampler.validate_inputs(0, 0, 121, -1.0, 0.0) is True
    assert "give both" in sampler_node.Sampler.validate_inputs(0, 512, 121, -1.0, 0.0)
    assert "length=4" in sampler_node.Sampler.validate_inputs(0, 0, 4, -1.0, 0.0)


def test_sampler_warns_when_a_one_frame_video_run_was_encoded_under_video(comfy_api):
    from nodes import sampler as sampler_node
    from nodes import text

    c = types.SimpleNamespace(text_embeds=None, pooled=None, text_mask=None)
    v = pipeline.get_variant("t2v-lite-sft-5s")
    message = sampler_node.warn_template(v, 1, text.to_conditioning(c, "video"))
    assert message and "'image'" in message and "Set template to image" in message
    assert sampler_node.warn_template(v, 1, text.to_conditioning(c, "image")) is None
    assert sampler_node.warn_template(v, 5, text.to_conditioning(c, "video")) is None
