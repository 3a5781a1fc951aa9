"""Time exact block-sparse NABLA attention against dense SDPA, with peak memory, and append the tables to
benchmarks/RESULTS.md.

    python benchmarks/nabla_attention.py                 # CPU: S=16384 tokens, 4 heads of 64
    python benchmarks/nabla_attention.py --device cuda   # also compiled flex and the full-size Lite 10 s shape

Two kinds of q / k, in the same run:

- structured: q and k get a random offset per 64-token block, so the pooled block map is peaked and NABLA keeps
  few blocks; the offset scale is tuned (bisection) so the mask's density is as close as possible to --sparsity.
- smooth + RoPE: q and k share a spatially and temporally smooth random field (trilinear upsampling of coarse
  noise), each with its own smooth part, are RMS-normalised per token (as the DiT's query / key norms do) and then
  rotated by the real 3D RoPE of Lite (axes 16/24/24); NABLA keeps the official P. The density is whatever the
  official top-cdf rule picks on such maps.

Each table gives the density the NABLA mask actually chose.
"""

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import publish  # noqa: E402
from kandinsky_core.layers import apply_rope, rope_3d  # noqa: E402
from kandinsky_core.nabla import (  # noqa: E402
    NablaParams,
    block_sparse_attention_flex,
    block_sparse_attention_sdpa,
    nabla_block_mask,
    sliding_tile_mask,
    tile_query_groups,
    tile_tokens,
)


def structured_qkv(grid, heads, head_dim, strength, device, dtype, seed=0):
    t, h, w = grid
    n = t * h * w // 64
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, n, 64, heads, head_dim, generator=g) for _ in range(3))
    q = q + strength * torch.randn(1, n, 1, heads, head_dim, generator=g)
    k = k + strength * torch.randn(1, n, 1, heads, head_dim, generator=g)
    return [rearrange(x, "b n s h d -> b (n s) h d").to(device, dtype).contiguous() for x in (q, k, v)]


