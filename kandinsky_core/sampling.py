"""Flow-matching schedule and Euler sampler with classifier-free guidance, I2V and I2I conditioning.

Everything here works on the DiT's latent space: `latent * variant.latent_scale`, channels-first
`[B, 16, T, H, W]`. `latent_to_dit` / `dit_to_latent` convert from / to ComfyUI LATENTs (unscaled VAE latents).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from .errors import InputError
from .nabla import NablaParams
from .settings import uses_cfg

LATENT_CHANNELS = 16

StepCallback = Callable[[int, int, Tensor], None]


@dataclass
class TextConditioning:
    """Encoded prompt: Qwen2.5-VL hidden states, their mask (True = real token) and CLIP-L pooled output."""

    text_embeds: Tensor  # [B, L, 3584]
    text_mask: Tensor  # [B, L] bool
    pooled: Tensor  # [B, 768]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextConditioning":
        return TextConditioning(
            text_embeds=self.text_embeds.to(device=device, dtype=dtype),
            text_mask=self.text_mask.to(device=device),
            pooled=self.pooled.to(device=device, dtype=dtype),
        )


def latent_to_dit(latent: Tensor, scale: float) -> Tensor:
    return latent * scale


def dit_to_latent(x: Tensor, scale: float) -> Tensor:
    return x / scale


def flow_timesteps(num_steps: int, scheduler_scale: float) -> Tensor:
    """Times from 1 (noise) to 0 (data), warped towards 1 by `scheduler_scale`: t' = s*t / (1 + (s-1)*t).

    Computed in float32 on the CPU, as the official sampler does on its device, so the values match it bit for bit.
    """
    if num_steps < 1:
        raise InputError(
            f"steps={num_steps} is not allowed: use at least 1 sampling step (official: 50, distilled: 16)."
        )
    if scheduler_scale <= 0:
        raise InputError(f"scheduler_scale={scheduler_scale} is not allowed: it must be > 0 (official: 5 or 10).")
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float32)
    return scheduler_scale * t / (1 + (scheduler_scale - 1) * t)


def x0_estimate(x_prev: Tensor, x_next: Tensor, t_prev: float, t_next: float) -> Tensor:
    """The clean latent an Euler step points at: with x_t = (1 - t) x0 + t noise, velocity v = dx/dt and
    x0 = x_t - t v."""
    v = (x_next - x_prev) / (t_next - t_prev)
    return x_next - t_next * v


def make_noise(
    shape: tuple[int, ...] | torch.Size,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Gaussian noise from a CPU generator, so a seed gives the same video on every device and dtype."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def adaptive_mean_std_normalization(source: Tensor, reference: Tensor) -> Tensor:
    """Moves each source frame's mean/std towards the reference's, by at most a small clamped amount.

    source `[C, Ts, H, W]` (statistics per frame), reference `[C, Tr, H, W]` (one global mean and std).
    The clamp bounds are the official constants.
    """
    dims = (0, 2, 3)
    source_mean = source.mean(dim=dims, keepdim=True)
    source_std = source.std(dim=dims, keepdim=True)
    reference_mean = torch.clamp(reference.mean(), source_mean - 0.05, source_mean + 0.1)
    reference_std = torch.clamp(reference.std(), source_std - 0.1, source_std + 0.25)
    return (source - source_mean) / source_std * reference_std + reference_mean


def normalize_first_frames(x: Tensor, num_first: int = 4, num_reference: int = 5) -> Tensor:
    """Pulls the first `num_first` latent frames' statistics towards the frames that follow them (I2V).

    x: `[B, C, T, H, W]`, each batch item handled on its own. The official code uses
    `reference = frames[4 : 4 + min(5, T - 1)]`; with T <= 4 that slice is empty and it yields NaNs
    (and with T == 1 a tuple), so here such short clips are returned unchanged.
    """
    T = x.shape[2]
    reference_end = num_first + min(num_reference, T - 1)
    if T <= num_first or reference_end <= num_first:
        return x
    out = x.clone()
    for b in range(x.shape[0]):
        first = x[b, :, :num_first]
        reference = x[b, :, num_first:reference_end]
        out[b, :, :num_first] = adaptive_mean_std_normalization(first, reference)
    return out


def _arch_flags(dit: Any) -> tuple[bool, bool]:
    """(visual_cond, instruct) of the DiT's architecture."""
    arch = getattr(dit, "arch", dit)
    return bool(getattr(arch, "visual_cond", False)), bool(getattr(arch, "instruct", False))


