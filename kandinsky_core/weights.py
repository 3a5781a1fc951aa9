"""Reading weight files: what the DiT, the two VAEs and the text encoders share.

Every reader of model weights goes through here for the parts that do not depend on the model:

- safetensors only (never pickles): `read_safetensors_header` checks a file from its header alone (a 40 GB file
  costs nothing to recognise), `open_safetensors` / `load_safetensors` read it with a clear error when it is broken,
  `require_safetensors` refuses other files by name;
- key prefixes other tools put in front of the official names (`split_prefix`);
- dtypes and fp8: our float8 storage with a per-tensor scale (`to_scaled_fp8`), ComfyUI's fp8 quantisation markers
  (`scaled_fp8` / `<layer>.scale_weight`, `<layer>.weight_scale`, `.comfy_quant`, `_quantization_metadata`) and
  their dequantisation (`dequantize`);
- strict comparison of a file's tensors with a model's (`compare_shapes`, `listing`);
- what a file that is not what was expected most likely is (`what_is_it`), for error messages.

Each reader keeps its own rename tables and messages (loading.py, hunyuan_vae.py, flux_vae.py, text_encoders/).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import MissingFilesError, TruncatedFileError, WeightsError

Header = dict[str, tuple[str, tuple[int, ...]]]

_MAX_HEADER = 100 * 1024 * 1024  # the format caps the JSON header at 100 MB
# bits per element of the safetensors dtypes (the format's names)
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Safetensors files.


def _describe_magic(head: bytes) -> str:
    if head[:2] == b"PK":
        return "a zip archive (a PyTorch .pt/.ckpt pickle checkpoint?)"
    if head[:4] == b"GGUF":
        return "a GGUF file (quantised weights for llama.cpp-style loaders)"
    if head[:1] == b"\x80":
        return "a Python pickle (an old PyTorch checkpoint?)"
    if head[:1] in (b"{", b"<", b"#"):
        return "a text file (JSON/HTML/config, perhaps an error page saved instead of the weights)"
    return "something that is not a safetensors file"


def read_safetensors_header(path: str | Path) -> Header:
    """{tensor name: (dtype string, shape)} from the header only; raises WeightsError for broken files."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(
            f"{str(path)!r} is a folder, not a weights file. Pick the .safetensors file itself "
            "(for a DiT, e.g. model/kandinsky5lite_t2v_sft_5s.safetensors)."
        )
    if not path.is_file():
        raise MissingFilesError(f"Weights file {str(path)!r} does not exist. Check the path or download it first.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(
                f"{path.name!r} is {size} bytes long: too short to be a safetensors file (expected an 8-byte header "
                "length, then a JSON header and the tensor data). The download is probably incomplete: fetch it again."
            )
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or n < 2:
            raise WeightsError(
                f"{path.name!r} is not a safetensors file: it starts like {_describe_magic(head)} (its first 8 bytes "
                f"would announce a {n}-byte header). Only .safetensors weights are supported; convert or re-download."
            )
        if 8 + n > size:
            raise TruncatedFileError(
                f"{path.name!r} is truncated or not a safetensors file: the header length is {n} bytes but the file "
                f"has only {size - 8} bytes after it. Re-download the file."
            )
        raw = f.read(n)
    try:
        meta = json.loads(raw.decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightsError(
            f"{path.name!r} is not a valid safetensors file: its header is not JSON ({e}). "
            f"The file starts like {_describe_magic(head)}. Re-download or convert it to safetensors."
        ) from None
    out: Header = {}
    data_end = 0
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise WeightsError(
                f"{path.name!r} has a malformed safetensors header entry for {name!r}: {info!r}. Re-download the file."
            ) from None
        if dtype not in _DTYPE_BITS:
            raise WeightsError(
                f"{path.name!r}: tensor {name!r} has the dtype {dtype!r}, which safetensors does not define (known: "
                f"{', '.join(_DTYPE_BITS)}). The file is corrupt or not safetensors: re-download it."
            )
        if not 0 <= start <= end or (end - start) * 8 != math.prod(shape) * _DTYPE_BITS[dtype]:
            raise WeightsError(
                f"{path.name!r}: tensor {name!r} has data offsets {[start, end]} that do not fit its shape "
                f"{list(shape)} and dtype {dtype}. The file is corrupt: re-download it."
            )
        out[name] = (dtype, shape)
        data_end = max(data_end, int(end))
    if 8 + n + data_end > size:
        raise TruncatedFileError(
            f"{path.name!r} is truncated: its tensors need {8 + n + data_end} bytes but the file has {size}. "
            "The download was interrupted: delete it and download again."
        )
    return out


def require_safetensors(path: Path, what: str, use: str) -> Path:
    """`path` if it is an existing .safetensors file; else MissingFilesError / WeightsError naming `what` to load
    and `use`, the file to pick instead."""
    if not path.is_file():
        raise MissingFilesError(f"{what}: {path} does not exist. Check the path or download it. {use}")
    if path.suffix != ".safetensors":
        raise WeightsError(
            f"{what}: {path.name} is not a .safetensors file. Only safetensors weights are supported (a pickled "
            f".pt/.bin/.ckpt file can run code when loaded, so only safetensors files are read). {use}"
        )
    return path


def _unreadable(path: Path, what: str, err: Exception) -> WeightsError:
    return WeightsError(
        f"{what}: cannot read {path} as safetensors ({err}). The file is truncated or not safetensors: "
        "download it again (only .safetensors weights are supported)."
    )


@contextmanager
def open_safetensors(path: str | Path, what: str, device: str = "cpu") -> Iterator[Any]:
    """`safetensors.safe_open` (torch tensors), with WeightsError saying what was being loaded if it fails."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(Path(path), what, e) from e
    try:
        with handle as f:
            yield f
    except SafetensorError as e:
        raise _unreadable(Path(path), what, e) from e


def load_safetensors(path: str | Path, what: str) -> dict[str, Tensor]:
    """Every tensor of a safetensors file on the CPU, with WeightsError if it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(Path(path), what, e) from e


DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # a diffusers model folder's weights


def diffusers_folder(
    path: Path, what: str, class_name: str, use: str, *, require_config: bool = False
) -> tuple[Path, dict[str, Any] | None]:
    """(weights file, config.json as a dict or None) of a diffusers model folder, or of its `vae/` subfolder when
    `path` is the repository root. The config must describe `class_name`; `use` says what to download instead."""
    if not (path / "config.json").is_file() and (path / "vae").is_dir():
        path = path / "vae"
    config_file, weights = path / "config.json", path / DIFFUSERS_WEIGHTS_NAME
    if not weights.is_file() or (require_config and not config_file.is_file()):
        needed = f"config.json and {DIFFUSERS_WEIGHTS_NAME}" if require_config else DIFFUSERS_WEIGHTS_NAME
        found = sorted(p.name for p in path.iterdir())[:10]
        raise MissingFilesError(
            f"{what}: the folder {path} needs {needed} (found: {found or 'nothing'}). Only safetensors weights are "
            f"loaded. {use}"
        )
    if not config_file.is_file():
        return weights, None
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"{what}: cannot read {config_file}: {err}. Download the folder again.") from err
    found_class = raw.get("_class_name", class_name)
    if found_class != class_name:
        raise WeightsError(f"{what}: {config_file} describes a {found_class}, not the {what} ({class_name}). {use}")
    return weights, raw


