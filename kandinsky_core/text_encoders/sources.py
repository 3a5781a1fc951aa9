"""A text encoder's safetensors file(s): which file holds each tensor (HF sharded folders or single files), which
layers are fp8-quantised, reading tensors dequantised, and strict checks against the model being loaded.

What every weights reader shares (headers, fp8 scales, "what is this file") is in kandinsky_core/weights.py.
"""

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import MissingFilesError, WeightsError
from ..weights import (
    FP8_FORMATS,
    compare_shapes,
    dequantize,
    is_quant_aux,
    open_safetensors,
    quantised_layers,
    read_safetensors_header,
    require_safetensors,
    scale_name,
    scaled_fp8_layers,
    what_is_it,
)

_USE = "Use the .safetensors release of this model."


@dataclass
class Source:
    """One model's safetensors file(s): tensor name -> file and shape, plus per-layer quantisation formats."""

    path: Path
    what: str
    files: dict[str, Path] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)


def _safetensors_files(path: Path, what: str) -> list[Path]:
    if not path.is_dir():
        return [require_safetensors(path, what, _USE)]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        folder = path.resolve()
        outside = sorted({n for n in weight_map.values() if not (folder / n).resolve().is_relative_to(folder)})
        if outside:
            raise WeightsError(
                f"{what}: {indexes[0]} names shards outside its folder ({', '.join(map(repr, outside))}); only "
                f"files inside {path} are read. Put the shards in that folder and list them by file name."
            )
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MissingFilesError(
                f"{what}: {indexes[0]} lists shards that are not in {path}: {', '.join(missing)}. "
                "Finish the download of that folder (all model-0000x-of-0000y.safetensors files)."
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MissingFilesError(
            f"{what}: the folder {path} holds no .safetensors file. Put the model's safetensors weights "
            "there (Hugging Face layout) or pass the single .safetensors file instead."
        )
    return files


def check_weight_files(path: str | os.PathLike, what: str) -> list[Path]:
    """The safetensors files a text encoder's file or folder holds, checked without reading any weights: the
    index's shards exist and lie inside the folder. MissingFilesError / WeightsError name the fault and the fix."""
    return _safetensors_files(Path(path), what)


def scan(path: str | os.PathLike, what: str) -> Source:
    """Every tensor's file and shape (from the headers) and the quantised layers of a text encoder's file(s)."""
    path = Path(path)
    source = Source(path=path, what=what)
    for file in _safetensors_files(path, what):
        for key, (_, shape) in read_safetensors_header(file).items():
            source.files[key] = file
            source.shapes[key] = shape
        with open_safetensors(file, what) as f:
            source.formats.update(quantised_layers(f))
    for layer, fmt in scaled_fp8_layers(source.files).items():
        source.formats.setdefault(layer, fmt)
    unsupported = sorted({fmt for fmt in source.formats.values() if fmt not in FP8_FORMATS})
    if unsupported:
        raise WeightsError(
            f"{what}: {path} is quantised as {', '.join(unsupported)}, which this loader does not read. "
            "Allowed: bf16/fp16/fp32 weights or ComfyUI fp8 scaled (float8_e4m3fn / float8_e5m2 per-tensor scales). "
            "Use qwen_2.5_vl_7b.safetensors or qwen_2.5_vl_7b_fp8_scaled.safetensors."
        )
    return source


def load_tensors(source: Source, names: dict[str, str], dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """Reads the tensors `names` (file key -> model key), dequantising fp8 and casting floats to `dtype`."""
    by_file: dict[Path, list[str]] = {}
    for key in names:
        by_file.setdefault(source.files[key], []).append(key)
    state = {}
    for file, keys in by_file.items():
        with open_safetensors(file, source.what) as f:
            for key in keys:
                tensor = f.get_tensor(key).to(device)
                layer = key.rsplit(".", 1)[0]
                scale = None
                scale_key = scale_name(layer, source.files) if key.endswith(".weight") else None
                if scale_key is not None and layer in source.formats:
                    if source.files[scale_key] == file:
                        scale = f.get_tensor(scale_key)
                    else:
                        with open_safetensors(source.files[scale_key], source.what) as g:
                            scale = g.get_tensor(scale_key)
                if tensor.is_floating_point():
                    tensor = dequantize(tensor, scale, dtype)
                state[names[key]] = tensor
    return state


def wrong_file(source: Source, expected: str) -> WeightsError:
    keys = sorted(k for k in source.files if not is_quant_aux(k))
    guess = what_is_it({k: source.shapes[k] for k in keys})
    return WeightsError(
        f"{source.what}: {source.path} is {guess.text}, not {expected} (found keys like {', '.join(keys[:3])}). "
        f"Pick {expected} instead (Qwen2.5-VL-7B for qwen_name, CLIP ViT-L/14 for clip_name)."
    )


def select(names: dict[str, str], prefix: str) -> dict[str, str]:
    return {k: v[len(prefix) :] for k, v in names.items() if v.startswith(prefix)}


def check_complete(what: str, source: Source, module: torch.nn.Module, state: dict[str, Tensor]) -> None:
    expected = module.state_dict()
    diff = compare_shapes(expected, state)
    if diff.missing:
        raise WeightsError(
            f"{what}: {source.path} lacks {len(diff.missing)} of the {len(expected)} tensors the model needs "
            f"(e.g. {', '.join(diff.missing[:4])}). The file is incomplete or a different model: download it again."
        )
    if diff.unexpected:
        raise WeightsError(
            f"{what}: {source.path} holds tensors this architecture does not have (e.g. "
            f"{', '.join(diff.unexpected[:4])}): it is a different model or size. Use the file named in the variant's "
            "requirements."
        )
    if diff.wrong:
        raise WeightsError(
            f"{what}: {source.path} has tensors of other shapes than the model expects ({diff.wrong[0]}): it is a "
            "different model size. Use the file named in the variant's requirements."
        )


@contextmanager
def empty_init(dtype: torch.dtype) -> Iterator[None]:
    """Build modules without initialising weights (they are replaced at load), in `dtype`."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            yield
    finally:
        torch.set_default_dtype(previous)
