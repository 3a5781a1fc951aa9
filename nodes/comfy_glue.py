"""The few places the pack touches ComfyUI: devices, ModelPatcher, memory, interrupts, progress and previews.

ComfyUI modules are imported inside the functions, so `nodes/` imports without ComfyUI (unit tests put fakes
in sys.modules) and importing the pack costs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from kandinsky_core.errors import MissingFilesError
from kandinsky_core.sampling import x0_estimate

log = logging.getLogger("kandinsky5")

OFFLOAD = {"dit": "unet_offload_device", "text": "text_encoder_offload_device", "vae": "vae_offload_device"}


def model_management():
    import comfy.model_management

    return comfy.model_management


def load_device() -> torch.device:
    return model_management().get_torch_device()


def offload_device(kind: str) -> torch.device:
    return getattr(model_management(), OFFLOAD[kind])()


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on accelerators, float32 on the CPU (where bfloat16 matmuls are slow)."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def dit_operations() -> Any:
    """comfy.ops.manual_cast (weights cast to the input's dtype and device at use, so ComfyUI can leave part of
    the DiT on the offload device: low-VRAM partial loading). Falls back to our layers where comfy lacks one."""
    from kandinsky_core import layers

    try:
        import comfy.ops

        cast = comfy.ops.manual_cast
    except (ImportError, AttributeError):
        return layers.ops
    return SimpleNamespace(
        Linear=eager_weights(getattr(cast, "Linear", layers.Linear)),
        LayerNorm=getattr(cast, "LayerNorm", layers.LayerNorm),
        RMSNorm=getattr(cast, "RMSNorm", layers.RMSNorm),
    )


def eager_weights(linear: type) -> type:
    """The Linear class with torch's own state-dict loading. With dynamic VRAM (comfy-aimdo, on by default on
    NVIDIA in ComfyUI v0.33.0), comfy.ops.Linear creates no weight until ComfyUI's own loader fills it, unless a
    subclass brings its own `_load_from_state_dict`; kandinsky_core loads strictly with
    `load_state_dict(assign=True)`, which needs the parameters to exist. Casting at use (what partial loading relies
    on) is unchanged."""

    from kandinsky_core import layers

    scales_weight = issubclass(linear, layers.Linear)

    class Linear(linear):
        def _load_from_state_dict(self, *args, **kwargs):
            return torch.nn.Module._load_from_state_dict(self, *args, **kwargs)

        def forward(self, x, *args, **kwargs):
            # float8 storage with a per-tensor scale (kandinsky_core.loading.to_scaled_fp8): comfy.ops casts the
            # stored weight only, so the scale goes on the input, (x * s) W^T = x (s W)^T
            scale = self._buffers.get("weight_scale")
            if scale is not None and not scales_weight:
                x = x * scale.to(device=x.device, dtype=x.dtype)
            return super().forward(x, *args, **kwargs)

    Linear.__qualname__ = f"{linear.__qualname__}[eager]"
    return Linear


class Holder(torch.nn.Module):
    """Holds one of our models for a ModelPatcher, which writes bookkeeping attributes (device, lowvram flags)
    onto the module it manages; our models keep read-only properties of those names."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner


def wrap(model: torch.nn.Module, kind: str) -> Any:
    """A ModelPatcher around one of our models (as `patcher.model.inner`), loading to ComfyUI's torch device and
    parking on the offload device of its kind ("dit", "text", "vae")."""
    from comfy.model_patcher import ModelPatcher

    return ModelPatcher(Holder(model), load_device=load_device(), offload_device=offload_device(kind))


def load(patcher: Any, memory_required: int) -> None:
    """Make room (ComfyUI unloads or offloads other models) and load `patcher` onto the torch device."""
    model_management().load_models_gpu([patcher], memory_required=int(memory_required))


# What ComfyUI's partial loader may keep on top of the weights (the largest module or two it moves one at a time).
_LOAD_SLACK = 256 * 2**20