def read_weights(
    path: Path, what: str, use: str, *, diffusers_class: str, require_config: bool = False
) -> tuple[Path, dict[str, Any] | None, dict[str, Tensor]]:
    """(file, its folder's config.json or None, its tensors) for a model given as a .safetensors file or a diffusers
    folder (see `diffusers_folder`)."""
    path = Path(path)
    if path.is_dir():
        file, config = diffusers_folder(path, what, diffusers_class, use, require_config=require_config)
    else:
        file, config = require_safetensors(path, what, use), None
    return file, config, load_safetensors(file, what)


# ---------------------------------------------------------------------------------------------------------------------
# Key prefixes and shapes.


def split_prefix(names: Iterable[str], prefixes: Iterable[str], markers: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """(prefix, {stripped name: name}) for the first of `prefixes` that some name carries in front of one of
    `markers` (the start of a name the model has); ("", every name as is) when none does. Names without the prefix
    (other models saved in the same checkpoint) are left out."""
    names = list(names)
    for p in prefixes:
        if any(n.startswith(tuple(p + m for m in markers)) for n in names):
            return p, {n[len(p) :]: n for n in names if n.startswith(p)}
    return "", {n: n for n in names}


# Wrappers a VAE's names carry in full checkpoints and other tools' exports.
VAE_PREFIXES = ("vae.", "first_stage_model.", "ae.")


def strip_vae_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A VAE's tensors without the wrapper its names carry in a full checkpoint (`vae.`, `first_stage_model.`, ...)."""
    _, names = split_prefix(state, VAE_PREFIXES, ("decoder.", "encoder."))
    return {name: state[orig] for name, orig in names.items()}


def shape_of(value: Any) -> tuple[int, ...]:
    """The shape of a tensor, a header entry (dtype, shape) or a plain shape."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return tuple(value[1])
    if hasattr(value, "shape"):
        return tuple(value.shape)
    return tuple(value)


def shapes_of(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: shape_of(v) for k, v in tensors.items()}


@dataclass(frozen=True)
class ShapeDiff:
    """How a file's tensors differ from a model's: names it lacks, names the model lacks, and 'name (file shape) !=
    (model shape)' for the rest."""

    missing: list[str]
    unexpected: list[str]
    wrong: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong)