def empty_conditioning(dit: Any, x: Tensor) -> Tensor | None:
    """The conditioning channels a DiT with image inputs (I2V `visual_cond`, I2I `instruct`) takes next to the latent
    x [B, 16, T, H, W] when no image is given: 16 zero latent channels and a zero mask, [B, 17, T, H, W]; None for a
    DiT without them. `torch.cat([x, extra], dim=1)` is the DiT's input."""
    visual_cond, instruct = _arch_flags(dit)
    if not (visual_cond or instruct):
        return None
    B, _, T, H, W = x.shape
    return torch.zeros((B, LATENT_CHANNELS + 1, T, H, W), dtype=x.dtype, device=x.device)


def _check_inputs(
    noise: Tensor,
    cond: TextConditioning,
    uncond: TextConditioning | None,
    guidance: float,
    visual_cond: bool,
    instruct: bool,
    first_frame_latent: Tensor | None,
    edit_latent: Tensor | None,
) -> None:
    if noise.ndim != 5 or noise.shape[1] != LATENT_CHANNELS:
        raise InputError(
            f"latent has shape {tuple(noise.shape)}: expected [B, {LATENT_CHANNELS}, T, H, W] "
            "(a Kandinsky 5 / HunyuanVideo or FLUX latent). Use an empty latent made for Kandinsky 5."
        )
    B, _, T, H, W = noise.shape
    for name, c in (("positive", cond), ("negative", uncond)):
        if c is not None and c.text_embeds.shape[0] not in (1, B):
            raise InputError(
                f"{name} conditioning has batch {c.text_embeds.shape[0]} but the latent has batch {B}: "
                "encode one prompt (batch 1) or one per latent."
            )
    if uses_cfg(guidance) and uncond is None:
        raise InputError(
            f"guidance={guidance} needs a negative conditioning: connect one, or set guidance to 1.0 "
            "(distilled and no-CFG variants)."
        )
    for name, lat, allowed in (
        ("first_frame_latent (start image)", first_frame_latent, visual_cond),
        ("edit_latent (edit image)", edit_latent, instruct),
    ):
        if lat is None:
            continue
        if not allowed:
            kind = "an image-to-video" if lat is first_frame_latent else "an image-edit (I2I)"
            raise InputError(f"{name} was given but this model does not take it: load {kind} variant, or remove it.")
        if lat.ndim != 5 or tuple(lat.shape[1:]) != (LATENT_CHANNELS, 1, H, W) or lat.shape[0] not in (1, B):
            raise InputError(
                f"{name} has shape {tuple(lat.shape)}: expected [{B}, {LATENT_CHANNELS}, 1, {H}, {W}], one frame "
                "with the generated latent's height and width. Resize the image to the output size before encoding."
            )


def _prepare(cond: TextConditioning, batch: int, device: torch.device) -> tuple[Tensor, Tensor | None, Tensor]:
    """(text_embeds, text_mask or None when nothing is padded, pooled), on the device, with the latent's batch.

    The mask is inspected here, once, so that no step has to read it back from the device.
    """
    c = cond.to(device=device)
    mask = c.text_mask.to(torch.bool)
    mask = None if bool(mask.all()) else mask.expand(batch, -1)
    return c.text_embeds.expand(batch, -1, -1), mask, c.pooled.expand(batch, -1)


