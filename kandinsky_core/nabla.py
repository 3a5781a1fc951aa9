"""NABLA: Neighborhood Adaptive Block-Level Attention.

Video tokens are reordered into 8x8 spatial tiles per frame, so every 64 consecutive tokens form one block.
Each query block attends to the key blocks that hold most of its (block-averaged) attention mass, plus a
sliding-tile neighbourhood. Two executors compute the same block-sparse attention: compiled flex_attention
on CUDA and a gather + SDPA path that runs anywhere.
"""

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .errors import InputError

log = logging.getLogger("kandinsky5")

BLOCK = 64
TILE = 8
_PIXELS_PER_TOKEN = 16  # 8 px per latent pixel x patch size 2
TIME_GROUP = 4  # consecutive frames of one tile share most of their sliding-tile neighbourhood


@dataclass(frozen=True)
class NablaParams:
    """Sparse attention settings: P is the attention mass each query block keeps; w* are sliding-tile windows."""

    P: float
    wT: int = 11
    wH: int = 3
    wW: int = 3

    def __post_init__(self) -> None:
        if not (0.0 < self.P <= 1.0):
            raise InputError(f"NABLA P={self.P} is out of range: it must be in (0, 1]. Use e.g. 0.9 (official value).")
        for name in ("wT", "wH", "wW"):
            w = getattr(self, name)
            if not isinstance(w, int) or isinstance(w, bool) or w <= 0 or w % 2 == 0:
                raise InputError(
                    f"NABLA window {name}={w} is not allowed: windows must be odd positive integers "
                    "(official values wT=11, wH=3, wW=3)."
                )


def _check_grid(grid: tuple[int, int, int]) -> None:
    _, h, w = grid
    if h % TILE or w % TILE:
        from .settings import nabla_grid_problems, raise_problems

        raise_problems(nabla_grid_problems(w * _PIXELS_PER_TOKEN, h * _PIXELS_PER_TOKEN))


