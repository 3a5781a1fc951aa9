"""Time exact block-sparse NABLA attention against dense SDPA, and append the table to benchmarks/RESULTS.md.

    python benchmarks/nabla_attention.py                 # CPU: S=16384 tokens, 4 heads of 64, ~80% sparsity
    python benchmarks/nabla_attention.py --device cuda   # also compiled flex and the full-size Lite 10 s shape

q and k get a random offset per 64-token block, so the pooled block map is peaked and NABLA keeps few blocks,
as in a trained model; the measured density is reported.
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

from kandinsky_core.nabla import (  # noqa: E402
    NablaParams,
    block_sparse_attention_flex,
    block_sparse_attention_sdpa,
    nabla_block_mask,
    sliding_tile_mask,
    tile_query_groups,
)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def structured_qkv(grid, heads, head_dim, strength, device, dtype, seed=0):
    t, h, w = grid
    n = t * h * w // 64
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, n, 64, heads, head_dim, generator=g) for _ in range(3))
    q = q + strength * torch.randn(1, n, 1, heads, head_dim, generator=g)
    k = k + strength * torch.randn(1, n, 1, heads, head_dim, generator=g)
    return [rearrange(x, "b n s h d -> b (n s) h d").to(device, dtype).contiguous() for x in (q, k, v)]


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


def run_case(name, grid, heads, head_dim, args, with_masked_dense):
    device, dtype = args.device, getattr(torch, args.dtype)
    t, h, w = grid
    params = NablaParams(args.P)
    q, k, v = structured_qkv(grid, heads, head_dim, args.strength, device, dtype)
    sta = sliding_tile_mask(t, h // 8, w // 8, params.wT, params.wH, params.wW, device)
    groups = tile_query_groups(t, h // 8, w // 8, device)

    block_mask = nabla_block_mask(q, k, sta, params.P)
    density = block_mask.float().mean().item()
    fns = {
        "mask": lambda: nabla_block_mask(q, k, sta, params.P),
        "sparse": lambda: block_sparse_attention_sdpa(q, k, v, block_mask, query_groups=groups),
        "dense": lambda: dense(q, k, v),
    }
    if with_masked_dense:
        fns["masked"] = lambda: dense_masked(q, k, v, block_mask)
    if device == "cuda":
        fns["flex"] = lambda: block_sparse_attention_flex(q, k, v, block_mask)
    times, results = interleaved(fns, args.repeats, device)
    others = [name for name in ("masked", "flex") if name in results]
    err = max((results[n].float() - results["sparse"].float()).abs().max().item() for n in others or ["sparse"])
    for executor in ("sparse", "flex"):
        if executor in times:  # per round, so the total is measured under one load
            times[executor + "_total"] = [a + b for a, b in zip(times["mask"], times[executor], strict=True)]
    times = {name: (statistics.median(t), min(t)) for name, t in times.items()}

    rows = [("dense SDPA (no mask)", times["dense"])]
    if with_masked_dense:
        rows.append(("dense SDPA + boolean token mask", times["masked"]))
    rows.append(("NABLA block mask (pool, softmax, top-cdf, OR sta)", times["mask"]))
    rows.append(("NABLA block-sparse SDPA executor (gathers included)", times["sparse"]))
    rows.append(("**NABLA total, SDPA executor (mask + executor)**", times["sparse_total"]))
    if device == "cuda":
        rows.append(("NABLA compiled flex_attention executor", times["flex"]))
        rows.append(("**NABLA total, flex executor (mask + executor)**", times["flex_total"]))

    s = t * h * w
    header = (
        f"### {name}: grid {t}x{h}x{w} tokens (S={s}), {heads} heads x {head_dim}, {args.dtype}, P={args.P}, "
        f"windows {params.wT}/{params.wH}/{params.wW}\n\n"
        f"block density {density:.1%} (sparsity {1 - density:.1%}); "
        f"max |SDPA executor - other exact paths| = {err:.2e}; {args.repeats} interleaved rounds\n\n"
        "| path | median (s) | min (s) | dense / path, median | dense / path, min |\n"
        "| --- | ---: | ---: | ---: | ---: |\n"
    )
    med_dense, min_dense = times["dense"]
    table = "".join(
        f"| {label} | {med:.3f} | {low:.3f} | {med_dense / med:.2f}x | {min_dense / low:.2f}x |\n"
        for label, (med, low) in rows
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
    parser.add_argument("--strength", type=float, default=1.8, help="block offset scale: higher = sparser mask")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = f"## NABLA attention, {stamp}\n\ndevice: {device_name}; torch {torch.__version__}\n\n"
    report += run_case("benchmark", tuple(args.grid), args.heads, args.head_dim, args, with_masked_dense=True)
    if args.device == "cuda":
        report += "\n" + run_case("Lite 10 s full size", (61, 32, 48), 28, 64, args, with_masked_dense=False)
    print(report)
    if not args.no_append:
        with RESULTS.open("a") as f:
            f.write("\n" + report)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