def compare_shapes(expected: Mapping[str, Any], found: Mapping[str, Any]) -> ShapeDiff:
    """Names sorted; mis-shaped tensors in the model's order."""
    want, have = shapes_of(expected), shapes_of(found)
    return ShapeDiff(
        missing=sorted(set(want) - set(have)),
        unexpected=sorted(set(have) - set(want)),
        wrong=[f"{k} {have[k]} != {shape}" for k, shape in want.items() if k in have and have[k] != shape],
    )


def listing(items: Iterable[str], limit: int = 8) -> str:
    """At most `limit` items for a message, and how many there are in all when that is more."""
    items = list(items)
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown + (f" ... ({len(items)} in all)" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------------------------------
# Dtypes and fp8.

FP8_DTYPE = torch.float8_e4m3fn
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")  # the ComfyUI quantisation formats we dequantise
# ComfyUI's tensors and markers beside quantised weights: older scaled fp8 (`scaled_fp8`, `<layer>.scale_weight`,
# `.scale_input`) and its mixed-precision quantisation (`.weight_scale`, `.input_scale`, `.comfy_quant`, ...).
QUANT_SUFFIXES = (
    ".scale_weight",
    ".scale_input",
    ".weight_scale",
    ".input_scale",
    ".comfy_quant",
    ".weight_scale_2",
    ".pre_quant_scale",
)
SCALED_FP8_MARKER = "scaled_fp8"


def is_quant_aux(name: str) -> bool:
    """A scale or marker that travels with quantised weights, not a weight of the model."""
    return name.endswith(QUANT_SUFFIXES) or name.endswith(SCALED_FP8_MARKER)


def quantised_layers(handle: Any) -> dict[str, str]:
    """{layer: format} of the quantised layers in an open safetensors file, from ComfyUI's three ways of saying it:
    `<layer>.comfy_quant` tensors, the `_quantization_metadata` header entry, and the older `scaled_fp8` marker
    with `<layer>.scale_weight` scales (float8_e4m3fn)."""
    formats: dict[str, str] = {}
    keys = list(handle.keys())
    for key in keys:
        if key.endswith(".comfy_quant"):
            conf = json.loads(bytes(handle.get_tensor(key).tolist()).decode("utf-8"))
            formats[key[: -len(".comfy_quant")]] = conf.get("format", "?")
    metadata = handle.metadata() or {}
    if "_quantization_metadata" in metadata:
        for layer, conf in json.loads(metadata["_quantization_metadata"]).get("layers", {}).items():
            formats[layer] = conf.get("format", "?")
    return formats


def scaled_fp8_layers(names: Iterable[str]) -> dict[str, str]:
    """{layer: "float8_e4m3fn"} for ComfyUI's older scaled fp8 (a `scaled_fp8` marker, `<layer>.scale_weight`)."""
    names = list(names)
    if not any(n.endswith(SCALED_FP8_MARKER) for n in names):
        return {}
    return {n[: -len(".scale_weight")]: "float8_e4m3fn" for n in names if n.endswith(".scale_weight")}


def scale_name(layer: str, names: Mapping[str, Any] | set[str]) -> str | None:
    """The name of a quantised layer's weight scale in `names` (ComfyUI's new or old spelling), if any."""
    return next((k for k in (f"{layer}.weight_scale", f"{layer}.scale_weight") if k in names), None)


def dequantize(weight: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """fp8 weight * its scale in float32, then `dtype` (per-tensor or per-output-channel scales); a weight without
    a scale is only cast."""
    if scale is None:
        return weight.to(dtype)
    scale = scale.to(device=weight.device, dtype=torch.float32)
    if scale.numel() > 1:
        scale = scale.reshape(-1, *([1] * (weight.ndim - 1)))
    return (weight.to(torch.float32) * scale).to(dtype)


def to_scaled_fp8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(float8_e4m3fn weight / scale, float32 0-dim scale) with the tensor's largest magnitude at float8's largest
    finite value: a plain cast flushes typical weights (std ~0.01, many below float8's smallest normal 2**-6) into
    its coarse subnormal range (5.7% output error at std 0.01)."""
    amax = weight.abs().max().float()
    scale = (amax / torch.finfo(FP8_DTYPE).max).clamp(min=torch.finfo(torch.float32).tiny)
    return (weight.float() / scale).to(FP8_DTYPE), scale


def cast_state(state: Mapping[str, Tensor], dtype: torch.dtype, device: torch.device | str) -> dict[str, Tensor]:
    """Floating-point tensors to `dtype` on `device`; other tensors (ids, masks) keep their dtype."""
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------------------------
# What is this file?


@dataclass(frozen=True)
class Guess:
    """What a weights file most likely is: `kind` (dit, lora, other_dit, video_vae, image_vae, text_encoder, clip,
    unknown, empty), `text` (a noun phrase for messages: "a CLIP text encoder") and `use` (where it belongs)."""

    kind: str
    text: str
    use: str = ""


_VAE_WRAPPERS = re.compile(r"^(first_stage_model|vae|autoencoder|ae)\.")
_LLM = re.compile(r"(model\.)?(language_model\.)?(layers\.\d+|embed_tokens)")
_LORA = re.compile(r"lora_[AB]|lora_(up|down)|\.alpha$|lora\.")


def what_is_it(tensors: Mapping[str, Any]) -> Guess:
    """A guess from tensor names and shapes (tensors, header entries or shapes) at what a file is."""
    shapes = shapes_of(tensors)
    names = list(shapes)
    joined = "\n".join(names[:5000])
    if not names:
        return Guess("empty", "an empty safetensors file (no tensors)")
    if any(_LORA.search(n) for n in names):
        return Guess(
            "lora", "a LoRA (low-rank adapter), not a full model", "load it with a LoRA loader on top of the DiT"
        )
    if any(s in joined for s in ("visual_transformer_blocks.", "text_transformer_blocks.", "time_embeddings.")):
        return Guess("dit", "a Kandinsky 5 DiT", "load it with the Kandinsky 5 model loader")
    if any(n.startswith(("double_blocks.", "single_blocks.")) for n in names):
        return Guess("other_dit", "a FLUX-style DiT, not a Kandinsky 5 model")
    if any(n.startswith(("blocks.", "transformer_blocks.")) for n in names):
        return Guess(
            "other_dit", "a diffusion transformer of another family (e.g. Wan or HunyuanVideo), not Kandinsky 5"
        )
    if "transformer.resblocks." in joined:
        return Guess(
            "clip", "an OpenCLIP-format CLIP (not read here: use the Hugging Face or ComfyUI clip_l.safetensors)"
        )
    if "encoder.block.0.layer.0.SelfAttention" in joined:
        return Guess("text_encoder", "a T5 encoder")
    vae = {_VAE_WRAPPERS.sub("", n): s for n, s in shapes.items()}
    if any(n.startswith(("encoder.", "decoder.")) for n in vae):
        if any(n.startswith(("decoder.upsamples", "decoder.middle")) for n in vae):
            return Guess("video_vae", "a Wan video VAE", "load it as the VAE")
        conv_in = vae.get("decoder.conv_in.conv.weight") or vae.get("decoder.conv_in.weight") or ()
        if any(len(s) == 5 for s in vae.values()):
            if len(conv_in) == 5 and conv_in[1] != 16:
                text = (
                    f"a 3D video VAE with {conv_in[1]} latent channels (e.g. HunyuanVideo 1.5), not HunyuanVideo's 16"
                )
                return Guess("video_vae", text, "load it as the VAE")
            return Guess("video_vae", "a video VAE (3D convolutions, e.g. the HunyuanVideo VAE)", "load it as the VAE")
        channels = f" with {conv_in[1]} latent channels" if len(conv_in) == 4 else ""
        return Guess("image_vae", f"an image VAE (2D convolutions, e.g. the FLUX VAE){channels}", "load it as the VAE")
    if any(_LLM.match(n) for n in names) or any(
        n.startswith(("visual.blocks", "model.visual.", "lm_head")) for n in names
    ):
        return Guess(
            "text_encoder",
            "a Qwen / LLM text encoder (model.layers.*, embed_tokens)",
            "load it as the text encoder (Qwen2.5-VL)",
        )
    if any(n.startswith(("text_model.", "vision_model.")) or ".text_model." in n for n in names):
        return Guess("clip", "a CLIP text encoder", "load it as the CLIP text encoder")
    return Guess("unknown", "an unknown model")