def tile_tokens(x: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """Reorder dim 1 of x from (t, h, w) raster order to 8x8 tiles: (t, h_block, w_block, h_in, w_in)."""
    _check_grid(grid)
    t, h, w = grid
    return rearrange(x, "b (t hb hi wb wi) ... -> b (t hb wb hi wi) ...", t=t, hi=TILE, wi=TILE, hb=h // TILE)


def untile_tokens(x: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """Inverse of tile_tokens."""
    _check_grid(grid)
    t, h, w = grid
    return rearrange(x, "b (t hb wb hi wi) ... -> b (t hb hi wb wi) ...", t=t, hi=TILE, wi=TILE, hb=h // TILE)


@lru_cache(maxsize=16)
def _sliding_tile_mask(t: int, hb: int, wb: int, wt: int, wh: int, ww: int, device: torch.device) -> Tensor:
    def near(n: int, window: int) -> Tensor:
        r = torch.arange(n, device=device)
        return (r[:, None] - r[None, :]).abs() <= window // 2

    mt, mh, mw = near(t, wt), near(hb, wh), near(wb, ww)
    mask = mt[:, None, None, :, None, None] & mh[None, :, None, None, :, None] & mw[None, None, :, None, None, :]
    return mask.reshape(t * hb * wb, t * hb * wb)


def sliding_tile_mask(T: int, Hb: int, Wb: int, wT: int, wH: int, wW: int, device: torch.device | str) -> Tensor:
    """[N, N] bool over blocks ordered (t, h_block, w_block): True where every block offset is inside its window.

    Cached per (shape, windows, device); the returned tensor is shared, do not modify it in place.
    """
    return _sliding_tile_mask(T, Hb, Wb, wT, wH, wW, torch.device(device))


def _pool_blocks(x: Tensor, heads_per_chunk: int) -> Tensor:
    """[B, S, H, D] -> [B, H, N, D] float32 means over 64-token blocks. Each chunk of heads is made a contiguous
    float32 [B, h, S, D] first (the official layout, so every mean reduces in the same order, bit for bit), so only
    one chunk's float32 copy is alive at a time instead of the whole of q or k."""
    b, s, h, d = x.shape
    out = torch.empty((b, h, s // BLOCK, d), dtype=torch.float32, device=x.device)
    for h0 in range(0, h, heads_per_chunk):
        chunk = x[:, :, h0 : h0 + heads_per_chunk].transpose(1, 2).float().contiguous()
        out[:, h0 : h0 + heads_per_chunk] = rearrange(chunk, "b h (n s) d -> b h n s d", s=BLOCK).mean(-2)
        del chunk
    return out


def nabla_block_mask(q: Tensor, k: Tensor, sta_mask: Tensor, P: float, heads_per_chunk: int = 4) -> Tensor:
    """[B, H, N, N] bool block mask: the top-cdf blocks of the pooled attention map, OR the sliding-tile mask.

    q, k are [B, S, H, D] in tile order. The pooled map is computed in float32 whatever the input dtype
    (the official code pools in the model dtype, bf16), so bf16 selections can differ at the P boundary.
    For each query block the map row is sorted ascending and cumsummed; blocks whose cumulative mass is
    >= 1 - P are kept, i.e. the smallest tail of large blocks that leaves less than 1 - P mass outside.

    Memory: pooling and the sort / cumsum / scatter run `heads_per_chunk` heads at a time, so the transient is
    the float32 map plus one chunk's work (not float32 copies of q and k and int64 sort indices of every head);
    the map itself comes from one matmul and one softmax over all heads, as before, so the mask is bit-identical.
    """
    d = q.shape[-1]
    qa, ka = _pool_blocks(q, heads_per_chunk), _pool_blocks(k, heads_per_chunk)
    attn_map = torch.softmax((qa @ ka.transpose(-2, -1)) / math.sqrt(d), dim=-1)
    del qa, ka
    mask = torch.empty(attn_map.shape, dtype=torch.bool, device=attn_map.device)
    sta = sta_mask.to(mask.device)
    for h0 in range(0, attn_map.shape[1], heads_per_chunk):
        vals, order = attn_map[:, h0 : h0 + heads_per_chunk].sort(-1)
        keep = vals.cumsum_(-1) >= 1 - P
        del vals
        part = mask[:, h0 : h0 + heads_per_chunk]
        part.zero_().scatter_(-1, order, keep)
        part |= sta
    return mask


def _group_rows(query_groups: Tensor, bh: int, n: int) -> list[Tensor]:
    """Rows of the flattened (b h n) mask that share a group, as [G, group_size] tensors, one per group size."""
    _, sizes = torch.unique(query_groups, return_counts=True)
    order = query_groups.argsort(stable=True)
    members = torch.split(order, sizes.tolist())
    heads = torch.arange(bh, device=query_groups.device)[:, None, None] * n
    result = []
    for size in torch.unique(sizes).tolist():
        blocks = torch.stack([m for m in members if m.numel() == size])  # [Gn, size]
        result.append((heads + blocks[None]).reshape(-1, size))
    return result


def _chunks(counts_desc: list[int], budget_blocks: int):
    """Split items sorted by descending block count into runs whose padded gather fits budget_blocks."""
    start = 0
    while start < len(counts_desc) and counts_desc[start] > 0:
        stop = min(len(counts_desc), start + max(1, budget_blocks // counts_desc[start]))
        while counts_desc[stop - 1] == 0:
            stop -= 1
        yield start, stop
        start = stop


def block_sparse_attention_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: Tensor,
    *,
    query_groups: Tensor | None = None,
    stats: dict | None = None,
    max_gather_elems: int | None = None,
) -> Tensor:
    """Exact block-sparse attention that only reads the selected key/value blocks.

    q, k, v are [B, S, H, D]; block_mask is [B, H, N, N] bool (N = S / 64, any broadcastable leading dims).
    Query blocks are sorted by how many key blocks they keep and cut into chunks; each chunk gathers its
    key/value blocks into [G, n*64, D] (rows with fewer blocks padded with masked-out blocks) and runs one
    SDPA call. Chunks fit a workspace of max_gather_elems elements (default 2**23 on CPU, 2**26 elsewhere),
    allocated once per call; few large chunks keep the number of parallel regions small, which matters on
    a busy CPU.

    query_groups ([N] ints, CPU only) names query blocks that select mostly the same key blocks (NABLA passes
    4 consecutive frames of one tile). The key blocks all members select are gathered once and attended by the
    whole group; each member's remaining blocks are attended separately, and the two partial results are
    merged exactly by their log-sum-exp. This cuts the gather traffic that dominates on CPU.
    If stats is given, stats["kv_blocks"] grows by the (query block, key block) pairs attended,
    stats["gathered_blocks"] by the selected key blocks copied and stats["padding_blocks"] by the padding.
    """
    b, s, h, d = q.shape
    n = s // BLOCK
    mask = block_mask.expand(b, h, n, n).reshape(b * h * n, n)
    qb = rearrange(q, "b (n s) h d -> (b h n) s d", s=BLOCK)
    kb = rearrange(k, "b (n s) h d -> (b h n) s d", s=BLOCK)
    vb = rearrange(v, "b (n s) h d -> (b h n) s d", s=BLOCK)
    row_counts = mask.sum(-1)
    if (row_counts == 0).any():
        raise InputError("NABLA block mask has a query block that attends to no key block; every row needs one.")
    # flat index of key block j for the (batch, head) that owns query row r
    row_base = torch.arange(b * h, device=q.device).repeat_interleave(n) * n
    block_elems = BLOCK * d
    if max_gather_elems is None:
        max_gather_elems = 1 << 23 if q.device.type == "cpu" else 1 << 26
    budget = max(max_gather_elems // block_elems, int(row_counts.max()))
    k_ws = torch.empty(budget * block_elems, dtype=k.dtype, device=k.device)
    v_ws = torch.empty(budget * block_elems, dtype=v.dtype, device=v.device)
    with_lse = query_groups is not None and q.device.type == "cpu"
    counter = {"kv_blocks": 0, "gathered_blocks": 0, "padding_blocks": 0}

    def attend(qg: Tensor, sel: Tensor, base: Tensor, counts: Tensor) -> tuple[Tensor, Tensor | None]:
        """qg [G, L, D] queries, sel [G, N] their key blocks -> out [G, L, D] and lse [G, L] (with_lse)."""
        g, width = sel.shape[0], int(counts.max())
        # selected blocks first (stable), then unselected ones as padding, masked out below
        idx = sel.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[:, :width]
        flat = (idx + base[:, None]).flatten()
        kg = torch.index_select(kb, 0, flat, out=k_ws[: flat.numel() * block_elems].view(-1, BLOCK, d))
        vg = torch.index_select(vb, 0, flat, out=v_ws[: flat.numel() * block_elems].view(-1, BLOCK, d))
        kg, vg = kg.view(g, 1, width * BLOCK, d), vg.view(g, 1, width * BLOCK, d)
        attn_mask = None
        padding = torch.arange(width, device=q.device) >= counts[:, None]
        n_padding = int(padding.sum())
        if n_padding:
            padding = padding.repeat_interleave(BLOCK, 1)[:, None, None]
            attn_mask = torch.zeros(padding.shape, dtype=q.dtype, device=q.device).masked_fill_(padding, -math.inf)
        counter["gathered_blocks"] += flat.numel() - n_padding
        counter["padding_blocks"] += n_padding
        if with_lse:
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qg[:, None], kg, vg, attn_mask=attn_mask
            )
            return o.squeeze(1), lse.squeeze(1)
        return F.scaled_dot_product_attention(qg[:, None], kg, vg, attn_mask=attn_mask).squeeze(1), None

    out = torch.zeros_like(qb) if with_lse else torch.empty_like(qb)
    lse = torch.full(qb.shape[:2], -math.inf, device=q.device) if with_lse else None
    private = mask
    if with_lse:
        private = mask.clone()
        for rows in _group_rows(query_groups.to(q.device), b * h, n):
            size = rows.shape[1]
            shared = mask[rows].all(1)  # [G, N] key blocks every member selects
            private[rows.flatten()] &= ~shared.repeat_interleave(size, 0)
            shared_counts, order = shared.sum(-1).sort(descending=True)
            for start, stop in _chunks(shared_counts.tolist(), budget):
                sel = order[start:stop]
                members = rows[sel].flatten()
                qg = qb.index_select(0, members).view(sel.numel(), size * BLOCK, d)
                o, l = attend(qg, shared[sel], row_base[rows[sel, 0]], shared_counts[start:stop])
                out.index_copy_(0, members, o.reshape(-1, BLOCK, d))
                lse.index_copy_(0, members, l.reshape(-1, BLOCK))
                counter["kv_blocks"] += size * int(shared_counts[start:stop].sum())

    counts, order = private.sum(-1).sort(descending=True)
    for start, stop in _chunks(counts.tolist(), budget):
        rows = order[start:stop]
        o, l = attend(qb.index_select(0, rows), private.index_select(0, rows), row_base[rows], counts[start:stop])
        if with_lse:
            # exact merge with the shared-block result: weight of this part = sigmoid(lse_own - lse_shared)
            w_own = torch.sigmoid(l - lse.index_select(0, rows))[..., None]
            o_shared = out.index_select(0, rows)
            if o.dtype == torch.float32:
                o = torch.lerp(o_shared, o, w_own)
            else:
                o = torch.lerp(o_shared.float(), o.float(), w_own).to(o.dtype)
        out.index_copy_(0, rows, o)
        counter["kv_blocks"] += int(counts[start:stop].sum())
    if stats is not None:
        for key, value in counter.items():
            stats[key] = stats.get(key, 0) + value
    return rearrange(out, "(b h n) s d -> b (n s) h d", b=b, h=h).contiguous()


_compiled_flex = None
_flex_broken = False
# Why compiled flex_attention is not used in this process (None while it works or was never tried on CUDA).
flex_failure: str | None = None

# NABLA's blocks are 64 tokens: torch.compile's default flex_attention config uses BLOCK_M = 128 on CUDA (every GPU
# generation, bf16) and then raises "Q and KV block size must be divisible by BLOCK_M and BLOCK_N".
FLEX_KERNEL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64}


def _on_cuda(x: Tensor) -> bool:
    return x.is_cuda


def _get_compiled_flex():
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        # fullgraph: a graph break would silently run eager flex_attention, which ignores block sparsity
        _compiled_flex = torch.compile(flex_attention, fullgraph=True)
    return _compiled_flex


def _to_flex_block_mask(block_mask: Tensor, s: int, full_blocks: bool):
    from torch.nn.attention.flex_attention import BlockMask, noop_mask

    block_mask = block_mask.to(torch.bool)
    counts = block_mask.sum(-1, dtype=torch.int32)
    indices = block_mask.to(torch.uint8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    if full_blocks:
        # every selected block is a full block, so no mask_mod is ever evaluated
        return BlockMask.from_kv_blocks(
            torch.zeros_like(counts), indices, counts, indices, BLOCK_SIZE=BLOCK, seq_lengths=(s, s),
            compute_q_blocks=False,  # the q_* tensors only serve the backward pass: inference never reads them
        )  # fmt: skip
    # Inductor's C++ flex kernel (torch 2.13) fails to compile full-blocks-only masks, so on CPU the same
    # blocks are listed as partial blocks with an all-true mask_mod: identical result, still block-sparse.
    return BlockMask.from_kv_blocks(
        counts, indices, BLOCK_SIZE=BLOCK, mask_mod=noop_mask, seq_lengths=(s, s), compute_q_blocks=False
    )


def block_sparse_attention_flex(q: Tensor, k: Tensor, v: Tensor, block_mask: Tensor) -> Tensor:
    """Block-sparse attention with compiled flex_attention; q, k, v [B, S, H, D], block_mask [B, H, N, N] bool."""
    b, s, h, _ = q.shape
    n = s // BLOCK
    cuda = _on_cuda(q)
    flex_mask = _to_flex_block_mask(block_mask.expand(b, h, n, n), s, full_blocks=cuda)
    kw = {"kernel_options": dict(FLEX_KERNEL_OPTIONS)} if cuda else {}
    out = _get_compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=flex_mask, **kw)
    return out.transpose(1, 2).contiguous()


def tile_query_groups(t: int, hb: int, wb: int, device: torch.device) -> Tensor:
    """Group id per query block (t, h_block, w_block) for block_sparse_attention_sdpa's query_groups:
    blocks of the same tile in the same run of TIME_GROUP frames share a group."""
    blocks = torch.arange(t * hb * wb, device=device)
    return blocks // (TIME_GROUP * hb * wb) * (hb * wb) + blocks % (hb * wb)


_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def nabla_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: tuple[int, int, int],
    params: NablaParams,
    *,
    executor: str = "auto",
    return_mask: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """NABLA self-attention on tile-ordered q, k, v [B, S, H, D] of a (T, H, W) token grid.

    executor: "auto" (compiled flex on CUDA, the SDPA gather path elsewhere), "flex" or "sdpa". On CUDA, when
    compiled flex_attention fails, "auto" runs dense attention (`backend`, see attention.py) from then on: the
    gather path is slower than dense flash attention on a GPU, and NABLA only exists to be faster than dense. The
    failure is logged once and kept in `flex_failure`. With return_mask, also returns the [B, H, N, N] block mask
    (None where dense attention ran).
    """
    global _flex_broken, flex_failure
    if executor not in ("auto", "flex", "sdpa"):
        raise InputError(f"NABLA executor {executor!r} is unknown: use 'auto', 'flex' or 'sdpa'.")
    _check_grid(grid)
    t, h, w = grid
    if q.shape[1] != t * h * w:
        raise InputError(f"NABLA got {q.shape[1]} tokens for a {t}x{h}x{w} token grid; they must match.")
    cuda = _on_cuda(q)
    if executor == "auto" and cuda and _flex_broken:
        return _dense(q, k, v, backend, return_mask)
    sta = sliding_tile_mask(t, h // TILE, w // TILE, params.wT, params.wH, params.wW, q.device)
    block_mask = nabla_block_mask(q, k, sta, params.P)

    out = None
    if executor == "flex":
        out = block_sparse_attention_flex(q, k, v, block_mask)
    elif executor == "auto" and cuda:
        try:
            out = block_sparse_attention_flex(q, k, v, block_mask)
            _log_once("NABLA executor: compiled flex_attention")
        except Exception as e:  # compiler, Triton or kernel config: dense attention is never slower than the rest
            _flex_broken = True
            flex_failure = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log.warning(
                "NABLA: compiled flex_attention failed (%s); running dense attention instead for the rest of this "
                "process (on a GPU the gather path would be slower than dense)", flex_failure[:300],
            )  # fmt: skip
            return _dense(q, k, v, backend, return_mask)
    if out is None:
        _log_once("NABLA executor: block-sparse SDPA gather path")
        out = block_sparse_attention_sdpa(
            q, k, v, block_mask, query_groups=tile_query_groups(t, h // TILE, w // TILE, q.device)
        )
    return (out, block_mask) if return_mask else out


def _dense(q: Tensor, k: Tensor, v: Tensor, backend: str | None, return_mask: bool):
    from .attention import attention

    out = attention(q, k, v, backend=backend)
    return (out, None) if return_mask else out


def nabla_attention_raster(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: tuple[int, int, int],
    params: NablaParams,
    *,
    executor: str = "auto",
    return_mask: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """NABLA self-attention on q, k, v [B, S, H, D] in raster (t, h, w) order, the order of models that never tile
    their tokens (ComfyUI's native Kandinsky 5). The rows are moved into tile order, attended by `nabla_attention`
    and moved back. Attention is permutation-equivariant when q, k and v move together, so this equals NABLA inside
    a model that keeps its tokens tiled (ours) for the same q, k, v after RoPE; the block mask (returned with
    return_mask) is the same, in tile order."""
    res = nabla_attention(
        tile_tokens(q, grid), tile_tokens(k, grid), tile_tokens(v, grid), grid, params,
        executor=executor, return_mask=True, backend=backend,
    )  # fmt: skip
    out, mask = res
    out = untile_tokens(out, grid)
    return (out, mask) if return_mask else out


def mask_density(block_mask: Tensor) -> tuple[int, int]:
    """(selected, total) (query block, key block) pairs of a [B, H, N, N] block mask: how sparse NABLA ran."""
    return int(block_mask.sum()), block_mask.numel()
