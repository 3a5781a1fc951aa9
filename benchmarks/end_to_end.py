"""Time whole generations stage by stage (text encoding, VAE encode, sampling, decoding) with peak memory, and
optionally the same generation with MagCache; appends the table to benchmarks/RESULTS.md.

    python benchmarks/end_to_end.py --models-dir /path/to/ComfyUI/models --device cuda \\
        --variants t2v-lite-distilled16steps-5s,t2v-lite-sft-10s --magcache
    python benchmarks/end_to_end.py --tiny      # CPU: tiny random models in a temporary folder (checks the harness;
                                                # the times are not a speed figure for real models)

    python benchmarks/end_to_end.py --models-dir ... --device cuda --variants t2v-lite-sft-5s --budget-gb 12
                                                # fit a 12 GB card: block swap / tiled VAE chosen from the weights
    python benchmarks/end_to_end.py --tiny --budget-gb 0.0005   # the same planning on the tiny models (CPU)

Each run goes through `kandinsky_core.pipeline.run` (the CLI's path, stage-by-stage offloading). Stage times come
from the pipeline's own log lines, so each includes loading that stage's model. Memory is measured per stage: the
CUDA allocator peak (reset at each stage start) and the process's resident-set high-water mark (Linux; reset at each
stage start through /proc/self/clear_refs). With --magcache the sampler gets MagCache with the official ratios
(variants without official ratios are run without it and say so).

--budget-gb B plans the run to fit B GiB of accelerator memory from the files' parameter sizes (safetensors headers)
and an activation estimate (`plan_budget`): Qwen2.5-VL layer swap when the text encoders do not fit (their fp8 files
are dequantised at load, so fp8 does not help there), DiT block swap when the DiT does not, tiled VAE decoding when
an untiled decode would not. The estimated peak per stage is printed next to the measured one.
"""

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results import publish  # noqa: E402
from kandinsky_core import pipeline, variants  # noqa: E402
from kandinsky_core.download import ensure_files, model_paths  # noqa: E402
from kandinsky_core.magcache import OFFICIAL_MAG_RATIOS, MagCacheParams  # noqa: E402
from kandinsky_core.settings import uses_cfg  # noqa: E402

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


GiB = 2**30
# Activations of one DiT call, per visual token: the block's widest live tensors (qkv, attention output, the
# feed-forward's hidden layer, residual and modulated copies) in the compute dtype; attention itself is O(S) with
# flash / efficient SDPA. A working estimate: compare with the measured column and adjust.
DIT_ACTIVATION_WIDTHS = (8, 2)  # 8 x model_dim + 2 x ff_dim values per token
VAE_LIVE_ACTIVATIONS = 8  # full-resolution, first-level-width activations alive at once (as hunyuan_vae assumes)
BUDGET_USABLE = 0.9  # of --budget-gb planned for tensors: the rest is the CUDA context and allocator fragmentation


def _headers(path: Path) -> dict:
    """{name: (dtype, shape)} of a .safetensors file or of every .safetensors file under a folder."""
    from kandinsky_core.loading import read_safetensors_header

    files = sorted(Path(path).rglob("*.safetensors")) if Path(path).is_dir() else [Path(path)]
    out = {}
    for f in files:
        out.update(read_safetensors_header(f))
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _split(header: dict, prefix: str) -> tuple[int, list[int]]:
    """(values outside the numbered layers under `prefix`, values per layer), from a header."""
    layers: dict[int, int] = {}
    rest = 0
    for name, (_, shape) in header.items():
        key = name.split(prefix, 1)
        if len(key) == 2 and key[1].split(".", 1)[0].isdigit():
            i = int(key[1].split(".", 1)[0])
            layers[i] = layers.get(i, 0) + _numel(shape)
        else:
            rest += _numel(shape)
    return rest, [layers[i] for i in sorted(layers)]


