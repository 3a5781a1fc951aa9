"""The Kandinsky 5 DiT as a ComfyUI model: what flows on a `MODEL` link is a ModelPatcher over `Kandinsky5Model`.

`Kandinsky5Model` is a `comfy.model_base.BaseModel` (ComfyUI v0.3.64 has no Kandinsky 5 class of its own) whose
`diffusion_model` is our `kandinsky_core.model.Kandinsky5DiT`. It declares what ComfyUI's samplers need: flow
matching (ModelType.FLOW, shift = the variant's scheduler scale, timesteps x 1000) and a latent format whose
`process_in` / `process_out` are kandinsky_core's `latent_to_dit` / `dit_to_latent`. `_apply_model` only adapts
ComfyUI's call to the DiT's signature; the math stays in kandinsky_core. The state dict is `diffusion_model.<module>`,
so ComfyUI's LoRA loaders find our layers.

comfy is imported on first use (`model_class()`), so the pack still imports without ComfyUI.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from kandinsky_core.errors import InputError
from kandinsky_core.settings import NABLA_TILE_PX, NABLA_WHY, raise_problems, side_problems
from kandinsky_core.variants import Variant

from .model_options import options_in

NABLA_NODE = "Kandinsky 5 NABLA"
SAMPLER_NODE = "Kandinsky 5 Sampler"
LOADER_NODE = "Load Kandinsky 5 DiT"


@functools.cache
def model_class() -> type:
    """`Kandinsky5Model`, built once on ComfyUI's BaseModel."""
    import comfy.conds
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models_base

    from kandinsky_core.sampling import LATENT_CHANNELS, dit_to_latent, empty_conditioning, latent_to_dit

    class VideoLatent(comfy.latent_formats.HunyuanVideo):
        """HunyuanVideo latents [B, 16, T, h, w]; ComfyUI's previews use its RGB factors."""

        def __init__(self, scale: float) -> None:
            super().__init__()
            self.scale_factor = scale

        def process_in(self, latent):
            return latent_to_dit(latent, self.scale_factor)

        def process_out(self, latent):
            return dit_to_latent(latent, self.scale_factor)

    class ImageLatent(comfy.latent_formats.Flux):
        """FLUX VAE latents [B, 16, h, w], scaled without the shift ComfyUI's Flux format applies: the official image
        pipelines (and kandinsky_core) use latent * 0.3611 only."""

        def __init__(self, scale: float) -> None:
            super().__init__()
            self.scale_factor, self.shift_factor = scale, 0.0

        def process_in(self, latent):
            return latent_to_dit(latent, self.scale_factor)

        def process_out(self, latent):
            return dit_to_latent(latent, self.scale_factor)

    class Kandinsky5Config(comfy.supported_models_base.BASE):
        """What BaseModel reads from a model config: no network of its own to build (ours is loaded already), the
        variant's flow shift and latent format, and float8 storage computing in the DiT's compute dtype."""

        unet_config = {"disable_unet_model_creation": True}
        unet_extra_config = {}

        def __init__(self, variant: Variant, storage: torch.dtype, compute: torch.dtype) -> None:
            super().__init__(self.unet_config)
            self.sampling_settings = {"shift": float(variant.scheduler_scale), "multiplier": 1000}
            fmt = VideoLatent if variant.vae == "hunyuan" else ImageLatent
            self.latent_format = fmt(variant.latent_scale)
            self.manual_cast_dtype = None if storage == compute else compute
            self.supported_inference_dtypes = [compute]

    class Kandinsky5Model(comfy.model_base.BaseModel):
        """A loaded Kandinsky 5 DiT for ComfyUI. `variant` (whose settings apply), `attention` (the dense attention
        backend chosen on the loader) and `name` (the file) are fixed at construction."""

        def __init__(
            self, dit: torch.nn.Module, variant: Variant, attention: str = "auto", name: str = "",
            device: torch.device | None = None,
        ) -> None:  # fmt: skip
            storage = next(dit.visual_transformer_blocks.parameters()).dtype
            config = Kandinsky5Config(variant, storage, dit.compute_dtype)
            super().__init__(config, comfy.model_base.ModelType.FLOW, device=device)
            self.diffusion_model = dit
            self._variant, self._attention, self._name, self._storage = variant, attention, name, storage

        @property
        def variant(self) -> Variant:
            return self._variant

        @property
        def attention(self) -> str:
            return self._attention

        @property
        def name(self) -> str:
            return self._name

        def get_dtype(self) -> torch.dtype:
            return self._storage

        def memory_estimate(self, shape: tuple[int, ...], text_len: int, cfg: bool, nabla: Any = None) -> int:
            """Bytes of activations one sampling step needs beyond the weights, for a latent [B, 16, T, H, W]: the
            step's peak measured on meta tensors (kandinsky_core.sampling.step_peak_bytes) plus the allocator
            margin."""
            from kandinsky_core.memory import ALLOCATOR_MARGIN
            from kandinsky_core.sampling import step_peak_bytes

            arch, dtype = self._variant.arch, self.diffusion_model.compute_dtype
            return int(step_peak_bytes(arch, dtype, tuple(shape), int(text_len), cfg, nabla) * ALLOCATOR_MARGIN)

        def nabla_for(self, options: Any, shape: tuple[int, ...]) -> Any:
            """The NABLA parameters the options give for a latent of `shape` (None: dense attention); InputError
            when NABLA is on and the size is not a multiple of 128 px."""
            nabla = options.nabla.params(self._variant)
            if nabla is not None:
                why = (f"{NABLA_WHY}; NABLA is on for {self._variant.name}: resize the empty latent, or set NABLA "
                       f"off with the {NABLA_NODE} node")  # fmt: skip
                raise_problems(side_problems(int(shape[-1]) * 8, int(shape[-2]) * 8, NABLA_TILE_PX, why))
            return nabla

        def memory_required(self, input_shape, cond_shapes={}, **kwargs):  # noqa: B006 (BaseModel's signature)
            shape = tuple(int(s) for s in input_shape)
            if len(shape) == 4:
                shape = (shape[0], shape[1], 1, *shape[2:])
            lengths = [int(s[1]) for s in (cond_shapes or {}).get("text_embeds", []) if len(s) > 1]
            patcher = getattr(self, "current_patcher", None)
            options = options_in(patcher.model_options.get("transformer_options", {})) if patcher else None
            nabla = self.nabla_for(options, shape) if options else None
            return self.memory_estimate(shape, max(lengths, default=self._variant.text_max_length), False, nabla)

        def extra_conds(self, **kwargs):
            problem = scaled_weight_patch_problem(getattr(self, "current_patcher", None))
            if problem:
                raise InputError(problem)
            if self._variant.task in ("i2v", "i2i"):
                image = "start image" if self._variant.task == "i2v" else "image to edit"
                raise InputError(
                    f"model: {self._variant.name} is an {self._variant.task.upper()} model and needs its {image}, "
                    f"which ComfyUI's samplers cannot pass. Use the {SAMPLER_NODE} node (start_latent / edit_latent) "
                    "for it, or load a text-to-video / text-to-image model for KSampler."
                )
            embeds, pooled, mask = (kwargs.get(k) for k in ("cross_attn", "pooled_output", "attention_mask"))
            if embeds is None or pooled is None or mask is None or embeds.ndim != 3 or pooled.ndim != 2:
                raise InputError(
                    "positive / negative is not a Kandinsky 5 conditioning (it lacks the Qwen embeddings, their mask "
                    "or the pooled CLIP output). Connect the outputs of Kandinsky 5 Text Encode."
                )
            # CONDRegular: a positive and a negative of different lengths run separately, never padded together;
            # the mask travels as integers (ComfyUI casts other tensors to the model dtype)
            return {
                "text_embeds": comfy.conds.CONDRegular(embeds),
                "text_mask": comfy.conds.CONDRegular(mask.to(torch.long)),
                "pooled": comfy.conds.CONDRegular(pooled),
            }

        def _apply_model(
            self,
            x,
            t,
            c_concat=None,
            c_crossattn=None,
            control=None,
            transformer_options=None,
            **kwargs,
        ):
            sigma = t
            xc = self.model_sampling.calculate_input(sigma, x)
            image = xc.ndim == 4  # [B, 16, H, W] from EmptyLatentImage / EmptySD3LatentImage: one frame
            if image:
                xc = xc[:, :, None]
            nabla = self.nabla_for(options_in(transformer_options or {}), xc.shape)
            extra = empty_conditioning(self.diffusion_model, xc)  # Lite T2V takes I2V's channels, empty
            out = self.diffusion_model(
                xc if extra is None else torch.cat([xc, extra], dim=1),
                kwargs["text_embeds"],
                kwargs["pooled"],
                self.model_sampling.timestep(t).float(),
                text_mask=kwargs["text_mask"].to(torch.bool),
                rope_scale=self._variant.rope_scale,
                nabla=nabla,
                attention_backend=None if self._attention == "auto" else self._attention,
            )[:, :LATENT_CHANNELS]
            if image:
                out = out[:, :, 0]
            return self.model_sampling.calculate_denoised(sigma, out.float(), x)

    return Kandinsky5Model


