"""FLUX VAE: parity with diffusers AutoencoderKL, both key layouts, shapes, and the errors users see."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from tiny_flux_vae import (
    TINY_FLUX_VAE_CONFIG,
    bfl_state_dict,
    diffusers_config,
    tiny_diffusers_vae,
    write_tiny_flux_vae,
)

from kandinsky_core.errors import InputError, MissingFilesError, WeightsError
from kandinsky_core.flux_vae import FLUX_VAE_CONFIG, FluxVAE, load_flux_vae

CFG = TINY_FLUX_VAE_CONFIG


@pytest.fixture(scope="module")
def reference():
    return tiny_diffusers_vae(seed=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_vae")
    return {
        layout: write_tiny_flux_vae(root / layout, layout, seed=0)
        for layout in ("bfl", "diffusers", "diffusers_folder")
    }


@pytest.fixture(scope="module")
def models(files):
    return {
        "bfl": load_flux_vae(files["bfl"], config=CFG),
        "diffusers": load_flux_vae(files["diffusers"], config=CFG),
        "diffusers_folder": load_flux_vae(files["diffusers_folder"]),  # architecture from vae/config.json
    }


def _images(b=2, h=32, w=48, seed=1):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latent(b=2, h=4, w=6, seed=2):
    return torch.randn(b, 16, h, w, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("layout", ["bfl", "diffusers_folder"])
def test_matches_diffusers_autoencoder_kl(reference, models, layout):
    vae = models[layout]
    x, z = _images(), _latent()
    ref_mean = reference.encode(x).latent_dist.mean
    ref_pixels = reference.decode(z).sample

    mean = vae.encode(x)
    assert mean.shape == (2, 16, 4, 6)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-5)
    pixels = vae.decode(z)
    assert pixels.shape == (2, 3, 32, 48)
    torch.testing.assert_close(pixels, ref_pixels, rtol=1e-5, atol=1e-5)
    assert ref_pixels.std() > 0.1 and ref_mean.std() > 0.1  # not a degenerate comparison

    # A posterior sample with the same CPU generator draws the same noise as diffusers.
    ref_sample = reference.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    sample = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sample, ref_sample, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sample, mean)


def test_layouts_load_to_identical_modules(models, files, tmp_path):
    # An `ae.safetensors` embedded in a bigger checkpoint with a prefix loads too.
    prefixed = {f"first_stage_model.{k}": v for k, v in load_flux_vae(files["bfl"], config=CFG).state_dict().items()}
    prefixed["model.diffusion_model.x.weight"] = torch.zeros(1)
    save_file(prefixed, str(tmp_path / "checkpoint.safetensors"))
    loaded = dict(models, prefixed=load_flux_vae(tmp_path / "checkpoint.safetensors", config=CFG))

    base = loaded["bfl"].state_dict()
    x = _images(b=1, seed=3)
    with torch.no_grad():
        expected = loaded["bfl"].encode(x)
    for name, vae in loaded.items():
        sd = vae.state_dict()
        assert sd.keys() == base.keys(), name
        assert all(torch.equal(sd[k], base[k]) for k in base), name
        with torch.no_grad():
            assert torch.equal(vae.encode(x), expected), name


def test_one_frame_video_layout(models):
    vae = models["bfl"]
    x, z = _images(b=1), _latent(b=1)
    with torch.no_grad():
        lat5 = vae.encode(x[:, :, None])
        pix5 = vae.decode(z[:, :, None])
        assert lat5.shape == (1, 16, 1, 4, 6) and pix5.shape == (1, 3, 1, 32, 48)
        assert torch.equal(lat5[:, :, 0], vae.encode(x))
        assert torch.equal(pix5[:, :, 0], vae.decode(z))


@torch.no_grad()
def test_tiled_encode_decode(models):
    vae = models["bfl"]
    x, z = _images(b=1), _latent(b=1)  # 32x48 pixels, 4x6 latent
    # Tiles as large as the input: a plain call.
    assert torch.equal(vae.decode(z, tile=8, overlap=2), vae.decode(z))
    assert torch.equal(vae.encode(x, tile=64, overlap=16), vae.encode(x))
    # Two column tiles [0, 4) and [2, 6) (latent): where only the first tile reaches, the output is its decode.
    tiled = vae.decode(z, tile=4, overlap=2)
    assert tiled.shape == (1, 3, 32, 48)
    torch.testing.assert_close(tiled[..., :16], vae.decode(z[..., :4])[..., :16], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tiled[..., -16:], vae.decode(z[..., 2:])[..., -16:], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tiled, vae.decode(z))  # the blended middle differs from a full decode
    lat = vae.encode(x, tile=32, overlap=16)
    assert lat.shape == (1, 16, 4, 6)
    torch.testing.assert_close(lat[..., :2], vae.encode(x[..., :32])[..., :2], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="multiples of 8"):
        vae.encode(x, tile=30, overlap=8)
    with pytest.raises(InputError, match="smaller than"):
        vae.decode(z, tile=4, overlap=4)


def test_dtype_and_output_dtype(files):
    vae = load_flux_vae(files["bfl"], config=CFG, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in vae.parameters())
    assert not any(p.requires_grad for p in vae.parameters())
    with torch.no_grad():
        lat = vae.encode(_images(b=1, h=16, w=16))
    assert lat.dtype == torch.float32 and lat.shape == (1, 16, 2, 2)


def test_real_config_uses_ae_safetensors_names():
    # Known tensors of the released FLUX.1 `ae.safetensors` (244 tensors, BFL / ComfyUI names).
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FluxVAE().state_dict().items()}
    assert len(shapes) == 244
    known = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (32, 512, 3, 3),
        "decoder.conv_in.weight": (512, 16, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.mid.attn_1.proj_out.bias": (512,),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in known.items():
        assert shapes[key] == shape, key
    assert "encoder.down.3.downsample.conv.weight" not in shapes and "decoder.up.0.upsample.conv.weight" not in shapes


def test_real_config_diffusers_names_convert(tmp_path):
    # The real FLUX.1-dev `vae/` architecture (meta tensors, no memory): every diffusers name maps onto ours.
    from diffusers import AutoencoderKL

    from kandinsky_core.flux_vae import _to_bfl_layout

    config = {k: v for k, v in diffusers_config(FLUX_VAE_CONFIG).items() if not k.startswith("_")}
    with torch.device("meta"):
        reference = AutoencoderKL(**config)
        ours = FluxVAE()
    converted = _to_bfl_layout(reference.state_dict(), tmp_path / "vae.safetensors")
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


def test_bad_inputs_raise_input_error(models):
    vae = models["bfl"]
    cases = [
        (vae.encode, torch.zeros(1, 3, 30, 48), "multiples of 8"),
        (vae.encode, torch.zeros(1, 4, 32, 32), "4 channels"),
        (vae.encode, torch.zeros(1, 3, 2, 32, 32), "2 frames"),
        (vae.encode, torch.zeros(3, 32, 32), "expected"),
        (vae.decode, torch.zeros(1, 4, 4, 4), "need 16"),
        (vae.decode, torch.zeros(1, 16, 3, 4, 4), "HunyuanVideo VAE"),
    ]
    for fn, x, words in cases:
        with pytest.raises(InputError, match=words):
            fn(x)


def _save(tmp_path, name, state):
    path = tmp_path / name
    save_file(state, str(path))
    return path


def test_wrong_files_raise_weights_error(tmp_path, reference):
    def t():
        return torch.zeros(2, 2)

    dit = _save(tmp_path, "dit.safetensors", {"visual_transformer_blocks.0.x.weight": t(), "out_layer.w": t()})
    text = _save(tmp_path, "qwen.safetensors", {"model.layers.0.mlp.up_proj.weight": t(), "lm_head.weight": t()})
    hunyuan = _save(
        tmp_path,
        "hunyuan_vae.safetensors",
        {
            "decoder.conv_in.conv.weight": torch.zeros(4, 16, 3, 3, 3),
            "encoder.down_blocks.0.resnets.0.norm1.weight": t(),
        },
    )
    cases = [(dit, "Kandinsky 5 DiT"), (text, "text encoder"), (hunyuan, "HunyuanVideo")]

    sd_vae = write_tiny_flux_vae(tmp_path / "sd", "diffusers", cfg=replace(CFG, z_channels=4))
    cases.append((sd_vae, "4 latent channels"))

    state = bfl_state_dict(reference)
    del state["decoder.up.2.block.1.conv1.weight"]
    state["encoder.quant_conv.weight"] = torch.zeros(32, 32, 1, 1)
    cases.append((_save(tmp_path, "partial.safetensors", state), "decoder.up.2.block.1.conv1.weight"))
    cases.append((_save(tmp_path, "partial2.safetensors", state), "encoder.quant_conv.weight"))

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(write_tiny_flux_vae(tmp_path / "t", "bfl").read_bytes()[:1000])
    cases.append((truncated, "truncated"))

    pickled = tmp_path / "ae.ckpt"
    pickled.write_bytes(b"not safetensors")
    cases.append((pickled, "only safetensors"))

    for path, words in cases:
        with pytest.raises(WeightsError, match=words):
            load_flux_vae(path, config=CFG)

    # The tiny file against the real architecture: strict loading names the mis-shaped weights.
    with pytest.raises(WeightsError, match="wrong shape"):
        load_flux_vae(write_tiny_flux_vae(tmp_path / "small", "bfl"))


def test_wrong_folders(tmp_path):
    with pytest.raises(MissingFilesError, match="does not exist"):
        load_flux_vae(tmp_path / "nowhere")

    bin_only = tmp_path / "bin_only" / "vae"
    bin_only.mkdir(parents=True)
    (bin_only / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(MissingFilesError, match="Only safetensors"):
        load_flux_vae(tmp_path / "bin_only")

    hunyuan = write_tiny_flux_vae(tmp_path / "hy", "diffusers_folder")
    config = json.loads((hunyuan / "vae" / "config.json").read_text())
    config["_class_name"] = "AutoencoderKLHunyuanVideo"
    (hunyuan / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="AutoencoderKLHunyuanVideo"):
        load_flux_vae(hunyuan)


def test_operations_namespace_builds_every_layer(files):
    class Conv(torch.nn.Conv2d):
        pass

    class Norm(torch.nn.GroupNorm):
        pass

    vae = load_flux_vae(files["bfl"], config=CFG, operations=SimpleNamespace(Conv2d=Conv, GroupNorm=Norm))
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert convs and norms
    assert all(type(m) is Conv for m in convs) and all(type(m) is Norm for m in norms)
