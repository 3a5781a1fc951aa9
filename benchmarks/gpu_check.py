"""One-command GPU check: environment, attention backends, NABLA, DiT forward against the official code, NABLA vs
dense in the DiT, Lite 5 s in 12 GiB, block swap, fp8 storage, torch.compile. Writes JSON and appends one table to
benchmarks/RESULTS.md.

    python benchmarks/gpu_check.py --device cuda --official /path/to/kandinsky-5 --json out/gpu_check.json
    python benchmarks/gpu_check.py --small --device cpu          # every section at toy sizes, under 3 minutes

Full size (CUDA, bf16, at most ~10 minutes on one H200): attention backends against SDPA; NABLA at the Lite 10 s
shape (61x32x48 tokens, 28 heads of 64); the Lite DiT (all 32 blocks, random weights) at the Lite 5 s shape
(768x512, 121 frames) against the official DiffusionTransformer3D, both eager and both compiled; the Lite DiT at the
10 s shape with NABLA against dense attention; Lite 5 s under a 12 GiB cap (DiT step + VAE decode); block swap; fp8
storage; compile time. --small runs the same code on the tests' tiny Lite-like architecture and small grids. The
official section needs a kandinsky-5 checkout (--official or $KANDINSKY5_OFFICIAL); without one it reports
"skipped: no official checkout".

Every section runs even when an earlier one failed; a failed section records its error (status "failed: ...") and
the exit status is 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results import RESULTS, publish  # noqa: E402
from kandinsky_core import nabla as nb  # noqa: E402
from kandinsky_core.compile import compile_dit, compile_state  # noqa: E402
from kandinsky_core.model import Kandinsky5DiT  # noqa: E402
from kandinsky_core.nabla import NablaParams  # noqa: E402
from kandinsky_core.variants import get_variant  # noqa: E402
from tests.tiny import TINY_ARCHS  # noqa: E402
from tests.tiny import random_state_dict as _random_state_dict  # noqa: E402


def _tiny_vae_config():
    """The tests' tiny HunyuanVideo VAE shape (tests/tiny_vae.py), for --small."""
    from kandinsky_core.hunyuan_vae import HunyuanVAEConfig

    return HunyuanVAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)


TARGETS = {
    "nabla_vs_dense": "NABLA >= 5x dense at 90% block sparsity, Lite 10 s shape",
    "dit_vs_official": "our DiT forward <= 0.8x the official, Lite 5 s, compiled vs compiled",
    "lite_5s_12gb": "Lite 5 s fitting 12 GB",
}


@functools.lru_cache(maxsize=2)
def random_state_dict(arch, seed: int = 0) -> dict:
    """The official-key random weights (tests/tiny.py), made once per architecture: the full Lite DiT's take tens of
    seconds of CPU time to draw."""
    return _random_state_dict(arch, seed=seed)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls after one warm-up call, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def once(fn, device: str) -> tuple[float, float | None, object]:
    """Seconds and peak MiB (CUDA allocator, beyond what was allocated before) of one call, and its result."""
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    start = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else None
    return seconds, peak, out


