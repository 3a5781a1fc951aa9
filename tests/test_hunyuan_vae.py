"""HunyuanVideo VAE: parity with diffusers, both key layouts, shapes, tiling (exactness, error, memory), errors."""

import copy
import json
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tiny_vae import (
    TINY_CONFIG,
    diffusers_state,
    diffusers_vae,
    write_diffusers_file,
    write_diffusers_folder,
    write_ldm_file,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kandinsky_core.errors import InputError, WeightsError
from kandinsky_core.hunyuan_vae import (
    HUNYUAN_VAE_CONFIG,
    HunyuanVAEConfig,
    HunyuanVideoVAE,
    VAETiling,
    causal_chunks,
    load_hunyuan_vae,
    to_our_layout,
)
from kandinsky_core.vae_tiling import blend_chunks_1d, ramp_weights, tile_spans, tiled_map_2d

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_diffusers_folder(tmp_path_factory.mktemp("hy") / "vae")


@pytest.fixture(scope="module")
def vae(folder):
    return load_hunyuan_vae(folder)


def video(frames: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latent(frames: int, size: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, frames, size, size, generator=torch.Generator().manual_seed(seed))


# Parity: the diffusers folder loads into our module, which then computes what diffusers computes.


def test_encode_decode_match_diffusers(vae):
    ref = diffusers_vae()
    x = video(5, size=16)
    posterior = ref.encode(x).latent_dist
    torch.testing.assert_close(vae.encode(x, tiled=False), posterior.mode(), rtol=0, atol=1e-5)

    gen_ref, gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    torch.testing.assert_close(
        vae.encode(x, sample=True, generator=gen, tiled=False), posterior.sample(gen_ref), rtol=0, atol=1e-5
    )

    z = latent(2, size=2)
    expected = ref.decode(z).sample
    torch.testing.assert_close(vae.decode(z, tiled=False, clamp=False), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(vae.decode(z, tiled=False), expected.clamp(-1, 1), rtol=0, atol=1e-4)
    assert expected.abs().max() > 1  # the clamp above was exercised


def test_both_layouts_load_identically(tmp_path, folder, vae):
    diffusers_file = write_diffusers_file(tmp_path / "hunyuan_video_vae_diffusers.safetensors")
    ldm_file = write_ldm_file(tmp_path / "hunyuan_video_vae_ldm.safetensors")
    reference = vae.state_dict()
    z = latent(2)
    expected = vae.decode(z, tiled=False)
    for path in (diffusers_file, ldm_file):
        loaded = load_hunyuan_vae(path, config=TINY_CONFIG)
        state = loaded.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
        torch.testing.assert_close(loaded.decode(z, tiled=False), expected, rtol=0, atol=0)


def test_bf16_original_file_loads_in_requested_dtype(tmp_path):
    path = write_diffusers_file(tmp_path / "hunyuan_video_vae_bf16.safetensors", dtype=torch.bfloat16)
    loaded = load_hunyuan_vae(path, config=TINY_CONFIG, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    z = latent(2)
    assert loaded.decode(z).dtype == torch.float32  # results come back in the caller's dtype
    state = diffusers_state()
    assert torch.equal(loaded.post_quant_conv.weight, state["post_quant_conv.weight"].to(torch.bfloat16))


def test_released_config_matches_diffusers_released_model():
    from diffusers import AutoencoderKLHunyuanVideo

    with torch.device("meta"):
        ours = HunyuanVideoVAE(HUNYUAN_VAE_CONFIG).state_dict()
        theirs = to_our_layout(AutoencoderKLHunyuanVideo().state_dict())  # diffusers' defaults = the release
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert "decoder.up.3.upsample.conv.conv.weight" in ours and "decoder.up.0.upsample.conv.conv.weight" not in ours


# Shapes.


@pytest.mark.parametrize("frames", [1, 5])
def test_shapes_round_trip(vae, frames):
    z = vae.encode(video(frames, size=16))
    assert z.shape == (1, 16, (frames - 1) // 4 + 1, 2, 2)
    assert vae.decode(z).shape == (1, 3, frames, 16, 16)


# Tiling.


def test_tile_spans_cover_with_overlap():
    assert tile_spans(10, 16, 4) == [(0, 10)]
    spans = tile_spans(100, 32, 8)
    assert spans[0][0] == 0 and spans[-1][1] == 100
    assert all(b - a == 32 for a, b in spans)
    assert all(prev[1] - nxt[0] >= 8 for prev, nxt in zip(spans, spans[1:], strict=False))
    w = ramp_weights([(0, 6), (4, 10)])
    torch.testing.assert_close(w[0][4:] + w[1][:2], torch.ones(2))
    assert causal_chunks(5, 5, 2) == [(0, 5)]
    assert causal_chunks(9, 3, 1) == [(0, 3), (1, 4), (2, 5), (3, 6), (4, 7), (5, 8), (6, 9)]


@pytest.mark.parametrize("scale", [8, 1])
def test_tiled_map_2d_is_exact_for_local_functions(scale):
    x = torch.randn(2, 3, 13, 21)

    def fn(t):
        return F.interpolate(t * 2 + 1, scale_factor=scale, mode="nearest")

    torch.testing.assert_close(tiled_map_2d(x, fn, tile=6, overlap=2, scale=scale), fn(x), rtol=0, atol=1e-6)
    pooled = tiled_map_2d(torch.randn(1, 2, 48, 40), lambda t: F.avg_pool2d(t, 8), tile=16, overlap=8, scale=0.125)
    assert pooled.shape == (1, 2, 6, 5)


def test_blend_chunks_1d_is_exact_for_consistent_chunks():
    full = torch.randn(2, 20, 3)
    chunks = [((a, b), lambda a=a, b=b: full[:, a:b]) for a, b in [(0, 8), (5, 14), (12, 20)]]
    torch.testing.assert_close(blend_chunks_1d(chunks, dim=1), full, rtol=0, atol=1e-6)


def test_tiled_orchestration_is_exact_with_a_local_causal_model():
    """Swap the networks for local, causal stand-ins (each latent frame -> 4 frames, the first -> 1, 8x8 pixels per
    latent pixel): then any tiling must reproduce the untiled result, so chunk and tile bookkeeping is exact."""
    model = HunyuanVideoVAE(TINY_CONFIG)

    def fake_decode(z):
        first = F.interpolate(z[:, :3, :1], scale_factor=(1, 8, 8))
        return torch.cat([first, F.interpolate(z[:, :3, 1:], scale_factor=(4, 8, 8))], dim=2)

    def fake_encode(x):
        moments = torch.cat([F.avg_pool3d(x[:, :, :1], (1, 8, 8)), F.avg_pool3d(x[:, :, 1:], (4, 8, 8))], dim=2)
        return moments.repeat(1, 11, 1, 1, 1)[:, :32]

    model._decode_untiled, model._encode_untiled = fake_decode, fake_encode
    tiling = VAETiling(tile_px=32, overlap_px=16, tile_frames=8, overlap_frames=4)
    z, x = latent(9, size=7), video(33, size=56)
    torch.testing.assert_close(
        model.decode(z, tiled=True, tiling=tiling), model.decode(z, tiled=False), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        model.encode(x, tiled=True, tiling=tiling), model.encode(x, tiled=False), rtol=0, atol=1e-6
    )


def test_tiled_is_exact_when_one_tile_covers_everything(vae):
    z, x = latent(2, size=2), video(5, size=16)
    torch.testing.assert_close(vae.decode(z, tiled=True), vae.decode(z, tiled=False), rtol=0, atol=0)
    torch.testing.assert_close(vae.encode(x, tiled=True), vae.encode(x, tiled=False), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("tiling", "z"),
    [
        (VAETiling(32, 16, 64, 0), latent(1, size=6)),
        (VAETiling(256, 64, 8, 4), latent(4, size=2)),
        (VAETiling(32, 8, 8, 4), latent(4, size=6)),  # plan_decode's overlaps: a quarter tile, one latent
    ],
    ids=["spatial", "temporal", "planned"],
)
def test_tiled_error_is_no_worse_than_the_reference_tiling(vae, tiling, z):
    """Tiles see less context (group-norm statistics, causal attention, receptive field), so tiled decoding is not
    exact, and a random tiny VAE is very sensitive to that. Tolerance: our tiled-vs-untiled mean error within 25%
    of the error of diffusers' tiling (the official scheme) with the same tile sizes and weights."""
    ref = diffusers_vae()
    ref.enable_tiling(
        tile_sample_min_height=tiling.tile_px,
        tile_sample_min_width=tiling.tile_px,
        tile_sample_stride_height=tiling.tile_px - tiling.overlap_px,
        tile_sample_stride_width=tiling.tile_px - tiling.overlap_px,
        tile_sample_min_num_frames=tiling.tile_frames,
        tile_sample_stride_num_frames=tiling.tile_frames - tiling.overlap_frames,
    )
    ref.use_framewise_decoding = True
    exact = vae.decode(z, tiled=False, clamp=False)
    ours = (vae.decode(z, tiled=True, tiling=tiling, clamp=False) - exact).abs().mean()
    theirs = (ref.decode(z).sample - exact).abs().mean()
    assert 0 < ours < 1.25 * theirs


def diffusers_temporal_tiling(tiling: VAETiling):
    """diffusers' AutoencoderKLHunyuanVideo on the same weights, with its frame-wise (temporal) tiling at the same
    tile settings and no spatial tiling (the videos here fit one spatial tile)."""
    ref = diffusers_vae()
    ref.use_framewise_decoding = ref.use_framewise_encoding = True
    ref.tile_sample_min_num_frames = tiling.tile_frames
    ref.tile_sample_stride_num_frames = tiling.tile_frames - tiling.overlap_frames
    return ref


def test_temporal_tiles_equal_diffusers_tiled_decode_and_encode(vae):
    """Without a temporal overlap nothing is blended, so our temporal tiling must give exactly what diffusers' does:
    the same causal clips (3 latents = 9 frames here), and a clip that starts mid-video drops its first decoded
    frame (a lone first frame, decoded as an image) and its first latent when encoding."""
    tiling = VAETiling(tile_px=256, overlap_px=64, tile_frames=8, overlap_frames=0)
    ref = diffusers_temporal_tiling(tiling)
    z = latent(7, size=2)  # 25 frames of 16x16 px: clips at latents 0-2, 2-4, 4-6
    want = ref.decode(z).sample
    got = vae.decode(z, tiled=True, tiling=tiling, clamp=False)
    assert got.shape == want.shape == (1, 3, 25, 16, 16)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - vae.decode(z, tiled=False, clamp=False)).abs().max() > 1e-2  # tiling changes frames

    x = video(25, size=16)
    torch.testing.assert_close(
        vae.encode(x, tiled=True, tiling=tiling), ref.encode(x).latent_dist.mean, rtol=0, atol=1e-5
    )


def test_temporal_tile_overlaps_match_diffusers_but_for_the_crossfade_weights(vae):
    """diffusers' defaults (clips of 16 + 1 frames, 4 overlapping) on 7 latents (25 frames): clips at latents 0-4
    and 3-6. Every frame outside the overlap is exactly diffusers'; in the 4 overlapping frames (13-16) both blend
    the same two clips (the later one without its lone first frame), diffusers with weights 0, 1/4, 2/4, 3/4 for
    the later clip, we with 1/5 .. 4/5 (the ramp our spatial tiles use too)."""
    tiling = VAETiling(tile_px=256, overlap_px=64, tile_frames=16, overlap_frames=4)
    ref = diffusers_temporal_tiling(tiling)
    z = latent(7, size=2, seed=1)
    want = ref.decode(z).sample
    got = vae.decode(z, tiled=True, tiling=tiling, clamp=False)
    assert got.shape == want.shape == (1, 3, 25, 16, 16)
    outside = [f for f in range(25) if not 13 <= f <= 16]
    torch.testing.assert_close(got[:, :, outside], want[:, :, outside], rtol=0, atol=1e-5)

    untiled = diffusers_vae()  # each clip decoded alone by diffusers
    first = untiled.decode(z[:, :, 0:5]).sample[:, :, 13:17]  # frames 13-16 of the clip at latents 0-4
    later = untiled.decode(z[:, :, 3:7]).sample[:, :, 1:5]  # the clip at latents 3-6 starts at frame 12: drop it
    theirs = torch.tensor([0, 1, 2, 3]) / 4
    ours = torch.tensor([1, 2, 3, 4]) / 5
    for weights, result in ((theirs, want), (ours, got)):
        w = weights.view(1, 1, 4, 1, 1)
        torch.testing.assert_close(result[:, :, 13:17], (1 - w) * first + w * later, rtol=0, atol=1e-5)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and alive at once (weights excluded)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if id(storage) not in self.seen:
                    self.seen.add(id(storage))
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        return out

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes


def peak_decode_bytes(model, z, tiled, tiling):
    with LiveTensorBytes() as meter:
        model.decode(z, tiled=tiled, tiling=tiling)
    return meter.peak


def test_tiled_peak_memory_stays_bounded_as_frames_grow(vae):
    tiling = VAETiling(tile_px=256, overlap_px=64, tile_frames=8, overlap_frames=0)
    short, long = latent(5, size=2), latent(9, size=2)  # 17 and 33 frames of 16x16 pixels
    untiled = [peak_decode_bytes(vae, z, False, tiling) for z in (short, long)]
    tiled = [peak_decode_bytes(vae, z, True, tiling) for z in (short, long)]
    output_growth = 3 * (33 - 17) * 16 * 16 * 4
    assert untiled[1] - untiled[0] > 8 * output_growth  # untiled: every activation grows with the frames
    assert tiled[1] - tiled[0] < 3 * output_growth  # tiled: only the output (and its blend buffer) grows
    assert tiled[1] < untiled[1] / 3


# Errors users can hit.


@pytest.mark.parametrize(
    ("shape", "message"),
    [((1, 3, 8, 32, 32), "4k+1 frames"), ((1, 4, 9, 32, 32), "[batch, 3, frames"), ((1, 3, 9, 36, 32), "multiples")],
)
def test_bad_video_raises_input_error(vae, shape, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("+", r"\+")):
        vae.encode(torch.zeros(shape))


def test_bad_latent_and_tiling_raise_input_error(vae):
    with pytest.raises(InputError, match="latent must be"):
        vae.decode(torch.zeros(1, 4, 3, 4, 4))
    with pytest.raises(InputError, match="latent must be"):
        vae.decode(torch.zeros(1, 16, 4, 4))
    with pytest.raises(InputError, match="tiling"):
        vae.decode(latent(3), tiling=VAETiling(tile_px=100))


@pytest.mark.parametrize(
    ("keys", "looks_like"),
    [
        ({"visual_transformer_blocks.0.self_attention.to_query.weight": (4, 4)}, "Kandinsky 5 DiT"),
        (
            {"decoder.conv_in.weight": (512, 16, 3, 3), "encoder.conv_in.weight": (128, 3, 3, 3)},
            r"image VAE \(2D convolutions.* 16 latent channels",
        ),
        ({"model.layers.0.mlp.up_proj.weight": (4, 4), "model.embed_tokens.weight": (4, 4)}, "text encoder"),
        ({"decoder.conv_in.conv.weight": (512, 32, 3, 3, 3), "decoder.up.0.block.0.norm1.weight": (4,)}, "32 latent"),
    ],
)
def test_wrong_file_raises_weights_error(tmp_path, keys, looks_like):
    path = tmp_path / "not_a_hunyuan_vae.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    with pytest.raises(WeightsError, match=looks_like) as err:
        load_hunyuan_vae(path)
    assert "not_a_hunyuan_vae.safetensors" in str(err.value)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = diffusers_state()
    del state["decoder.mid_block.attentions.0.to_q.weight"]
    state["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"Missing: decoder\.mid\.attn_1\.q\.weight.*Unexpected: decoder\.extra"):
        load_hunyuan_vae(path, config=TINY_CONFIG)


def test_weights_of_another_size_are_a_weights_error(folder):
    weights = folder / "diffusion_pytorch_model.safetensors"
    with pytest.raises(WeightsError, match=r"keys do not match.*Missing: decoder\.up\.0\.block\.2\."):
        load_hunyuan_vae(weights)  # tiny weights, released config (3 resnets per decoder level, not 2)
    narrower = HunyuanVAEConfig(block_out_channels=(4, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
    with pytest.raises(
        WeightsError, match=r"shapes differ.*encoder\.conv_in\.conv\.weight \(8, 3, 3, 3, 3\) != \(4, 3, 3, 3, 3\)"
    ):
        load_hunyuan_vae(weights, config=narrower)


def test_unusable_paths_raise_weights_error(tmp_path):
    pickled = tmp_path / "vae.pt"
    torch.save({"a": torch.zeros(1)}, pickled)
    with pytest.raises(WeightsError, match="only safetensors"):
        load_hunyuan_vae(pickled)
    garbage = tmp_path / "truncated.safetensors"
    garbage.write_bytes(b"\x10\x00\x00")
    with pytest.raises(WeightsError, match="cannot read"):
        load_hunyuan_vae(garbage)
    with pytest.raises(WeightsError, match="does not exist"):
        load_hunyuan_vae(tmp_path / "nowhere")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(WeightsError, match="config.json"):
        load_hunyuan_vae(empty)
    flux = tmp_path / "flux_vae"
    flux.mkdir()
    (flux / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (flux / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match="AutoencoderKL, not the HunyuanVideo VAE"):
        load_hunyuan_vae(flux)


def test_prefixed_checkpoint_keys_are_accepted(tmp_path):
    state = {f"vae.{k}": v for k, v in diffusers_state().items()}
    path = tmp_path / "prefixed.safetensors"
    save_file(state, str(path))
    loaded = load_hunyuan_vae(path, config=TINY_CONFIG)
    assert set(loaded.state_dict()) == set(to_our_layout(diffusers_state()))


def test_auto_tiling_follows_the_memory_budget(vae, monkeypatch):
    import kandinsky_core.hunyuan_vae as hunyuan_vae

    assert vae._use_tiles("auto", 17 * 64 * 64) is False
    assert vae._use_tiles(True, 1) is True and vae._use_tiles(False, 10**12) is False
    monkeypatch.setattr(hunyuan_vae, "_CPU_BUDGET", 1024)
    assert vae._use_tiles("auto", 17 * 64 * 64) is True


def test_layers_come_from_the_operations_namespace():
    class Conv3d(torch.nn.Conv3d):
        pass

    class Linear(torch.nn.Linear):
        pass

    ops = SimpleNamespace(Conv3d=Conv3d, Linear=Linear, GroupNorm=torch.nn.GroupNorm)
    model = HunyuanVideoVAE(TINY_CONFIG, operations=ops)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert convs and all(type(m) is Conv3d for m in convs)
    assert len(linears) == 8 and all(type(m) is Linear for m in linears)


# Decode planning from measured peaks (what VAE Decode asks ComfyUI for, and how it tiles by default).


def test_decode_peak_estimate_covers_the_measured_peak_of_the_whole_tiled_decode():
    """decode_peak_bytes adds the largest tile's peak to the tiling's buffers; the whole tiled decode of the
    released VAE, measured on meta tensors, must stay under it, and not by much (the estimate sizes ComfyUI's load)."""
    from kandinsky_core.hunyuan_vae import HUNYUAN_VAE_CONFIG, _meta_vae, decode_peak_bytes
    from kandinsky_core.memory import measure_peak

    shape, tiling = (1, 16, 9, 64, 96), VAETiling(512, 128, 16, 4)
    vae = _meta_vae(HUNYUAN_VAE_CONFIG, torch.bfloat16)
    z = torch.empty(shape, device="meta", dtype=torch.bfloat16)
    measured = measure_peak(lambda: vae.decode(z, tiled=True, tiling=tiling))
    estimate = decode_peak_bytes(HUNYUAN_VAE_CONFIG, torch.bfloat16, shape, True, tiling)
    assert measured <= estimate <= 1.25 * measured, (measured, estimate)


def test_plan_decode_takes_the_largest_tiles_that_fit():
    from kandinsky_core.hunyuan_vae import HUNYUAN_VAE_CONFIG, plan_decode

    lite_5s = (1, 16, 31, 64, 96)  # 121 frames, 768x512
    roomy = plan_decode(HUNYUAN_VAE_CONFIG, torch.bfloat16, lite_5s, 1000 * 2**30)
    assert not roomy.tiled and roomy.work == 1.0
    for gib in (16, 8, 3):
        plan = plan_decode(HUNYUAN_VAE_CONFIG, torch.bfloat16, lite_5s, gib * 2**30)
        assert plan.tiled and plan.peak_bytes <= gib * 2**30, (gib, plan)
    sd = plan_decode(HUNYUAN_VAE_CONFIG, torch.bfloat16, lite_5s, 16 * 2**30)
    assert sd.tiling.tile_px >= 768, f"an SD video is decoded in whole frames when they fit: {sd}"
    assert sd.work < 2.0, sd  # temporal clips of 16 + 1 frames overlapping by one latent


def test_auto_decode_of_an_sd_video_uses_whole_frames_when_memory_allows(monkeypatch):
    """tiled='auto' decodes with plan_decode's tiles for the memory at hand: a Lite 5 s 768x512 latent on a device
    with 20 GiB to spare is decoded in whole frames (temporal clips only), not in the 256 px tiles that cost 4.1x
    the untiled work."""
    from kandinsky_core import hunyuan_vae

    vae = copy.copy(hunyuan_vae._meta_vae(hunyuan_vae.HUNYUAN_VAE_CONFIG, torch.bfloat16))
    seen = []

    def decode_pixels(z, tiled, tiling):
        seen.append((tiled, tiling))
        return torch.empty((z.shape[0], 3, 4 * (z.shape[2] - 1) + 1, z.shape[3] * 8, z.shape[4] * 8), device="meta")

    vae._decode_pixels = decode_pixels
    z = torch.empty(1, 16, 31, 64, 96, device="meta", dtype=torch.bfloat16)
    vae.decode(z, tiled="auto", budget_bytes=20 * 2**30)
    ((tiled, tiling),) = seen
    assert tiled and tiling.tile_px >= 768, tiling
