"""The sampler against hand-computed values, with fake DiTs that record what they are given."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kandinsky_core.errors import InputError
from kandinsky_core.sampling import (
    TextConditioning,
    denoise,
    dit_to_latent,
    flow_timesteps,
    latent_to_dit,
    make_noise,
    normalize_first_frames,
    sample,
    x0_estimate,
)


class FakeDiT:
    """v = a * x[:, :16] + pooled[:, 0] (per batch item) + t / 1000; records every call."""

    def __init__(self, visual_cond=False, instruct=False, a=0.5):
        self.arch = SimpleNamespace(visual_cond=visual_cond, instruct=instruct)
        self.a = a
        self.calls = []

    def __call__(self, x, text_embeds, pooled, timestep, text_mask=None, **kwargs):
        self.calls.append(dict(x=x.clone(), text_embeds=text_embeds, pooled=pooled, t=timestep.clone(), mask=text_mask))
        self.calls[-1].update(kwargs)
        return self.a * x[:, :16] + pooled[:, 0].view(-1, 1, 1, 1, 1) + timestep.view(-1, 1, 1, 1, 1) / 1000


def cond(value: float, batch: int = 1, length: int = 3, real: int | None = None) -> TextConditioning:
    mask = torch.ones(batch, length, dtype=torch.bool)
    if real is not None:
        mask[:, real:] = False
    return TextConditioning(torch.full((batch, length, 8), value), mask, torch.full((batch, 4), value))


def test_flow_timesteps_hand_computed():
    # s*t / (1 + (s-1)*t) with s = 5 at t = 1, .75, .5, .25, 0
    expected = [1.0, 3.75 / 4.0, 2.5 / 3.0, 1.25 / 2.0, 0.0]
    assert flow_timesteps(4, 5.0).tolist() == pytest.approx(expected, abs=1e-7)
    assert flow_timesteps(2, 1.0).tolist() == [1.0, 0.5, 0.0]
    assert flow_timesteps(3, 10.0).dtype == torch.float32


@pytest.mark.parametrize("steps, scale", [(0, 5.0), (4, 0.0)])
def test_flow_timesteps_rejects(steps, scale):
    with pytest.raises(InputError, match="steps|scheduler_scale"):
        flow_timesteps(steps, scale)


def euler_reference(x, steps, scale, guidance, a, c, u):
    """Hand-rolled Euler with the fake DiT's closed form: v_c = a*x + c + t, v_u = a*x + u + t."""
    ts = [scale * t / (1 + (scale - 1) * t) for t in np.linspace(1, 0, steps + 1)]
    x = x.double().clone()
    for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
        v_c = a * x + c + t0
        v_u = a * x + u + t0
        x = x + (t1 - t0) * (v_u + guidance * (v_c - v_u))
    return x


def test_cfg_and_euler_match_hand_computation():
    dit = FakeDiT()
    noise = make_noise((1, 16, 2, 4, 4), seed=3)
    out = sample(dit, noise, cond(0.3), cond(-0.2), steps=3, guidance=4.0, scheduler_scale=5.0)
    ref = euler_reference(noise, 3, 5.0, 4.0, 0.5, 0.3, -0.2)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # two DiT calls per step (conditional, then negative), at t*1000 for t = 1, s*(2/3)/(1+(s-1)*2/3), ...
    assert len(dit.calls) == 6
    assert [float(c["pooled"][0, 0]) for c in dit.calls[:2]] == pytest.approx([0.3, -0.2])
    assert [float(c["t"][0]) for c in dit.calls[::2]] == pytest.approx([1000.0, 10000 / 11, 5000 / 7], rel=1e-6)
    assert torch.equal(noise, make_noise((1, 16, 2, 4, 4), seed=3)), "sample must not modify the noise in place"


def test_guidance_one_skips_the_negative_pass():
    dit = FakeDiT()
    noise = make_noise((1, 16, 1, 4, 4), seed=0)
    out = sample(dit, noise, cond(0.3), cond(-0.2), steps=4, guidance=1.0, scheduler_scale=3.0)
    assert len(dit.calls) == 4
    assert all(float(c["pooled"][0, 0]) == pytest.approx(0.3) for c in dit.calls)
    torch.testing.assert_close(out.double(), euler_reference(noise, 4, 3.0, 1.0, 0.5, 0.3, -0.2), atol=1e-5, rtol=0)
    # no negative conditioning is needed at all
    sample(FakeDiT(), noise, cond(0.3), None, steps=2, guidance=1.0, scheduler_scale=3.0)


