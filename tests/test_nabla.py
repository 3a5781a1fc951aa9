import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from kandinsky_core import nabla as nb
from kandinsky_core.errors import InputError
from kandinsky_core.nabla import (
    NablaParams,
    block_sparse_attention_flex,
    block_sparse_attention_sdpa,
    nabla_attention,
    nabla_block_mask,
    sliding_tile_mask,
    tile_tokens,
    untile_tokens,
)


def structured_qkv(b, n_blocks, h, d, strength=1.7, seed=0, dtype=torch.float32):
    """q, k, v [B, n_blocks*64, H, D] whose block means differ, so the pooled map is peaked and the mask sparse."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n_blocks, 64, h, d, generator=g) for _ in range(3))
    q = q + strength * torch.randn(b, n_blocks, 1, h, d, generator=g)
    k = k + strength * torch.randn(b, n_blocks, 1, h, d, generator=g)
    return tuple(rearrange(t, "b n s h d -> b (n s) h d").to(dtype) for t in (q, k, v))


def dense_masked(q, k, v, block_mask):
    """Dense SDPA with the block mask expanded to a [B, H, S, S] token mask."""
    token_mask = block_mask.repeat_interleave(64, -1).repeat_interleave(64, -2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=token_mask)
    return out.transpose(1, 2)


# --- parameters ---------------------------------------------------------------------------------------------


def test_params_validation():
    assert NablaParams(0.9) == NablaParams(P=0.9, wT=11, wH=3, wW=3)
    NablaParams(1.0, 1, 1, 1)
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(InputError, match=r"P=.*\(0, 1\]"):
            NablaParams(bad)
    for kw in ({"wT": 4}, {"wH": 0}, {"wW": -3}, {"wT": 3.0}):
        with pytest.raises(InputError, match="odd positive"):
            NablaParams(0.9, **kw)


# --- tiles --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(1, 8, 8), (3, 16, 24), (2, 24, 8)])
def test_tile_order_matches_reference(grid):
    t, h, w = grid
    x = torch.randn(2, t * h * w, 3)
    # official local_patching with group (1, 8, 8): blocks in (t, h_block, w_block) order, rows then cols inside
    ref = rearrange(x.reshape(2, t, h, w, 3), "b t (hb i) (wb j) c -> b (t hb wb i j) c", i=8, j=8)
    tiled = tile_tokens(x, grid)
    assert torch.equal(tiled, ref)
    assert torch.equal(untile_tokens(tiled, grid), x)


def test_tile_order_hand_checked():
    grid = (2, 8, 16)  # two 8x8 tiles side by side per frame
    idx = torch.arange(2 * 8 * 16)[None]
    tiled = tile_tokens(idx, grid)[0]

    def raster(t, r, c):
        return t * 128 + r * 16 + c

    assert tiled[0] == raster(0, 0, 0)
    assert tiled[1] == raster(0, 0, 1)
    assert tiled[8] == raster(0, 1, 0)  # second row of the first tile
    assert tiled[64] == raster(0, 0, 8)  # first token of the second (right) tile
    assert tiled[127] == raster(0, 7, 15)
    assert tiled[128] == raster(1, 0, 0)


def test_tile_round_trip_on_rope_shapes():
    grid = (2, 8, 16)
    s = 2 * 8 * 16
    for x in (torch.randn(1, s, 4, 2, 2), torch.randn(3, s, 2, 5)):
        assert torch.equal(untile_tokens(tile_tokens(x, grid), grid), x)
        assert not torch.equal(tile_tokens(x, grid), x)


def test_grid_not_multiple_of_tiles_is_input_error():
    with pytest.raises(
        InputError,
        match=r"(?s)width=400 must be a multiple of 128 px.*Nearest: 384 or 512.*"
        r"height=144 must be a multiple of 128 px.*Nearest: 128 or 256",
    ):
        tile_tokens(torch.zeros(1, 2 * 9 * 25), (2, 9, 25))
    with pytest.raises(InputError, match="128"):
        nabla_attention(*structured_qkv(1, 2, 1, 8), (1, 8, 12), NablaParams(0.9))  # 96 tokens, 12 not tile-able


# --- sliding tile mask --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,windows", [((4, 3, 5), (3, 3, 3)), ((6, 2, 4), (11, 1, 3)), ((3, 4, 4), (1, 5, 1))])
def test_sliding_tile_mask_brute_force(shape, windows):
    t, hb, wb = shape
    wt, wh, ww = windows
    coords = [(a, b, c) for a in range(t) for b in range(hb) for c in range(wb)]
    ref = torch.tensor(
        [
            [
                abs(a[0] - b[0]) <= wt // 2 and abs(a[1] - b[1]) <= wh // 2 and abs(a[2] - b[2]) <= ww // 2
                for b in coords
            ]
            for a in coords
        ]
    )
    mask = sliding_tile_mask(t, hb, wb, wt, wh, ww, "cpu")
    assert mask.dtype == torch.bool and torch.equal(mask, ref)
    assert sliding_tile_mask(t, hb, wb, wt, wh, ww, torch.device("cpu")) is mask  # cached


# --- block mask selection -----------------------------------------------------------------------------------


def brute_force_block_mask(q, k, P):
    """Pool in float64, softmax each row, drop the smallest blocks while the dropped mass stays below 1 - P."""
    b, s, h, d = q.shape
    n = s // 64
    qa = q.double().reshape(b, n, 64, h, d).mean(2)
    ka = k.double().reshape(b, n, 64, h, d).mean(2)
    mask = torch.zeros(b, h, n, n, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                row = torch.softmax(ka[bi, :, hi] @ qa[bi, i, hi] / d**0.5, 0).tolist()
                dropped = 0.0
                for j in sorted(range(n), key=lambda j: row[j]):
                    dropped += row[j]
                    mask[bi, hi, i, j] = dropped >= 1 - P - 1e-12
    return mask


@pytest.mark.parametrize("P", [1.0, 0.9, 0.5, 0.05])
def test_block_mask_top_cdf_brute_force(P):
    q, k, _ = structured_qkv(2, 12, 3, 16, seed=1)
    no_sta = torch.zeros(12, 12, dtype=torch.bool)
    mask = nabla_block_mask(q, k, no_sta, P)
    assert mask.shape == (2, 3, 12, 12)
    assert torch.equal(mask, brute_force_block_mask(q, k, P))
    if P == 1.0:
        assert mask.all()
    if P <= 0.5:
        assert mask.float().mean() < 0.5
    assert mask.any(-1).all()  # the largest block is always kept


def test_block_mask_is_or_with_sliding_tiles():
    q, k, _ = structured_qkv(1, 16, 2, 16, seed=2)
    sta = sliding_tile_mask(4, 2, 2, 3, 1, 1, "cpu")
    mask = nabla_block_mask(q, k, sta, 0.5)
    assert torch.equal(mask, brute_force_block_mask(q, k, 0.5) | sta)
    assert 0.2 < mask.float().mean() < 0.8


def test_block_mask_bf16_selects_on_float32_map():
    q, k, _ = structured_qkv(1, 12, 2, 16, seed=3, dtype=torch.bfloat16)
    mask = nabla_block_mask(q, k, torch.zeros(12, 12, dtype=torch.bool), 0.7)
    assert torch.equal(mask, brute_force_block_mask(q.float(), k.float(), 0.7))


# --- executors ----------------------------------------------------------------------------------------------


def random_block_mask(b, h, n, density, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, h, n, n, generator=g) < density) | torch.eye(n, dtype=torch.bool)


@pytest.mark.parametrize("b,h,n,d,density", [(1, 2, 12, 32, 0.3), (2, 3, 8, 16, 0.15), (1, 1, 5, 64, 0.6)])
def test_sdpa_executor_matches_dense_masked_fp32(b, h, n, d, density):
    q, k, v = structured_qkv(b, n, h, d, seed=n)
    block_mask = random_block_mask(b, h, n, density, seed=d)
    stats = {}
    out = block_sparse_attention_sdpa(q, k, v, block_mask, stats=stats)
    assert out.shape == q.shape and out.is_contiguous()
    torch.testing.assert_close(out, dense_masked(q, k, v, block_mask), atol=1e-5, rtol=1e-5)
    assert stats["kv_blocks"] == stats["gathered_blocks"] == block_mask.sum().item() < b * h * n * n
    assert stats["padding_blocks"] > 0  # rows with fewer blocks shared a chunk, padded and masked


def test_sdpa_executor_chunked_gathers_are_identical():
    q, k, v = structured_qkv(2, 10, 2, 16, seed=4)
    block_mask = random_block_mask(2, 2, 10, 0.4, seed=5)
    stats = {}
    small = block_sparse_attention_sdpa(q, k, v, block_mask, stats=stats, max_gather_elems=64 * 16)
    torch.testing.assert_close(small, block_sparse_attention_sdpa(q, k, v, block_mask), atol=1e-6, rtol=1e-6)
    assert stats["kv_blocks"] == block_mask.sum().item()


def test_sdpa_executor_skips_unselected_blocks():
    q, k, v = structured_qkv(1, 6, 1, 16, seed=6)
    block_mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    block_mask[..., :3] = True
    block_mask[..., 3:, 3] = True  # key blocks 4 and 5 are selected by nobody
    k_bad, v_bad = k.clone(), v.clone()
    token_unused = ~block_mask[0, 0].any(0).repeat_interleave(64)
    assert token_unused.any()
    k_bad[:, token_unused] = float("nan")  # blocks nobody selected are never read
    v_bad[:, token_unused] = float("nan")
    out = block_sparse_attention_sdpa(q, k_bad, v_bad, block_mask)
    torch.testing.assert_close(out, dense_masked(q, k, v, block_mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_grouped_sdpa_executor_matches_dense_masked(dtype, tol):
    # groups of frames: shared key blocks are gathered once per group, the rest per query block (LSE merge)
    grid_blocks = (6, 2, 2)  # T=6 -> groups of 4 and 2 frames
    n = 24
    q, k, v = structured_qkv(2, n, 2, 32, seed=14, dtype=dtype)
    sta = sliding_tile_mask(*grid_blocks, 3, 1, 3, "cpu")
    block_mask = nabla_block_mask(q, k, sta, 0.6)
    block_mask[1, 1, :, :] = random_block_mask(1, 1, n, 0.2, seed=15)  # a head whose groups share almost nothing
    groups = nb.tile_query_groups(*grid_blocks, "cpu")
    assert groups.unique().numel() == 2 * 2 * 2
    stats = {}
    out = block_sparse_attention_sdpa(q, k, v, block_mask, query_groups=groups, stats=stats, max_gather_elems=4096)
    ref = dense_masked(q.float(), k.float(), v.float(), block_mask)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    assert stats["kv_blocks"] == block_mask.sum().item()
    # key blocks common to a group are gathered once for the group, the others once per query block
    expected = 0
    for bi in range(2):
        for hi in range(2):
            for gid in groups.unique():
                rows = block_mask[bi, hi, groups == gid]
                shared = rows.all(0).sum().item()
                expected += shared + rows.sum().item() - shared * rows.shape[0]
    assert stats["gathered_blocks"] == expected < stats["kv_blocks"]


def test_tile_query_groups_layout():
    groups = nb.tile_query_groups(6, 2, 3, "cpu").view(6, 2, 3)
    assert torch.equal(groups[0], groups[3]) and not torch.equal(groups[3], groups[4])
    assert torch.equal(groups[4], groups[5])
    assert groups[0].unique().numel() == 6 and groups.unique().numel() == 12


def test_sdpa_executor_bf16():
    q, k, v = structured_qkv(1, 8, 2, 32, seed=8, dtype=torch.bfloat16)
    block_mask = random_block_mask(1, 2, 8, 0.3, seed=9)
    out = block_sparse_attention_sdpa(q, k, v, block_mask)
    assert out.dtype == torch.bfloat16
    ref = dense_masked(q.float(), k.float(), v.float(), block_mask)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_nabla_attention_full_density_is_dense_attention():
    grid = (2, 8, 16)
    q, k, v = structured_qkv(1, 4, 2, 16, seed=10)
    out, mask = nabla_attention(q, k, v, grid, NablaParams(1.0), return_mask=True)
    assert mask.all()
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def test_nabla_attention_sparse_matches_masked_dense_and_never_uses_flex_on_cpu(monkeypatch):
    def no_flex(*args, **kwargs):
        raise AssertionError("flex must not run for CPU tensors with executor='auto'")

    monkeypatch.setattr(nb, "block_sparse_attention_flex", no_flex)
    grid = (3, 16, 16)  # 12 blocks
    params = NablaParams(0.5, wT=1, wH=1, wW=3)
    q, k, v = structured_qkv(1, 12, 2, 16, seed=11)
    out, mask = nabla_attention(q, k, v, grid, params, return_mask=True)
    sta = sliding_tile_mask(3, 2, 2, 1, 1, 3, "cpu")
    assert torch.equal(mask, brute_force_block_mask(q, k, 0.5) | sta)
    assert mask.float().mean() < 0.7
    torch.testing.assert_close(out, dense_masked(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_nabla_attention_input_errors():
    q, k, v = structured_qkv(1, 2, 1, 8)
    with pytest.raises(InputError, match="tokens"):
        nabla_attention(q, k, v, (1, 8, 24), NablaParams(0.9))
    with pytest.raises(InputError, match="executor"):
        nabla_attention(q, k, v, (1, 8, 16), NablaParams(0.9), executor="triton")


@pytest.mark.skipif(
    os.environ.get("KANDINSKY_TEST_CPU_FLEX") != "1",
    reason="compiling flex_attention for CPU takes 15-35 s on 2 cores; set KANDINSKY_TEST_CPU_FLEX=1 to run it",
)
@pytest.mark.skipif(shutil.which("g++") is None, reason="compiled flex_attention on CPU needs a C++ compiler (g++)")
def test_compiled_flex_executor_matches_sdpa_executor():
    # CPU flex goes through Inductor's C++ backend: about 15 s of compilation, once
    q, k, v = structured_qkv(1, 8, 2, 16, seed=12)
    block_mask = random_block_mask(1, 2, 8, 0.3, seed=13)
    out = block_sparse_attention_flex(q, k, v, block_mask)
    assert hasattr(nb._compiled_flex, "_torchdynamo_orig_callable")  # a torch.compile wrapper, not eager flex
    torch.testing.assert_close(out, block_sparse_attention_sdpa(q, k, v, block_mask), atol=1e-5, rtol=1e-5)
    # eager flex_attention with an all-true mask_mod would ignore the block sparsity and give dense attention
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert (out - dense).abs().max() > 0.1


@pytest.mark.parametrize("full_blocks", [True, False])
def test_flex_block_mask_encodes_exactly_the_selected_blocks(full_blocks):
    block_mask = random_block_mask(2, 3, 7, 0.3, seed=16)
    flex_mask = nb._to_flex_block_mask(block_mask, 7 * 64, full_blocks=full_blocks)
    assert torch.equal(flex_mask.to_dense().bool(), block_mask)
    assert (flex_mask.kv_num_blocks.sum() == 0) == full_blocks  # CUDA: only full blocks, no mask_mod work


def test_flex_executor_only_runs_compiled_flex(monkeypatch):
    from torch.nn.attention.flex_attention import flex_attention

    seen = {}

    def fake_compile(fn, **kwargs):
        seen["fn"], seen["kwargs"] = fn, kwargs

        def compiled(q, k, v, block_mask):
            seen["block_mask"] = block_mask
            return q * 2

        return compiled

    monkeypatch.setattr(nb, "_compiled_flex", None)
    monkeypatch.setattr(torch, "compile", fake_compile)
    q, k, v = structured_qkv(1, 4, 2, 8, seed=17)
    block_mask = random_block_mask(1, 2, 4, 0.3, seed=18)
    out = block_sparse_attention_flex(q, k, v, block_mask)
    assert seen["fn"] is flex_attention and seen["kwargs"] == {"fullgraph": True}
    assert torch.equal(seen["block_mask"].to_dense().bool(), block_mask)
    assert torch.equal(out, q * 2) and out.is_contiguous()


def fake_cuda_flex(monkeypatch, behaviour):
    """NABLA told its tensors are on CUDA, with a stand-in for the compiled flex_attention."""
    calls = []

    def compiled(q, k, v, block_mask, **kwargs):
        calls.append(kwargs)
        return behaviour(q, k, v, block_mask, **kwargs)

    monkeypatch.setattr(nb, "_on_cuda", lambda x: True)
    monkeypatch.setattr(nb, "_compiled_flex", compiled)
    monkeypatch.setattr(nb, "_flex_broken", False)
    monkeypatch.setattr(nb, "flex_failure", None)
    return calls


def test_cuda_flex_runs_with_64x64_kernel_blocks(monkeypatch):
    """torch.compile's default flex config uses BLOCK_M=128 on CUDA, which NABLA's 64-token blocks refuse
    ("Q and KV block size must be divisible by BLOCK_M and BLOCK_N"): the kernel blocks must be 64x64."""

    def flex(q, k, v, block_mask, kernel_options=None):
        if (kernel_options or {}).get("BLOCK_M", 128) % 64 or 64 % (kernel_options or {}).get("BLOCK_M", 128):
            raise ValueError("Q and KV block size must be divisible by BLOCK_M and BLOCK_N.")
        return q

    calls = fake_cuda_flex(monkeypatch, flex)
    q, k, v = structured_qkv(1, 4, 2, 8, seed=21)
    out = nabla_attention(q, k, v, (1, 16, 16), NablaParams(0.9))
    assert calls == [{"kernel_options": {"BLOCK_M": 64, "BLOCK_N": 64}}]
    assert torch.equal(out, q.contiguous()) and nb.flex_failure is None


def test_cuda_flex_failure_falls_back_to_dense_attention_never_the_gather_path(monkeypatch, caplog):
    """On a GPU the gather path is slower than dense flash attention: when flex fails, dense attention runs, the
    reason is logged once and kept in nabla.flex_failure, and flex is not retried."""

    def broken(*args, **kwargs):
        raise ValueError("Q and KV block size must be divisible by BLOCK_M and BLOCK_N. We got Q_BLOCK_SIZE=64")

    def no_gather(*args, **kwargs):
        raise AssertionError("the gather path ran on CUDA")

    calls = fake_cuda_flex(monkeypatch, broken)
    monkeypatch.setattr(nb, "block_sparse_attention_sdpa", no_gather)
    q, k, v = structured_qkv(1, 4, 2, 8, seed=22)
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    with caplog.at_level("INFO", logger="kandinsky5"):
        for _ in range(3):
            out = nabla_attention(q, k, v, (1, 16, 16), NablaParams(0.9))
            torch.testing.assert_close(out, dense, atol=1e-6, rtol=1e-6)
    assert len(calls) == 1  # not retried once broken
    assert "divisible by BLOCK_M" in nb.flex_failure
    warnings = [r for r in caplog.records if "dense attention instead" in r.getMessage()]
    assert len(warnings) == 1


def unchunked_block_mask(q, k, sta_mask, P):
    """The block mask computed in one piece (float32 copies of q and k, one sort over every head)."""
    d = q.shape[-1]
    qa = rearrange(q.transpose(1, 2).float().contiguous(), "b h (n s) d -> b h n s d", s=64).mean(-2)
    ka = rearrange(k.transpose(1, 2).float().contiguous(), "b h (n s) d -> b h n s d", s=64).mean(-2)
    attn_map = torch.softmax((qa @ ka.transpose(-2, -1)) / d**0.5, dim=-1)
    vals, order = attn_map.sort(-1)
    keep = vals.cumsum_(-1) >= 1 - P
    return torch.zeros_like(keep).scatter_(-1, order, keep) | sta_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads_per_chunk", [1, 3, 4, 16])
def test_chunked_block_mask_is_bit_identical(dtype, heads_per_chunk):
    g = torch.Generator().manual_seed(30)
    s, h = 3 * 16 * 24, 7
    offsets = [torch.randn(2, s // 64, h, 64, generator=g).repeat_interleave(64, 1) for _ in range(2)]
    q, k = ((torch.randn(2, s, h, 64, generator=g) + 2 * o).to(dtype) for o in offsets)
    sta = sliding_tile_mask(3, 2, 3, 3, 1, 1, "cpu")
    for P in (0.5, 0.9, 0.99):
        expected = unchunked_block_mask(q, k, sta, P)
        assert torch.equal(nb.nabla_block_mask(q, k, sta, P, heads_per_chunk=heads_per_chunk), expected)


def test_block_mask_memory_at_the_lite_10s_shape():
    """Lite 10 s (61x32x48 tokens, 28 heads of 64, bf16): the mask's transient, measured on meta tensors, was
    2.33 GiB with float32 copies of q and k and int64 sort indices of every head at once."""
    from kandinsky_core.memory import measure_peak

    t, h, w, heads = 61, 32, 48, 28
    q = torch.empty(1, t * h * w, heads, 64, device="meta", dtype=torch.bfloat16)
    sta = sliding_tile_mask(t, h // 8, w // 8, 11, 3, 3, "meta")
    peak = measure_peak(lambda: nb.nabla_block_mask(q, q, sta, 0.9))
    assert peak < 0.6 * 2**30, f"{peak / 2**30:.2f} GiB"


@pytest.mark.parametrize("full_blocks", [True, False])
def test_flex_block_mask_skips_the_backward_only_q_tensors(full_blocks):
    flex_mask = nb._to_flex_block_mask(random_block_mask(1, 2, 5, 0.4, seed=31), 5 * 64, full_blocks=full_blocks)
    assert flex_mask.q_indices is None and flex_mask.q_num_blocks is None