def available_memory(patcher: Any) -> int:
    """Bytes `patcher`'s model may use for activations once loaded on the torch device: the free memory plus what
    other loaded models hold there (load_models_gpu evicts them on demand), less the weights of this model not yet
    on the device, ComfyUI's reserve and _LOAD_SLACK (so that asking for this much still loads the model whole)."""
    mm = model_management()
    device = patcher.load_device
    free = mm.get_free_memory(device)
    for loaded in getattr(mm, "current_loaded_models", []):
        other = loaded.model
        if other is not None and other is not patcher and loaded.device == device:
            free += other.loaded_size()
    free -= patcher.model_size() - patcher.loaded_size()
    return int(free - mm.extra_reserved_memory() - _LOAD_SLACK)


@contextmanager
def loaded_or_swapped(patcher: Any, layers: torch.nn.ModuleList, memory_required: int) -> Iterator[Any]:
    """Have `patcher`'s model on the torch device while the block runs.

    When it fits (with `memory_required` bytes of activations), ComfyUI loads it whole, as any model. When it does
    not, it is never handed to ComfyUI's partial loader: that moves some modules of a plain-torch model (e.g. a
    transformers Qwen) and leaves the rest on the CPU with nothing to cast them, so the first layer left behind
    fails with mismatched devices. Instead ComfyUI evicts other models, everything outside `layers` plus as many of
    `layers` as fit goes to the device, and the remaining layers are swapped in one at a time
    (kandinsky_core.offload.swap_layers); the model returns to its offload device afterwards. Yields the BlockSwap,
    or None for a whole load."""
    if patcher.load_device.type == "cpu" or available_memory(patcher) >= memory_required:
        load(patcher, memory_required)
        yield None
        return
    from kandinsky_core.offload import block_bytes, swap_layers

    mm = model_management()
    device, model = patcher.load_device, patcher.model
    sizes = [block_bytes(layer) for layer in layers]
    rest = patcher.model_size() - sum(sizes)
    mm.free_memory(patcher.model_size() + memory_required + mm.extra_reserved_memory(), device)
    room = mm.get_free_memory(device) - mm.extra_reserved_memory() - memory_required - rest - 2 * max(sizes)
    resident = 0
    while resident < len(sizes) and room >= sizes[resident]:
        room -= sizes[resident]
        resident += 1
    log.info(
        "Kandinsky 5: %.1f GiB of weights do not fit the %.1f GiB free on %s: %d of %d layers stay there, the "
        "others are copied in one at a time", patcher.model_size() / 2**30, mm.get_free_memory(device) / 2**30,
        device, resident, len(sizes),
    )  # fmt: skip
    swap = None
    try:
        swap = swap_layers(model, layers, device, resident, offload_device=patcher.offload_device)
        yield swap
    finally:
        if swap is not None:
            swap.remove()
        model.to(patcher.offload_device)


def check_interrupted() -> None:
    """Raises ComfyUI's interrupt exception when the user pressed Cancel (POST /interrupt)."""
    model_management().throw_exception_if_processing_interrupted()


def cancellable(*roots: Any) -> Any:
    """A context in which ComfyUI's Cancel stops the models `roots` between their blocks (layers, tokens, tiles)."""
    from kandinsky_core.cancel import checks_between

    return checks_between(roots, check_interrupted)


def comfy_dir() -> str:
    """ComfyUI's `comfy` package folder, where it bundles the Qwen2.5 and CLIP tokenizers.

    ComfyUI's comfy/ has no __init__.py: it is a namespace package whose `__file__` is None. Its `__path__` (or,
    failing that, the folder of comfy.model_management, which every ComfyUI has) names the folder."""
    import os

    import comfy

    folders = [str(p) for p in (getattr(comfy, "__path__", None) or [])]
    if getattr(comfy, "__file__", None):
        folders.append(os.path.dirname(comfy.__file__))
    try:
        folders.append(os.path.dirname(model_management().__file__))
    except (ImportError, AttributeError, TypeError):
        pass
    for folder in folders:
        if os.path.isdir(os.path.join(folder, "text_encoders")) or os.path.isdir(os.path.join(folder, "sd1_tokenizer")):
            return os.path.abspath(folder)
    if folders:
        return os.path.abspath(folders[0])
    raise MissingFilesError(
        "ComfyUI's comfy/ folder (with its bundled Qwen2.5 and CLIP tokenizers) cannot be located. Use the Hugging "
        "Face text_encoder/ and text_encoder2/ folders, which bring their own tokenizers."
    )