def make_patcher(dit: torch.nn.Module, variant: Variant, attention: str, name: str) -> Any:
    """A ModelPatcher over a Kandinsky5Model of `dit`, loading to ComfyUI's torch device and parking on the DiT's
    offload device."""
    from comfy.model_patcher import ModelPatcher

    from . import comfy_glue

    model = model_class()(dit, variant, attention, name, device=comfy_glue.offload_device("dit"))
    return ModelPatcher(model, load_device=comfy_glue.load_device(), offload_device=comfy_glue.offload_device("dit"))


OUR_ADAPTER = "Kandinsky5LoraAdapter"


def scaled_weight_patch_problem(patcher: Any) -> str | None:
    """A weight patch other than Load Kandinsky 5 LoRA's on a float8 weight stored divided by its `weight_scale`
    (weight_dtype fp8_e4m3fn): ComfyUI adds such a delta to the stored weight, so it would act `weight_scale` times
    too strongly or weakly. Our LoRA node's adapter divides by the scale itself. None when there is nothing wrong."""
    patches = getattr(patcher, "patches", None) or {}
    model = getattr(patcher, "model", None)
    for key, entries in patches.items():
        if not key.endswith(".weight") or all(type(e[1]).__name__ == OUR_ADAPTER for e in entries):
            continue
        try:
            module = model.get_submodule(key[: -len(".weight")])
        except AttributeError:
            continue
        if module._buffers.get("weight_scale") is not None:
            return (
                f"model: a LoRA (or other weight patch) from a ComfyUI node targets {key}, a float8 weight stored "
                "with its own scale (Load Kandinsky 5 DiT weight_dtype fp8_e4m3fn); ComfyUI would apply it at the "
                "wrong strength. Load the LoRA with Load Kandinsky 5 LoRA, which handles the scale, or load the DiT "
                "with weight_dtype default / bf16."
            )
    return None


