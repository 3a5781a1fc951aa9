"""FLUX.1 VAE: the 2D, 16-channel autoencoder the Kandinsky 5 image variants (T2I, I2I edit) work in.

Module names follow the BFL / ComfyUI `ae.safetensors` layout (`encoder.down.0.block.0.conv1`, `mid.attn_1.q`, ...),
so that file loads as is; the diffusers `AutoencoderKL` layout (the `vae/` folder of black-forest-labs/FLUX.1-dev,
which the official Kandinsky download uses) is renamed on load.

Latents leave `encode` unscaled. The DiT works on `latent * variants.FLUX_LATENT_SCALE` (0.3611) with no shift, as
the official image pipeline does (it multiplies by `vae.config.scaling_factor` only). BFL's FLUX, diffusers'
FLUX.1-dev `vae/config.json` and ComfyUI's `latent_formats.Flux` pair that scale with a shift of 0.1159, which
Kandinsky 5 does not apply; a folder's `scaling_factor` / `shift_factor` are therefore not read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .errors import InputError, WeightsError
from .vae_posterior import posterior_latent
from .vae_tiling import tiled_map_2d
from .weights import compare_shapes, listing, read_weights, strip_vae_prefix, what_is_it


@dataclass(frozen=True)
class FluxVAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    norm_groups: int = 32

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


FLUX_VAE_CONFIG = FluxVAEConfig()

# The defaults of `operations`: plain torch layers. ComfyUI may pass `comfy.ops.*` (same names) instead.
torch_ops = SimpleNamespace(Conv2d=nn.Conv2d, GroupNorm=nn.GroupNorm)


def _norm(channels: int, groups: int, ops: Any) -> nn.Module:
    return ops.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, ops: Any):
        super().__init__()
        self.norm1 = _norm(in_channels, groups, ops)
        self.conv1 = ops.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _norm(out_channels, groups, ops)
        self.conv2 = ops.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = ops.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj are 1x1 convs as in `ae.safetensors`."""

    def __init__(self, channels: int, groups: int, ops: Any):
        super().__init__()
        self.norm = _norm(channels, groups, ops)
        self.q = ops.Conv2d(channels, channels, kernel_size=1)
        self.k = ops.Conv2d(channels, channels, kernel_size=1)
        self.v = ops.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = ops.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int, ops: Any):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Pad right and bottom only: the stride-2 conv then halves even sizes exactly.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int, ops: Any):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, ops: Any):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, ops)
        self.attn_1 = AttnBlock(channels, groups, ops)
        self.block_2 = ResnetBlock(channels, channels, groups, ops)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: resnet blocks, then an optional down- or upsampler."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, ops: Any):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(channels[i], channels[i + 1], groups, ops) for i in range(num_blocks))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: FluxVAEConfig, ops: Any):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = ops.Conv2d(cfg.in_channels, widths[0], kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            level = Level(widths[max(i - 1, 0)], width, cfg.num_res_blocks, cfg.norm_groups, ops)
            if i < len(widths) - 1:
                level.downsample = Downsample(width, ops)
            self.down.append(level)
        self.mid = MidBlock(widths[-1], cfg.norm_groups, ops)
        self.norm_out = _norm(widths[-1], cfg.norm_groups, ops)
        self.conv_out = ops.Conv2d(widths[-1], 2 * cfg.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: FluxVAEConfig, ops: Any):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = ops.Conv2d(cfg.z_channels, widths[-1], kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(widths[-1], cfg.norm_groups, ops)
        # `up[i]` works at the resolution of `encoder.down[i]`; it runs in reverse order (deepest first).
        self.up = nn.ModuleList()
        for i, width in enumerate(widths):
            level = Level(widths[min(i + 1, len(widths) - 1)], width, cfg.num_res_blocks + 1, cfg.norm_groups, ops)
            if i > 0:
                level.upsample = Upsample(width, ops)
            self.up.append(level)
        self.norm_out = _norm(widths[0], cfg.norm_groups, ops)
        self.conv_out = ops.Conv2d(widths[0], cfg.out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class FluxVAE(nn.Module):
    """FLUX.1 autoencoder. Pixels are -1..1; latents are the VAE's own (unscaled) latents.

    Both methods take an image batch `[B, C, H, W]` or a one-frame video `[B, C, 1, H, W]` (the engine's image
    layout) and answer in the same layout, on the module's device, in the input's dtype. Decoded pixels are not
    clamped.
    """

    def __init__(self, config: FluxVAEConfig = FLUX_VAE_CONFIG, operations: Any = None):
        super().__init__()
        ops = torch_ops if operations is None else operations
        self.config = config
        self.encoder = Encoder(config, ops)
        self.decoder = Decoder(config, ops)

    def encode(
        self,
        images: Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        tile: int | None = None,
        overlap: int = 64,
    ) -> Tensor:
        """Posterior mean of `images`, or a posterior sample when `sample=True` (noise drawn from `generator`).

        `tile` (pixels, a multiple of the 8x downscale) encodes in overlapping tiles to bound memory; see `decode`.
        """
        ds = self.config.downscale
        x, video = _as_image_batch(images, "images", self.config.in_channels, ds, "pixel")
        x = x.to(self._device, self._dtype)
        if tile is None:
            moments = self.encoder(x)
        else:
            _check_tiling(tile, overlap, ds, "pixels")
            moments = tiled_map_2d(x, self.encoder, tile=tile, overlap=overlap, scale=Fraction(1, ds))
        latent = posterior_latent(moments, sample, generator)
        return _restore_layout(latent.to(images.dtype), video)

    def decode(self, latent: Tensor, *, tile: int | None = None, overlap: int = 8) -> Tensor:
        """Pixels (about -1..1) for an unscaled latent `[B, 16, h, w]` or `[B, 16, 1, h, w]`.

        `tile` (latent positions) decodes in overlapping tiles blended with linear ramps, to bound memory for very
        large images. Tiles see no global context (the mid-block attention and the GroupNorm statistics become
        per tile), so a tiled result differs slightly from a full one; 1024px images need no tiling.
        """
        z, video = _as_image_batch(latent, "latent", self.config.z_channels, 1, "latent")
        z = z.to(self._device, self._dtype)
        if tile is None:
            x = self.decoder(z)
        else:
            _check_tiling(tile, overlap, 1, "latent positions")
            x = tiled_map_2d(z, self.decoder, tile=tile, overlap=overlap, scale=self.config.downscale)
        return _restore_layout(x.to(latent.dtype), video)

    @property
    def _device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    @property
    def _dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype


def _as_image_batch(x: Tensor, name: str, channels: int, multiple: int, kind: str) -> tuple[Tensor, bool]:
    if x.ndim == 5:
        if x.shape[2] != 1:
            raise InputError(
                f"FLUX VAE: `{name}` has {x.shape[2]} frames (shape {tuple(x.shape)}); the FLUX VAE is an image VAE "
                "and takes one frame [B, C, 1, H, W]. Use the HunyuanVideo VAE for videos, or pass one frame."
            )
        x, video = x[:, :, 0], True
    elif x.ndim == 4:
        video = False
    else:
        raise InputError(
            f"FLUX VAE: `{name}` has shape {tuple(x.shape)}; "
            f"expected [B, {channels}, H, W] or [B, {channels}, 1, H, W]."
        )
    if x.shape[1] != channels:
        what = "RGB pixels" if kind == "pixel" else "FLUX latents"
        raise InputError(
            f"FLUX VAE: `{name}` has {x.shape[1]} channels (shape {tuple(x.shape)}); {what} need {channels}. "
            "Check that the input comes from the matching node (images are channels-first here)."
        )
    height, width = x.shape[-2:]
    if height % multiple or width % multiple or height == 0 or width == 0:
        raise InputError(
            f"FLUX VAE: `{name}` is {height}x{width}; {kind} height and width must be positive multiples of "
            f"{multiple}. Resize or crop the image to a multiple of {multiple}."
        )
    return x, video


def _check_tiling(tile: int, overlap: int, multiple: int, unit: str) -> None:
    if tile <= 0 or not 0 <= overlap < tile or tile % multiple or overlap % multiple:
        raise InputError(
            f"FLUX VAE: tile {tile} with overlap {overlap} ({unit}) cannot work; the overlap must be smaller than "
            f"the tile and both must be multiples of {multiple}. Pick e.g. tile {64 * multiple}, "
            f"overlap {8 * multiple}."
        )


def _restore_layout(x: Tensor, video: bool) -> Tensor:
    return x[:, :, None] if video else x


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def load_flux_vae(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: FluxVAEConfig | None = None,
    operations: Any = None,
) -> FluxVAE:
    """Load a FLUX VAE from `ae.safetensors` (BFL/ComfyUI layout), a diffusers-layout `.safetensors` file, or a
    diffusers folder (`vae/` with `config.json` + `diffusion_pytorch_model.safetensors`, or the repo root above it).

    The architecture is `config` if given, else the folder's `config.json`, else the real FLUX.1 config.
    Loading is strict: any missing, unexpected or mis-shaped weight raises `WeightsError`.
    """
    weights_file, raw, state = read_weights(Path(path), _WHAT, _USE, diffusers_class="AutoencoderKL")
    if not config and raw is not None:
        config = _config_from_diffusers(raw, weights_file.parent / "config.json")
    cfg = config or FLUX_VAE_CONFIG
    state = _to_bfl_layout(state, weights_file)
    _check_latent_channels(state, cfg, weights_file)

    with torch.device("meta"):
        model = FluxVAE(cfg, operations)
    _check_keys(model, state, weights_file)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


_WHAT = "FLUX VAE"
_USE = "Use the FLUX.1 VAE: `ae.safetensors` (models/vae) or the `vae/` folder of black-forest-labs/FLUX.1-dev."


def _config_from_diffusers(raw: dict, config_file: Path) -> FluxVAEConfig:
    try:
        widths = [int(c) for c in raw["block_out_channels"]]
        ch = widths[0]
        if any(w % ch for w in widths):
            raise ValueError(f"block_out_channels {widths} are not multiples of {ch}")
        return replace(
            FLUX_VAE_CONFIG,
            in_channels=int(raw.get("in_channels", 3)),
            out_channels=int(raw.get("out_channels", 3)),
            ch=ch,
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=int(raw["layers_per_block"]),
            z_channels=int(raw["latent_channels"]),
            norm_groups=int(raw.get("norm_num_groups", 32)),
        )
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise WeightsError(
            f"FLUX VAE: {config_file} is not a usable AutoencoderKL config ({err!r}). Re-download the `vae/` folder."
        ) from err


# diffusers AutoencoderKL name -> BFL name. `{up}` is replaced by the mirrored up-level index.
_DIFFUSERS_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.up.{up\1}.block.\2."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.up.{up\1}.upsample."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|query)\.", r"\1.mid.attn_1.q."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_k|key)\.", r"\1.mid.attn_1.k."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_v|value)\.", r"\1.mid.attn_1.v."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_out\.0|proj_attn)\.", r"\1.mid.attn_1.proj_out."),
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"\.conv_shortcut\.", r".nin_shortcut."),
    ]
]
_UP_INDEX = re.compile(r"\{up(\d+)\}")