def _swap_count(budget: float, rest: float, per_layer: list[float], extra: float) -> int | None:
    """None when everything fits; else how many layers can stay resident (two more are in flight while swapping)."""
    if rest + sum(per_layer) + extra <= budget:
        return None
    biggest = max(per_layer)
    return max(0, min(len(per_layer), int((budget - rest - extra - 2 * biggest) // biggest)))


def _resident(rest: float, per_layer: list[float], keep: int | None) -> float:
    if keep is None:
        return rest + sum(per_layer)
    return rest + sum(per_layer[:keep]) + sum(sorted(per_layer[keep:])[-2:])


def file_headers(models) -> dict[str, dict]:
    return {role: _headers(getattr(models, role)) for role in ("dit", "qwen", "clip", "vae")}


def meta_headers(variant) -> dict[str, dict]:
    """The headers the released files have, from the architectures built on the meta device (no weights needed)."""
    from transformers import CLIPTextConfig, CLIPTextModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from kandinsky_core.flux_vae import FluxVAE
    from kandinsky_core.hunyuan_vae import HunyuanVideoVAE
    from kandinsky_core.model import Kandinsky5DiT
    from kandinsky_core.text_encoders import CLIP_L_TEXT_CONFIG, QWEN25_VL_7B_CONFIG

    with torch.device("meta"):
        models = {
            "dit": Kandinsky5DiT(variant.arch),
            "qwen": Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_7B_CONFIG)),
            "clip": CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG)),
            "vae": FluxVAE() if variant.vae == "flux" else HunyuanVideoVAE(),
        }
    return {role: {k: ("meta", tuple(t.shape)) for k, t in m.state_dict().items()} for role, m in models.items()}


