"""HunyuanVideo 3D causal VAE (the video VAE of Kandinsky 5): encode / decode, tiling and its memory plan, loading.

Pixels `[B, 3, F, H, W]` in -1..1 with F = 4k + 1 <-> latents `[B, 16, k + 1, H/8, W/8]`, unscaled (the DiT's
scaling by variants.HUNYUAN_LATENT_SCALE, this VAE's config scaling_factor 0.476986, happens in sampling.py).
Convolutions are causal in time: frame t only sees frames <= t, the first frame is padded by replication, and the
first frame is compressed alone (hence 4k + 1).
Numerically this is diffusers' AutoencoderKLHunyuanVideo; weights load from either key layout users have.

The networks and the config are in hunyuan_vae_layers.py (importable from here too). Our parameter names follow the
original latent-diffusion layout ComfyUI uses (`encoder.down.{i}.block.{j}`, `mid.attn_1`, `norm_out`), with the
attention projections as linear layers (2D weights). This file stays a little over 500 lines on purpose: the tiled
decode, its memory plan and the loader share the VAE's config and are read together when memory is the question.
"""

import copy
import dataclasses
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from kandinsky_core.errors import InputError, WeightsError
from kandinsky_core.hunyuan_vae_layers import (  # HunyuanVAEConfig, HUNYUAN_VAE_CONFIG are imported from here too
    HUNYUAN_VAE_CONFIG,
    TORCH_OPS,
    Decoder,
    Encoder,
    HunyuanVAEConfig,
)
from kandinsky_core.memory import ALLOCATOR_MARGIN, measure_peak
from kandinsky_core.vae_posterior import posterior_latent
from kandinsky_core.vae_tiling import blend_chunks_1d, tile_spans, tiled_map_2d
from kandinsky_core.weights import compare_shapes, listing, read_weights, strip_vae_prefix, what_is_it


@dataclass(frozen=True)
class VAETiling:
    """Tile sizes, in pixels and pixel frames. Defaults: diffusers' spatial tiles (256 px, 64 px overlap)
    and the official Kandinsky temporal tiles (clips of 16 + 1 frames, 8 of them overlapping).

    Tiled results are close to, not equal to, untiled ones: a tile sees less context (group-norm statistics,
    the mid-block attention, the convolutions' reach), and overlaps are cross-faded linearly. Where one tile
    covers the whole input, tiled and untiled are identical.
    """

    tile_px: int = 256
    overlap_px: int = 64
    tile_frames: int = 16
    overlap_frames: int = 8


Tiled = bool | Literal["auto"]

# Rough count of full-resolution, first-level-width activations alive at once in an untiled encode.
_LIVE_FULL_RES_ACTIVATIONS = 8
_CPU_BUDGET = 4 * 2**30


