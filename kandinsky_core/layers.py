"""DiT building blocks: embeddings, RoPE, modulation, attention blocks, feed-forward and the output layer.

Module and parameter names follow the official checkpoints, so a state dict loads without renaming.
Numerically sensitive steps (time embedding, modulation, norms with scale/shift, gated residuals, RoPE)
run in float32 and return the working dtype, as the official code does under autocast. On CUDA those
elementwise float32 helpers (scale_shift_norm, gate_sum, apply_rope) run torch.compile'd, as the official code
compiles its own: eager, each float32 op is a pass over the activations (about a quarter of an eager forward on an
H100). The compiled graphs compute the same float32 math, fused. Set KANDINSKY_FUSE=0 to keep them eager.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .attention import attention
from .nabla import NablaParams, nabla_attention


class Linear(nn.Linear):
    """nn.Linear that casts its weight (and bias) to the input dtype at use: float8 storage just works. A
    `weight_scale` buffer (0-dim float32, set by the loader for float8 storage) multiplies the stored weight."""

    def forward(self, x: Tensor) -> Tensor:
        scale = self._buffers.get("weight_scale")
        if scale is not None:
            w = (self.weight.float() * scale.to(self.weight.device)).to(x.dtype)
        else:
            w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, w, b)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        if w is not None and w.dtype != x.dtype:
            w = w.to(x.dtype)
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class RMSNorm(nn.RMSNorm):
    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if w is not None and w.dtype != x.dtype:
            w = w.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, w, self.eps)


# The default `operations` namespace; ComfyUI passes comfy.ops.* with the same three classes.
ops = SimpleNamespace(Linear=Linear, LayerNorm=LayerNorm, RMSNorm=RMSNorm)


def get_freqs(dim: int, max_period: float = 10000.0) -> Tensor:
    """exp(-ln(max_period) * i / dim) for i < dim, float32 on the CPU (as the official tables are built)."""
    return torch.exp(-math.log(max_period) * torch.arange(dim, dtype=torch.float32) / dim)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[B] -> [B, dim] float32 sinusoidal embedding, cosines first."""
    args = torch.outer(t.float(), get_freqs(dim // 2, max_period).to(t.device))
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_1d(length: int, head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin [L, head_dim/2] for text positions 0..L-1."""
    args = torch.outer(torch.arange(length, dtype=torch.float32), get_freqs(head_dim // 2)).to(device)
    return torch.cos(args), torch.sin(args)


def rope_3d(
    grid: tuple[int, int, int], axes_dims: tuple[int, int, int], scale: tuple[float, float, float], device: torch.device
) -> tuple[Tensor, Tensor]:
    """cos, sin [T*H*W, head_dim/2] in raster order; positions on each axis are arange(n) / scale."""
    per_axis = []
    for n, d, s in zip(grid, axes_dims, scale, strict=True):
        args = torch.outer(torch.arange(n, dtype=torch.float32), get_freqs(d // 2)).to(device)
        per_axis.append(args / s)
    t, h, w = grid
    args = torch.cat(
        [
            per_axis[0][:, None, None].expand(t, h, w, -1),
            per_axis[1][None, :, None].expand(t, h, w, -1),
            per_axis[2][None, None, :].expand(t, h, w, -1),
        ],
        dim=-1,
    ).reshape(t * h * w, -1)
    return torch.cos(args), torch.sin(args)


log = logging.getLogger("kandinsky5")
FUSE_BACKEND = "inductor"
fuse_state = {"compiled_calls": 0, "failed": None}
_fused_compiled: dict[str, object] = {}


def _on_cuda(x: Tensor) -> bool:
    return x.is_cuda


def _fused(fn):
    """`fn` torch.compile'd (dynamic shapes, lazily) when its first tensor is on CUDA and no enclosing compile is
    already tracing it (compile_dit inlines it); eager elsewhere, and for good after a compiler failure (logged
    once, kept in fuse_state["failed"])."""

    @functools.wraps(fn)
    def wrapper(*args):
        x = next(a for a in args if isinstance(a, Tensor))
        if (
            fuse_state["failed"] is not None
            or not _on_cuda(x)
            or torch.compiler.is_compiling()
            or os.environ.get("KANDINSKY_FUSE") == "0"
        ):
            return fn(*args)
        compiled = _fused_compiled.get(fn.__name__)
        if compiled is None:
            compiled = _fused_compiled[fn.__name__] = torch.compile(fn, backend=FUSE_BACKEND, dynamic=True)
        try:
            out = compiled(*args)
        except Exception as e:  # the compiler's failures have no common base class
            from .compile import describe_compile_error

            fuse_state["failed"] = f"{fn.__name__}: {describe_compile_error(e)}"
            log.warning("Kandinsky: compiling the float32 elementwise helpers failed (%s); they run eagerly",
                        fuse_state["failed"][:300])  # fmt: skip
            return fn(*args)
        fuse_state["compiled_calls"] += 1
        return out

    return wrapper


@_fused
def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of x [B, S, H, D] by the angles of cos/sin [S, D/2] ([B, S, D/2] also works)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    return out.flatten(-2).to(x.dtype)


@_fused
def scale_shift_norm(norm: nn.Module, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return (norm(x.float()) * (scale + 1.0) + shift).to(x.dtype)


@_fused
def gate_sum(x: Tensor, out: Tensor, gate: Tensor) -> Tensor:
    return (x.float() + gate * out.float()).to(x.dtype)


class TimeEmbeddings(nn.Module):
    def __init__(self, model_dim: int, time_dim: int, dtype=None, device=None, operations=ops):
        super().__init__()
        self.model_dim = model_dim
        self.in_layer = operations.Linear(model_dim, time_dim, bias=True, dtype=dtype, device=device)
        self.out_layer = operations.Linear(time_dim, time_dim, bias=True, dtype=dtype, device=device)

    def forward(self, t: Tensor) -> Tensor:
        # float32 throughout (the official module runs under float32 autocast)
        emb = timestep_embedding(t, self.model_dim)
        return self.out_layer(F.silu(self.in_layer(emb)))


class TextEmbeddings(nn.Module):
    def __init__(self, text_dim: int, model_dim: int, dtype=None, device=None, operations=ops):
        super().__init__()
        self.in_layer = operations.Linear(text_dim, model_dim, bias=True, dtype=dtype, device=device)
        self.norm = operations.LayerNorm(model_dim, elementwise_affine=True, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        h = self.in_layer(x)
        return self.norm(h.float()).to(h.dtype)


class VisualEmbeddings(nn.Module):
    def __init__(self, visual_dim: int, model_dim: int, patch_size, dtype=None, device=None, operations=ops):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.in_layer = operations.Linear(
            math.prod(patch_size) * visual_dim, model_dim, bias=True, dtype=dtype, device=device
        )

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, T, H, W] -> [B, T', H', W', model_dim]; patch features ordered (pt, ph, pw, c)."""
        pt, ph, pw = self.patch_size
        x = rearrange(x, "b c (t pt) (h ph) (w pw) -> b t h w (pt ph pw c)", pt=pt, ph=ph, pw=pw)
        return self.in_layer(x)


class Modulation(nn.Module):
    def __init__(self, time_dim: int, model_dim: int, num_params: int, dtype=None, device=None, operations=ops):
        super().__init__()
        self.out_layer = operations.Linear(time_dim, num_params * model_dim, dtype=dtype, device=device)

    def forward(self, time_embed: Tensor) -> Tensor:
        """[B, time_dim] float32 -> [B, 1, num_params * model_dim] float32."""
        return self.out_layer(F.silu(time_embed.float())).unsqueeze(1)


class MultiheadAttention(nn.Module):
    """Projections shared by the text/visual self-attention and the cross-attention (same parameter names)."""

    def __init__(self, dim: int, head_dim: int, dtype=None, device=None, operations=ops):
        super().__init__()
        self.num_heads = dim // head_dim
        kw = dict(bias=True, dtype=dtype, device=device)
        self.to_query = operations.Linear(dim, dim, **kw)
        self.to_key = operations.Linear(dim, dim, **kw)
        self.to_value = operations.Linear(dim, dim, **kw)
        self.query_norm = operations.RMSNorm(head_dim, dtype=dtype, device=device)
        self.key_norm = operations.RMSNorm(head_dim, dtype=dtype, device=device)
        self.out_layer = operations.Linear(dim, dim, **kw)

    def _heads(self, x: Tensor) -> Tensor:
        return rearrange(x, "b s (h d) -> b s h d", h=self.num_heads)

    def qkv(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        kv_in = x if cond is None else cond
        q = self._heads(self.to_query(x))
        k = self._heads(self.to_key(kv_in))
        v = self._heads(self.to_value(kv_in))
        q = self.query_norm(q.float()).to(q.dtype)
        k = self.key_norm(k.float()).to(k.dtype)
        return q, k, v

    def out(self, x: Tensor) -> Tensor:
        return self.out_layer(rearrange(x, "b s h d -> b s (h d)"))


class SelfAttention(MultiheadAttention):
    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        key_mask: Tensor | None = None,
        nabla: NablaParams | None = None,
        grid: tuple[int, int, int] | None = None,
        backend: str | None = None,
    ) -> Tensor:
        q, k, v = self.qkv(x)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if nabla is not None:
            out = nabla_attention(q, k, v, grid, nabla, backend=backend)
        else:
            out = attention(q, k, v, key_mask=key_mask, backend=backend)
        return self.out(out)


class CrossAttention(MultiheadAttention):
    def forward(self, x: Tensor, cond: Tensor, key_mask: Tensor | None = None, backend: str | None = None) -> Tensor:
        q, k, v = self.qkv(x, cond)
        return self.out(attention(q, k, v, key_mask=key_mask, backend=backend))


class FeedForward(nn.Module):
    def __init__(self, dim: int, ff_dim: int, dtype=None, device=None, operations=ops):
        super().__init__()
        self.in_layer = operations.Linear(dim, ff_dim, bias=False, dtype=dtype, device=device)
        self.out_layer = operations.Linear(ff_dim, dim, bias=False, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.gelu(self.in_layer(x)))


def _plain_norm(dim: int, dtype, device, operations) -> nn.Module:
    return operations.LayerNorm(dim, elementwise_affine=False, dtype=dtype, device=device)


class TextBlock(nn.Module):
    """Text encoder block: modulated self-attention with 1D RoPE, then a modulated feed-forward."""

    def __init__(
        self, model_dim: int, time_dim: int, ff_dim: int, head_dim: int, dtype=None, device=None, operations=ops
    ):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.text_modulation = Modulation(time_dim, model_dim, 6, **kw)
        self.self_attention_norm = _plain_norm(model_dim, dtype, device, operations)
        self.self_attention = SelfAttention(model_dim, head_dim, **kw)
        self.feed_forward_norm = _plain_norm(model_dim, dtype, device, operations)
        self.feed_forward = FeedForward(model_dim, ff_dim, **kw)

    def forward(
        self,
        x: Tensor,
        time_embed: Tensor,
        rope: tuple[Tensor, Tensor],
        key_mask: Tensor | None,
        backend: str | None = None,
    ) -> Tensor:
        shift, scale, gate, ff_shift, ff_scale, ff_gate = self.text_modulation(time_embed).chunk(6, dim=-1)
        out = scale_shift_norm(self.self_attention_norm, x, scale, shift)
        x = gate_sum(x, self.self_attention(out, rope, key_mask=key_mask, backend=backend), gate)
        out = scale_shift_norm(self.feed_forward_norm, x, ff_scale, ff_shift)
        return gate_sum(x, self.feed_forward(out), ff_gate)


class VisualBlock(nn.Module):
    """Visual decoder block: self-attention (3D RoPE; dense or NABLA), cross-attention to text, feed-forward."""

    def __init__(
        self, model_dim: int, time_dim: int, ff_dim: int, head_dim: int, dtype=None, device=None, operations=ops
    ):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.visual_modulation = Modulation(time_dim, model_dim, 9, **kw)
        self.self_attention_norm = _plain_norm(model_dim, dtype, device, operations)
        self.self_attention = SelfAttention(model_dim, head_dim, **kw)
        self.cross_attention_norm = _plain_norm(model_dim, dtype, device, operations)
        self.cross_attention = CrossAttention(model_dim, head_dim, **kw)
        self.feed_forward_norm = _plain_norm(model_dim, dtype, device, operations)
        self.feed_forward = FeedForward(model_dim, ff_dim, **kw)

    def forward(
        self,
        x: Tensor,
        text: Tensor,
        time_embed: Tensor,
        rope: tuple[Tensor, Tensor],
        text_mask: Tensor | None,
        nabla: NablaParams | None = None,
        grid: tuple[int, int, int] | None = None,
        backend: str | None = None,
    ) -> Tensor:
        params = self.visual_modulation(time_embed).chunk(9, dim=-1)
        shift, scale, gate = params[0:3]
        out = scale_shift_norm(self.self_attention_norm, x, scale, shift)
        x = gate_sum(x, self.self_attention(out, rope, nabla=nabla, grid=grid, backend=backend), gate)
        shift, scale, gate = params[3:6]
        out = scale_shift_norm(self.cross_attention_norm, x, scale, shift)
        x = gate_sum(x, self.cross_attention(out, text, key_mask=text_mask, backend=backend), gate)
        shift, scale, gate = params[6:9]
        out = scale_shift_norm(self.feed_forward_norm, x, scale, shift)
        return gate_sum(x, self.feed_forward(out), gate)


class OutLayer(nn.Module):
    def __init__(
        self, model_dim: int, time_dim: int, visual_dim: int, patch_size, dtype=None, device=None, operations=ops
    ):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.modulation = Modulation(time_dim, model_dim, 2, dtype=dtype, device=device, operations=operations)
        self.norm = _plain_norm(model_dim, dtype, device, operations)
        self.out_layer = operations.Linear(
            model_dim, math.prod(patch_size) * visual_dim, bias=True, dtype=dtype, device=device
        )

    def forward(self, x: Tensor, time_embed: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, T'*H'*W', model_dim] (raster order) -> [B, C_out, T, H, W]; out features ordered (c, pt, ph, pw)."""
        shift, scale = self.modulation(time_embed).chunk(2, dim=-1)
        x = self.out_layer(scale_shift_norm(self.norm, x, scale, shift))
        pt, ph, pw = self.patch_size
        t, h, w = grid
        return rearrange(x, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)