def test_text_mask_and_options_reach_the_dit():
    dit = FakeDiT()
    noise = make_noise((2, 16, 1, 2, 2), seed=0)
    sample(
        dit, noise, cond(0.1, real=2), cond(0.0), steps=1, guidance=2.0, scheduler_scale=1.0,
        rope_scale=(1.0, 3.16, 3.16), nabla="N", attention_backend="sdpa",
    )  # fmt: skip
    c, u = dit.calls
    assert c["mask"].tolist() == [[True, True, False]] * 2  # batch 1 conditioning expands to the latent batch
    assert u["mask"] is None  # nothing padded: no mask, the attention's fast path
    assert c["text_embeds"].shape == (2, 3, 8) and c["t"].shape == (2,)
    assert c["rope_scale"] == (1.0, 3.16, 3.16) and c["nabla"] == "N" and c["attention_backend"] == "sdpa"


def test_i2v_first_frame_overwrite_and_mask_channel():
    dit = FakeDiT(visual_cond=True)
    B, T, H, W = 1, 6, 4, 4
    noise = make_noise((B, 16, T, H, W), seed=1)
    image = make_noise((B, 16, 1, H, W), seed=2)
    out = sample(dit, noise, cond(0.3), None, steps=3, guidance=1.0, scheduler_scale=5.0, first_frame_latent=image)
    assert len(dit.calls) == 3
    for i, call in enumerate(dit.calls):
        x = call["x"]
        assert x.shape == (B, 33, T, H, W)
        assert torch.equal(x[:, :16, :1], image), f"step {i}: frame 0 must be the clean image latent"
        assert torch.count_nonzero(x[:, 16:32]) == 0, "the visual_cond channels stay zero (official behaviour)"
        assert torch.equal(x[:, 32, 0], torch.ones(B, H, W)) and torch.count_nonzero(x[:, 32, 1:]) == 0
    # frames 1.. follow the Euler steps with frame 0 clamped to the image before every step
    x = noise.double().clone()
    ts = flow_timesteps(3, 5.0).double()
    for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
        x[:, :, :1] = image
        x = x + (t1 - t0) * (0.5 * x + 0.3 + t0)
    x[:, :, :1] = image
    torch.testing.assert_close(out.double(), first_frames_reference(x.float()).double(), atol=1e-5, rtol=1e-5)


def test_visual_cond_without_image_feeds_zero_channels():
    dit = FakeDiT(visual_cond=True)
    sample(dit, make_noise((1, 16, 2, 2, 2), 0), cond(0.0), None, steps=1, guidance=1.0, scheduler_scale=1.0)
    assert dit.calls[0]["x"].shape[1] == 33 and torch.count_nonzero(dit.calls[0]["x"][:, 16:]) == 0


def test_i2i_edit_channels():
    edit = make_noise((1, 16, 1, 4, 4), seed=5)
    noise = make_noise((1, 16, 1, 4, 4), seed=6)
    dit = FakeDiT(instruct=True)
    out = sample(dit, noise, cond(0.1), None, steps=2, guidance=1.0, scheduler_scale=3.0, edit_latent=edit)
    for call in dit.calls:
        assert torch.equal(call["x"][:, 16:32], edit) and torch.equal(call["x"][:, 32:], torch.ones(1, 1, 1, 4, 4))
    assert out.shape == noise.shape
    torch.testing.assert_close(out.double(), euler_reference(noise, 2, 3.0, 1.0, 0.5, 0.1, 0.0), atol=1e-5, rtol=0)
    dit = FakeDiT(instruct=True)  # T2I with an I2I model: zero image and zero mask (official generate_sample_ti2i)
    sample(dit, noise, cond(0.1), None, steps=1, guidance=1.0, scheduler_scale=3.0)
    assert dit.calls[0]["x"].shape[1] == 33 and torch.count_nonzero(dit.calls[0]["x"][:, 16:]) == 0


def test_noise_is_seeded_on_the_cpu():
    a = make_noise((1, 16, 2, 4, 4), seed=42)
    expected = torch.randn((1, 16, 2, 4, 4), generator=torch.Generator("cpu").manual_seed(42))
    assert torch.equal(a, expected)  # a CPU generator: the same numbers whatever device receives them
    assert torch.equal(make_noise((1, 16, 2, 4, 4), seed=42, dtype=torch.bfloat16), expected.bfloat16())
    assert not torch.equal(a, make_noise((1, 16, 2, 4, 4), seed=43))
    assert make_noise((1, 16, 1, 2, 2), seed=1, device="meta").device.type == "meta"