def describe(model: Any) -> str:
    """What a MODEL link carries, in words, for messages."""
    inner = getattr(model, "model", None)
    kind = type(inner).__name__ if inner is not None else type(model).__name__
    if kind == "Kandinsky5":
        return "ComfyUI's own Kandinsky 5 model (from Load Diffusion Model)"
    if inner is not None and hasattr(inner, "model_config"):
        return f"a {kind} model (ComfyUI model class {kind}), not a Kandinsky 5 one"
    return f"a {kind}, not a ComfyUI model"


def k5_model(model: Any, label: str = "model") -> Any:
    """The Kandinsky5Model behind a MODEL link (a ModelPatcher made by Load Kandinsky 5 DiT); InputError naming what
    came instead and what to load (the Kandinsky 5 Sampler also takes ComfyUI's own model: `run_model`)."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(inner, model_class()):
        return inner
    raise InputError(
        f"{label} is {describe(model)}. This node runs the Kandinsky 5 DiT loaded by {LOADER_NODE}: load the "
        f"Kandinsky 5 .safetensors from models/diffusion_models with {LOADER_NODE} and connect its MODEL output."
    )


def run_model(model: Any, frames: int, image: str | None = None) -> Any:
    """What the Kandinsky 5 Sampler runs: the Kandinsky5Model of Load Kandinsky 5 DiT, or, for ComfyUI's own Kandinsky
    5 model (core's Load Diffusion Model), a `native.NativeKandinsky5` whose variant suits `frames` and `image`
    ("start" / "edit" / None); InputError for any other model."""
    from . import native

    if native.is_native(model):
        return native.NativeKandinsky5(model, frames, image)
    return k5_model(model)
