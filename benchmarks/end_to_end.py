"""Time whole generations stage by stage (text encoding, VAE encode, sampling, decoding) with peak memory, and
optionally the same generation with MagCache; appends the table to benchmarks/RESULTS.md.

    python benchmarks/end_to_end.py --models-dir /path/to/ComfyUI/models --device cuda \\
        --variants t2v-lite-distilled16steps-5s,t2v-lite-sft-10s --magcache
    python benchmarks/end_to_end.py --tiny      # CPU: tiny random models in a temporary folder (checks the harness;
                                                # the times are not a speed figure for real models)

Each run goes through `kandinsky_core.pipeline.run` (the CLI's path, stage-by-stage offloading). Stage times come
from the pipeline's own log lines, so each includes loading that stage's model; peak accelerator memory is the
CUDA allocator peak of the run, peak host memory the process's resident-set high-water mark during it (Linux).
With --magcache the sampler gets `block_cache=MagCache(official ratios)` (variants without official ratios are run
without it and say so).
"""

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kandinsky_core import pipeline, sampling, variants  # noqa: E402
from kandinsky_core.download import ensure_files, model_paths  # noqa: E402
from kandinsky_core.magcache import OFFICIAL_MAG_RATIOS, MagCache, MagCacheParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PROMPT = "A red fox walks through deep snow in a birch forest at sunrise, cinematic"
STAGES = {"text encoders": "text", "VAE encode": "vae encode", "DiT": "sampling", "VAE decode": "vae decode"}


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_host_peak() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")


@contextlib.contextmanager
def magcache_in_sampler(cache: MagCache | None):
    """pipeline.run imports `sample` from kandinsky_core.sampling at call time: wrap it to add the block cache."""
    original = sampling.sample
    if cache is not None:
        sampling.sample = lambda *a, **k: original(*a, **k, block_cache=cache)
    try:
        yield
    finally:
        sampling.sample = original


def run_once(variant: str, models, args, magcache: bool) -> dict:
    frames = args.frames if variants.get_variant(variant).is_video else None
    request = pipeline.resolve_request(
        variant, PROMPT, width=args.width, height=args.height, frames=frames, steps=args.steps, seed=0
    )
    cache = None
    if magcache and request.variant.name in OFFICIAL_MAG_RATIOS:
        cache = MagCache(MagCacheParams.for_variant(request.variant))
    marks: list[tuple[str, float]] = []

    def log(msg: str) -> None:
        for prefix, stage in STAGES.items():
            if msg.startswith(prefix):
                marks.append((stage, time.perf_counter()))

    device = pipeline.pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _reset_host_peak()
    start = time.perf_counter()
    with magcache_in_sampler(cache):
        frames = pipeline.run(request, models, device=device, progress=False, log=log)
    if device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    stages = {}
    for (stage, t0), (_, t1) in zip(marks, [*marks[1:], ("end", end)], strict=True):
        stages[stage] = stages.get(stage, 0.0) + t1 - t0
    return dict(
        request=request,
        frames=frames,
        total=end - start,
        stages=stages,
        gpu_peak=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        host_peak=(_rss_kib("VmHWM") or 0) / 2**20 or None,
        skipped=None if cache is None else len(cache.skipped),
        calls=None if cache is None else request.steps * (2 if request.variant.uses_cfg else 1),
    )


