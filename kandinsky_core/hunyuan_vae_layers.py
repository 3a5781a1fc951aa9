"""HunyuanVideo VAE building blocks: its config, causal 3D convolutions, resnet / attention / resampling blocks, and
the encoder and decoder networks. `hunyuan_vae.py` wraps them into the VAE (encode, decode, tiling, loading).

Parameter names follow the original latent-diffusion layout ComfyUI uses (`encoder.down.{i}.block.{j}`, `mid.attn_1`,
`norm_out`), with the attention projections as linear layers (2D weights).
"""

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

TORCH_OPS = SimpleNamespace(Conv3d=nn.Conv3d, Linear=nn.Linear, GroupNorm=nn.GroupNorm)


@dataclass(frozen=True)
class HunyuanVAEConfig:
    """The VAE's shape. The default is the released HunyuanVideo VAE (hunyuanvideo-community/HunyuanVideo)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    spatial_compression: int = 8
    temporal_compression: int = 4
    mid_attention: bool = True

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "HunyuanVAEConfig":
        return cls(
            in_channels=config.get("in_channels", 3),
            out_channels=config.get("out_channels", 3),
            latent_channels=config.get("latent_channels", 16),
            block_out_channels=tuple(config.get("block_out_channels", (128, 256, 512, 512))),
            layers_per_block=config.get("layers_per_block", 2),
            norm_num_groups=config.get("norm_num_groups", 32),
            spatial_compression=config.get("spatial_compression_ratio", 8),
            temporal_compression=config.get("temporal_compression_ratio", 4),
            mid_attention=config.get("mid_block_add_attention", True),
        )

    def level_strides(self) -> list[tuple[int, int, int]]:
        """(time, height, width) resampling factor of each resolution level, (1, 1, 1) where none.

        As released: spatial resampling at the first log2(spatial) levels, temporal at the log2(temporal)
        levels just before the last one.
        """
        n = len(self.block_out_channels)
        n_space, n_time = int(math.log2(self.spatial_compression)), int(math.log2(self.temporal_compression))
        strides = []
        for i in range(n):
            s = 2 if i < n_space else 1
            t = 2 if n - 1 - n_time <= i < n - 1 else 1
            strides.append((t, s, s))
        return strides


HUNYUAN_VAE_CONFIG = HunyuanVAEConfig()


class CausalConv3d(nn.Module):
    """3D convolution padded causally in time (replicating the first frame) and 'same' in space."""

    def __init__(self, ops, c_in: int, c_out: int, kernel: int = 3, stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.pad = (kernel // 2, kernel // 2, kernel // 2, kernel // 2, kernel - 1, 0)
        self.conv = ops.Conv3d(c_in, c_out, kernel, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad, mode="replicate")
        return self.conv(x)


class ResnetBlock(nn.Module):
    def __init__(self, ops, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = ops.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = CausalConv3d(ops, c_in, c_out)
        self.norm2 = ops.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = CausalConv3d(ops, c_out, c_out)
        self.nin_shortcut = CausalConv3d(ops, c_in, c_out, kernel=1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class CausalAttention(nn.Module):
    """Single-head self-attention over all positions, where a frame only attends to itself and earlier frames."""

    def __init__(self, ops, channels: int, groups: int):
        super().__init__()
        self.norm = ops.GroupNorm(groups, channels, eps=1e-6)
        self.q = ops.Linear(channels, channels)
        self.k = ops.Linear(channels, channels)
        self.v = ops.Linear(channels, channels)
        self.proj_out = ops.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        _, _, t, h, w = x.shape
        tokens = rearrange(self.norm(x), "b c t h w -> b (t h w) c")
        q, k, v = (rearrange(proj(tokens), "b s c -> b 1 s c") for proj in (self.q, self.k, self.v))
        # Frame by frame instead of a (THW)^2 mask: queries of frame i see keys of frames 0..i.
        frame = h * w
        out = torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[:, :, i * frame : (i + 1) * frame], k[:, :, : (i + 1) * frame], v[:, :, : (i + 1) * frame]
                )
                for i in range(t)
            ],
            dim=2,
        )
        out = self.proj_out(rearrange(out, "b 1 s c -> b s c"))
        return x + rearrange(out, "b (t h w) c -> b c t h w", t=t, h=h, w=w)


class MidBlock(nn.Module):
    def __init__(self, ops, channels: int, groups: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(ops, channels, channels, groups)
        self.attn_1 = CausalAttention(ops, channels, groups) if attention else None
        self.block_2 = ResnetBlock(ops, channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Downsample(nn.Module):
    def __init__(self, ops, channels: int, stride: tuple[int, int, int]):
        super().__init__()
        self.conv = CausalConv3d(ops, channels, channels, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling then a causal conv; the first frame is only upsampled in space (it stays one frame)."""

    def __init__(self, ops, channels: int, factor: tuple[int, int, int]):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(ops, channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.factor[0] == 1 or x.shape[2] == 1:
            x = F.interpolate(x, scale_factor=(1, *self.factor[1:]), mode="nearest")
        else:
            first = F.interpolate(x[:, :, :1], scale_factor=(1, *self.factor[1:]), mode="nearest")
            rest = F.interpolate(x[:, :, 1:].contiguous(), scale_factor=self.factor, mode="nearest")
            x = torch.cat([first, rest], dim=2)
        return self.conv(x)


class Encoder(nn.Module):
    def __init__(self, config: HunyuanVAEConfig, ops):
        super().__init__()
        chans, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = CausalConv3d(ops, config.in_channels, chans[0])
        self.down = nn.ModuleList()
        c_in = chans[0]
        for i, stride in enumerate(config.level_strides()):
            level = nn.Module()
            level.block = nn.ModuleList(
                ResnetBlock(ops, c_in if j == 0 else chans[i], chans[i], groups) for j in range(config.layers_per_block)
            )
            if stride != (1, 1, 1):
                level.downsample = Downsample(ops, chans[i], stride)
            self.down.append(level)
            c_in = chans[i]
        self.mid = MidBlock(ops, chans[-1], groups, config.mid_attention)
        self.norm_out = ops.GroupNorm(groups, chans[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ops, chans[-1], 2 * config.latent_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                x = block(x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: HunyuanVAEConfig, ops):
        super().__init__()
        chans, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = CausalConv3d(ops, config.latent_channels, chans[-1])
        self.mid = MidBlock(ops, chans[-1], groups, config.mid_attention)
        # up[i] works at the resolution of encoder level i, so it runs in reverse order.
        levels = []
        c_in = chans[-1]
        for i, factor in enumerate(config.level_strides()):
            c_out = chans[-1 - i]
            level = nn.Module()
            level.block = nn.ModuleList(
                ResnetBlock(ops, c_in if j == 0 else c_out, c_out, groups) for j in range(config.layers_per_block + 1)
            )
            if factor != (1, 1, 1):
                level.upsample = Upsample(ops, c_out, factor)
            levels.append(level)
            c_in = c_out
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = ops.GroupNorm(groups, chans[0], eps=1e-6)
        self.conv_out = CausalConv3d(ops, chans[0], config.out_channels)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                x = block(x)
            if hasattr(level, "upsample"):
                x = level.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))
