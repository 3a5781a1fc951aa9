"""End-to-end generation with stage-by-stage offloading.

Stages run one after another and only one large model sits on the accelerator at a time:
text encoders (encode prompts) -> VAE encode (I2V start image / I2I edit image) -> DiT (sample) -> VAE decode.
Every argument is checked by `resolve_request` before any weights are read.
"""

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .download import ModelPaths
from .errors import InputError, MissingFilesError
from .magcache import MagCache, MagCacheParams, MagCalibration
from .media import image_size, read_image, resize, resize_center_crop, to_uint8_frames
from .settings import CLI_WORDING, NablaChoice, Problem, raise_problems, resolve, uses_cfg
from .variants import Variant, crops_input_image, encode_template, get_variant, size_for_image

__all__ = ["ModelPaths", "Request", "resolve_request", "generate", "run", "pick_device"]

# t2v_pipeline.py / i2v_pipeline.py __call__ default; the image pipelines default to "".
VIDEO_NEGATIVE = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, deformed, "
    "walking backwards"
)


@dataclass(frozen=True)
class Request:
    """A fully resolved, validated generation: every default filled in from the variant."""

    variant: Variant
    prompt: str
    negative: str
    width: int
    height: int
    frames: int
    seed: int
    steps: int
    guidance: float
    scheduler_scale: float
    image: Tensor | None  # uint8 [3, height, width], already resized (I2I, or a size set by the user: and cropped)
    expand_prompt: bool
    nabla: Any  # NablaParams or None (dense attention)
    source_image: Tensor | None = None  # uint8 [3, H, W] as given: prompt expansion shows Qwen this, as officially

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        return (1, 16, (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8)


def _image_size(image: str | os.PathLike | Tensor) -> tuple[int, int]:
    if isinstance(image, Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    return image_size(image)


def resolve_request(
    variant: str | Variant,
    prompt: str,
    *,
    negative: str | None = None,
    width: int | None = None,
    height: int | None = None,
    frames: int | None = None,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    scheduler_scale: float | None = None,
    image: str | os.PathLike | Tensor | None = None,
    expand_prompt: bool = False,
    nabla: Any = None,
) -> Request:
    """Fill defaults from the variants table and check everything; cheap (reads at most the input image).

    `nabla`: None keeps the variant's setting, False forces dense attention, a NablaParams overrides it.
    `image`: a path, or uint8 [3, H, W]; required for I2V and I2I, refused otherwise. Without width/height,
    I2V / I2I take their size from the image as the official pipelines do (variants.size_for_image): I2V keeps the
    whole image at about the variant's `i2v_max_area`, I2I takes the nearest trained aspect and cover-crops.
    """
    v = get_variant(variant)
    problems: list[Problem] = []
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append(Problem("prompt", "The prompt is empty. Describe what to generate with --prompt TEXT."))
    size_from_image = width is None and height is None and image is not None
    image_w = image_h = 0
    if size_from_image and v.task in ("i2v", "i2i"):
        image_w, image_h = _image_size(image)
        width, height = size_for_image(v, image_w, image_h)
    seed = int(seed)
    if not 0 <= seed < 2**64:
        problems.append(Problem("seed", f"seed={seed} is not allowed: use a whole number between 0 and 2**64 - 1."))
    if nabla is None:
        choice = NablaChoice("auto")
    elif nabla is False:
        choice = NablaChoice("off")
    elif nabla is True:
        choice = NablaChoice("on")
    else:
        choice = NablaChoice("on", nabla.P, nabla.wT, nabla.wH, nabla.wW)
    settings, found = resolve(
        v, width=width, height=height, length=frames, steps=steps, guidance=guidance,
        scheduler_scale=scheduler_scale, nabla=choice, has_start=v.is_video and image is not None,
        has_edit=not v.is_video and image is not None, wording=CLI_WORDING,
    )  # fmt: skip
    if size_from_image and v.task in ("i2v", "i2i"):
        found = [
            Problem(p.input, f"The input image ({image_w}x{image_h}) gives {width}x{height} for {v.name}, which "
                             f"cannot be generated: {p.message} Crop the image closer to a common aspect ratio, or set "
                             "--width and --height.") if p.input in ("width", "height") else p
            for p in found
        ]  # fmt: skip
    raise_problems(problems + found)
    width, height = settings.width, settings.height
    if negative is None:
        negative = VIDEO_NEGATIVE if v.is_video else ""

    pixels = resized = None
    if image is not None:
        pixels = image if isinstance(image, Tensor) else read_image(image)
        if pixels.ndim != 3 or pixels.shape[0] != 3:
            raise InputError(f"Input image tensor has shape {tuple(pixels.shape)}; expected uint8 [3, H, W].")
        crop = crops_input_image(v, size_from_image)
        resized = resize_center_crop(pixels, width, height) if crop else resize(pixels, width, height)
    return Request(
        variant=v,
        prompt=prompt,
        negative=negative,
        width=width,
        height=height,
        frames=settings.length,
        seed=seed,
        steps=settings.steps,
        guidance=settings.guidance,
        scheduler_scale=settings.scheduler_scale,
        image=resized,
        expand_prompt=bool(expand_prompt),
        nabla=settings.nabla,
        source_image=pixels if expand_prompt else None,
    )


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" -> CUDA if present, else Apple MPS, else CPU. An explicit device that is absent is an InputError."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise InputError(f"--device {device!r} is not a device name. Use auto, cpu, cuda, cuda:N or mps.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device} was asked for but this torch sees no CUDA GPU. Use --device cpu or auto.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"--device {device} was asked for but this machine has no Apple MPS. Use --device cpu.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {device} cannot run a model. Use auto, cpu, cuda, cuda:N or mps.")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _free(device: torch.device) -> None:
    """Return an accelerator's cached memory after a stage (on the CPU, dropping the last reference is enough)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    elif device.type == "mps":
        gc.collect()
        torch.mps.empty_cache()


def _offload(model: Any, device: torch.device, offload: bool) -> None:
    """Park a model that is needed again later (the VAE between I2V/I2I encode and decode) on the CPU."""
    if offload and device.type != "cpu":
        model.to("cpu")
        _free(device)


def _pixels(image: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """uint8 [3, H, W] -> [1, 3, 1, H, W] in -1..1, the VAE's input layout."""
    return (image.to(device=device, dtype=torch.float32) / 127.5 - 1.0)[None, :, None].to(dtype)


def _load_vae(variant: Variant, path: Path, dtype: torch.dtype, device: torch.device) -> Any:
    if variant.vae == "flux":
        from .flux_vae import load_flux_vae

        return load_flux_vae(path, dtype=dtype, device=device)
    from .hunyuan_vae import load_hunyuan_vae

    return load_hunyuan_vae(path, dtype=dtype, device=device)


def _progress_callback(steps: int, enabled: bool) -> tuple[Callable[[int, int, Tensor], None] | None, Any]:
    if not enabled:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=steps, desc="sampling", unit="step")
    return (lambda i, n, x: bar.update(1)), bar


@dataclass(frozen=True)
class Runtime:
    """How a run uses the machine, shared by its stages (see `run` for each field)."""

    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    offload: bool = True
    progress: bool = True
    attention_backend: str | None = None
    fp8: bool = False
    log: Callable[[str], None] = print
    block_cache: Any = None
    block_swap: int | None = None
    text_block_swap: int | None = None
    vae_tiled: bool | str = "auto"
    compile: bool = False


@torch.no_grad()
def run(
    request: Request,
    models: ModelPaths,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype | None = None,
    offload: bool = True,
    progress: bool = True,
    attention_backend: str | None = None,
    fp8: bool = False,
    log: Callable[[str], None] | None = None,
    magcache: Any = None,
    block_swap: int | None = None,
    text_block_swap: int | None = None,
    vae_tiled: bool | str = "auto",
    compile: bool = False,
) -> Tensor:
    """Generate `request` from the files in `models`; returns frames uint8 [F, H, W, 3] on the CPU.

    Stages, one large model on the accelerator at a time: `encode_text` (text encoders loaded, used, dropped) ->
    `encode_image` (VAE encode of the input image, then parked on the CPU when `offload`) -> `sample_latent` (DiT
    loaded, sampled, dropped) -> `decode_latent`; `generate` then writes the file. `fp8` stores the DiT's block
    weights in float8. `magcache`: a `magcache.MagCacheParams` (skip visual blocks with those ratios and controls), a
    `magcache.MagCalibration` (measure this model's ratios; read them from it afterwards) or None.
    `block_swap`: None keeps the whole DiT on the device; N keeps its first N visual blocks there and swaps the others
    in from the host one at a time (`offload.enable_block_swap`; for small accelerators). `text_block_swap` does the
    same for Qwen2.5-VL's decoder layers (28 of them, ~13 GB in bf16). `vae_tiled` (HunyuanVideo VAE): True / False
    force tiled / untiled decoding, "auto" tiles when an untiled pass would not fit. `compile`: torch.compile the DiT's
    blocks (`compile.compile_dit`; compiled on the first step, eager again if the compiler fails)."""
    for name, value in (("block_swap", block_swap), ("text_block_swap", text_block_swap)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InputError(
                f"{name}={value!r} is not allowed: give the number of blocks to keep on the accelerator (0 or more; "
                "the rest are swapped in from the host one at a time), or None to keep the whole model there."
            )
    dev = pick_device(device)
    dtype = dtype or default_dtype(dev)
    rt = Runtime(
        device=dev, dtype=dtype, vae_dtype=vae_dtype or dtype, offload=offload, progress=progress,
        attention_backend=attention_backend, fp8=fp8, log=log or (lambda msg: None),
        block_cache=_block_cache(magcache), block_swap=block_swap, text_block_swap=text_block_swap,
        vae_tiled=vae_tiled, compile=compile,
    )  # fmt: skip
    if Path(models.dit).is_file():  # the DiT file fits the variant (header only), before minutes of text encoding
        from .loading import chosen_variant, read_safetensors_header

        chosen_variant(read_safetensors_header(models.dit), Path(models.dit).name, request.variant)
    cond, uncond = encode_text(request, models, rt)
    vae, first_frame, edit = encode_image(request, models, rt)
    x = sample_latent(request, models, rt, cond, uncond, first_frame, edit)
    return decode_latent(request, models, rt, x, vae)


def encode_text(request: Request, models: ModelPaths, rt: Runtime) -> tuple[Any, Any]:
    """Stage 1: the prompt (expanded first when asked) and, with CFG, the negative prompt, encoded on the CPU; the
    encoders are dropped afterwards."""
    from .text_encoders import load_text_encoders

    v, dev = request.variant, rt.device
    rt.log(f"text encoders: {models.qwen} + {models.clip}")
    text_dev = dev if rt.text_block_swap is None else torch.device("cpu")
    encoders = load_text_encoders(
        models.qwen, models.clip, dtype=rt.dtype, device=text_dev, tokenizer_dir=models.tokenizer_dir
    )
    if rt.text_block_swap is not None:
        from .offload import swap_layers

        encoders.clip.to(dev)
        swap_layers(encoders.qwen, encoders.qwen.model.language_model.layers, dev, rt.text_block_swap)
    images = [request.image] if v.task == "i2i" else None
    prompt = request.prompt
    if request.expand_prompt:
        # the official pipelines show Qwen the image as given (I2I: at a quarter of its size), not the resized one
        image = request.source_image if request.source_image is not None else request.image
        prompt = encoders.expand_prompt(prompt, v.text_template, image=image, seed=request.seed)
        rt.log(f"expanded prompt: {prompt}")
    template = encode_template(v, request.frames)
    cond = encoders.encode([prompt], template, v.text_max_length, images=images)
    uncond = None
    if uses_cfg(request.guidance):
        uncond = encoders.encode([request.negative], template, v.text_max_length, images=images)
    cond, uncond = cond.to("cpu"), (uncond.to("cpu") if uncond is not None else None)
    del encoders  # used once: dropping them frees the accelerator without copying 16 GB back to the CPU
    _free(dev)
    return cond, uncond


def encode_image(request: Request, models: ModelPaths, rt: Runtime) -> tuple[Any, Tensor | None, Tensor | None]:
    """Stage 2: the start image (I2V) or edit image (I2I) through the VAE, as a scaled latent on the CPU. Returns
    the VAE (kept for decoding, parked on the CPU when offloading; None without an image), the I2V first-frame
    latent and the I2I edit latent."""
    v, dev = request.variant, rt.device
    if request.image is None:
        return None, None, None
    rt.log(f"VAE encode: {models.vae}")
    vae = _load_vae(v, models.vae, rt.vae_dtype, dev)
    latent = vae.encode(_pixels(request.image, dev, rt.vae_dtype)).float() * v.latent_scale
    latent = latent.cpu()
    _offload(vae, dev, rt.offload)
    return (vae, latent, None) if v.task == "i2v" else (vae, None, latent)


def sample_latent(
    request: Request, models: ModelPaths, rt: Runtime, cond: Any, uncond: Any, first_frame: Tensor | None,
    edit: Tensor | None,
) -> Tensor:  # fmt: skip
    """Stage 3: the DiT loaded (whole, or with block swap), the flow sampled from seeded noise, the DiT dropped.
    Returns the latent in DiT space on the device."""
    from .loading import load_dit
    from .sampling import make_noise, sample

    v, dev, dtype = request.variant, rt.device, rt.dtype
    rt.log(f"DiT: {models.dit}")
    if rt.block_swap is None:
        dit, _ = load_dit(models.dit, v, dtype=dtype, device=dev, fp8=rt.fp8)
    else:
        from .offload import enable_block_swap

        dit, _ = load_dit(models.dit, v, dtype=dtype, device="cpu", fp8=rt.fp8)
        swap = enable_block_swap(dit, dev, blocks_on_device=rt.block_swap)
        rt.log(f"block swap: {len(swap.swapped)} of {len(dit.visual_transformer_blocks)} visual blocks swapped in")
    if rt.compile:
        from .compile import compile_dit

        compile_dit(dit)
        rt.log("torch.compile: the DiT blocks compile during the first step")
    noise = make_noise(request.latent_shape, request.seed, dtype=torch.float32, device=dev)
    callback, bar = _progress_callback(request.steps, rt.progress)
    try:
        x = sample(
            dit,
            noise,
            cond.to(dev, dtype),
            uncond.to(dev, dtype) if uncond is not None else None,
            steps=request.steps,
            guidance=request.guidance,
            scheduler_scale=request.scheduler_scale,
            rope_scale=v.rope_scale,
            nabla=request.nabla,
            first_frame_latent=first_frame.to(dev) if first_frame is not None else None,
            edit_latent=edit.to(dev) if edit is not None else None,
            callback=callback,
            attention_backend=rt.attention_backend,
            block_cache=rt.block_cache,
        )
    finally:
        if bar is not None:
            bar.close()
    if isinstance(rt.block_cache, MagCache):
        rt.log(f"MagCache: {len(rt.block_cache.skipped)} of {request.steps * (2 if uncond is not None else 1)} DiT "
               "calls reused the cached residual")  # fmt: skip
    del dit
    _free(dev)
    return x


def decode_latent(request: Request, models: ModelPaths, rt: Runtime, x: Tensor, vae: Any = None) -> Tensor:
    """Stage 4: the latent through the VAE (the one of stage 2, or loaded now) to uint8 frames [F, H, W, 3]."""
    v, dev = request.variant, rt.device
    rt.log("VAE decode")
    if vae is None:
        vae = _load_vae(v, models.vae, rt.vae_dtype, dev)
    elif rt.offload:
        vae.to(dev)
    tiling = {} if v.vae == "flux" else {"tiled": rt.vae_tiled}
    pixels = vae.decode((x / v.latent_scale).to(rt.vae_dtype), **tiling)
    del vae
    _free(dev)
    return to_uint8_frames(pixels[:, :, : request.frames])


def _block_cache(magcache: Any) -> Any:
    """The sampler's block cache for run(magcache=...): a fresh MagCache for MagCacheParams, a MagCalibration as is."""
    if magcache is None or isinstance(magcache, MagCalibration):
        return magcache
    if isinstance(magcache, MagCacheParams):
        return MagCache(magcache)
    raise InputError(
        f"magcache={magcache!r:.60} is not allowed: pass MagCacheParams (e.g. MagCacheParams.for_variant(variant)), a "
        "MagCalibration, or None."
    )


def generate(
    variant: str | Variant,
    prompt: str,
    *,
    models: ModelPaths | str | os.PathLike | None = None,
    negative: str | None = None,
    width: int | None = None,
    height: int | None = None,
    frames: int | None = None,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    scheduler_scale: float | None = None,
    image: str | os.PathLike | Tensor | None = None,
    expand_prompt: bool = False,
    nabla: Any = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    progress: bool = True,
    offload: bool = True,
    attention_backend: str | None = None,
    fp8: bool = False,
    magcache: Any = None,
    block_swap: int | None = None,
    compile: bool = False,
) -> Tensor:
    """Text (and image) to video or image: frames uint8 [F, H, W, 3] (F = 1 for image variants).

    Defaults (size, frames, steps, guidance, scheduler scale, negative prompt, NABLA) come from the variants table.
    `models`: the files (ModelPaths), or a models folder in ComfyUI's layout (None: the default one, see
    download.default_models_dir); nothing is downloaded here, missing files raise MissingFilesError naming them.
    """
    request = resolve_request(
        variant,
        prompt,
        negative=negative,
        width=width,
        height=height,
        frames=frames,
        seed=seed,
        steps=steps,
        guidance=guidance,
        scheduler_scale=scheduler_scale,
        image=image,
        expand_prompt=expand_prompt,
        nabla=nabla,
    )
    if not isinstance(models, ModelPaths):
        from .download import default_models_dir, ensure_files, model_paths

        folder = Path(models) if models is not None else default_models_dir()
        models = model_paths(ensure_files(request.variant, folder, allow_download=False), folder)
    missing = [p for p in (models.dit, models.qwen, models.clip, models.vae) if not Path(p).exists()]
    if missing:
        raise MissingFilesError(
            f"Model files do not exist: {', '.join(str(p) for p in missing)}. Check the paths, or run "
            f"`python -m kandinsky_core download --variant {request.variant.name}`."
        )
    return run(
        request,
        models,
        device=device,
        dtype=dtype,
        offload=offload,
        progress=progress,
        attention_backend=attention_backend,
        fp8=fp8,
        magcache=magcache,
        block_swap=block_swap,
        compile=compile,
    )