def fmt(v, spec=".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def report_rows(name: str, plain: dict, cached: dict | None) -> list[str]:
    rows = []
    for label, r in (("off", plain), ("on", cached)):
        if r is None:
            continue
        s = r["stages"]
        skip = "" if r["skipped"] is None else f"{r['skipped']}/{r['calls']} skipped"
        if label == "on" and r["skipped"] is None:
            skip = "no official ratios: ran without"
        diff = ""
        if label == "on":
            diff = f"{(r['frames'].float() - plain['frames'].float()).abs().mean().item():.2f}"
        rq = r["request"]
        rows.append(
            f"| {name} | {rq.width}x{rq.height}x{rq.frames}, {rq.steps} steps | {label} {skip} | {r['total']:.1f} | "
            + " | ".join(fmt(s.get(k)) for k in ("text", "vae encode", "sampling", "vae decode"))
            + f" | {fmt(r['gpu_peak'], '.2f')} | {fmt(r['host_peak'], '.2f')} | {diff} |"
        )
    return rows


@contextlib.contextmanager
def tiny_models():
    """A ComfyUI-style models folder with tiny random weights (the layout tests/test_pipeline.py builds), and the
    variants table patched to the tiny DiT architectures for the duration."""
    sys.path.insert(0, str(REPO / "tests"))
    import tiny_flux_vae
    import tiny_text
    import tiny_vae
    from tiny import TINY_ARCHS, make_tiny_dit_file

    from kandinsky_core import download

    dim = 32
    tiny = {
        "t2v-lite-sft-5s": dataclasses.replace(TINY_ARCHS["lite"], in_text_dim=dim, in_text_dim2=dim),
        "t2i-lite": dataclasses.replace(TINY_ARCHS["image"], in_text_dim=dim, in_text_dim2=dim),
    }
    saved = dict(variants.VARIANTS)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = root / "models"
        t = tiny_text.make_tiny_text_encoders(root / "official", "folder", qwen_hidden=dim, clip_hidden=dim)
        (models / "text_encoders").mkdir(parents=True)
        t.qwen.rename(models / "text_encoders" / download.QWEN_DIR)
        t.clip.rename(models / "text_encoders" / download.CLIP_DIR)
        tiny_vae.write_diffusers_folder(models / "vae" / download.HUNYUAN_VAE_DIR / "vae", seed=0)
        tiny_flux_vae.write_tiny_flux_vae(models / "vae" / download.FLUX_VAE_DIR, "diffusers_folder", seed=0)
        for i, (name, arch) in enumerate(tiny.items()):
            make_tiny_dit_file(
                models / "diffusion_models" / variants.VARIANTS[name].hf_filename.split("/")[-1], arch, i
            )
            variants.VARIANTS[name] = dataclasses.replace(variants.VARIANTS[name], arch=arch)
        try:
            yield models, list(tiny)
        finally:
            variants.VARIANTS.clear()
            variants.VARIANTS.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, help="ComfyUI models folder with the variants' files")
    parser.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (harness check)")
    parser.add_argument("--variants", default=None, help="comma list (default: t2v-lite-distilled16steps-5s)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--magcache", action="store_true", help="also run each variant with MagCache")
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    if not args.tiny and args.models_dir is None:
        sys.exit("Give --models-dir (a ComfyUI models folder with the weights), or --tiny for the CPU harness check.")

    with contextlib.ExitStack() as stack:
        if args.tiny:
            folder, names = stack.enter_context(tiny_models())
            args.width, args.height = args.width or 96, args.height or 64
            args.frames, args.steps = args.frames or 5, args.steps or 4
        else:
            folder = args.models_dir
            names = (args.variants or "t2v-lite-distilled16steps-5s").split(",")
        if args.variants and args.tiny:
            names = args.variants.split(",")
        rows = []
        for name in names:
            v = variants.get_variant(name.strip())
            models = model_paths(ensure_files(v, folder, allow_download=False), folder)
            plain = run_once(v.name, models, args, magcache=False)
            cached = run_once(v.name, models, args, magcache=True) if args.magcache else None
            rows += report_rows(v.name, plain, cached)

    device = pipeline.pick_device(args.device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"{device.type} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    kind = "tiny random models (harness check, not a speed figure)" if args.tiny else "real weights"
    report = (
        f"## End to end, {kind}, {stamp}\n\n"
        f"device: {device_name}; torch {torch.__version__}\n\n"
        "| variant | size, steps | MagCache | total (s) | text (s) | VAE encode (s) | sampling (s) | VAE decode (s) "
        "| peak GPU (GiB) | peak host (GiB) | mean abs frame diff vs off |\n"
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(rows) + "\n"
    )
    print(report)
    if not args.no_append:
        with RESULTS.open("a") as f:
            f.write("\n" + report)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
