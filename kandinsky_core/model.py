"""Kandinsky5DiT: the one diffusion transformer for Video Lite, Video Pro and Image Lite (T2I and I2I edit)."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor, nn

from .attention import select_backend
from .errors import InputError
from .layers import (
    OutLayer,
    TextBlock,
    TextEmbeddings,
    TimeEmbeddings,
    VisualBlock,
    VisualEmbeddings,
    ops,
    rope_1d,
    rope_3d,
)
from .nabla import TILE, NablaParams, tile_tokens, untile_tokens
from .variants import DiTArch

# (visual tokens before the visual blocks, function running the blocks) -> visual tokens after them
BlockCacheHook = Callable[[Tensor, Callable[[Tensor], Tensor]], Tensor]


class Kandinsky5DiT(nn.Module):
    """Text blocks encode Qwen embeddings; visual blocks attend to themselves and to the text; time (plus the
    pooled CLIP embedding) modulates every block.

    `dtype` is the storage dtype of the parameters; `compute_dtype` (default: `dtype`, or bfloat16 when the
    storage is float8) is the working dtype of activations.
    """

    def __init__(
        self,
        arch: DiTArch,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        operations=None,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        operations = operations or ops
        self.arch = arch
        if compute_dtype is None:
            # float8 storage computes in bf16; no dtype means torch's default (fp32) parameters computing in fp32
            if dtype is None:
                compute_dtype = torch.get_default_dtype()
            else:
                compute_dtype = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
        self.compute_dtype = compute_dtype
        kw = dict(dtype=dtype, device=device, operations=operations)
        a = arch
        self.time_embeddings = TimeEmbeddings(a.model_dim, a.time_dim, **kw)
        self.text_embeddings = TextEmbeddings(a.in_text_dim, a.model_dim, **kw)
        self.pooled_text_embeddings = TextEmbeddings(a.in_text_dim2, a.time_dim, **kw)
        self.visual_embeddings = VisualEmbeddings(a.in_channels, a.model_dim, a.patch_size, **kw)
        self.text_transformer_blocks = nn.ModuleList(
            [TextBlock(a.model_dim, a.time_dim, a.ff_dim, a.head_dim, **kw) for _ in range(a.num_text_blocks)]
        )
        self.visual_transformer_blocks = nn.ModuleList(
            [VisualBlock(a.model_dim, a.time_dim, a.ff_dim, a.head_dim, **kw) for _ in range(a.num_visual_blocks)]
        )
        self.out_layer = OutLayer(a.model_dim, a.time_dim, a.out_visual_dim, a.patch_size, **kw)

    def _token_grid(self, x: Tensor, nabla: NablaParams | None) -> tuple[int, int, int]:
        a = self.arch
        if x.ndim != 5 or x.shape[1] != a.in_channels:
            raise InputError(
                f"DiT input x has shape {tuple(x.shape)}; expected [B, {a.in_channels}, T, H, W] "
                f"({a.in_channels} latent channels for this model). Check the latent / conditioning channels."
            )
        _, _, t, h, w = x.shape
        pt, ph, pw = a.patch_size
        if t % pt or h % ph or w % pw:
            raise InputError(
                f"Latent size T={t}, H={h}, W={w} is not divisible by the patch size {a.patch_size}. "
                "Use pixel widths/heights that are multiples of 16."
            )
        grid = (t // pt, h // ph, w // pw)
        if nabla is not None and (grid[1] % TILE or grid[2] % TILE):
            from .settings import nabla_grid_problems, raise_problems

            raise_problems(nabla_grid_problems(w * 8, h * 8))
        return grid

    def forward(
        self,
        x: Tensor,
        text_embeds: Tensor,
        pooled_text_embeds: Tensor,
        timestep: Tensor,
        text_mask: Tensor | None = None,
        rope_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
        nabla: NablaParams | None = None,
        attention_backend: str | None = None,
        block_cache: BlockCacheHook | None = None,
    ) -> Tensor:
        """Velocity [B, 16, T, H, W] (in x's dtype) for x [B, C_in, T, H, W], text [B, L, 3584], pooled [B, 768],
        timestep [B] in 0..1000 and text_mask [B, L] (True = real token).

        `block_cache(visual, run_blocks)`, when given, replaces the pass through the visual blocks: it gets the
        visual tokens [B, S, D] before the blocks and a function that runs them, and returns the tokens after them
        (MagCache uses it to reuse a cached residual instead of running the blocks)."""
        out_dtype = x.dtype
        dt = self.compute_dtype
        attention_backend = select_backend(attention_backend)  # once per call, not once per block
        b = x.shape[0]
        grid = self._token_grid(x, nabla)
        a = self.arch
        if text_embeds.ndim != 3 or text_embeds.shape[0] != b or text_embeds.shape[2] != a.in_text_dim:
            raise InputError(
                f"text_embeds has shape {tuple(text_embeds.shape)}; expected [{b}, L, {a.in_text_dim}] "
                "(Qwen2.5-VL hidden states). Connect the Kandinsky 5 text encoder output."
            )
        if tuple(pooled_text_embeds.shape) != (b, a.in_text_dim2):
            raise InputError(
                f"pooled_text_embeds has shape {tuple(pooled_text_embeds.shape)}; expected [{b}, {a.in_text_dim2}] "
                "(pooled CLIP-L embedding)."
            )
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).float()
        if timestep.numel() == 1 and b > 1:
            timestep = timestep.expand(b)
        if text_mask is not None:
            if text_mask.shape != text_embeds.shape[:2]:
                raise InputError(
                    f"text_mask has shape {tuple(text_mask.shape)}; it must match text_embeds [B, L] = "
                    f"{tuple(text_embeds.shape[:2])}."
                )
            # None lets the attention backend take its unmasked fast path
            text_mask = None if _mask_is_full(text_mask) else text_mask.to(device=x.device, dtype=torch.bool)

        text = self.text_embeddings(text_embeds.to(dt))
        time_embed = self.time_embeddings(timestep)
        time_embed = time_embed + self.pooled_text_embeddings(pooled_text_embeds.to(dt))
        visual = rearrange(self.visual_embeddings(x.to(dt)), "b t h w c -> b (t h w) c")

        text_rope = rope_1d(text.shape[1], a.head_dim, x.device)
        for block in self.text_transformer_blocks:
            text = block(text, time_embed, text_rope, text_mask, backend=attention_backend)

        cos, sin = rope_3d(grid, a.axes_dims, tuple(float(s) for s in rope_scale), x.device)
        if nabla is not None:
            # Tile order puts each 8x8 block of tokens together (the official fractal_flatten).
            visual = tile_tokens(visual, grid)
            cos, sin = tile_tokens(cos[None], grid)[0], tile_tokens(sin[None], grid)[0]

        def run_visual_blocks(visual: Tensor) -> Tensor:
            for block in self.visual_transformer_blocks:
                visual = block(visual, text, time_embed, (cos, sin), text_mask, nabla, grid, backend=attention_backend)
            return visual

        visual = run_visual_blocks(visual) if block_cache is None else block_cache(visual, run_visual_blocks)
        if nabla is not None:
            visual = untile_tokens(visual, grid)

        return self.out_layer(visual, time_embed, grid).to(out_dtype)


_checked_masks: dict[int, bool] = {}  # id(text mask) -> every token real, while that tensor lives


def _mask_is_full(text_mask: Tensor) -> bool:
    """Whether every token of `text_mask` is real; raises when a sample has none. One device-to-host copy per mask
    tensor, not two per forward: the sampler passes the same mask to every step, so the result is kept for as long
    as the tensor lives (masks are not modified in place)."""
    key = id(text_mask)
    full = _checked_masks.get(key)
    if full is None:
        mask = text_mask.to(torch.bool)
        every_row, full = (bool(f) for f in torch.stack([mask.any(dim=1).all(), mask.all()]).cpu())
        if not every_row:
            raise InputError("text_mask has a sample with no real token; every prompt needs at least one token.")
        _checked_masks[key] = full
        weakref.finalize(text_mask, _checked_masks.pop, key, None)
    return full