@torch.no_grad()
def sample(
    dit: Any,
    noise: Tensor,
    cond: TextConditioning,
    uncond: TextConditioning | None,
    *,
    steps: int,
    guidance: float,
    scheduler_scale: float,
    rope_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
    nabla: NablaParams | None = None,
    first_frame_latent: Tensor | None = None,
    edit_latent: Tensor | None = None,
    callback: StepCallback | None = None,
    attention_backend: str | None = None,
    block_cache: Any = None,
) -> Tensor:
    """Euler integration of the flow from t=1 (noise) to t=0, returning the sample in DiT latent space.

    noise, first_frame_latent (I2V) and edit_latent (I2I) are scaled latents `[B, 16, T, H, W]`
    (`first_frame_latent` and `edit_latent` have one frame). With guidance 1.0 the negative prompt is
    never evaluated. `callback(step_index, steps, x)` runs after every step with the current latent (clone it
    to keep it: I2V overwrites its frame 0 in place); to cancel, raise from it: the exception propagates and
    sampling stops there. The loop itself never reads a value back from the device.
    `block_cache` (e.g. `magcache.MagCache` or `magcache.MagCalibration`) gets `begin(steps, cfg)` once, then gives
    the DiT a `block_cache=hook(step, branch)` for every call (branch 0: positive prompt, 1: negative).
    """
    visual_cond, instruct = _arch_flags(dit)
    _check_inputs(noise, cond, uncond, guidance, visual_cond, instruct, first_frame_latent, edit_latent)
    B, _, T, H, W = noise.shape
    device = noise.device
    use_cfg = uses_cfg(guidance)

    cond_args = _prepare(cond, B, device)
    uncond_args = _prepare(uncond, B, device) if use_cfg else None

    # The whole schedule goes to the device once: the loop never reads a device value back (no syncs).
    times = flow_timesteps(steps, scheduler_scale)
    dit_times = (times[:-1] * 1000).to(device)
    dts = torch.diff(times).to(device)

    x = noise.clone()
    extra = empty_conditioning(dit, x)
    if visual_cond:
        if first_frame_latent is not None:
            first_frame_latent = first_frame_latent.to(device=device, dtype=x.dtype).expand(B, -1, -1, -1, -1)
            extra[:, LATENT_CHANNELS:, :1] = 1
    elif instruct:
        if edit_latent is not None:
            extra[:, :LATENT_CHANNELS] = edit_latent.to(device=device, dtype=x.dtype)
            extra[:, LATENT_CHANNELS:] = 1

    if block_cache is not None:
        block_cache.begin(steps, use_cfg)

    def velocity(
        model_input: Tensor, t: Tensor, text: tuple[Tensor, Tensor | None, Tensor], step: int, branch: int
    ) -> Tensor:
        text_embeds, text_mask, pooled = text
        hook = {} if block_cache is None else {"block_cache": block_cache.hook(step, branch)}
        v = dit(
            model_input,
            text_embeds,
            pooled,
            t,
            text_mask=text_mask,
            rope_scale=rope_scale,
            nabla=nabla,
            attention_backend=attention_backend,
            **hook,
        )
        return v[:, :LATENT_CHANNELS]

    for i in range(steps):
        if first_frame_latent is not None:
            # The official sampler writes the clean image into the noisy latent itself at every step.
            x[:, :, :1] = first_frame_latent
        model_input = x if extra is None else torch.cat([x, extra], dim=1)
        t = dit_times[i].expand(B)
        v = velocity(model_input, t, cond_args, i, 0)
        if use_cfg:
            v_uncond = velocity(model_input, t, uncond_args, i, 1)
            v = v_uncond + guidance * (v - v_uncond)
        x = x + dts[i] * v.to(x.dtype)
        if callback is not None:
            callback(i, steps, x)

    if first_frame_latent is not None:
        x[:, :, :1] = first_frame_latent
        x = normalize_first_frames(x)
    return x