def test_callback_each_step_and_cancellation():
    seen = []
    dit = FakeDiT()
    noise = make_noise((1, 16, 1, 2, 2), seed=0)
    out = sample(
        dit, noise, cond(0.0), None, steps=3, guidance=1.0, scheduler_scale=1.0,
        callback=lambda i, n, x: seen.append((i, n, x.clone())),
    )  # fmt: skip
    assert [(i, n) for i, n, _ in seen] == [(0, 3), (1, 3), (2, 3)]
    assert torch.equal(seen[-1][2], out)

    class Cancelled(Exception):
        pass

    def cancel(i, n, x):
        if i == 1:
            raise Cancelled

    dit = FakeDiT()
    with pytest.raises(Cancelled):
        sample(dit, noise, cond(0.0), None, steps=5, guidance=1.0, scheduler_scale=1.0, callback=cancel)
    assert len(dit.calls) == 2


def first_frames_reference(x: torch.Tensor) -> torch.Tensor:
    """Hand-written (numpy, loops) official normalize_first_frame for [B, C, T, H, W], T > 4."""
    out = x.double().numpy().copy()
    for b in range(out.shape[0]):
        ref = out[b, :, 4 : 4 + min(5, out.shape[2] - 1)]
        ref_mean, ref_std = ref.mean(), ref.std(ddof=1)
        for f in range(4):
            frame = out[b, :, f]
            m, s = frame.mean(), frame.std(ddof=1)
            target_mean = min(max(ref_mean, m - 0.05), m + 0.1)
            target_std = min(max(ref_std, s - 0.1), s + 0.25)
            out[b, :, f] = (frame - m) / s * target_std + target_mean
    return torch.from_numpy(out)


@pytest.mark.parametrize("T", [5, 7, 12])
def test_normalize_first_frames_matches_hand_reference(T):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(2, 16, T, 4, 6, generator=g)
    x[:, :, :4] = x[:, :, :4] * 2.0 + 0.7  # first frames off from the rest: the clamps are exercised
    x[1, :, :4] = x[1, :, :4] * 0.1 - 0.01
    out = normalize_first_frames(x)
    torch.testing.assert_close(out.double(), first_frames_reference(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, :, 4:], x[:, :, 4:])


def test_normalize_first_frames_short_clips_unchanged():
    x = torch.randn(1, 16, 4, 2, 2)
    assert torch.equal(normalize_first_frames(x), x)  # the official code would return NaNs here


def test_latent_scaling_and_denoise():
    latent = torch.randn(1, 16, 1, 2, 2)
    assert torch.allclose(dit_to_latent(latent_to_dit(latent, 0.476986), 0.476986), latent)
    dit = FakeDiT()
    out = denoise(dit, latent, cond(0.2), None, latent_scale=0.5, seed=9, steps=2, guidance=1.0, scheduler_scale=2.0)
    ref = euler_reference(make_noise(latent.shape, 9), 2, 2.0, 1.0, 0.5, 0.2, 0.0) / 0.5
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise=torch.zeros(1, 4, 1, 2, 2)), "expected \\[B, 16, T, H, W\\]"),
        (dict(guidance=5.0, uncond=None), "needs a negative conditioning"),
        (dict(first_frame_latent=torch.zeros(1, 16, 1, 2, 2)), "does not take it"),
        (dict(dit=FakeDiT(visual_cond=True), first_frame_latent=torch.zeros(1, 16, 1, 4, 2)), "expected \\[1, 16, 1"),
        (dict(edit_latent=torch.zeros(1, 16, 1, 2, 2)), "image-edit"),
        (dict(cond=cond(0.0, batch=3)), "batch 3"),
    ],
)
def test_input_errors(kwargs, match):
    args = dict(dit=FakeDiT(), noise=torch.zeros(1, 16, 1, 2, 2), cond=cond(0.0), uncond=cond(0.0), guidance=1.0)
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        sample(
            args["dit"], args["noise"], args["cond"], args["uncond"], steps=1, guidance=args["guidance"],
            scheduler_scale=1.0, first_frame_latent=args.get("first_frame_latent"),
            edit_latent=args.get("edit_latent"),
        )  # fmt: skip