class HunyuanVideoVAE(nn.Module):
    """The HunyuanVideo VAE. `encode` gives the posterior mean (or a sample), `decode` pixels clamped to -1..1."""

    def __init__(self, config: HunyuanVAEConfig = HUNYUAN_VAE_CONFIG, operations=TORCH_OPS):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, operations)
        self.decoder = Decoder(config, operations)
        latent = config.latent_channels
        self.quant_conv = operations.Conv3d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = operations.Conv3d(latent, latent, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def encode(
        self,
        video: Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        tiled: Tiled = "auto",
        tiling: VAETiling = VAETiling(),
    ) -> Tensor:
        """`[B, 3, 4k+1, H, W]` in -1..1 -> unscaled latent `[B, 16, k+1, H/8, W/8]` (posterior mean unless
        `sample`, then mean + std * noise from `generator`). Returned in the input's dtype, on the VAE's device."""
        cfg = self.config
        _check_video(video, cfg)
        _check_tiling(tiling, cfg)
        x = video.to(device=self.device, dtype=self.dtype)
        moments = self._encode_moments(x, tiled, tiling)
        return posterior_latent(moments, sample, generator).to(video.dtype)

    def decode(
        self,
        latent: Tensor,
        *,
        tiled: Tiled = "auto",
        tiling: VAETiling | None = None,
        clamp: bool = True,
        budget_bytes: int | None = None,
    ) -> Tensor:
        """Unscaled latent `[B, 16, T, h, w]` -> pixels `[B, 3, 4(T-1)+1, 8h, 8w]`, clamped to -1..1 as the
        official pipeline does (clamp=False gives the raw decoder output). Returned in the latent's dtype.

        tiled=True tiles with `tiling` (default VAETiling()); tiled="auto" without a `tiling` decodes with
        `plan_decode`'s choice: untiled when it fits, else the tiles with the least recomputed work that fit
        `budget_bytes` (default: the free memory of the VAE's device); with a `tiling`, it tiles with that one only
        when an untiled decode would not fit."""
        _check_latent(latent, self.config)
        if tiling is not None:
            _check_tiling(tiling, self.config)
        z = latent.to(device=self.device, dtype=self.dtype)
        if tiled == "auto":
            budget = self.memory_budget() if budget_bytes is None else budget_bytes
            if tiling is None:
                plan = plan_decode(self.config, self.dtype, tuple(z.shape), budget)
                tiled, tiling = plan.tiled, plan.tiling
            else:
                tiled = decode_peak_bytes(self.config, self.dtype, tuple(z.shape), False, tiling) > budget
        video = self._decode_pixels(z, bool(tiled), tiling or VAETiling())
        if clamp:
            video = video.clamp(-1.0, 1.0)
        return video.to(latent.dtype)

    def memory_budget(self) -> int:
        """Bytes a decode may use for activations on the VAE's device: the free CUDA memory (what the caching
        allocator holds unused included) over ALLOCATOR_MARGIN, or _CPU_BUDGET elsewhere."""
        if self.device.type != "cuda":
            return _CPU_BUDGET
        free = torch.cuda.mem_get_info(self.device)[0]
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return int(free / ALLOCATOR_MARGIN)

    # Untiled building blocks.

    def _encode_untiled(self, x: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(x))

    def _decode_untiled(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    # Tiling: time chunks first (each a causal clip of 4m+1 frames), each chunk split into spatial tiles.

    def _use_tiles(self, tiled: Tiled, pixels: int) -> bool:
        """`pixels`: batch * frames * height * width of the video side. 'auto' tiles when an untiled pass
        would not fit: in free CUDA memory on a GPU, in _CPU_BUDGET bytes elsewhere."""
        if tiled != "auto":
            return bool(tiled)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        need = pixels * self.config.block_out_channels[0] * itemsize * _LIVE_FULL_RES_ACTIVATIONS
        if self.device.type == "cuda":
            budget = 0.8 * torch.cuda.mem_get_info(self.device)[0]
        else:
            budget = _CPU_BUDGET
        return need > budget

    def _encode_moments(self, x: Tensor, tiled: Tiled, tiling: VAETiling) -> Tensor:
        if not self._use_tiles(tiled, x.shape[0] * x.shape[2:].numel()):
            return self._encode_untiled(x)
        r, s = self.config.temporal_compression, self.config.spatial_compression

        def encode_clip(clip: Tensor) -> Tensor:
            return tiled_map_2d(
                clip,
                self._encode_untiled,
                tile=tiling.tile_px,
                overlap=tiling.overlap_px,
                scale=Fraction(1, s),
            )

        latent_frames = (x.shape[2] - 1) // r + 1
        chunks = []
        for a, b in causal_chunks(latent_frames, tiling.tile_frames // r + 1, tiling.overlap_frames // r):
            clip = x[:, :, r * a : r * (b - 1) + 1]
            # A clip starting mid-video encodes its first frame alone, as an image: drop that latent.
            skip = 1 if a > 0 else 0
            chunks.append(((a + skip, b), lambda clip=clip, skip=skip: encode_clip(clip)[:, :, skip:]))
        if len(chunks) == 1:
            return encode_clip(x)
        return blend_chunks_1d(chunks, dim=2)

    def _decode_pixels(self, z: Tensor, tiled: bool, tiling: VAETiling) -> Tensor:
        r, s = self.config.temporal_compression, self.config.spatial_compression
        if not tiled:
            return self._decode_untiled(z)

        def decode_clip(clip: Tensor) -> Tensor:
            return tiled_map_2d(
                clip, self._decode_untiled, tile=tiling.tile_px // s, overlap=tiling.overlap_px // s, scale=s
            )

        chunks = []
        for a, b in causal_chunks(z.shape[2], tiling.tile_frames // r + 1, tiling.overlap_frames // r):
            # A clip starting mid-video decodes its first latent as a lone first frame: drop that frame.
            skip = 1 if a > 0 else 0
            span = (r * a + skip, r * (b - 1) + 1)
            chunks.append((span, lambda a=a, b=b, skip=skip: decode_clip(z[:, :, a:b])[:, :, skip:]))
        if len(chunks) == 1:
            return decode_clip(z)
        return blend_chunks_1d(chunks, dim=2)


# Decode planning: measured peaks (kandinsky_core.memory, on a meta copy of the VAE) instead of a formula.


_SPATIAL_TILE_PENALTY = 0.1


def _spatial_tiles(config: HunyuanVAEConfig, shape: tuple[int, ...], tiling: VAETiling) -> int:
    s = config.spatial_compression
    return math.prod(len(tile_spans(n, tiling.tile_px // s, tiling.overlap_px // s)) for n in shape[3:])


@dataclass(frozen=True)
class DecodePlan:
    """How to decode one latent: untiled or with `tiling`; `peak_bytes` is the measured activation peak (without
    ALLOCATOR_MARGIN); `work` the decoded latent volume over the latent's own (1.0 untiled, more with overlaps)."""

    tiled: bool
    tiling: VAETiling
    peak_bytes: int
    work: float


@lru_cache(maxsize=8)
def _meta_vae(config: HunyuanVAEConfig, dtype: torch.dtype) -> "HunyuanVideoVAE":
    with torch.device("meta"):
        return HunyuanVideoVAE(config).to(dtype)


@lru_cache(maxsize=512)
def _untiled_peak(config: HunyuanVAEConfig, dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    vae = _meta_vae(config, dtype)
    z = torch.empty(shape, device="meta", dtype=dtype)
    return measure_peak(lambda: vae._decode_untiled(z))


def _tile_shapes(config: HunyuanVAEConfig, shape: tuple[int, ...], tiling: VAETiling) -> set[tuple[int, ...]]:
    r, s = config.temporal_compression, config.spatial_compression
    b, c, t, h, w = shape
    frames = {stop - start for start, stop in causal_chunks(t, tiling.tile_frames // r + 1, tiling.overlap_frames // r)}
    rows = {stop - start for start, stop in tile_spans(h, tiling.tile_px // s, tiling.overlap_px // s)}
    cols = {stop - start for start, stop in tile_spans(w, tiling.tile_px // s, tiling.overlap_px // s)}
    return {(b, c, f, y, x) for f in frames for y in rows for x in cols}


@lru_cache(maxsize=256)
def decode_peak_bytes(
    config: HunyuanVAEConfig, dtype: torch.dtype, shape: tuple[int, ...], tiled: bool, tiling: VAETiling
) -> int:
    """Measured activation peak of `HunyuanVideoVAE.decode` of a latent `shape` (the final clamp and cast
    included): the largest tile's untiled decode on top of the tiling's own buffers (blend accumulators, output),
    both measured on meta tensors in milliseconds."""
    vae = _meta_vae(config, dtype)
    z = torch.empty(shape, device="meta", dtype=dtype)
    if not tiled:
        return measure_peak(lambda: vae.decode(z, tiled=False))
    r, s = config.temporal_compression, config.spatial_compression

    def stand_in(zt: Tensor) -> Tensor:  # the decoder's output, without its work
        out_shape = (zt.shape[0], config.out_channels, r * (zt.shape[2] - 1) + 1, *(n * s for n in zt.shape[3:]))
        return torch.empty(out_shape, device=zt.device, dtype=zt.dtype)

    orchestration = copy.copy(vae)
    orchestration._decode_untiled = stand_in
    buffers = measure_peak(lambda: orchestration.decode(z, tiled=True, tiling=tiling))
    return buffers + max(_untiled_peak(config, dtype, t) for t in _tile_shapes(config, shape, tiling))


def _work(config: HunyuanVAEConfig, shape: tuple[int, ...], tiling: VAETiling) -> float:
    r, s = config.temporal_compression, config.spatial_compression
    t, h, w = shape[2:]
    chunks = causal_chunks(t, tiling.tile_frames // r + 1, tiling.overlap_frames // r)
    rows = tile_spans(h, tiling.tile_px // s, tiling.overlap_px // s)
    cols = tile_spans(w, tiling.tile_px // s, tiling.overlap_px // s)
    return math.prod(sum(b - a for a, b in spans) / n for spans, n in ((chunks, t), (rows, h), (cols, w)))


def _tile_volume(config: HunyuanVAEConfig, shape: tuple[int, ...], tiled: bool, tiling: VAETiling) -> int:
    """Latent positions one tile covers (the whole latent when untiled)."""
    t, h, w = shape[2:]
    if not tiled:
        return t * h * w
    r, s = config.temporal_compression, config.spatial_compression
    return min(t, tiling.tile_frames // r + 1) * min(h, tiling.tile_px // s) * min(w, tiling.tile_px // s)


def decode_plans(config: HunyuanVAEConfig, shape: tuple[int, ...]) -> list[tuple[bool, VAETiling]]:
    """The candidates plan_decode weighs: untiled; whole frames in temporal clips; square spatial tiles from the
    frame's size down to 128 px, each over all frames or in clips. Spatial overlaps are a quarter of the tile (at
    most 128 px), temporal overlaps one latent (4 frames), as diffusers' tiled decode blends."""
    r, s = config.temporal_compression, config.spatial_compression
    t, h, w = shape[2:]
    all_frames = max(2 * r, r * (t - 1))
    side = max(h, w) * s
    plans: list[tuple[bool, VAETiling]] = [(False, VAETiling())]
    clips = [n for n in (64, 32, 16, 12, 8) if n < all_frames]
    for tile_px in [side] + [n for n in (1024, 768, 640, 512, 384, 256, 192, 128) if n < side]:
        overlap_px = min(128, tile_px // 4 // s * s)
        for tile_frames in ([all_frames] if tile_px < side else []) + clips:
            plans.append((True, VAETiling(tile_px, overlap_px, tile_frames, r)))
    return plans


def plan_decode(
    config: HunyuanVAEConfig, dtype: torch.dtype, shape: tuple[int, ...], budget_bytes: float
) -> DecodePlan:
    """The cheapest decode whose measured peak fits `budget_bytes`: untiled when it fits, else the least recomputed
    work (overlaps), each extra spatial tile adding 10% for its seams and lost context (the official decoder
    likewise keeps SD frames whole and decodes HD frames in a few large tiles); larger tiles first between equals.
    When nothing fits, the plan with the smallest peak."""
    candidates = []
    for tiled, tiling in decode_plans(config, shape):
        work = _work(config, shape, tiling) if tiled else 1.0
        cost = work * (1 + _SPATIAL_TILE_PENALTY * (_spatial_tiles(config, shape, tiling) - 1 if tiled else 0))
        candidates.append((cost, -_tile_volume(config, shape, tiled, tiling), work, tiled, tiling))
    candidates.sort(key=lambda c: c[:2])
    smallest = None
    for _, _, work, tiled, tiling in candidates:
        plan = DecodePlan(tiled, tiling, decode_peak_bytes(config, dtype, shape, tiled, tiling), work)
        if plan.peak_bytes <= budget_bytes:
            return plan
        if smallest is None or plan.peak_bytes < smallest.peak_bytes:
            smallest = plan
    return smallest


def causal_chunks(latent_frames: int, chunk: int, overlap: int) -> list[tuple[int, int]]:
    """Latent [start, stop) chunks of `chunk` latents, consecutive ones sharing `overlap` latents after the
    first latent of the later chunk is dropped (it only stands for a lone first frame)."""
    if latent_frames <= chunk:
        return [(0, latent_frames)]
    stride = chunk - 1 - overlap
    starts = [0]
    while starts[-1] + chunk < latent_frames:
        starts.append(starts[-1] + stride)
    return [(a, min(a + chunk, latent_frames)) for a in starts]


def _check_video(video: Tensor, cfg: HunyuanVAEConfig) -> None:
    r, s = cfg.temporal_compression, cfg.spatial_compression
    if video.ndim != 5 or video.shape[1] != cfg.in_channels:
        raise InputError(
            f"VAE encode: video must be [batch, {cfg.in_channels}, frames, height, width], got {tuple(video.shape)}. "
            "Pass RGB frames in channels-first video layout."
        )
    frames, height, width = video.shape[2:]
    if (frames - 1) % r != 0:
        lower = (frames - 1) // r * r + 1
        raise InputError(
            f"VAE encode: the HunyuanVideo VAE needs {r}k+1 frames (1, 5, 9, ...), got {frames}. "
            f"Trim the video to {lower} or pad it to {lower + r} frames."
        )
    if height % s or width % s:
        raise InputError(
            f"VAE encode: height and width must be multiples of {s}, got {height}x{width}. "
            f"Resize or crop the video to {height // s * s}x{width // s * s}."
        )


def _check_latent(latent: Tensor, cfg: HunyuanVAEConfig) -> None:
    if latent.ndim != 5 or latent.shape[1] != cfg.latent_channels:
        raise InputError(
            f"VAE decode: latent must be [batch, {cfg.latent_channels}, frames, height, width], got "
            f"{tuple(latent.shape)}. Use a latent made for the HunyuanVideo VAE (Kandinsky 5 video/T2V/I2V), "
            "not one from an image VAE."
        )


def tiling_problem(tiling: VAETiling, cfg: HunyuanVAEConfig = HUNYUAN_VAE_CONFIG) -> str | None:
    """What makes a tiling unusable (None when it works): the one rule behind the decode and the VAE Decode node's
    validation. The FLUX VAE's tiles (tile_px / 8 latent positions) work whenever this holds."""
    r, s = cfg.temporal_compression, cfg.spatial_compression
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in dataclasses.astuple(tiling)) and (
        tiling.tile_px % s == 0
        and tiling.overlap_px % s == 0
        and 0 <= 2 * tiling.overlap_px <= tiling.tile_px
        and tiling.tile_px > 0
        and tiling.tile_frames % r == 0
        and tiling.overlap_frames % r == 0
        and 0 <= 2 * tiling.overlap_frames <= tiling.tile_frames
        and tiling.tile_frames > 0
    )
    if ok:
        return None
    t, d = tiling, VAETiling()
    return (
        f"VAE tiling tile_px={t.tile_px!r}, overlap_px={t.overlap_px!r}, tile_frames={t.tile_frames!r}, "
        f"overlap_frames={t.overlap_frames!r} is not usable: tile_px and overlap_px must be multiples of {s}, "
        f"tile_frames and overlap_frames multiples of {r}, and each overlap at most half its tile. Try the "
        f"defaults tile_px={d.tile_px}, overlap_px={d.overlap_px}, tile_frames={d.tile_frames}, "
        f"overlap_frames={d.overlap_frames}."
    )


def _check_tiling(tiling: VAETiling, cfg: HunyuanVAEConfig) -> None:
    problem = tiling_problem(tiling, cfg)
    if problem:
        raise InputError(problem)


# Loading.

_WHAT = "HunyuanVideo VAE"
_USE = (
    "Use the HunyuanVideo VAE: hunyuan_video_vae_bf16.safetensors (models/vae) or the vae/ folder of "
    "hunyuanvideo-community/HunyuanVideo."
)


def load_hunyuan_vae(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: HunyuanVAEConfig | None = None,
    operations=TORCH_OPS,
) -> HunyuanVideoVAE:
    """Load the HunyuanVideo VAE from a diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors)
    or a single .safetensors file in the original/diffusers layout or ComfyUI's latent-diffusion layout.

    `config` overrides the folder's config.json / the released config (tests use tiny ones). Loading is strict.
    """
    weights, raw, state = read_weights(
        Path(path), _WHAT, _USE, diffusers_class="AutoencoderKLHunyuanVideo", require_config=True
    )
    state = to_our_layout(state, weights)
    config = config or (HunyuanVAEConfig.from_diffusers(raw) if raw is not None else HUNYUAN_VAE_CONFIG)

    conv_in = state["decoder.conv_in.conv.weight"]
    if conv_in.shape[1] != config.latent_channels:
        raise WeightsError(
            f"{weights} is not the HunyuanVideo VAE: it looks like {what_is_it(state).text}, but Kandinsky 5 "
            f"needs {config.latent_channels}. Use hunyuan_video_vae_bf16.safetensors (HunyuanVideo 1.0)."
        )
    with torch.device("meta"):
        model = HunyuanVideoVAE(config, operations)
    diff = compare_shapes(model.state_dict(), state)
    if diff.missing or diff.unexpected:
        raise WeightsError(
            f"HunyuanVideo VAE {weights}: keys do not match the model (config {config.block_out_channels}, "
            f"{config.latent_channels} latent channels). Missing: {listing(diff.missing)}. Unexpected: "
            f"{listing(diff.unexpected)}. Use the HunyuanVideo VAE file (e.g. hunyuan_video_vae_bf16.safetensors)."
        )
    if diff.wrong:
        raise WeightsError(
            f"HunyuanVideo VAE {weights}: tensor shapes differ from the HunyuanVideo VAE: {listing(diff.wrong)}. "
            "This file is a different VAE (another size or latent channel count)."
        )
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# Key layouts. "diffusers": diffusers' AutoencoderKLHunyuanVideo, which is also the original Tencent layout
# (hunyuan_video_vae_bf16.safetensors, as the HunyuanVideo wrappers load it): down_blocks/up_blocks/resnets.
# "ldm": what ComfyUI converts that to (comfy/diffusers_convert.py): down/up/block, mid.attn_1 as 1x1x1 convs.


def detect_layout(keys: set[str]) -> str | None:
    if "decoder.conv_in.conv.weight" not in keys:
        return None
    if any(k.startswith("decoder.up_blocks.") for k in keys):
        return "diffusers"
    if any(k.startswith("decoder.up.") for k in keys):
        return "ldm"
    return None


def to_our_layout(state: dict[str, Tensor], source: Path | str = "state dict") -> dict[str, Tensor]:
    """Rename a HunyuanVideo VAE state dict (either layout, optional 'vae.'/'first_stage_model.' prefix) to ours."""
    state = strip_vae_prefix(state)
    layout = detect_layout(set(state))
    if layout is None:
        raise WeightsError(
            f"{source} is not a HunyuanVideo VAE: it looks like {what_is_it(state).text}. "
            "Use the HunyuanVideo VAE (hunyuan_video_vae_bf16.safetensors or the diffusers vae/ folder)."
        )
    if layout == "diffusers":
        n_levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
        return {_diffusers_name(k, n_levels): v for k, v in state.items()}
    out = {}
    for k, v in state.items():
        if re.fullmatch(r".*\.mid\.attn_1\.(q|k|v|proj_out)\.weight", k) and v.ndim == 5:
            v = v.reshape(v.shape[:2])
        out[k] = v
    return out


_DIFFUSERS_RENAMES = [
    (r"\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r".down.\1.block.\2."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_(q|k|v)\.", r".mid.attn_1.\1."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
]


def _diffusers_name(key: str, n_levels: int) -> str:
    # Decoder up_blocks run from the lowest resolution; our up[i] is indexed by resolution level.
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.\d+|upsamplers\.0)\.", key)
    if m:
        level = n_levels - 1 - int(m.group(1))
        inner = re.sub(r"resnets\.", "block.", m.group(2)).replace("upsamplers.0", "upsample")
        key = f"decoder.up.{level}.{inner}.{key[m.end() :]}"
    key = "." + key
    for pattern, repl in _DIFFUSERS_RENAMES:
        key = re.sub(pattern, repl, key)
    return key[1:]