def peak_mib(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ----------------------------------------------------------------------------- sections


def section_environment(args) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": args.device}
    for name in ("triton", "flash_attn", "flash_attn_interface", "sageattention"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "installed (no __version__)")
        except Exception as e:
            env[name] = f"not usable ({type(e).__name__})"
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
        env["cuda"] = torch.version.cuda
    from kandinsky_core.attention import available_backends

    env["attention_backends"] = available_backends()
    return env


def section_nabla(args) -> dict:
    """NABLA attention alone: the executor auto picks, flex vs gather vs dense with the token mask, times, peaks."""
    device, dtype = args.device, args.dtype
    grid, heads = ((4, 32, 32), 2) if args.small else ((61, 32, 48), 28)
    t, h, w = grid
    s = t * h * w
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, s, heads, 64, generator=g).to(device, dtype) for _ in range(3))
    blocks = s // 64
    offset = torch.randn(1, blocks, heads, 64, generator=g).repeat_interleave(64, 1).to(device, dtype)
    q, k = q + 2.5 * offset, k + 2.5 * offset  # peaked block map, as a trained model's
    params = NablaParams(0.9)
    sta = nb.sliding_tile_mask(t, h // 8, w // 8, params.wT, params.wH, params.wW, device)
    mask = nb.nabla_block_mask(q, k, sta, params.P)
    out = {"grid": list(grid), "heads": heads, "tokens": s, "block_density": float(mask.float().mean())}

    nb._logged.discard("NABLA executor: compiled flex_attention")
    auto_out = nb.nabla_attention(q, k, v, grid, params)
    out["auto_executor"] = executor_name(q.is_cuda)
    repeats = args.repeats
    out["dense_s"], dense = timed(lambda: nb._dense(q, k, v, None, False), device, repeats)
    out["gather_s"], gather = timed(
        lambda: nb.block_sparse_attention_sdpa(q, k, v, mask, query_groups=nb.tile_query_groups(t, h // 8, w // 8,
                                               q.device)), device, repeats)  # fmt: skip
    out["mask_s"], _ = timed(lambda: nb.nabla_block_mask(q, k, sta, params.P), device, repeats)
    out["auto_total_s"], _ = timed(lambda: nb.nabla_attention(q, k, v, grid, params), device, repeats)
    out["gather_vs_auto_max_diff"] = max_diff(auto_out, gather)
    # dense attention with the token mask: all of it at --small; at full size (an S x S mask would be 8.8 GB)
    # head 0 and the first 64 query blocks against every key
    rows = s if args.small else 64 * 64
    heads_checked = slice(None) if args.small else slice(0, 1)
    token_mask = mask[:, heads_checked, : rows // 64].repeat_interleave(64, -1).repeat_interleave(64, -2)
    masked = torch.nn.functional.scaled_dot_product_attention(
        q[:, :rows, heads_checked].transpose(1, 2), k[:, :, heads_checked].transpose(1, 2),
        v[:, :, heads_checked].transpose(1, 2), attn_mask=token_mask,
    ).transpose(1, 2)  # fmt: skip
    out["gather_vs_masked_dense_max_diff"] = max_diff(gather[:, :rows, heads_checked], masked)
    del token_mask, masked
    if q.is_cuda or args.cpu_flex:
        try:
            out["flex_s"], flex = timed(lambda: nb.block_sparse_attention_flex(q, k, v, mask), device, repeats)
            out["flex_vs_gather_max_diff"] = max_diff(flex, gather)
            out["dense_over_flex"] = out["dense_s"] / out["flex_s"]
            out["flex_peak_mib"] = peak_mib(lambda: nb.block_sparse_attention_flex(q, k, v, mask), device)
        except Exception as e:
            out["flex"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    else:
        out["flex"] = "skipped on CPU (compiling it takes 15-35 s on 2 cores; --cpu-flex runs it)"
    out["dense_peak_mib"] = peak_mib(lambda: nb._dense(q, k, v, None, False), device)
    out["auto_peak_mib"] = peak_mib(lambda: nb.nabla_attention(q, k, v, grid, params), device)
    out["dense_over_auto"] = out["dense_s"] / out["auto_total_s"]
    del dense
    return out


def section_attention(args) -> dict:
    """Every installed dense backend against SDPA at the Lite 5 s self-attention shape (bf16 on CUDA): relative
    error and time. SageAttention (8-bit) is checked against its documented accuracy (cosine similarity > 0.99)."""
    from kandinsky_core import attention as attn

    device, dtype = args.device, args.dtype
    s, heads = (1024, 2) if args.small else (31 * 32 * 48, 28)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, s, heads, 64, generator=g).to(device, dtype) for _ in range(3))
    out = {"tokens": s, "installed": attn.available_backends()}
    out["sdpa_s"], ref = timed(lambda: attn.attention(q, k, v, backend="sdpa"), device, args.repeats)
    for name in attn.available_backends():
        if name == "sdpa":
            continue
        if device != "cuda":
            out[name] = "needs CUDA"
            continue
        try:
            out[f"{name}_s"], o = timed(lambda name=name: attn.attention(q, k, v, backend=name), device, args.repeats)
            out[f"{name}_rel_err"] = rel_err(o, ref)
            cos = torch.nn.functional.cosine_similarity(o.float().flatten(), ref.float().flatten(), dim=0)
            out[f"{name}_cosine"] = float(cos)
            if name in attn._failed:
                out[name] = f"fell back: {attn._failed[name]}"
        except Exception as e:
            out[name] = f"failed: {type(e).__name__}: {e}"[:300]
    return out


def executor_name(cuda: bool) -> str:
    """What nabla_attention(executor="auto") runs here."""
    if cuda:
        return f"dense (flex failed: {nb.flex_failure})" if nb.flex_failure else "compiled flex_attention"
    return "sdpa gather path"


def make_dit(arch, device: str, dtype: torch.dtype, seed: int = 0) -> Kandinsky5DiT:
    sd = {k: v.to(dtype) for k, v in random_state_dict(arch, seed=seed).items()}
    sd = {k: v * 0.1 if "modulation" in k and k.endswith("weight") else v for k, v in sd.items()}
    dit = Kandinsky5DiT(arch, dtype=dtype, device=device)
    dit.load_state_dict(sd)
    return dit.eval().requires_grad_(False)


def dit_inputs(arch, grid, text_len: int, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    t, h, w = grid
    return dict(
        x=torch.randn(1, arch.in_channels, t, h, w, generator=g).to(device, dtype),
        text_embeds=torch.randn(1, text_len, arch.in_text_dim, generator=g).to(device, dtype),
        pooled_text_embeds=torch.randn(1, arch.in_text_dim2, generator=g).to(device, dtype),
        timestep=torch.tensor([700.0], device=device),
    )


def lite(args, variant: str = "t2v-lite-sft-5s"):
    arch = TINY_ARCHS["lite"] if args.small else get_variant(variant).arch
    return arch, get_variant(variant).rope_scale


def section_official(args) -> dict:
    root = args.official or os.environ.get("KANDINSKY5_OFFICIAL")
    if not root or not (Path(root) / "kandinsky" / "models" / "dit.py").is_file():
        return {"status": "skipped: no official checkout (--official PATH or $KANDINSKY5_OFFICIAL)"}
    from einops import rearrange

    from benchmarks import dit_forward

    off = dit_forward.import_official(Path(root), keep_compile=True)
    device, dtype = args.device, args.dtype
    # float32 (CPU): the official helpers' bf16 casts removed, as benchmarks/dit_forward.py does
    (off.use_cast_free if dtype == torch.float32 else off.use_shipped)()
    arch, rope_scale = lite(args)
    grid = (3, 16, 16) if args.small else (31, 64, 96)
    text_len = 16 if args.small else 128
    ours = make_dit(arch, device, dtype)
    engine = "auto" if device == "cuda" else "sdpa"
    official = off.dit.DiffusionTransformer3D(**dit_forward.official_kwargs(arch), attention_engine=engine)
    sd = {k: v.to(dtype) for k, v in random_state_dict(arch, seed=0).items()}
    official.load_state_dict({k: v * 0.1 if "modulation" in k and k.endswith("weight") else v for k, v in sd.items()})
    official = official.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if hasattr(official, "visual_rope_embeddings"):  # the official pipeline keeps its RoPE buffers in float32
        official.visual_rope_embeddings.float()
        official.text_rope_embeddings.float()
    inp = dit_inputs(arch, grid, text_len, device, dtype)
    t, h, w = grid
    x_off = rearrange(inp["x"][0], "c t h w -> t h w c").contiguous()
    visual_pos = [torch.arange(n, device=device) for n in (t, h // 2, w // 2)]
    text_pos = torch.arange(text_len, device=device)

    def run_official():
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            o = official(x_off, inp["text_embeds"], inp["pooled_text_embeds"], inp["timestep"], visual_pos, text_pos,
                         scale_factor=rope_scale)  # fmt: skip
        return rearrange(o, "t h w c -> 1 c t h w")

    def run_ours():
        with torch.no_grad():
            return ours(**inp, rope_scale=rope_scale)

    out = {"grid": list(grid), "blocks": f"{arch.num_text_blocks} + {arch.num_visual_blocks}"}
    with torch.compiler.set_stance("force_eager"):
        out["eager_official_s"], a = timed(run_official, device, args.repeats)
        out["eager_ours_s"], b = timed(run_ours, device, args.repeats)
    out["eager_rel_err"] = rel_err(b, a)
    if args.device == "cuda" or not args.small:
        compile_dit(ours)
        out["compiled_official_s"], a = timed(run_official, device, args.repeats)
        out["compiled_ours_s"], b = timed(run_ours, device, args.repeats)
        state = compile_state(ours)
        out["ours_compiled"] = "failed: " + state.error if state.failed else "yes"
        out["compiled_rel_err"] = rel_err(b, a)
        out["ours_over_official_compiled"] = out["compiled_ours_s"] / out["compiled_official_s"]
    out["ours_over_official_eager"] = out["eager_ours_s"] / out["eager_official_s"]
    return out


def section_nabla_dit(args) -> dict:
    """The Lite DiT at the 10 s shape with NABLA against dense attention."""
    device, dtype = args.device, args.dtype
    arch, rope_scale = lite(args, "t2v-lite-sft-10s")
    if not args.small:
        arch = dataclasses.replace(arch, num_visual_blocks=args.nabla_blocks)
    grid = (3, 64, 64) if args.small else (61, 64, 96)
    dit = make_dit(arch, device, dtype)
    inp = dit_inputs(arch, grid, 16 if args.small else 128, device, dtype)
    params = NablaParams(0.9)

    def run(nabla):
        with torch.no_grad():
            return dit(**inp, rope_scale=rope_scale, nabla=nabla)

    out = {"grid": list(grid), "visual_blocks": arch.num_visual_blocks}
    repeats = max(1, args.repeats // 2)
    out["dense_s"], dense = timed(lambda: run(None), device, repeats)
    out["nabla_s"], sparse = timed(lambda: run(params), device, repeats)
    out["dense_over_nabla"] = out["dense_s"] / out["nabla_s"]
    out["nabla_vs_dense_rel_err"] = rel_err(sparse, dense)
    out["executor"] = executor_name(device == "cuda")
    return out


def lite_forward(args) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """A random Lite DiT on the check's device and a call of it at the check's shape (the 5 s one unless --small)."""
    arch, rope_scale = lite(args)
    grid = (3, 16, 16) if args.small else (31, 64, 96)
    inp = dit_inputs(arch, grid, 16 if args.small else 128, args.device, args.dtype)
    dit = make_dit(arch, args.device, args.dtype)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return dit(**inp, rope_scale=rope_scale)

    return dit, run


def section_block_swap(args) -> dict:
    from kandinsky_core.offload import enable_block_swap

    device = args.device
    dit, run = lite_forward(args)
    out = {}
    out["resident_s"], ref = timed(run, device, max(1, args.repeats // 2))
    out["resident_peak_mib"] = peak_mib(run, device)
    dit.to("cpu")
    swap = enable_block_swap(dit, device, blocks_on_device=1)
    out["swapped_s"], swapped = timed(run, device, max(1, args.repeats // 2))
    out["swapped_peak_mib"] = peak_mib(run, device)
    out["exact"] = bool(torch.equal(ref, swapped))
    out["block_loads"] = swap.loads
    swap.remove()
    return out


def section_fp8(args) -> dict:
    from safetensors.torch import save_file

    from kandinsky_core.loading import load_dit

    device, dtype = args.device, args.dtype
    arch, rope_scale = lite(args)
    variant = dataclasses.replace(get_variant("t2v-lite-sft-5s"), arch=arch)
    grid = (3, 16, 16) if args.small else (31, 64, 96)
    inp = dit_inputs(arch, grid, 16 if args.small else 128, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dit.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in random_state_dict(arch, seed=0).items()}, str(path))
        full, _ = load_dit(path, variant, dtype=dtype, device=device)
        fp8, _ = load_dit(path, variant, dtype=dtype, device=device, fp8=True)

    def run(dit):
        with torch.no_grad():
            return dit(**inp, rope_scale=rope_scale)

    out = {}
    out["full_s"], a = timed(lambda: run(full), device, max(1, args.repeats // 2))
    out["fp8_s"], b = timed(lambda: run(fp8), device, max(1, args.repeats // 2))
    out["fp8_rel_err"] = rel_err(b, a)
    out["fp8_weight_gib"] = sum(p.numel() * p.element_size() for p in fp8.parameters()) / 2**30
    out["full_weight_gib"] = sum(p.numel() * p.element_size() for p in full.parameters()) / 2**30
    return out


def _one_sampling_step(args, arch, rope_scale, shape, out: dict) -> torch.Tensor:
    """One Euler step with CFG of a random-weight DiT; times and peak into `out`; the DiT is freed on return."""
    from kandinsky_core.sampling import TextConditioning, sample

    device, dtype = args.device, args.dtype
    dit = make_dit(arch, device, dtype)
    g = torch.Generator().manual_seed(4)
    text_len = 16 if args.small else 256

    def cond() -> TextConditioning:
        return TextConditioning(torch.randn(1, text_len, arch.in_text_dim, generator=g).to(device, dtype),
                                torch.ones(1, text_len, dtype=torch.bool, device=device),
                                torch.randn(1, arch.in_text_dim2, generator=g).to(device, dtype))  # fmt: skip

    noise = torch.randn(shape, generator=g).to(device)
    positive, negative = cond(), cond()

    def run() -> torch.Tensor:
        return sample(dit, noise, positive, negative, steps=1, guidance=5.0, scheduler_scale=5.0, rope_scale=rope_scale)

    out["dit_weights_gib"] = sum(p.numel() * p.element_size() for p in dit.parameters()) / 2**30
    out["first_step_s"], _, _ = once(run, device)  # warm-up (kernels, RoPE tables)
    out["step_s"], out["step_peak_mib"], latent = once(run, device)  # peak beyond the weights
    if device == "cuda":
        out["step_total_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30  # weights included
    return latent


def section_lite_12gb(args) -> dict:
    """Lite 5 s (768x512, 121 frames) within 12 GiB: one sampling step with CFG, then VAE Decode with the plan that
    tiling auto picks for what is left, under torch.cuda.set_per_process_memory_fraction(12 GiB). The text encoders
    (13.6 GiB in bf16) are not part of it: on a 12 GB card their Qwen layers are swapped (nodes/comfy_glue.py).
    --small on the CPU runs the same code on tiny models without a cap."""
    from kandinsky_core.hunyuan_vae import HunyuanVideoVAE
    from kandinsky_core.memory import ALLOCATOR_MARGIN

    device, dtype = args.device, args.dtype
    arch, rope_scale = lite(args)
    shape = (1, 16, 3, 16, 16) if args.small else (1, 16, 31, 64, 96)
    cap = 12 * 2**30
    out = {"cap_gib": None if device != "cuda" else 12}
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    try:
        latent = _one_sampling_step(args, arch, rope_scale, shape, out)
        if device == "cuda":
            torch.cuda.empty_cache()
        config = _tiny_vae_config() if args.small else None
        vae = (HunyuanVideoVAE(config) if config else HunyuanVideoVAE()).to(device, dtype).eval().requires_grad_(False)
        weights = sum(p.numel() * p.element_size() for p in vae.parameters())
        used = torch.cuda.memory_allocated() if device == "cuda" else 0
        budget = int((cap - weights - used - 2**30) / ALLOCATOR_MARGIN) if device == "cuda" else vae.memory_budget()
        z = latent[:, :16].to(dtype)
        del latent

        def decode() -> torch.Tensor:
            return vae.decode(z, tiled="auto", budget_bytes=budget)

        with torch.no_grad():  # one decode: 121 frames take a while even on a GPU
            out["decode_s"], out["decode_peak_mib"], pixels = once(decode, device)
        out["decode_frames"] = int(pixels.shape[2])
        if device == "cuda":
            out["decode_total_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["fits_12gb"] = max(out["step_total_peak_gib"], out["decode_total_peak_gib"]) <= 12
    finally:
        if device == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
    return out


def section_compile(args) -> dict:
    device = args.device
    dit, run = lite_forward(args)
    out = {}
    out["eager_s"], eager = timed(run, device, max(1, args.repeats // 2))
    # CPU --small: Inductor's C++ codegen takes minutes on 2 cores; aot_eager checks the tracing only
    backend = "aot_eager" if device == "cpu" and args.small else "inductor"
    compile_dit(dit, backend=backend)  # the Compile node's default mode (max-autotune would take minutes)
    start = time.perf_counter()
    run()
    sync(device)
    out["first_call_s"] = time.perf_counter() - start
    out["compiled_s"], compiled = timed(run, device, max(1, args.repeats // 2))
    state = compile_state(dit)
    out["backend"] = backend
    out["compiled"] = "failed: " + state.error if state.failed else "yes"
    out["speedup"] = out["eager_s"] / out["compiled_s"]
    out["compiled_vs_eager_rel_err"] = rel_err(compiled, eager)
    return out


SECTIONS = {
    "environment": section_environment,
    "attention_backends": section_attention,
    "nabla_attention": section_nabla,
    "dit_vs_official": section_official,
    "nabla_in_dit": section_nabla_dit,
    "lite_5s_12gb": section_lite_12gb,
    "block_swap": section_block_swap,
    "fp8": section_fp8,
    "compile": section_compile,
}


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(report: dict) -> str:
    head = (
        f"## gpu_check.py {'--small ' if report['small'] else ''}--device {report['device']}, {report['dtype']}, "
        f"{report['date']}\n\n| section | status | figures |\n| --- | --- | --- |\n"
    )
    rows = []
    for name, result in report["sections"].items():
        status = result.get("status", "ok")
        figures = "; ".join(f"{k} {fmt(v)}" for k, v in result.items() if k not in ("status", "traceback"))
        rows.append(f"| {name} | {status} | {figures} |")
    return head + "\n".join(rows) + "\n\nTargets: " + "; ".join(TARGETS.values()) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--small", action="store_true", help="toy sizes (the tests' tiny DiT, small grids)")
    parser.add_argument("--official", default=None, help="root of a kandinsky-5 checkout (or $KANDINSKY5_OFFICIAL)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per path (default 3, --small 2)")
    parser.add_argument("--nabla-blocks", type=int, default=8, help="visual blocks of the 10 s NABLA-vs-dense DiT")
    parser.add_argument("--cpu-flex", action="store_true", help="also compile flex_attention on the CPU")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma list of sections to run")
    parser.add_argument("--json", type=Path, default=None, help="write the report here as JSON")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the table is appended to")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (2 if args.small else 3)
    args.dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": args.device,
        "dtype": str(args.dtype).removeprefix("torch."),
        "small": args.small,
        "sections": {},
    }
    failed = False
    for name in args.sections.split(","):
        start = time.perf_counter()
        try:
            result = SECTIONS[name](args)
        except Exception as e:
            failed = True
            result = {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300],
                      "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
        result.setdefault("status", "ok")
        result["seconds"] = round(time.perf_counter() - start, 1)
        report["sections"][name] = result
        print(f"{name}: {result['status']} ({result['seconds']} s)", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
    publish(table(report), append=not args.no_append, path=args.results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
