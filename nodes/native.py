"""Our model patches on ComfyUI's own Kandinsky 5 model (`comfy.model_base.Kandinsky5` / `Kandinsky5Image`, what
core's Load Diffusion Model gives since v0.4; ComfyUI v0.3.64 has none, so nothing here runs there).

NABLA: a DIFFUSION_MODEL wrapper reads the model's Kandinsky 5 options (`model_options.options_in`) on every call,
resolves them against the variant the tensors say (auto), and, when NABLA applies, runs the forward with an
`optimized_attention_override` that sends the visual self-attention of every visual block through
`kandinsky_core.nabla.nabla_attention_raster` (the native model keeps its tokens in raster order; the tiling and
the masks are kandinsky_core's). Every other attention (text blocks, cross-attention) goes to ComfyUI's own
attention, or to an override another node set before.

Which attention call is the visual self-attention: inside the visual blocks ComfyUI sets `block_type` "double"
and `block_index`; the self-attention is the first call of a block, its queries and keys both have the visual
token count (cross-attention's keys have the text length). The wrapper hands the forward a copy of
transformer_options without a stale `block_type`, so the text blocks, which run first, never match.
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace
from typing import Any

from kandinsky_core.errors import InputError
from kandinsky_core.loading import nabla_variant
from kandinsky_core.nabla import mask_density, nabla_attention_raster
from kandinsky_core.settings import NABLA_TILE_PX, NABLA_WHY, raise_problems, side_problems

from .model_options import options_in

log = logging.getLogger("kandinsky5")

_NO_VARIANT = SimpleNamespace(nabla=None)
NATIVE_CLASSES = ("Kandinsky5", "Kandinsky5Image")
NABLA_KEY = "kandinsky5_nabla"
CACHE_KEY = "kandinsky5_block_cache"


def is_native(model: Any) -> bool:
    """Whether a MODEL link carries ComfyUI's own Kandinsky 5 model."""
    inner = getattr(model, "model", None)
    return inner is not None and type(inner).__name__ in NATIVE_CLASSES and type(inner).__module__ == "comfy.model_base"


class _VisualSelfAttention:
    """The attention override of one forward: NABLA for the visual self-attention, the rest passed on."""

    def __init__(self, grid: tuple[int, int, int], params: Any, previous: Any, stats: dict) -> None:
        self.grid, self.params, self.previous, self.stats = grid, params, previous, stats
        self.tokens = math.prod(grid)
        self.seen: set[Any] = set()

    def __call__(self, func: Any, q: Any, k: Any, v: Any, heads: int, *args: Any, **kwargs: Any) -> Any:
        options = kwargs.get("transformer_options") or {}
        block = options.get("block_index")
        split = kwargs.get("skip_reshape", False)  # Kandinsky 5 passes [B, H, S, D]
        visual = (
            split and options.get("block_type") == "double" and block not in self.seen
            and q.shape[2] == k.shape[2] == self.tokens
        )  # fmt: skip
        if not visual:
            if self.previous is not None:
                return self.previous(func, q, k, v, heads, *args, **kwargs)
            return func(q, k, v, heads, *args, **kwargs)
        self.seen.add(block)
        out, mask = nabla_attention_raster(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.grid, self.params, return_mask=True
        )
        if mask is not None:
            kept, total = mask_density(mask)
            self.stats["kept"] = self.stats.get("kept", 0) + kept
            self.stats["total"] = self.stats.get("total", 0) + total
            if "masks" in self.stats:
                self.stats["masks"].append(mask)
        self.stats["calls"] = self.stats.get("calls", 0) + 1
        if kwargs.get("skip_output_reshape", False):
            return out.transpose(1, 2)
        return out.reshape(out.shape[0], out.shape[1], -1)