def _to_bfl_layout(state: dict[str, Tensor], file: Path) -> dict[str, Tensor]:
    state = strip_vae_prefix(state)
    if any(v.ndim == 5 for v in state.values()):
        raise WeightsError(
            f"FLUX VAE: {file.name} holds 3D (video) convolutions: it looks like a video VAE such as the "
            "HunyuanVideo VAE. The image variants need the FLUX.1 VAE (`ae.safetensors`); load this file with the "
            "HunyuanVideo VAE loader for the video variants."
        )
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "decoder.mid_block.")) for k in state):
        return _rename_diffusers(state)
    if any(k.startswith(("encoder.down.", "decoder.up.", "decoder.mid.")) for k in state):
        return state
    raise WeightsError(
        f"FLUX VAE: {file.name} is not a FLUX VAE: no `encoder.down` / `decoder.up` weights; it looks like "
        f"{what_is_it(state).text} (first keys: {listing(list(state), 5)}). {_USE}"
    )


def _rename_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    up_ids = [int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))]
    last_up = max(up_ids, default=0)
    out = {}
    for key, value in state.items():
        for pattern, repl in _DIFFUSERS_RULES:
            key = pattern.sub(repl, key)
        key = _UP_INDEX.sub(lambda m: str(last_up - int(m.group(1))), key)
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # diffusers keeps the attention projections as Linear
        out[key] = value
    return out


