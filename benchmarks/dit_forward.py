"""Time our DiT forward against the official DiffusionTransformer3D, same random weights and inputs, in one run.

    python benchmarks/dit_forward.py --official /path/to/kandinsky-5                  # CPU, reduced Lite, fp32 + bf16
    python benchmarks/dit_forward.py --official /path/to/kandinsky-5 --device cuda --full   # Lite 5 s, 768x512, bf16
    python benchmarks/dit_forward.py --official /path/to/kandinsky-5 --device cuda --full --variant t2v-pro-sft-5s-sd
    python benchmarks/dit_forward.py --official /path/to/kandinsky-5 --tiny       # the tests' tiny DiT (CPU)
    python benchmarks/dit_forward.py --official /path/to/kandinsky-5 --variants all   # Lite, Pro and Image, one table

The official package is imported from `--official` (a local checkout; none of its code lives here), patched
around, never inside its math:
- `torch.compile` becomes the identity unless `--compile` (then the official keeps its decorators and ours gets
  `kandinsky_core.compile.compile_dit`, its blocks compiled, falling back to eager if that fails);
- `kandinsky/__init__.py` (pipelines, VAE, text encoders) is skipped by importing the package as a bare namespace,
  and `torchvision` is stubbed when absent (only image resizing uses it);
- in float32 its three hard casts to bfloat16 (apply_scale_shift_norm, apply_gate_sum, apply_rotary) are swapped
  for cast-free twins with the same math, as tests/reference/make_fixtures.py does; in bfloat16 it runs as
  shipped, under `torch.autocast(<device>, bfloat16)` like the official pipelines call it.
Both models get the same weights (official key names, from tests/tiny.py's random_state_dict) and the same inputs;
one table has a row per variant and dtype: median and min of interleaved rounds, the time ratio, the peak memory
of one forward, and the difference between the two outputs. Appends to benchmarks/RESULTS.md unless --no-append.

--variants takes family names (lite = t2v-lite-sft-5s, pro = t2v-pro-sft-5s-sd, image = t2i-lite), variant names,
or all. Reduced CPU sizes: each architecture's real width with 2 text + 2 visual blocks (Pro: 1 + 1, its blocks
are 4x Lite's) on a 3x16x16 latent (images: 1x16x16); --full: the variant's own size, all blocks.
"""

import argparse
import ctypes
import dataclasses
import datetime
import platform
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

import torch
from einops import rearrange

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results import publish  # noqa: E402
from kandinsky_core.compile import compile_dit, compile_state  # noqa: E402
from kandinsky_core.model import Kandinsky5DiT  # noqa: E402
from kandinsky_core.variants import get_variant  # noqa: E402
from tests.tiny import TINY_ARCHS, random_state_dict  # noqa: E402

FAMILIES = {"lite": "t2v-lite-sft-5s", "pro": "t2v-pro-sft-5s-sd", "image": "t2i-lite"}
CPU_BLOCKS = {"lite": (2, 2), "pro": (1, 1), "image": (2, 2)}  # (text, visual) blocks at reduced CPU size


# ----------------------------------------------------------------------------- the official code, patched around


def _identity_compile(fn=None, *args, **kwargs):
    return fn if callable(fn) else (lambda f: f)


def import_official(root: Path, keep_compile: bool) -> types.SimpleNamespace:
    if not (root / "kandinsky" / "models" / "dit.py").is_file():
        sys.exit(f"--official {root}: no kandinsky/models/dit.py there; give the root of a kandinsky-5 checkout.")
    if not keep_compile:
        torch.compile = _identity_compile
    # Its @torch.autocast(device_type="cuda") decorators warn once each on a CPU-only torch (and stay inert).
    warnings.filterwarnings("ignore", message="CUDA is not available")
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        tv, tv_t, tv_f = (types.ModuleType(n) for n in ("torchvision", "torchvision.transforms", "tv_f"))
        tv.transforms, tv_t.functional = tv_t, tv_f
        sys.modules.update(
            {"torchvision": tv, "torchvision.transforms": tv_t, "torchvision.transforms.functional": tv_f}
        )
    pkg = types.ModuleType("kandinsky")
    pkg.__path__ = [str(root / "kandinsky")]
    sys.modules["kandinsky"] = pkg
    import kandinsky.models.dit as dit
    import kandinsky.models.nn as nn_mod

    shipped = {name: getattr(nn_mod, name) for name in ("apply_scale_shift_norm", "apply_gate_sum", "apply_rotary")}

    def apply_scale_shift_norm(norm, x, scale, shift):
        return norm(x) * (scale + 1.0) + shift

    def apply_gate_sum(x, out, gate):
        return x + gate * out

    def apply_rotary(x, rope):
        x_ = x.reshape(*x.shape[:-1], -1, 1, 2)
        return (rope.to(x.dtype) * x_).sum(dim=-1).reshape(*x.shape)

    cast_free = dict(
        apply_scale_shift_norm=apply_scale_shift_norm, apply_gate_sum=apply_gate_sum, apply_rotary=apply_rotary
    )

    def use(fns: dict) -> None:
        for name, fn in fns.items():
            setattr(nn_mod, name, fn)
            if hasattr(dit, name):
                setattr(dit, name, fn)

    return types.SimpleNamespace(dit=dit, use_shipped=lambda: use(shipped), use_cast_free=lambda: use(cast_free))


