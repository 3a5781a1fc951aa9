"""Tiled application of VAE encoders/decoders: overlapping tiles, blended back with linear ramps.

Generic over the model: a spatial helper for the last two dims of `[..., H, W]` tensors (images or videos),
and a 1D helper for any dim (time) where the caller says which output range each input chunk produces.
Every output position is a weighted mean of the tiles covering it; a tile's weight ramps linearly from
near 0 to 1 across each overlap it shares with a neighbour, so seams fade instead of showing.
"""

from collections.abc import Callable, Sequence
from fractions import Fraction

import torch
from torch import Tensor

Span = tuple[int, int]


def tile_spans(size: int, tile: int, overlap: int) -> list[Span]:
    """[start, stop) tiles of length `tile` covering range(size), neighbours sharing at least `overlap`.

    Tiles are spread evenly, so every tile has the full length (the same context) when size >= tile.
    """
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if size <= tile:
        return [(0, size)]
    stride = tile - overlap
    count = -(-(size - overlap) // stride)  # ceil
    starts = [round(i * (size - tile) / (count - 1)) for i in range(count)]
    return [(s, s + tile) for s in starts]


def ramp_weights(spans: Sequence[Span]) -> list[Tensor]:
    """One 1D float32 weight per span: linear ramps over the overlaps with the previous and next span."""
    weights = []
    for i, (start, stop) in enumerate(spans):
        w = torch.ones(stop - start)
        if i > 0 and spans[i - 1][1] > start:
            n = min(spans[i - 1][1], stop) - start
            w[:n] = torch.arange(1, n + 1) / (n + 1)
        if i + 1 < len(spans) and spans[i + 1][0] < stop:
            n = stop - max(spans[i + 1][0], start)
            w[-n:] = torch.minimum(w[-n:], torch.arange(n, 0, -1) / (n + 1))
        weights.append(w)
    return weights


def _scaled(span: Span, scale: Fraction) -> Span:
    start, stop = span[0] * scale, span[1] * scale
    if start.denominator != 1 or stop.denominator != 1:
        raise ValueError(f"tile {span} does not map to whole output positions at scale {scale}")
    return int(start), int(stop)


def tiled_map_2d(
    x: Tensor,
    fn: Callable[[Tensor], Tensor],
    *,
    tile: int,
    overlap: int,
    scale: int | Fraction = 1,
) -> Tensor:
    """Apply `fn` to overlapping spatial tiles of `x` `[..., H, W]` and blend the results.

    `fn` maps a tile `[..., h, w]` to `[..., h * scale, w * scale]` (scale 8 for a decoder, 1/8 for an
    encoder; leading dims may change, e.g. channels). `tile` and `overlap` are in input positions.
    Peak memory: the output, one row of weights and one tile's work.
    """
    scale = Fraction(scale)
    height, width = x.shape[-2:]
    # Shrinking fns (encoders) need tiles on their grid: work in units of 1/scale input positions.
    unit = scale.denominator
    if height % unit or width % unit or tile % unit or overlap % unit:
        raise ValueError(f"size {height}x{width}, tile {tile} and overlap {overlap} must be multiples of {unit}")
    rows = [(a * unit, b * unit) for a, b in tile_spans(height // unit, tile // unit, overlap // unit)]
    cols = [(a * unit, b * unit) for a, b in tile_spans(width // unit, tile // unit, overlap // unit)]
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)
    out_rows, out_cols = [_scaled(s, scale) for s in rows], [_scaled(s, scale) for s in cols]
    row_w, col_w = ramp_weights(out_rows), ramp_weights(out_cols)

    out = None
    for (r0, r1), (o_r0, o_r1), wr in zip(rows, out_rows, row_w, strict=True):
        for (c0, c1), (o_c0, o_c1), wc in zip(cols, out_cols, col_w, strict=True):
            y = fn(x[..., r0:r1, c0:c1])
            if out is None:
                out_dtype = y.dtype
                out_shape = (*y.shape[:-2], out_rows[-1][1], out_cols[-1][1])
                out = torch.zeros(out_shape, dtype=_accum_dtype(y.dtype), device=y.device)
            w = (wr[:, None] * wc[None, :]).to(device=y.device)
            out[..., o_r0:o_r1, o_c0:o_c1] += y * w
            del y

    total_r = _weight_sum(out_rows, row_w, out.shape[-2])
    total_c = _weight_sum(out_cols, col_w, out.shape[-1])
    out /= (total_r[:, None] * total_c[None, :]).to(device=out.device, dtype=out.dtype)
    return out.to(out_dtype)


def blend_chunks_1d(
    chunks: Sequence[tuple[Span, Callable[[], Tensor]]],
    *,
    dim: int,
) -> Tensor:
    """Blend lazily computed chunks along `dim`, each with the output span it covers.

    `chunks` is a list of (output [start, stop), thunk) in increasing start order; thunk() returns a tensor whose
    length along `dim` is stop - start. Chunks are computed one at a time, so only one is alive at once.
    """
    spans = [span for span, _ in chunks]
    weights = ramp_weights(spans)
    length = max(stop for _, stop in spans)
    out = None
    for ((start, stop), compute), w in zip(chunks, weights, strict=True):
        y = compute()
        if y.shape[dim] != stop - start:
            raise ValueError(f"chunk for [{start}, {stop}) has length {y.shape[dim]} along dim {dim}")
        if out is None:
            out_dtype = y.dtype
            shape = list(y.shape)
            shape[dim] = length
            out = torch.zeros(shape, dtype=_accum_dtype(y.dtype), device=y.device)
        view = [1] * y.ndim
        view[dim] = -1
        out.narrow(dim, start, stop - start).add_(y * w.view(view).to(device=y.device))
        del y
    view = [1] * out.ndim
    view[dim] = -1
    out /= _weight_sum(spans, weights, length).view(view).to(device=out.device, dtype=out.dtype)
    return out.to(out_dtype)


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    # Blend low-precision tiles in float32: the weighted sums would otherwise round at every tile.
    return torch.promote_types(dtype, torch.float32)


def _weight_sum(spans: Sequence[Span], weights: Sequence[Tensor], length: int) -> Tensor:
    total = torch.zeros(length)
    for (start, stop), w in zip(spans, weights, strict=True):
        total[start:stop] += w
    return total