def test_x0_estimate_recovers_the_clean_latent_of_a_straight_flow():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    t1, t2 = 0.8, 0.55
    x_t1, x_t2 = (1 - t1) * x0 + t1 * noise, (1 - t2) * x0 + t2 * noise
    torch.testing.assert_close(x0_estimate(x_t1, x_t2, t1, t2), x0)


@pytest.mark.parametrize("guidance, one_step, two_steps", [(0.25, 0.075, 0.565625), (0.0, 0.2, 0.675)])
def test_guidance_below_one_still_applies_cfg(guidance, one_step, two_steps):
    """Guidance in [0, 1) is CFG (an interpolation towards the negative prompt), not CFG off as guidance 1 is.

    By hand, with the fake DiT's a = 0.5, c = 0.3, u = -0.2 and every latent value 2, scheduler scale 1:
    one step, t = 1 -> 0 (dt = -1): v_c = 0.5 * 2 + 0.3 + 1 = 2.3, v_u = 0.5 * 2 - 0.2 + 1 = 1.8,
    v = v_u + g (v_c - v_u) = 1.8 + 0.5 g; g = 0.25: x = 2 - 1.925 = 0.075; g = 0: x = 2 - 1.8 = 0.2
    (CFG switched off would give 2 - 2.3 = -0.3).
    Two steps, t = 1 -> 0.5 -> 0 (dt = -0.5): x1 = 2 - 0.5 (1.8 + 0.5 g) = 1.0375 (g = 0.25) / 1.1 (g = 0);
    at t = 0.5, v = 0.5 x1 - 0.2 + 0.5 + 0.5 g = 0.94375 / 0.85, so x2 = x1 - 0.5 v = 0.565625 / 0.675.
    """
    noise = torch.full((1, 16, 1, 2, 2), 2.0)
    one = sample(FakeDiT(), noise, cond(0.3), cond(-0.2), steps=1, guidance=guidance, scheduler_scale=1.0)
    torch.testing.assert_close(one, torch.full_like(noise, one_step), atol=1e-6, rtol=0)

    dit = FakeDiT()
    two = sample(dit, noise, cond(0.3), cond(-0.2), steps=2, guidance=guidance, scheduler_scale=1.0)
    assert [float(c["pooled"][0, 0]) for c in dit.calls] == pytest.approx([0.3, -0.2, 0.3, -0.2])  # both, each step
    torch.testing.assert_close(two, torch.full_like(noise, two_steps), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("grid", "batch", "cfg", "text_len"),
    [((3, 8, 12), 1, True, 7), ((5, 16, 16), 1, False, 12), ((2, 16, 24), 2, True, 5)],
)
def test_step_memory_estimate_matches_a_measured_sampling_step(grid, batch, cfg, text_len, comfy_api):
    """The Sampler asks ComfyUI for step_peak_bytes (measured on meta tensors): it must match the peak of a real
    one-step `sample` on the CPU (every tensor alive at once counted by kandinsky_core.memory's tracker), CFG
    included: its two branches run one after the other, so CFG costs one more velocity, not twice the activations
    (the old formula assumed 40 live copies, doubled for CFG: several times the measurement)."""
    from tiny import TINY_ARCHS, make_tiny_dit

    from kandinsky_core.memory import measure_peak
    from kandinsky_core.sampling import step_peak_bytes

    arch = TINY_ARCHS["lite"]
    dit = make_tiny_dit(arch)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, 16, *grid, generator=g)

    def conditioning():
        embeds = torch.randn(1, text_len, arch.in_text_dim, generator=g)
        pooled = torch.randn(1, arch.in_text_dim2, generator=g)
        return TextConditioning(embeds, torch.ones(1, text_len, dtype=torch.bool), pooled)

    cond, uncond = conditioning(), conditioning() if cfg else None
    measured = measure_peak(
        lambda: sample(dit, noise, cond, uncond, steps=1, guidance=5.0 if cfg else 1.0, scheduler_scale=1.0),
        fused_attention=False,
    )
    # what Kandinsky5Model.memory_estimate (the Sampler, ComfyUI's memory_required) asks for, before the margin
    estimate = step_peak_bytes(arch, dit.compute_dtype, (batch, 16, *grid), text_len, cfg)
    assert 0.95 * measured <= estimate <= 1.1 * measured, (measured, estimate)