def plan_budget(request, headers: dict[str, dict], budget_gb: float | None, dtype: torch.dtype) -> dict:
    """Settings for pipeline.run that fit `budget_gb` GiB (None: no budget, keep everything resident) and the
    estimated peak accelerator memory per stage in GiB. `headers`: file_headers(models) or meta_headers(variant)."""
    v = request.variant
    item = torch.empty((), dtype=dtype).element_size()
    budget = float("inf") if budget_gb is None else budget_gb * GiB * BUDGET_USABLE

    # the text path only: the vision tower (I2I) and the LM head (prompt expansion) load on first need
    qwen = {k: s for k, s in headers["qwen"].items() if "visual." not in k and "lm_head" not in k}
    text_rest, text_layers = _split(qwen, "layers.")
    clip_bytes = sum(_numel(s) for _, s in headers["clip"].values()) * 4  # CLIP runs in float32
    hidden = next(shape[-1] for name, (_, shape) in qwen.items() if "embed_tokens" in name)
    text_act = v.text_max_length * hidden * 12 * item  # hidden states, MLP hidden (~5x), attention, norms
    text_keep = _swap_count(budget, text_rest * item + clip_bytes, [n * item for n in text_layers], text_act)
    text_peak = _resident(text_rest * item + clip_bytes, [n * item for n in text_layers], text_keep) + text_act

    dit_rest, dit_blocks = _split(headers["dit"], "visual_transformer_blocks.")
    a = v.arch
    _, t, h, w = request.latent_shape[1:]
    tokens = t * (h // a.patch_size[1]) * (w // a.patch_size[2])
    dit_act = tokens * (DIT_ACTIVATION_WIDTHS[0] * a.model_dim + DIT_ACTIVATION_WIDTHS[1] * a.ff_dim) * item
    dit_keep = _swap_count(budget, dit_rest * item, [n * item for n in dit_blocks], dit_act)
    dit_peak = _resident(dit_rest * item, [n * item for n in dit_blocks], dit_keep) + dit_act

    vae = headers["vae"]
    vae_bytes = sum(_numel(s) for _, s in vae.values()) * item
    # channels of the decoder's full-resolution level: the input width of its last convolution (128 for both VAEs)
    width = next(s[1] for k, (_, s) in vae.items() if "decoder.conv_out." in k and k.endswith("weight") and len(s) > 3)
    f, ph, pw = request.frames, request.height, request.width
    tiled = v.vae != "flux" and vae_bytes + f * ph * pw * width * item * VAE_LIVE_ACTIVATIONS > budget
    if tiled:  # one temporal clip of 16 + 1 frames x a 256 px tile at a time (hunyuan_vae.VAETiling defaults)
        f, ph, pw = min(f, 17), min(ph, 256), min(pw, 256)
    full = f * ph * pw * width * item * VAE_LIVE_ACTIVATIONS
    return dict(
        settings=dict(text_block_swap=text_keep, block_swap=dit_keep, vae_tiled=True if tiled else "auto"),
        estimate={"text": text_peak / GiB, "sampling": dit_peak / GiB, "vae decode": (vae_bytes + full) / GiB},
    )


class StageMemory:
    """Peak accelerator memory and host resident-set high-water mark per stage, stages marked by the log lines."""

    def __init__(self, device: torch.device):
        self.device, self.stage = device, None
        self.gpu: dict[str, float] = {}
        self.host: dict[str, float] = {}

    def mark(self, stage: str | None) -> None:
        if self.stage is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / GiB
                self.gpu[self.stage] = max(self.gpu.get(self.stage, 0.0), peak)
            hwm = (_rss_kib("VmHWM") or 0) / 2**20
            self.host[self.stage] = max(self.host.get(self.stage, 0.0), hwm)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _reset_host_peak()
        self.stage = stage


def run_once(variant: str, models, args, magcache: bool) -> dict:
    frames = args.frames if variants.get_variant(variant).is_video else None
    request = pipeline.resolve_request(
        variant, PROMPT, width=args.width, height=args.height, frames=frames, steps=args.steps, seed=0
    )
    params = None
    if magcache and request.variant.name in OFFICIAL_MAG_RATIOS:
        params = MagCacheParams.for_variant(request.variant)
    device = pipeline.pick_device(args.device)
    plan = plan_budget(request, file_headers(models), args.budget_gb, pipeline.default_dtype(device))
    settings = plan["settings"]
    if args.block_swap is not None:
        settings["block_swap"] = args.block_swap
    if args.text_block_swap is not None:
        settings["text_block_swap"] = args.text_block_swap
    marks: list[tuple[str, float]] = []
    memory = StageMemory(device)
    skipped = []
    compile_failures = CompileFailures()

    def log(msg: str) -> None:
        for prefix, stage in STAGES.items():
            if msg.startswith(prefix):
                marks.append((stage, time.perf_counter()))
                memory.mark(stage)
        if msg.startswith("MagCache:"):
            skipped.append(int(msg.split()[1]))

    start = time.perf_counter()
    with compile_failures:
        frames = pipeline.run(
            request, models, device=device, progress=False, log=log, magcache=params, compile=args.compile, **settings
        )
    memory.mark(None)
    end = time.perf_counter()
    stages = {}
    for (stage, t0), (_, t1) in zip(marks, [*marks[1:], ("end", end)], strict=True):
        stages[stage] = stages.get(stage, 0.0) + t1 - t0
    return dict(
        request=request,
        frames=frames,
        total=end - start,
        stages=stages,
        gpu=memory.gpu if device.type == "cuda" else {},
        host=memory.host,
        estimate=plan["estimate"],
        settings=settings,
        skipped=skipped[0] if skipped else None,
        calls=None if params is None else request.steps * (2 if uses_cfg(request.variant.guidance) else 1),
        compile="off" if not args.compile else ("failed, ran eager" if compile_failures.records else "on"),
    )


class CompileFailures(logging.Handler):
    """Collects kandinsky_core.compile's fallback warnings during a run (so the table says compile failed)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self):
        logging.getLogger("kandinsky_core.compile").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("kandinsky_core.compile").removeHandler(self)


def fmt(v, spec=".1f") -> str:
    return "n/a" if v is None else format(v, spec)


MEMORY_STAGES = ("text", "vae encode", "sampling", "vae decode")


def report_rows(name: str, plain: dict, cached: dict | None) -> tuple[list[str], list[str]]:
    """(time rows, memory rows) of the results table and the per-stage memory table."""
    rows, memory = [], []
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
        gpu_peak = max(r["gpu"].values()) if r["gpu"] else None
        host_peak = max(r["host"].values()) if r["host"] else None
        rows.append(
            f"| {name} | {rq.width}x{rq.height}x{rq.frames}, {rq.steps} steps | {label} {skip} | {r['total']:.1f} | "
            + " | ".join(fmt(s.get(k)) for k in MEMORY_STAGES)
            + f" | {fmt(gpu_peak, '.2f')} | {fmt(host_peak, '.2f')} | {diff} |"
        )
        st = r["settings"]
        setting = (
            f"DiT swap {st['block_swap'] if st['block_swap'] is not None else 'off'}, "
            f"Qwen swap {st['text_block_swap'] if st['text_block_swap'] is not None else 'off'}, "
            f"VAE tiled {st['vae_tiled']}, compile {r['compile']}"
        )
        for stage in MEMORY_STAGES:
            if stage not in s:
                continue
            memory.append(
                f"| {name} | MagCache {label} | {setting} | {stage} | {fmt(r['estimate'].get(stage), '.3f')} | "
                f"{fmt(r['gpu'].get(stage), '.3f')} | {fmt(r['host'].get(stage), '.3f')} |"
            )
    return rows, memory


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


def plan_only(args) -> None:
    names = (args.variants or "t2v-lite-sft-5s,t2v-pro-sft-5s-sd").split(",")
    rows = []
    for name in names:
        v = variants.get_variant(name.strip())
        frames = (args.frames or v.default_frames) if v.is_video else None
        request = pipeline.resolve_request(v, PROMPT, width=args.width, height=args.height, frames=frames)
        headers = meta_headers(v)
        for budget in (None, args.budget_gb):
            plan = plan_budget(request, headers, budget, torch.bfloat16)
            st, est = plan["settings"], plan["estimate"]
            rows.append(
                f"| {v.name} | {request.width}x{request.height}x{request.frames} | "
                f"{'none' if budget is None else f'{budget:g} GiB'} | {st['text_block_swap']} | {st['block_swap']} | "
                f"{st['vae_tiled']} | " + " | ".join(f"{est[k]:.2f}" for k in ("text", "sampling", "vae decode")) + " |"
            )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = (
        f"## Memory plan (estimates only, no run), {stamp}\n\n"
        f"bf16 weights from the released architectures' parameter sizes; activations estimated; the plan keeps "
        f"{BUDGET_USABLE:.0%} of the budget for tensors. Qwen swap / DiT swap: layers kept resident (None: all).\n\n"
        "| variant | size | budget | Qwen swap | DiT swap | VAE tiled | text (GiB) | sampling (GiB) "
        "| VAE decode (GiB) |\n| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |\n" + "\n".join(rows) + "\n"
    )
    publish(report, append=not args.no_append, quiet_append=True)


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
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (pipeline.run(compile="
                        "True)); the first step's time includes compiling")  # fmt: skip
    parser.add_argument("--budget-gb", type=float, help="plan block swap / tiled VAE to fit this many GiB")
    parser.add_argument("--plan-only", action="store_true", help="only the --budget-gb plan and estimates for the "
                        "released architectures (meta device: no weights, nothing run)")  # fmt: skip
    parser.add_argument("--block-swap", type=int, help="DiT visual blocks kept on the device (overrides the plan)")
    parser.add_argument("--text-block-swap", type=int, help="Qwen layers kept on the device (overrides the plan)")
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    if args.plan_only:
        return plan_only(args)
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
        rows, memory_rows = [], []
        for name in names:
            v = variants.get_variant(name.strip())
            models = model_paths(ensure_files(v, folder, allow_download=False), folder)
            plain = run_once(v.name, models, args, magcache=False)
            cached = run_once(v.name, models, args, magcache=True) if args.magcache else None
            time_rows, mem_rows = report_rows(v.name, plain, cached)
            rows, memory_rows = rows + time_rows, memory_rows + mem_rows

    device = pipeline.pick_device(args.device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"{device.type} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    kind = "tiny random models (harness check, not a speed figure)" if args.tiny else "real weights"
    budget = "" if args.budget_gb is None else f", budget {args.budget_gb:g} GiB"
    report = (
        f"## End to end, {kind}, {stamp}\n\n"
        f"device: {device_name}; torch {torch.__version__}\n\n"
        "| variant | size, steps | MagCache | total (s) | text (s) | VAE encode (s) | sampling (s) | VAE decode (s) "
        "| peak GPU (GiB) | peak host (GiB) | mean abs frame diff vs off |\n"
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(rows) + "\n\n"
        f"Memory per stage{budget}: estimated accelerator peak (weights on the device from the files' parameter "
        "sizes + activation estimate) next to the measured one (CUDA allocator peak; n/a on the CPU) and the host "
        "resident-set peak (whole process)\n\n"
        "| variant | MagCache | settings | stage | estimated peak (GiB) | measured accelerator peak (GiB) "
        "| host peak (GiB) |\n| --- | --- | --- | --- | ---: | ---: | ---: |\n" + "\n".join(memory_rows) + "\n"
    )
    publish(report, append=not args.no_append)


if __name__ == "__main__":
    main()