def official_kwargs(arch) -> dict:
    return dict(
        in_visual_dim=arch.in_visual_dim, out_visual_dim=arch.out_visual_dim, in_text_dim=arch.in_text_dim,
        in_text_dim2=arch.in_text_dim2, time_dim=arch.time_dim, patch_size=tuple(arch.patch_size),
        model_dim=arch.model_dim, ff_dim=arch.ff_dim, num_text_blocks=arch.num_text_blocks,
        num_visual_blocks=arch.num_visual_blocks, axes_dims=tuple(arch.axes_dims), visual_cond=arch.visual_cond,
        instruct_type="channel" if arch.instruct else None,
    )  # fmt: skip


# ----------------------------------------------------------------------------- measuring


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, device: str) -> tuple[dict, dict]:
    """One warm-up call each, then `repeats` rounds of all paths in turn (load on a shared machine hits all alike)."""
    results = {name: fn() for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            results[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times, results


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(field)


def peak_memory_mib(fn, device: str) -> float | None:
    """Peak memory one call adds: allocator peak on CUDA; on Linux CPUs the resident-set high-water mark (reset
    through /proc/self/clear_refs, after handing freed heap back with malloc_trim). None where not measurable."""
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        base = _rss_kib("VmRSS")
        fn()
        return (_rss_kib("VmHWM") - base) / 1024
    except OSError:
        return None


# ----------------------------------------------------------------------------- one dtype


def run_dtype(args, off, arch, rope_scale, dtype: torch.dtype, grid: tuple[int, int, int]) -> dict:
    device = args.device
    t, h, w = grid
    (off.use_cast_free if dtype == torch.float32 else off.use_shipped)()
    sd = {k: v.to(dtype) for k, v in random_state_dict(arch, seed=0).items()}
    # Modulation weights of 1/sqrt(fan_in) would make every block's gates O(1); a tenth keeps deep stacks finite.
    sd = {k: v * 0.1 if "modulation" in k and k.endswith("weight") else v for k, v in sd.items()}

    ours = Kandinsky5DiT(arch, dtype=dtype, device=device)
    ours.load_state_dict(sd)
    ours.eval().requires_grad_(False)
    official = off.dit.DiffusionTransformer3D(**official_kwargs(arch), attention_engine=args.official_attention)
    official.load_state_dict(sd, strict=True)  # the same tensors under the official key names
    official = official.to(device=device, dtype=dtype).eval().requires_grad_(False)
    del sd

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, arch.in_channels, t, h, w, generator=g).to(device, dtype)
    text = torch.randn(1, args.text_len, arch.in_text_dim, generator=g).to(device, dtype)
    pooled = torch.randn(1, arch.in_text_dim2, generator=g).to(device, dtype)
    timestep = torch.tensor([700.0], device=device)  # float32, as the official generate passes t * 1000
    x_off = rearrange(x[0], "c t h w -> t h w c").contiguous()
    visual_pos = [torch.arange(n, device=device) for n in (t, h // 2, w // 2)]
    text_pos = torch.arange(args.text_len, device=device)

    ours_fn = compile_dit(ours) if args.compile else ours  # falls back to eager (and logs) if compiling fails

    def run_ours():
        with torch.no_grad():
            return ours_fn(x, text, pooled, timestep, rope_scale=rope_scale)

    def run_official():
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = official(x_off, text, pooled, timestep, visual_pos, text_pos, scale_factor=rope_scale)
        return rearrange(out, "t h w c -> 1 c t h w")

    fns = {"official": run_official, "ours": run_ours}
    times, results = interleaved(fns, args.repeats, device)
    memory = {name: peak_memory_mib(fn, device) for name, fn in fns.items()}
    a, b = results["ours"].float(), results["official"].float()
    diff = float((a - b).abs().max())
    rel = float((a - b).norm() / b.norm())
    rms = float(b.pow(2).mean().sqrt())

    state = compile_state(ours)
    compiled = "off" if state is None else ("failed, eager" if state.failed else "on")
    stats = {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}
    return dict(
        dtype=str(dtype).removeprefix("torch."), blocks=f"{arch.num_text_blocks} + {arch.num_visual_blocks}",
        width=arch.model_dim, grid=f"{t}x{h // 2}x{w // 2} (S={t * (h // 2) * (w // 2)})", stats=stats,
        memory=memory, diff=diff, rel=rel, rms=rms, compiled=compiled,
    )  # fmt: skip


TABLE_HEAD = (
    "| variant | dtype | text + visual blocks | width | token grid | official median (s) | official min (s) | "
    "ours median (s) | ours min (s) | ours / official, median | ours / official, min | peak MiB official | "
    "peak MiB ours | max abs diff (rel L2) | ours compiled |\n"
    "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |\n"
)


def table_row(variant: str, r: dict) -> str:
    (off_med, off_min), (our_med, our_min) = r["stats"]["official"], r["stats"]["ours"]

    def mib(impl):
        return "n/a" if r["memory"][impl] is None else f"{r['memory'][impl]:.0f}"

    return (
        f"| {variant} | {r['dtype']} | {r['blocks']} | {r['width']} | {r['grid']} | {off_med:.4f} | {off_min:.4f} | "
        f"{our_med:.4f} | {our_min:.4f} | {our_med / off_med:.2f}x | {our_min / off_min:.2f}x | {mib('official')} | "
        f"{mib('ours')} | {r['diff']:.2e} ({r['rel']:.1e}) | {r['compiled']} |\n"
    )


def variant_names(spec: str) -> list[str]:
    names = list(FAMILIES) if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    return [FAMILIES.get(n, n) for n in names]


def family(variant) -> str:
    return "image" if not variant.is_video else ("pro" if variant.arch.model_dim >= 4096 else "lite")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="root of a kandinsky-5 checkout")
    parser.add_argument("--variant", default="t2v-lite-sft-5s", help="architecture and RoPE scale from this variant")
    parser.add_argument("--variants", default=None, help="comma list of lite, pro, image or variant names, or all; "
                        "one table with a row per variant and dtype (overrides --variant)")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny Lite-like architecture instead")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--full", action="store_true", help="the variant's own size and frames, all blocks")
    parser.add_argument("--dtypes", default=None, help="comma list; default float32,bfloat16 on CPU, bfloat16 --full")
    parser.add_argument("--grid", type=int, nargs=3, default=None, metavar=("T", "H", "W"), help="latent size")
    parser.add_argument("--text-blocks", type=int, default=None, help="default: the variant's")
    parser.add_argument("--visual-blocks", type=int, default=None, help="default: 2 on CPU (Pro 1), all with --full")
    parser.add_argument("--text-len", type=int, default=None, help="default 32 (CPU), 128 (--full)")
    parser.add_argument("--repeats", type=int, default=None, help="default 7 (CPU), 10 (--full)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both (the official's own decorators)")
    parser.add_argument("--official-attention", default=None, help="official engine; default sdpa on CPU, else auto")
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch here; run on CPU or on a GPU machine.")
    full = args.full
    args.text_len = args.text_len or (128 if full else 32)
    args.repeats = args.repeats or (10 if full else 7)
    args.official_attention = args.official_attention or ("auto" if args.device == "cuda" else "sdpa")
    dtypes = args.dtypes or ("bfloat16" if full else "float32,bfloat16")
    variants = [get_variant(n) for n in variant_names(args.variants or args.variant)]
    off = import_official(args.official.resolve(), keep_compile=args.compile)

    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    what = "tiny test architecture" if args.tiny else ", ".join(v.name for v in variants)
    size = "full size" if full else "reduced"
    report = (
        f"## DiT forward, ours vs official ({what}; {size}), {stamp}\n\n"
        f"device: {device_name}; torch {torch.__version__}; compile: {'on' if args.compile else 'off'}; "
        f"official attention engine: {args.official_attention}; dense attention; text {args.text_len} tokens; "
        f"{args.repeats} interleaved rounds; peak MiB: one more forward each "
        f"({'CUDA allocator peak' if args.device == 'cuda' else 'resident-set high-water growth'}); "
        "diff: largest |ours - official| over the output, relative L2 in brackets\n\n" + TABLE_HEAD
    )
    for variant in variants:
        width, height = variant.default_size
        latent_t = (variant.default_frames - 1) // 4 + 1  # 121 frames -> 31 latent frames; images: 1
        grid = tuple(args.grid or ((latent_t, height // 8, width // 8) if full else (min(latent_t, 3), 16, 16)))
        base = TINY_ARCHS["lite"] if args.tiny else variant.arch
        text_blocks, visual_blocks = CPU_BLOCKS[family(variant)]
        arch = dataclasses.replace(
            base,
            num_text_blocks=args.text_blocks or (base.num_text_blocks if full or args.tiny else text_blocks),
            num_visual_blocks=args.visual_blocks or (base.num_visual_blocks if full or args.tiny else visual_blocks),
        )
        for name in dtypes.split(","):
            row = run_dtype(args, off, arch, variant.rope_scale, getattr(torch, name.strip()), grid)
            report += table_row("tiny" if args.tiny else variant.name, row)
            print(report.splitlines()[-1], flush=True)
    publish(report, append=not args.no_append)


if __name__ == "__main__":
    main()