class NativeNabla:
    """DIFFUSION_MODEL wrapper of ComfyUI's Kandinsky 5 model. `stats` (optional) collects the visited (query
    block, key block) pairs of every forward (`kept` / `total` / `calls`), and the masks when it has a `masks`
    list."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], stats: dict | None = None, params: Any = None) -> None:
        self.shapes = shapes
        self.stats = stats
        self.fixed = params  # NablaParams chosen by the caller (the Kandinsky 5 Sampler), instead of the options
        self._auto: dict[tuple[int, int], Any] = {}

    def variant(self, width: int, height: int) -> Any:
        if (width, height) not in self._auto:
            variant, said = nabla_variant(self.shapes, width, height)
            log.info("Kandinsky 5 NABLA on ComfyUI's model: %s", said)
            self._auto[(width, height)] = variant
        return self._auto[(width, height)]

    def __call__(self, executor: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        transformer_options = kwargs.get("transformer_options") or {}
        setting = options_in(transformer_options).nabla
        t = x.shape[2] if x.ndim == 5 else 1
        grid = (t, -(-x.shape[-2] // 2), -(-x.shape[-1] // 2))
        width, height = grid[2] * 16, grid[1] * 16
        params = None
        if self.fixed is not None:
            params = self.fixed
        elif setting.mode == "on" and all((setting.P, setting.wT, setting.wH, setting.wW)):
            params = setting.params(_NO_VARIANT)  # every number given: no variant needed
        elif setting.mode != "off":
            params = setting.params(self.variant(width, height))
        if params is None:
            return executor(x, *args, **kwargs)
        why = f"{NABLA_WHY}; resize the latent, or set NABLA off with the Kandinsky 5 NABLA node"
        raise_problems(side_problems(width, height, NABLA_TILE_PX, why))
        stats = self.stats if self.stats is not None else {}
        options = {k: v for k, v in transformer_options.items() if k not in ("block_type", "block_index")}
        override = _VisualSelfAttention(grid, params, transformer_options.get("optimized_attention_override"), stats)
        options["optimized_attention_override"] = override
        kept0, total0 = stats.get("kept", 0), stats.get("total", 0)
        out = executor(x, *args, **{**kwargs, "transformer_options": options})
        kept, total = stats.get("kept", 0) - kept0, stats.get("total", 0) - total0
        if total:
            log.info(
                "Kandinsky 5 NABLA: %d visual self-attentions sparse, %d of %d key blocks visited (%.1f%%)",
                len(override.seen), kept, total, 100.0 * kept / total,
            )  # fmt: skip
        return out


class NativeBlockCache:
    """DIFFUSION_MODEL wrapper of ComfyUI's Kandinsky 5 model for a block-cache option (MagCache / MagCache
    Calibrate: `make(variant)` gives the run's cache, `done(...)` ends it): the step is the position of the call's
    sigma in KSampler's `sample_sigmas`, the CFG branch is `cond_or_uncond` (a batch holding both is run one branch
    after the other, as the official sampler and ours do), and the visual blocks run through the cache's
    hook(step, branch) from a replacement of the first visual block (the others pass their input on). A run starts
    when the option, the sigmas change or a step comes again; `done` is called after the last step's calls."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.run: dict[str, Any] = {}

    def _begin(self, setting: Any, sigmas: Any, step: int, branches: list[int]) -> Any:
        run = self.run
        fresh = (
            run.get("setting") is not setting or run.get("sigmas") is None or not _same(run["sigmas"], sigmas)
            or step < run["step"] or (step == run["step"] and any(b in run["seen"] for b in branches))
        )  # fmt: skip
        if fresh:
            steps = len(sigmas) - 1
            cache = setting.make(None)
            cache.begin(steps, True)
            self.run = run = {"setting": setting, "sigmas": sigmas.detach().cpu(), "cache": cache, "steps": steps,
                              "step": step, "seen": set(), "cfg": False}  # fmt: skip
        if step != run["step"]:
            run["step"], run["seen"] = step, set()
        run["seen"].update(branches)
        run["cfg"] = run["cfg"] or 1 in branches
        return run

    def __call__(self, executor: Any, x: Any, timestep: Any, context: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        options = kwargs.get("transformer_options") or {}
        setting = options_in(options).block_cache
        sigmas = options.get("sample_sigmas")
        if setting is None or sigmas is None or "sigmas" not in options:
            return executor(x, timestep, context, y, *args, **kwargs)
        sigma = float(options["sigmas"].flatten()[0])
        step = int((sigmas[:-1].float().cpu() - sigma).abs().argmin())
        branches = [int(b) for b in options.get("cond_or_uncond") or [0]]
        run = self._begin(setting, sigmas, step, branches)
        blocks = executor.class_obj.visual_transformer_blocks
        n = len(branches)
        outs = []
        for i, branch in enumerate(branches):
            part = slice(i * x.shape[0] // n, (i + 1) * x.shape[0] // n)
            hook = run["cache"].hook(step, branch)

            replace = blocks_through(hook, blocks)
            patches = dict(options.get("patches_replace") or {})
            patches["dit"] = {**patches.get("dit", {}), **replace}
            opts = {**options, "cond_or_uncond": [branch], "patches_replace": patches}

            def cut(v: Any, part: slice = part) -> Any:
                return v[part] if torch.is_tensor(v) and v.shape[:1] == x.shape[:1] else v

            chunk = {k: cut(v) for k, v in kwargs.items()}
            chunk["transformer_options"] = opts
            outs.append(executor(x[part], cut(timestep), cut(context), cut(y), *args, **chunk))
        if step == run["steps"] - 1:
            setting.done(run["cache"], run["steps"], run["cfg"])
        return outs[0] if n == 1 else torch.cat(outs)


def blocks_through(hook: Any, blocks: Any) -> dict:
    """`patches_replace["dit"]` entries that run all visual blocks through a block-cache hook (hook(visual,
    run_blocks) -> visual) from the first block's replacement; the other blocks pass their input on."""

    def first(a: dict, extra: dict) -> dict:
        opts = a["transformer_options"]

        def run_blocks(v: Any) -> Any:
            for j, block in enumerate(blocks):
                opts["block_index"] = j
                v = block(v, a["context"], a["time_embed"], freqs=a["freqs"], transformer_options=opts)
            return v

        return {"x": hook(a["x"], run_blocks)}

    replace = {("double_block", 0): first}
    replace.update({("double_block", j): _pass_on for j in range(1, len(blocks))})
    return replace


def _pass_on(a: dict, extra: dict) -> dict:
    return {"x": a["x"]}


def _same(a: Any, b: Any) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a, b.detach().cpu())


def install(patcher: Any, nabla: bool = False, cache: bool = False, stats: dict | None = None) -> Any:
    """`patcher` (already a clone) with our wrappers on ComfyUI's native model: NABLA (added by the NABLA node only:
    the native model stays dense unless asked) and / or the block cache, each doing what the model's Kandinsky 5
    options say on every call; idempotent."""
    from .comfy_glue import diffusion_model_wrapper

    kind = diffusion_model_wrapper()
    shapes = shapes_of(patcher)
    if nabla:
        patcher.remove_wrappers_with_key(kind, NABLA_KEY)
        patcher.add_wrapper_with_key(kind, NABLA_KEY, NativeNabla(shapes, stats))
    if cache:
        patcher.remove_wrappers_with_key(kind, CACHE_KEY)
        patcher.add_wrapper_with_key(kind, CACHE_KEY, NativeBlockCache(shapes))
    return patcher


def add_nabla(patcher: Any, stats: dict | None = None) -> Any:
    """`patcher` with the NABLA wrapper (see install)."""
    return install(patcher, nabla=True, stats=stats)


class NativeDiT:
    """ComfyUI's Kandinsky 5 network called the way kandinsky_core.sampling drives our Kandinsky5DiT
    (`dit(x, text_embeds, pooled, timestep, text_mask=, rope_scale=, nabla=, attention_backend=, block_cache=)`):
    NABLA through our wrapper with the Sampler's parameters, the block cache through the block replacement, the
    variant's RoPE scale through ComfyUI's rope_options, padding tokens of the text dropped (the native model takes
    no text mask)."""

    def __init__(self, network: Any, arch: Any, compute_dtype: Any) -> None:
        self.network, self.arch, self.compute_dtype = network, arch, compute_dtype
        self.visual_transformer_blocks = network.visual_transformer_blocks

    def modules(self) -> Any:  # what Cancel's checks walk
        return self.network.modules()

    def __call__(
        self, x: Any, text_embeds: Any, pooled: Any, timestep: Any, text_mask: Any = None,
        rope_scale: tuple[float, float, float] = (1.0, 1.0, 1.0), nabla: Any = None, attention_backend: Any = None,
        block_cache: Any = None,
    ) -> Any:  # fmt: skip
        from .comfy_glue import diffusion_model_wrapper

        if text_mask is not None and not bool(text_mask.all()):
            if text_mask.shape[0] != 1 or not bool(text_mask[0].any()):
                raise InputError(
                    "positive / negative: ComfyUI's own Kandinsky 5 model takes no text mask, so prompts padded to "
                    "one length cannot run as a batch on it. Use batch_size 1, or Load Kandinsky 5 DiT."
                )
            text_embeds = text_embeds[:, text_mask[0].bool()]
        options: dict = {"rope_options": {"scale_t": 1 / rope_scale[0], "scale_y": 1 / rope_scale[1],
                                          "scale_x": 1 / rope_scale[2]}}  # fmt: skip
        if nabla is not None:
            options["wrappers"] = {diffusion_model_wrapper(): {NABLA_KEY: [NativeNabla({}, None, params=nabla)]}}
        if block_cache is not None:
            options["patches_replace"] = {"dit": blocks_through(block_cache, self.visual_transformer_blocks)}
        return self.network(x, timestep, text_embeds, pooled, transformer_options=options)


class NativeKandinsky5:
    """What the Kandinsky 5 Sampler reads of a model (as `comfy_model.Kandinsky5Model` gives it), for ComfyUI's own
    Kandinsky 5 model: the variant (from the tensors and the run: `loading.variant_for_run`, logged), the network
    as a NativeDiT, the attention backend (ComfyUI's) and the memory estimate of a step."""

    attention = "auto"
    name = ""

    def __init__(self, patcher: Any, frames: int, image: str | None) -> None:
        from kandinsky_core.loading import variant_for_run

        model = patcher.model
        shapes = {k: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}
        self.variant, said = variant_for_run(shapes, frames, image)
        log.info("Kandinsky 5 Sampler on ComfyUI's own Kandinsky 5 model: %s", said)
        compute = getattr(model, "manual_cast_dtype", None) or model.get_dtype()
        self.diffusion_model = NativeDiT(model.diffusion_model, self.variant.arch, compute)

    def memory_estimate(self, shape: tuple[int, ...], text_len: int, cfg: bool, nabla: Any = None) -> int:
        from kandinsky_core.memory import ALLOCATOR_MARGIN
        from kandinsky_core.sampling import step_peak_bytes

        dtype = self.diffusion_model.compute_dtype
        peak = step_peak_bytes(self.variant.arch, dtype, tuple(shape), int(text_len), cfg, nabla)
        return int(peak * ALLOCATOR_MARGIN)


def shapes_of(model: Any) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the network of a MODEL link (what variant detection reads)."""
    return {k: tuple(v.shape) for k, v in model.model.diffusion_model.state_dict().items()}


def patched(model: Any, nabla: bool = False, cache: bool = False) -> Any:
    """An option node's output clone: on ComfyUI's own Kandinsky 5 model, with our wrappers added (`install`) so
    that KSampler honours the options; any other model unchanged (our Kandinsky5Model reads the options itself)."""
    return install(model, nabla=nabla, cache=cache) if is_native(model) else model
