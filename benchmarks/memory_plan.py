"""What the pack asks the memory manager for, measured on meta tensors (kandinsky_core/memory.py), at released sizes.

    python benchmarks/memory_plan.py              # about a minute on a CPU; appends the tables to RESULTS.md

- Sampler: one step's activation peak (sampling.step_peak_bytes, what the Sampler node asks ComfyUI for before the
  allocator margin) next to the formula it replaced (tokens x width x 40 copies, doubled for CFG).
- VAE Decode: the plan `tiling=auto` picks (hunyuan_vae.plan_decode) for the memory left for activations, its
  measured peak and its recomputed work (1.0 = untiled).
- NABLA: the block mask's transient (nabla_block_mask) at the 10 s shapes.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results import publish  # noqa: E402
from kandinsky_core.hunyuan_vae import HUNYUAN_VAE_CONFIG, plan_decode  # noqa: E402
from kandinsky_core.memory import measure_peak  # noqa: E402
from kandinsky_core.nabla import nabla_block_mask, sliding_tile_mask  # noqa: E402
from kandinsky_core.sampling import step_peak_bytes  # noqa: E402
from kandinsky_core.variants import get_variant  # noqa: E402

GIB = 2**30
# (variant, width, height, frames)
SAMPLER_CASES = [
    ("t2v-lite-sft-5s", 768, 512, 121),
    ("t2v-lite-sft-10s", 768, 512, 241),
    ("t2v-pro-sft-5s-sd", 768, 512, 121),
    ("t2v-pro-sft-5s-hd", 1280, 768, 121),
]
VAE_CASES = [(768, 512, 121), (768, 512, 241), (1280, 768, 121)]
VAE_BUDGETS = (20, 14, 10, 6, 3)


def sampler_table() -> str:
    rows = []
    for name, width, height, frames in SAMPLER_CASES:
        v = get_variant(name)
        shape = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
        nabla = v.nabla
        tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
        for cfg in (False, True):
            peak = step_peak_bytes(v.arch, torch.bfloat16, shape, 256, cfg, nabla)
            old = tokens * v.arch.model_dim * 2 * 40 * (2 if cfg else 1)
            flags = f"{'on' if nabla else 'off'} | {'yes' if cfg else 'no'}"
            rows.append(f"| {name} | {width}x{height}x{frames} | {flags} | {peak / GIB:.2f} | {old / GIB:.2f} | "
                        f"{old / peak:.1f}x |")  # fmt: skip
    return (
        "| variant | size | NABLA | CFG | measured step peak (GiB) | old formula (GiB) | old / measured |\n"
        "| --- | --- | --- | --- | ---: | ---: | ---: |\n" + "\n".join(rows) + "\n"
    )


def vae_table() -> str:
    rows = []
    for width, height, frames in VAE_CASES:
        shape = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
        for gib in VAE_BUDGETS:
            plan = plan_decode(HUNYUAN_VAE_CONFIG, torch.bfloat16, shape, gib * GIB)
            t = plan.tiling
            tiles = f"{t.tile_px} px / {t.overlap_px}, {t.tile_frames} frames / {t.overlap_frames}" if plan.tiled \
                else "untiled"  # fmt: skip
            rows.append(
                f"| {width}x{height}x{frames} | {gib} | {tiles} | {plan.peak_bytes / GIB:.2f} | {plan.work:.2f} |"
            )
    return (
        "| video | GiB for activations | plan (tile / overlap) | measured peak (GiB) | work (1 = untiled) |\n"
        "| --- | ---: | --- | ---: | ---: |\n" + "\n".join(rows) + "\n"
    )


def nabla_table() -> str:
    rows = []
    for name, (t, h, w) in {"t2v-lite-sft-10s": (61, 32, 48), "t2v-pro-sft-10s-hd": (61, 48, 80)}.items():
        v = get_variant(name)
        heads, p = v.arch.num_heads, v.nabla
        q = torch.empty(1, t * h * w, heads, v.arch.head_dim, device="meta", dtype=torch.bfloat16)
        sta = sliding_tile_mask(t, h // 8, w // 8, p.wT, p.wH, p.wW, "meta")
        peak = measure_peak(lambda q=q, sta=sta, p=p: nabla_block_mask(q, q, sta, p.P))
        rows.append(f"| {name} | {t}x{h}x{w} | {heads} | {peak / GIB:.2f} |")
    return "| variant | token grid | heads | block mask transient (GiB) |\n| --- | --- | ---: | ---: |\n" + \
        "\n".join(rows) + "\n"  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = (
        f"## memory_plan.py: memory requests measured on meta tensors (bf16), {date}\n\n"
        "### Sampler: one step's activations (batch 1, 256 text tokens)\n\n" + sampler_table() + "\n"
        "### VAE Decode, tiling auto (HunyuanVideo VAE)\n\n" + vae_table() + "\n"
        "### NABLA block mask (the variant's P and windows)\n\n" + nabla_table()
    )
    publish(report, append=not args.no_append)


if __name__ == "__main__":
    main()