def denoise(
    dit: Any,
    latent: Tensor,
    cond: TextConditioning,
    uncond: TextConditioning | None,
    *,
    latent_scale: float,
    seed: int,
    image_latent: Tensor | None = None,
    edit_image_latent: Tensor | None = None,
    **sample_kwargs: Any,
) -> Tensor:
    """LATENT in, LATENT out: seeded noise of `latent`'s shape, `sample`, and the scale conversions around it.

    `image_latent` (I2V start frame) and `edit_image_latent` (I2I) are unscaled VAE latents.
    """
    noise = make_noise(latent.shape, seed, dtype=torch.float32, device=latent.device)
    x = sample(
        dit,
        noise,
        cond,
        uncond,
        first_frame_latent=None if image_latent is None else latent_to_dit(image_latent.float(), latent_scale),
        edit_latent=None if edit_image_latent is None else latent_to_dit(edit_image_latent.float(), latent_scale),
        **sample_kwargs,
    )
    return dit_to_latent(x, latent_scale)


# Memory: what one sampling step needs beyond the weights, measured (kandinsky_core.memory) on a meta copy of the DiT.


@lru_cache(maxsize=4)
def _meta_dit(arch: Any, dtype: torch.dtype) -> Any:
    from .model import Kandinsky5DiT

    with torch.device("meta"):
        return Kandinsky5DiT(arch, dtype=dtype).eval().requires_grad_(False)


@lru_cache(maxsize=64)
def step_peak_bytes(
    arch: Any,
    dtype: torch.dtype,
    shape: tuple[int, int, int, int, int],
    text_len: int,
    cfg: bool,
    nabla: NablaParams | None = None,
) -> int:
    """Activation peak of one Euler step of `sample` for a latent `shape` [B, 16, T, H, W] (float32, as the Sampler
    keeps it), `text_len` text tokens, with or without CFG (the branches run one after the other, so CFG adds one
    velocity, not a second forward's activations), measured by running the step on meta tensors. With NABLA, the
    transient of its block mask (pooled map, sort, cumsum) is added on top of the dense forward's peak; the sparse
    executors allocate no more than dense attention's output."""
    from .memory import measure_peak

    dit = _meta_dit(arch, dtype)
    b, _, t, h, w = shape
    visual_cond, instruct = _arch_flags(arch)
    meta = dict(device="meta")
    x = torch.empty(shape, dtype=torch.float32, **meta)
    text = torch.empty((b, text_len, arch.in_text_dim), dtype=dtype, **meta)
    pooled = torch.empty((b, arch.in_text_dim2), dtype=dtype, **meta)
    timestep = torch.empty((b,), **meta)

    def step() -> Tensor:
        state = x.clone()  # the sampler's own latent, next to the noise it started from
        # I2V / I2I models: the conditioning channels the sampler keeps for the whole run
        extra = torch.zeros((b, LATENT_CHANNELS + 1, t, h, w), **meta) if visual_cond or instruct else None
        model_input = state if extra is None else torch.cat([state, extra], dim=1)
        v = dit(model_input, text, pooled, timestep)[:, :LATENT_CHANNELS]
        if cfg:
            v_uncond = dit(model_input, text, pooled, timestep)[:, :LATENT_CHANNELS]
            v = v_uncond + 5.0 * (v - v_uncond)
        return state + 0.1 * v.to(state.dtype)

    peak = measure_peak(step)
    if nabla is not None:
        from .nabla import nabla_block_mask, sliding_tile_mask

        p = arch.patch_size
        grid = (t // p[0], h // p[1], w // p[2])
        heads = arch.model_dim // arch.head_dim
        q = torch.empty((b, math.prod(grid), heads, arch.head_dim), dtype=dtype, **meta)
        sta = sliding_tile_mask(grid[0], grid[1] // 8, grid[2] // 8, nabla.wT, nabla.wH, nabla.wW, "meta")
        peak += measure_peak(lambda: nabla_block_mask(q, q, sta, nabla.P))
    return peak