def smooth_field(grid, heads, head_dim, g, cell=(2, 8, 8)):
    """[T, H, W, heads, D] random field, smooth over about `cell` tokens along each axis (trilinear upsampling)."""
    coarse = [n // c + 2 for n, c in zip(grid, cell, strict=True)]
    x = torch.randn(1, heads * head_dim, *coarse, generator=g)
    x = F.interpolate(x, size=[c * (n // c + 1) for n, c in zip(grid, cell, strict=True)], mode="trilinear")
    x = x[:, :, : grid[0], : grid[1], : grid[2]]
    return rearrange(x, "1 (h d) t y x -> t y x h d", h=heads)


def smooth_rope_qkv(grid, heads, head_dim, device, dtype, seed=0, own=0.5, gain=1.0):
    """q, k, v [1, S, heads, D] in tile order: a shared smooth field plus `own` x a smooth field of their own,
    RMS-normalised per token and scaled by `gain` (a query / key RMSNorm with all weights = gain), rotated by
    Lite's 3D RoPE (head_dim 64 = axes 16 + 24 + 24)."""
    g = torch.Generator().manual_seed(seed)
    shared = smooth_field(grid, heads, head_dim, g)
    q, k = (shared + own * smooth_field(grid, heads, head_dim, g) for _ in range(2))
    v = torch.randn(shared.shape, generator=g)
    q, k, v = (rearrange(x, "t y x h d -> 1 (t y x) h d") for x in (q, k, v))
    q, k = (gain * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) for x in (q, k))
    side = (head_dim - head_dim // 4) // 4 * 2  # Lite's split of 64: 16 (time) + 24 + 24
    axes = (head_dim - 2 * side, side, side)
    cos, sin = rope_3d(tuple(grid), axes, (1.0, 1.0, 1.0), torch.device("cpu"))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return [tile_tokens(x, tuple(grid)).to(device, dtype).contiguous() for x in (q, k, v)]


def tune_strength(grid, heads, head_dim, params, sta, target_density, device, dtype, steps=10):
    """The block offset scale whose mask density is closest to target_density (bisection; density falls with it)."""
    lo, hi, best = 0.0, 8.0, (float("inf"), 0.0, 1.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        q, k, _ = structured_qkv(grid, heads, head_dim, mid, device, dtype)
        density = nabla_block_mask(q, k, sta, params.P).float().mean().item()
        del q, k
        best = min(best, (abs(density - target_density), mid, density))
        lo, hi = (mid, hi) if density > target_density else (lo, mid)
    return best[1], best[2]


def _return_big_blocks_to_the_os() -> None:
    """glibc serves big allocations from mmap only up to a threshold it raises after each free, so a warmed
    process reuses its heap and its resident set stops growing: fix the threshold (128 KiB) so every tensor of
    any size is mapped and unmapped, and the high-water mark sees each call's real peak."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)  # and hand back what the heap holds free now
    except (OSError, AttributeError):
        pass


def peak_memory(fn, device):
    """Bytes one call of fn needs beyond what was allocated before it. CUDA: the allocator's peak. CPU: the growth
    of the process's resident-set high-water mark (Linux /proc; reset through /proc/self/clear_refs), which also
    sees kernels' internal scratch buffers; None where that is not available."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    status = Path("/proc/self/status")
    _return_big_blocks_to_the_os()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None

    def kib(field):
        return int(next(line for line in status.read_text().splitlines() if line.startswith(field)).split()[1])

    base = kib("VmRSS:")
    fn()
    return (kib("VmHWM:") - base) * 1024


def interleaved(fns, repeats, device):
    """Run every fn once to warm up, then `repeats` rounds of all of them in turn (a shared machine's load
    then hits every path alike). Returns {name: [seconds per round]} and the last results."""
    results = {name: fn() for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[name] = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times, results


def dense(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def dense_masked(q, k, v, block_mask):
    """Dense SDPA with the equivalent [S, S] boolean token mask, one head at a time to bound memory."""
    outs = []
    for head in range(q.shape[2]):
        token_mask = block_mask[:, head : head + 1].repeat_interleave(64, -1).repeat_interleave(64, -2)
        sl = slice(head, head + 1)
        qh, kh, vh = (x[:, :, sl].transpose(1, 2) for x in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=token_mask).transpose(1, 2))
    return torch.cat(outs, 2)


def run_case(name, grid, heads, head_dim, args, with_masked_dense, qk="structured"):
    device, dtype = args.device, getattr(torch, args.dtype)
    t, h, w = grid
    params = NablaParams(args.P)
    sta = sliding_tile_mask(t, h // 8, w // 8, params.wT, params.wH, params.wW, device)
    groups = tile_query_groups(t, h // 8, w // 8, device)
    if qk == "structured":
        strength = args.strength
        if strength is None:
            strength, _ = tune_strength(grid, heads, head_dim, params, sta, 1 - args.sparsity, device, dtype)
        q, k, v = structured_qkv(grid, heads, head_dim, strength, device, dtype)
        qk_text = (
            f"q/k structured: random offset per 64-token block, scale {strength:.2f} (tuned for "
            f"{args.sparsity:.0%} sparsity; the sliding-tile mask alone keeps {sta.float().mean().item():.1%} of "
            "the blocks)"
        )
    else:
        q, k, v = smooth_rope_qkv(grid, heads, head_dim, device, dtype, gain=args.gain)

        def density_at(gain):
            scale = gain / args.gain
            return nabla_block_mask(q * scale, k * scale, sta, params.P).float().mean().item()

        sweep = ", ".join(f"{gain:g}: {density_at(gain):.1%}" for gain in (1.0, 1.25, 1.5, 2.0))
        qk_text = (
            "q/k smooth + RoPE: a shared smooth random field (coarse cells of 2x8x8 tokens, trilinear) plus 0.5x a "
            f"field of their own, RMS-normalised per token times gain {args.gain:g} (a query / key RMSNorm with unit "
            "weights at gain 1), rotated by Lite's 3D RoPE; the official P picks the blocks. The density depends "
            f"steeply on the q/k scale, which trained norm weights set: mask density at gain {sweep}"
        )

    block_mask = nabla_block_mask(q, k, sta, params.P)
    density = block_mask.float().mean().item()
    fns = {
        "mask": lambda: nabla_block_mask(q, k, sta, params.P),
        "sparse": lambda: block_sparse_attention_sdpa(q, k, v, block_mask, query_groups=groups),
        "dense": lambda: dense(q, k, v),
    }
    if with_masked_dense:
        fns["masked"] = lambda: dense_masked(q, k, v, block_mask)
    flex_error = None
    if device == "cuda":
        try:  # compile once here: a flex failure is reported in the table, never a crash of the benchmark
            block_sparse_attention_flex(q, k, v, block_mask)
            fns["flex"] = lambda: block_sparse_attention_flex(q, k, v, block_mask)
        except Exception as e:
            flex_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    times, results = interleaved(fns, args.repeats, device)
    if not with_masked_dense and device != "cuda":  # check exactness on one head (masked dense is slow on a CPU)
        head = slice(0, 1)
        one = dense_masked(q[:, :, head], k[:, :, head], v[:, :, head], block_mask[:, head])
        results["masked"] = torch.cat([one, results["sparse"][:, :, 1:]], 2)
    others = [name for name in ("masked", "flex") if name in results]
    err = max((results[n].float() - results["sparse"].float()).abs().max().item() for n in others or ["sparse"])
    del results
    memory = {name: peak_memory(fn, device) for name, fn in fns.items()}
    memory["sparse_total"] = peak_memory(
        lambda: block_sparse_attention_sdpa(q, k, v, nabla_block_mask(q, k, sta, params.P), query_groups=groups), device
    )
    if "flex" in fns:
        memory["flex_total"] = peak_memory(
            lambda: block_sparse_attention_flex(q, k, v, nabla_block_mask(q, k, sta, params.P)), device
        )
    for executor in ("sparse", "flex"):
        if executor in times:  # per round, so the total is measured under one load
            times[executor + "_total"] = [a + b for a, b in zip(times["mask"], times[executor], strict=True)]
    times = {name: (statistics.median(t), min(t)) for name, t in times.items()}

    rows = [("dense SDPA (no mask)", "dense")]
    if with_masked_dense:
        rows.append(("dense SDPA + boolean token mask", "masked"))
    rows.append(("NABLA block mask (pool, softmax, top-cdf, OR sta)", "mask"))
    rows.append(("NABLA block-sparse SDPA executor (gathers included)", "sparse"))
    rows.append(("**NABLA total, SDPA executor (mask + executor)**", "sparse_total"))
    if "flex" in fns:
        rows.append(("NABLA compiled flex_attention executor", "flex"))
        rows.append(("**NABLA total, flex executor (mask + executor)**", "flex_total"))

    s = t * h * w
    mem_label = "peak MiB (CUDA allocator)" if device == "cuda" else "peak MiB (RSS high-water growth)"
    header = (
        f"### {name}: grid {t}x{h}x{w} tokens (S={s}), {heads} heads x {head_dim}, {args.dtype}, P={args.P}, "
        f"windows {params.wT}/{params.wH}/{params.wW}\n\n"
        f"{qk_text}\n\n"
        f"**block density chosen by the mask {density:.1%} (sparsity {1 - density:.1%})**; "
        f"max |SDPA executor - other exact paths| = {err:.2e}"
        f"{'' if with_masked_dense or device == 'cuda' else ' (masked dense on head 0)'}; "
        f"{args.repeats} interleaved rounds; memory: one more call per path, beyond q, k, v\n\n"
        f"{'' if flex_error is None else f'**compiled flex_attention failed** ({flex_error}): not timed' + chr(10) * 2}"
        f"| path | median (s) | min (s) | dense / path, median | dense / path, min | {mem_label} |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: |\n"
    )
    med_dense, min_dense = times["dense"]

    def mib(key):
        return "n/a" if memory.get(key) is None else f"{memory[key] / 2**20:.0f}"

    table = "".join(
        f"| {label} | {times[key][0]:.3f} | {times[key][1]:.3f} | {med_dense / times[key][0]:.2f}x | "
        f"{min_dense / times[key][1]:.2f}x | {mib(key)} |\n"
        for label, key in rows
    )
    return header + table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    parser.add_argument("--grid", type=int, nargs=3, default=[4, 64, 64], metavar=("T", "H", "W"))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--P", type=float, default=0.9)
    parser.add_argument("--sparsity", type=float, default=0.9, help="structured q/k: block sparsity to tune for")
    parser.add_argument("--strength", type=float, default=None, help="structured q/k: a fixed block offset scale "
                        "instead of tuning it for --sparsity")  # fmt: skip
    parser.add_argument("--gain", type=float, default=1.0, help="smooth q/k: RMS of q and k (query / key norm gain)")
    parser.add_argument("--qk", default="structured,smooth", help="q/k kinds to run: structured, smooth or both")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    if args.device == "cpu":
        _return_big_blocks_to_the_os()  # before the first big tensor, so the memory column is honest
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = f"## NABLA attention, {stamp}\n\ndevice: {device_name}; torch {torch.__version__}\n\n"
    kinds = args.qk.split(",")
    for i, kind in enumerate(kinds):
        label = {"structured": "structured q/k", "smooth": "smooth + RoPE q/k, official P"}[kind]
        grid, heads = tuple(args.grid), args.heads
        report += ("\n" if i else "") + run_case(
            f"benchmark, {label}", grid, heads, args.head_dim, args, with_masked_dense=i == 0, qk=kind
        )
    if args.device == "cuda":
        for kind in kinds:
            label = {"structured": "structured q/k", "smooth": "smooth + RoPE q/k, official P"}[kind]
            report += "\n" + run_case(
                f"Lite 10 s full size, {label}", (61, 32, 48), 28, 64, args, with_masked_dense=False, qk=kind
            )
    publish(report, append=not args.no_append)


if __name__ == "__main__":
    main()