def _check_latent_channels(state: dict[str, Tensor], cfg: FluxVAEConfig, file: Path) -> None:
    conv_in = state.get("decoder.conv_in.weight")
    if conv_in is None or conv_in.ndim != 4 or conv_in.shape[1] == cfg.z_channels:
        return  # absent or malformed weights are reported by the strict key check
    channels = conv_in.shape[1]
    hint = " (SD 1.x / SDXL VAEs have 4)" if channels == 4 else ""
    raise WeightsError(
        f"FLUX VAE: {file.name} has {channels} latent channels{hint}; the Kandinsky image variants need the "
        f"{cfg.z_channels}-channel FLUX.1 VAE (`ae.safetensors` or FLUX.1-dev `vae/`)."
    )


def _check_keys(model: nn.Module, state: dict[str, Tensor], file: Path) -> None:
    diff = compare_shapes(model.state_dict(), state)
    if not diff:
        return
    parts = [
        f"{len(items)} {label}: {listing(items)}"
        for label, items in (("missing", diff.missing), ("unexpected", diff.unexpected), ("wrong shape", diff.wrong))
        if items
    ]
    raise WeightsError(
        f"FLUX VAE: {file.name} does not match the FLUX VAE architecture ({'; '.join(parts)}). The file is "
        "incomplete or a different VAE; use `ae.safetensors` or the FLUX.1-dev `vae/` folder."
    )