def latent_format(vae_kind: str) -> Any:
    import comfy.latent_formats as lf

    return lf.HunyuanVideo() if vae_kind == "hunyuan" else lf.Flux()


def make_previewer(vae_kind: str) -> Any:
    """ComfyUI's previewer for the latent space (Latent2RGB from its own factors, or TAESD when installed and
    chosen), or None when previews are off."""
    try:
        import latent_preview

        return latent_preview.get_previewer(load_device(), latent_format(vae_kind))
    except Exception as e:  # previews are a convenience: never fail a generation for them
        log.warning("Kandinsky 5: no latent previews (%s)", e)
        return None


def step_callback(
    noise: Tensor, times: Tensor, latent_scale: float, vae_kind: str, steps: int
) -> Callable[[int, int, Tensor], None]:
    """The sampler's per-step hook: stop on Cancel, advance the progress bar and send a preview of x0."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(steps)
    previewer = make_previewer(vae_kind)
    fmt = latent_format(vae_kind) if previewer is not None else None
    state = {"x": noise.clone()}

    def callback(i: int, n: int, x: Tensor) -> None:
        check_interrupted()
        preview = None
        if previewer is not None:
            x0 = x0_estimate(state["x"], x, float(times[i]), float(times[i + 1]))
            state["x"] = x.clone()
            try:
                preview = previewer.decode_latent_to_preview_image("JPEG", fmt.process_in(x0 / latent_scale))
            except Exception as e:
                log.debug("Kandinsky 5 preview failed: %s", e)
        bar.update_absolute(i + 1, n, preview)

    return callback


def lora_patches(patcher: Any, lora: Any) -> dict[str, Any]:
    """ComfyUI weight patches for a kandinsky_core.lora.LoraFile, keyed by the patcher's state-dict keys
    (`diffusion_model.<module>.weight`, those of a Kandinsky 5 MODEL). Each is a
    comfy.weight_adapter adapter that computes the LoRA's delta with kandinsky_core's math when ComfyUI patches the
    weight (on load, or per layer under partial loading); float8 weights stored divided by their `weight_scale`
    get the delta divided by it too."""
    cls = _lora_adapter_class()
    inner = patcher.model.diffusion_model
    patches = {}
    for module, target in lora.targets.items():
        scale = inner.get_submodule(module)._buffers.get("weight_scale")
        names = tuple(target.factors)
        weights = (target.kind, target.scale, 1.0 / float(scale) if scale is not None else 1.0, names,
                   tuple(target.factors[n] for n in names))  # fmt: skip
        patches[f"diffusion_model.{module}.weight"] = cls({f"{module}"}, weights)
    return patches


def _lora_adapter_class() -> type:
    from comfy.weight_adapter.base import WeightAdapterBase

    from kandinsky_core.lora import LoraTarget

    class Kandinsky5LoraAdapter(WeightAdapterBase):
        """weights: (kind, alpha/rank scale, 1 / float8 weight scale, factor names, factors). ComfyUI rebuilds
        adapters as type(a)(a.loaded_keys, moved weights) when it prefetches them to the GPU."""

        name = "kandinsky5_lora"

        def __init__(self, loaded_keys: set[str], weights: tuple) -> None:
            self.loaded_keys = loaded_keys
            self.weights = weights

        def calculate_weight(
            self, weight, key, strength, strength_model, offset, function, intermediate_dtype=torch.float32,
            original_weight=None,
        ):  # fmt: skip
            kind, scale, inverse, names, factors = self.weights
            target = LoraTarget(key, kind, dict(zip(names, factors, strict=True)), scale)
            delta = target.delta(device=weight.device, dtype=intermediate_dtype) * (strength * inverse)
            if function is not None:
                delta = function(delta)
            weight += delta.to(weight.dtype)
            return weight

    return Kandinsky5LoraAdapter


def diffusion_model_wrapper() -> str:
    """ComfyUI's wrapper kind around a diffusion model's forward (what nodes/native.py's patches register as)."""
    import comfy.patcher_extension

    return comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
