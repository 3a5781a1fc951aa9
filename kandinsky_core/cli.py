"""`python -m kandinsky_core variants | download | generate | queue`.

Heavy modules (torch models, huggingface_hub, PyAV) are imported inside the commands, so `variants` and argument
errors answer at once. Expected failures (KandinskyError) print one paragraph to stderr and exit with status 2.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import InputError, KandinskyError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # what shells report for Ctrl-C


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kandinsky_core", description="Kandinsky 5.0 video and image generation."
    )
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("variants", help="list the released variants and their settings")

    d = sub.add_parser("download", help="fetch a variant's files into ComfyUI's model folders")
    d.add_argument("--variant", required=True)
    d.add_argument("--models-dir", type=Path, help="models folder (default: $COMFYUI_MODELS_DIR, ComfyUI's, ./models)")
    d.add_argument(
        "--folders",
        action="store_true",
        help="fetch the Hugging Face folders (Qwen2.5-VL-7B-Instruct/, clip-vit-large-patch14/, the VAE's vae/) "
        "instead of ComfyUI's single files, which the bundled workflows use",
    )

    g = sub.add_parser("generate", help="generate a video (.mp4) or image (.png)")
    g.add_argument("--variant", required=True, help="see `variants`")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative", default=None, help="negative prompt (default: the official one)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=int, help="video length in seconds (24 fps)")
    length.add_argument("--frames", type=int, help="number of frames, 4k+1 (e.g. 121 = 5 s)")
    size_help = (
        "(with the other). Default: the variant's; I2V: the start image's aspect at the variant's area, whole image "
        "kept; I2I: the nearest trained aspect, cover-cropped (as the official pipelines)"
    )
    g.add_argument("--width", type=int, help=f"output width in px {size_help}")
    g.add_argument("--height", type=int, help="output height in px (see --width)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance", type=float)
    g.add_argument("--scheduler-scale", type=float)
    g.add_argument("--image", type=Path, help="start frame (i2v) or image to edit (i2i)")
    g.add_argument(
        "--expand-prompt",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let Qwen2.5-VL rewrite the prompt first, as the official pipelines do by default (it sees the start "
        "image for I2V, a quarter-size edit image for I2I); --no-expand-prompt encodes the prompt as written",
    )
    g.add_argument("--no-nabla", action="store_true", help="dense attention even for NABLA variants")
    g.add_argument("--models-dir", type=Path, help="models folder (default: $COMFYUI_MODELS_DIR, ComfyUI's, ./models)")
    g.add_argument("--dit", type=Path, help="DiT .safetensors (overrides the models folder)")
    g.add_argument("--text-encoder", type=Path, help="Qwen2.5-VL folder or file (overrides the models folder)")
    g.add_argument("--clip", type=Path, help="CLIP-L folder or file (overrides the models folder)")
    g.add_argument("--vae", type=Path, help="VAE folder or file (overrides the models folder)")
    g.add_argument("--tokenizer-dir", type=Path, help="tokenizers for ComfyUI single-file text encoders (ComfyUI root)")
    g.add_argument("--no-download", action="store_true", help="never download; fail if files are missing")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    g.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="compute dtype (default: bf16 on CUDA, else fp32)")
    g.add_argument("--no-offload", action="store_true", help="keep the VAE on the accelerator between stages")
    g.add_argument("--fp8", action="store_true", help="store the DiT's block weights in float8 (less memory)")
    g.add_argument("--attention", default=None, help="attention backend (default: the best available)")
    g.add_argument("--output", type=Path, help="output .mp4 (video) or .png (image); default kandinsky5.mp4/.png")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    m = g.add_argument_group("speed and memory")
    m.add_argument("--magcache", action="store_true", help="MagCache: skip the visual blocks at predictable steps")
    m.add_argument("--magcache-threshold", type=float, help="MagCache error threshold (default 0.12)")
    m.add_argument("--magcache-k", type=int, help="MagCache: most steps skipped in a row (default 2)")
    m.add_argument("--magcache-retention", type=float, help="MagCache: first fraction of steps never skipped (0.2)")
    m.add_argument("--magcache-ratios", type=Path, help="ratios JSON from --calibrate-magcache (variants without "
                   "official ratios: distilled, pretrain, image)")  # fmt: skip
    m.add_argument("--calibrate-magcache", type=Path, metavar="FILE.json", help="measure this model's MagCache "
                   "ratios during a full run and write them to FILE.json")  # fmt: skip
    m.add_argument("--block-swap", type=int, metavar="N", help="keep N visual blocks on the accelerator and swap the "
                   "rest in from host memory one at a time (small GPUs; 0 = all swapped)")  # fmt: skip
    m.add_argument("--text-block-swap", type=int, metavar="N", help="the same for Qwen2.5-VL's 28 decoder layers "
                   "(~13 GB in bf16; e.g. 12 on a 12 GB card)")  # fmt: skip
    m.add_argument("--compile", action="store_true", help="torch.compile the DiT's blocks (compiled during the first "
                   "step; runs uncompiled if the compiler fails)")  # fmt: skip
    q = sub.add_parser("queue", help="run a ComfyUI workflow (UI or API .json) on a ComfyUI server, headless")
    q.add_argument("workflow", type=Path, help="workflow .json (e.g. workflows/api/t2v-lite-sft-5s.json)")
    q.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address (default %(default)s)")
    q.add_argument("--prompt", help="prompt of the Kandinsky 5 Text Encode node")
    q.add_argument("--negative", help="negative prompt of the Kandinsky 5 Text Encode node")
    q.add_argument("--seed", type=int, help="seed of the Kandinsky 5 Sampler")
    q.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="set an input; NODE is a node id, title or type (e.g. K5Sampler.steps=20)")  # fmt: skip
    q.add_argument("--output-dir", type=Path, default=Path("."), help="where the outputs are downloaded")
    q.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run (default %(default)g)")
    return p


def cmd_queue(args: argparse.Namespace) -> int:
    # the ComfyUI client lives beside the engine (comfy_client/), which knows nothing of ComfyUI
    try:
        from comfy_client.queue import run_workflow
    except ModuleNotFoundError as e:
        if e.name not in ("comfy_client", "websocket"):
            raise
        raise InputError(
            f"queue needs {'the websocket-client package' if e.name == 'websocket' else 'the comfy_client folder'}, "
            "which is missing. Run it from the pack's folder after `pip install -r requirements.txt`."
        ) from None

    try:
        run_workflow(args.workflow, args.server, args.prompt, args.negative, args.seed, args.sets, args.output_dir,
                     args.timeout)  # fmt: skip
    except KeyboardInterrupt:
        print("\nstopped waiting; a queued prompt keeps running on the server (Cancel it in ComfyUI).", file=sys.stderr)
        return 130
    return 0


def cmd_variants(args: argparse.Namespace) -> int:
    from .variants import VARIANTS

    rows = []
    for v in VARIANTS.values():
        sizes = " ".join(f"{w}x{h}" for w, h in v.resolutions)
        nabla = f"NABLA P={v.nabla.P:g}" if v.nabla else "dense"
        length = f"{v.max_frames} frames" if v.is_video else "image"
        rows.append(
            f"{v.name:<26} {v.task:<4} {v.steps:>3} steps  cfg {v.guidance:<4g} sched {v.scheduler_scale:<4g} "
            f"{nabla:<12} {length:<11} {sizes}\n{'':<27}{v.title}: {v.hf_repo} {v.hf_filename}"
        )
    print("\n".join(rows))
    return 0


def _models_dir(arg: Path | None) -> Path:
    from .download import default_models_dir

    return arg if arg is not None else default_models_dir()


def cmd_download(args: argparse.Namespace) -> int:
    from .download import ensure_files, plan_downloads
    from .variants import get_variant

    variant = get_variant(args.variant)
    models_dir = _models_dir(args.models_dir)
    for p in plan_downloads(variant, models_dir, folders=args.folders):
        if p.present:
            print(f"{p.role:<5} present: {p.path}")
        elif p.dest.is_file():
            print(f"{p.role:<5} broken:  {p.dest} is truncated (an interrupted download); fetching it again")
        else:
            print(f"{p.role:<5} missing: {p.describe()}")
    plan = ensure_files(variant, models_dir, folders=args.folders, log=print)
    print(f"All files for {variant.name} are in {models_dir}:")
    for p in plan:
        print(f"  {p.role:<5} {p.path}")
    return 0


def _resolve_models(args: argparse.Namespace, variant):
    """Explicit paths win; the rest come from the models folder, downloaded when missing (unless offline)."""
    from .download import ModelPaths, ensure_files, plan_downloads
    from .download import tokenizer_dir as tokenizers_of

    explicit = {"dit": args.dit, "qwen": args.text_encoder, "clip": args.clip, "vae": args.vae}
    for role, path in explicit.items():
        if path is not None and not path.exists():
            flag = {"dit": "--dit", "qwen": "--text-encoder", "clip": "--clip", "vae": "--vae"}[role]
            raise InputError(f"{flag} {path} does not exist. Pass an existing file or folder, or drop {flag}.")
    paths = {role: path for role, path in explicit.items() if path is not None}
    tokenizer_dir = args.tokenizer_dir
    if len(paths) < len(explicit):
        models_dir = _models_dir(args.models_dir)
        full = plan_downloads(variant, models_dir)
        plan = [p for p in full if p.role.removesuffix("_tokenizer") not in paths]
        if any(not p.present for p in plan):
            full = ensure_files(variant, models_dir, allow_download=not args.no_download, log=print)
            plan = [p for p in full if p.role.removesuffix("_tokenizer") not in paths]
        tokenizer_dir = tokenizer_dir or tokenizers_of(full, models_dir)
        paths.update({p.role: p.path for p in plan})
    return ModelPaths(paths["dit"], paths["qwen"], paths["clip"], paths["vae"], tokenizer_dir=tokenizer_dir)


def _magcache(args: argparse.Namespace, variant):
    """MagCacheParams, a MagCalibration (--calibrate-magcache) or None, checked before anything is loaded."""
    from .magcache import (
        DEFAULT_K,
        DEFAULT_RETENTION,
        DEFAULT_THRESHOLD,
        OFFICIAL_MAG_RATIOS,
        MagCacheParams,
        MagCalibration,
        read_mag_ratios,
    )

    tuning = {"--magcache-threshold": args.magcache_threshold, "--magcache-k": args.magcache_k,
              "--magcache-retention": args.magcache_retention, "--magcache-ratios": args.magcache_ratios}  # fmt: skip
    given = [flag for flag, value in tuning.items() if value is not None]
    if args.calibrate_magcache is not None:
        if args.magcache or given:
            raise InputError(
                "--calibrate-magcache measures ratios in a full run (no block is skipped): drop --magcache and "
                f"{', '.join(given) or 'its settings'}, or drop --calibrate-magcache."
            )
        return MagCalibration()
    if not args.magcache:
        if given:
            raise InputError(f"{', '.join(given)} given without --magcache. Add --magcache to use MagCache.")
        return None
    if args.magcache_ratios is not None:
        path = args.magcache_ratios
        if not path.is_file():
            raise InputError(
                f"--magcache-ratios {path} does not exist. Write it with a calibration run: generate --variant "
                f"{variant.name} ... --calibrate-magcache {path}."
            )
        ratios = read_mag_ratios(path.read_text(), f"--magcache-ratios {path}")
    elif variant.name in OFFICIAL_MAG_RATIOS:
        ratios = OFFICIAL_MAG_RATIOS[variant.name]
    else:
        raise InputError(
            f"--magcache: {variant.name} has no official MagCache ratios (official ratios exist for "
            f"{', '.join(OFFICIAL_MAG_RATIOS)}). Measure them once with a full run: generate --variant {variant.name} "
            "... --calibrate-magcache ratios.json, then add --magcache --magcache-ratios ratios.json."
        )
    return MagCacheParams(
        ratios,
        threshold=DEFAULT_THRESHOLD if args.magcache_threshold is None else args.magcache_threshold,
        K=DEFAULT_K if args.magcache_k is None else args.magcache_k,
        retention=DEFAULT_RETENTION if args.magcache_retention is None else args.magcache_retention,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from .media import check_output_path, ensure_writable_folder
    from .variants import get_variant, seconds_to_frames

    variant = get_variant(args.variant)
    frames = args.frames
    if args.seconds is not None:
        if not variant.is_video:
            raise InputError(f"--seconds is for video variants; {variant.name} makes an image. Remove --seconds.")
        if args.seconds < 1 or args.seconds not in variant.durations:
            allowed = ", ".join(str(s) for s in variant.durations)
            raise InputError(f"--seconds {args.seconds} is not offered by {variant.name}: use one of {allowed}.")
        frames = seconds_to_frames(args.seconds)

    from .pipeline import resolve_request

    request = resolve_request(
        variant,
        args.prompt,
        negative=args.negative,
        width=args.width,
        height=args.height,
        frames=frames,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        scheduler_scale=args.scheduler_scale,
        image=args.image,
        expand_prompt=args.expand_prompt,
        nabla=False if args.no_nabla else None,
    )
    from .pipeline import pick_device

    pick_device(args.device)  # an absent device is refused before anything loads
    magcache = _magcache(args, variant)
    if args.block_swap is not None:
        from .settings import block_swap_problem

        problem = block_swap_problem(variant, "--block-swap", args.block_swap)
        if problem:
            raise InputError(problem)
    if args.text_block_swap is not None and args.text_block_swap < 0:
        raise InputError(
            f"--text-block-swap {args.text_block_swap} is not allowed: give how many Qwen2.5-VL decoder layers stay "
            "on the accelerator (0 .. 28; 0 swaps them all)."
        )
    calibration_file = args.calibrate_magcache
    if calibration_file is not None and calibration_file.exists() and not args.overwrite:
        raise InputError(f"--calibrate-magcache {calibration_file} exists. Pick another file, or add --overwrite.")
    output = args.output or Path("kandinsky5.mp4" if variant.is_video else "kandinsky5.png")
    output = check_output_path(output, video=variant.is_video, overwrite=args.overwrite)
    if calibration_file is not None:
        ensure_writable_folder(calibration_file.parent, "--calibrate-magcache folder", "Choose another file.")
    models = _resolve_models(args, variant)

    import torch

    from .pipeline import run

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[args.dtype]
    start = time.perf_counter()
    frames_out = run(
        request,
        models,
        device=args.device,
        dtype=dtype,
        offload=not args.no_offload,
        progress=not args.quiet,
        attention_backend=args.attention,
        fp8=args.fp8,
        log=(lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr)),
        magcache=magcache,
        block_swap=args.block_swap,
        text_block_swap=args.text_block_swap,
        compile=args.compile,
    )
    _write_or_rescue(frames_out, output, args.overwrite)
    if calibration_file is not None:
        from .magcache import mag_ratios_json

        calibration_file.parent.mkdir(parents=True, exist_ok=True)
        calibration_file.write_text(mag_ratios_json(magcache, request))
        print(f"wrote MagCache ratios to {calibration_file} (use: --magcache --magcache-ratios {calibration_file})")
    f, h, w = frames_out.shape[:3]
    print(f"wrote {output} ({w}x{h}, {f} frame{'s' if f > 1 else ''}) in {time.perf_counter() - start:.1f} s")
    return 0


def _write_or_rescue(frames, output: Path, overwrite: bool) -> None:
    """Write the finished result; when that fails (disk full, folder gone, file appeared), keep it elsewhere and
    say where: a run of minutes or hours is never thrown away at the last step."""
    from .errors import OutputError
    from .media import rescue_output, write_output

    try:
        write_output(frames, output, overwrite=overwrite)
    except (OSError, InputError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        kept = rescue_output(frames, output)
        if kept is None:
            raise OutputError(
                f"The result could not be written to {str(output)!r} ({reason}), nor to the temporary or home "
                "folder. Free some disk space and run again."
            ) from e
        raise OutputError(
            f"The result could not be written to {str(output)!r} ({reason}). It was kept in {kept} instead: move it "
            "where you want it."
        ) from e


COMMANDS = {"variants": cmd_variants, "download": cmd_download, "generate": cmd_generate, "queue": cmd_queue}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KandinskyError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"\nstopped (Ctrl-C): {args.command} was interrupted; nothing was written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `... variants | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
