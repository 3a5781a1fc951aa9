"""Text encoders: Qwen2.5-VL-7B (last hidden state under the official prompt templates) and CLIP ViT-L/14 (pooled).

Both are built with transformers from configs shipped here and loaded from safetensors in any layout users have:
the official Hugging Face folders (`text_encoder/` sharded Qwen, `text_encoder2/` full CLIP) and ComfyUI's single
files (`qwen_2.5_vl_7b.safetensors`, `qwen_2.5_vl_7b_fp8_scaled.safetensors`, `clip_l.safetensors`).
The Qwen vision tower and LM head are read from disk only when an image must be seen or a prompt expanded.
"""

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from .errors import InputError, KandinskyError, MissingFilesError, WeightsError
from .sampling import TextConditioning

log = logging.getLogger(__name__)

CONTENT_KINDS = ("video", "image2video", "image", "image_edit")
CLIP_MAX_LENGTH = 77

# Official Qwen2.5-VL prompt templates (text_embedders.py PROMPT_TEMPLATE), verbatim: their spelling
# ("promt", "scren") is what the DiT was trained with. Lines are joined with "\n".
PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "video": (
        "<|im_start|>system\nYou are a promt engineer. Describe the video in detail.",
        ("Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects."),
        "Describe the location of the video, main characters or objects and their action.",
        "Describe the dynamism of the video and presented actions.",
        (
            "Name the visual style of the video: whether it is a professional footage, user generated "
            "content, some kind of animation, video game or scren content."
        ),
        "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
        "Pay attention to the order of key actions shown in the scene.<|im_end|>",
        "<|im_start|>user\n{}<|im_end|>",
    ),
    "image2video": (
        (
            "<|im_start|>system\nYou are a promt engineer. Your task is to create a highly detailed and "
            "effective video description based on a provided input image."
        ),
        ("Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects."),
        "Describe main characters actions.",
        "Describe the dynamism of the video and presented actions.",
        (
            "Name the visual style of the video: whether it is a professional footage, user generated "
            "content, some kind of animation, video game or scren content."
        ),
        "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
        "Pay attention to the order of key actions shown in the scene.<|im_end|>",
        "<|im_start|>user\n{}<|im_end|>",
    ),
    "image": (
        (
            "<|im_start|>system\nYou are a promt engineer. Describe the image by detailing the color, shape, "
            "size, texture, quantity, text, spatial relationships of the objects and background:<|im_end|>"
        ),
        "<|im_start|>user\n{}<|im_end|>",
    ),
    "image_edit": (
        (
            "<|im_start|>system\nYou are a promt engineer. Based on the provided source image (first image) "
            "and target image (second image), create an interesting text prompt that can be used together "
            "with the source image to create the target image:<|im_end|>"
        ),
        "<|im_start|>user\n{}",
    ),
}

_EXPAND_VIDEO = (
    "You are a prompt beautifier that transforms short user video descriptions into rich, detailed "
    "English prompts specifically optimized for video generation models.\n"
    "        Here are some example descriptions from the dataset that the model was trained:\n"
    '        1. "In a dimly lit room with a cluttered background, papers are pinned to the wall and '
    "various objects rest on a desk. Three men stand present: one wearing a red sweater, another in "
    "a black sweater, and the third in a gray shirt. The man in the gray shirt speaks and makes hand "
    "gestures, while the other two men look forward. The camera remains stationary, focusing on the "
    "three men throughout the sequence. A gritty and realistic visual style prevails, marked by a "
    "greenish tint that contributes to a moody atmosphere. Low lighting casts shadows, enhancing the "
    'tense mood of the scene."\n'
    '        2. "In an office setting, a man sits at a desk wearing a gray sweater and seated in a '
    "black office chair. A wooden cabinet with framed pictures stands beside him, alongside a small "
    "plant and a lit desk lamp. Engaged in a conversation, he makes various hand gestures to "
    "emphasize his points. His hands move in different positions, indicating different ideas or "
    "points. The camera remains stationary, focusing on the man throughout. Warm lighting creates a "
    "cozy atmosphere. The man appears to be explaining something. The overall visual style is "
    'professional and polished, suitable for a business or educational context."\n'
    '        3. "A person works on a wooden object resembling a sunburst pattern, holding it in '
    "their left hand while using their right hand to insert a thin wire into the gaps between the "
    "wooden pieces. The background features a natural outdoor setting with greenery and a tree trunk "
    "visible. The camera stays focused on the hands and the wooden object throughout, capturing the "
    "detailed process of assembling the wooden structure. The person carefully threads the wire "
    "through the gaps, ensuring the wooden pieces are securely fastened together. The scene unfolds "
    "with a naturalistic and instructional style, emphasizing the craftsmanship and the methodical "
    'steps taken to complete the task."\n'
    "        IImportantly! These are just examples from a large training dataset of 200 million "
    "videos.\n"
    '        Rewrite Prompt: "{prompt}" to get high-quality video generation. Answer only with '
    "expanded prompt."
)

_EXPAND_IMAGE2VIDEO = (
    "You are a prompt beautifier that transforms short user video descriptions into rich, detailed "
    "English prompts specifically optimized for video generation models.\n"
    "    Here are some example descriptions from the dataset that the model was trained:\n"
    '    1. "Create a video showing a nighttime urban driving scene from inside a car. The driver is '
    "focused on the road ahead, with the city lights visible through the windshield. The GPS device "
    "on the dashboard continues to display navigation information. The camera remains steady, "
    "capturing the interior of the car and the changing street view outside as the vehicle moves "
    "forward. The background shifts slightly to show different parts of the cityscape, including "
    'illuminated buildings and street signs."\n'
    '    2. "Create a video where the character, dressed in historical attire, is seen holding an '
    "umbrella with a logo. The character should move closer to the camera while maintaining a steady "
    "pace, keeping the umbrella raised. The background remains consistent with a foggy, outdoor "
    "setting, but the focus shifts more towards the character as they approach. The lighting should "
    'emphasize the details of the costume and the umbrella, enhancing the dramatic effect."\n'
    '    3. "Darken the scene while keeping the characters and setting unchanged, emphasizing a '
    'serious atmosphere."\n'
    "    IImportantly! These are just examples from a large training dataset of 20 mln videos.\n"
    '    Rewrite Prompt: "{prompt}" to get high-quality image to video generation from this image. '
    "Pay main attention to information about changes of objects.\n"
    "    Make prompt dynamic. Answer only with expanded prompt."
)

_EXPAND_IMAGE = (
    "Rewrite and enhance the original prompt with richer detail, clearer structure, and improved "
    "descriptive quality. Expand the scene, atmosphere, and context while preserving the user’s "
    "intent. When adding text that should appear inside an image, place that text inside double "
    "quotes and in capital letters. Strengthen visual clarity, style, and specificity, but do not "
    "change the meaning. Output only the enhanced prompt, written in polished, vivid language "
    "suitable for high-quality image generation.\n"
    "        example:\n"
    "        Original text: white mini police car with blue stripes, with 911 and 'Police' text \n"
    "        Result: A miniature model car simulating the official transport of the relevant "
    'authorities. The body is white with blue stripes. The word "911" is written in large blue '
    'letters on the hood and side. Below it, "POLICE" is used in a font. The windows are '
    "transparent, and the interior has black seats. The headlights have plastic lenses, and the roof "
    "has blue and red beacons. The radiator grille has vertical slots. The wheels are black with "
    "white rims. The doors are closed, the windows have black frames. The background is uniform "
    "white.\n"
    "        Here 911 in double quotes because it is text on image, 'Police' -> \"POLICE\" because it "
    "should be in double quotes and capital letters.\n"
    '        Rewrite Prompt: "{prompt}". Answer only with expanded prompt.'
)

_EXPAND_IMAGE_EDIT = (
    "Rewrite and enhance the original editing instruction with richer detail, clearer structure, and "
    "improved descriptive quality. When adding text that should appear inside an image, place that "
    "text inside double quotes and in capital letters. Explain what needs to be changed and what "
    "needs to be left unchanged. Explain in details how to change  camera potision or tell that "
    "camera position shouldn't be changed.\n"
    "example:\n"
    "Original text: add text 911 and 'Police' \n"
    'Result: Add the word "911" in large blue letters to the hood. Below that, add the word '
    '"POLICE." Keep the camera position unchanged, as do the background, car position, and lighting.\n'
    'Rewrite Prompt: "{prompt}". Answer only with expanded prompt.'
)

# Prompt-expansion instructions, verbatim from the official pipelines (t2v, i2v, t2i, i2i); `{prompt}` is the user's.
EXPAND_INSTRUCTIONS: dict[str, str] = {
    "video": _EXPAND_VIDEO,
    "image2video": _EXPAND_IMAGE2VIDEO,
    "image": _EXPAND_IMAGE,
    "image_edit": _EXPAND_IMAGE_EDIT,
}

# Tokens the official code crops from the front of the hidden states. For video, image2video and image this is the
# template prefix (everything before the prompt) under the real Qwen tokenizer; image_edit crops 3 more tokens than
# its 52-token prefix, as the official code does.
OFFICIAL_CROP_START = {"video": 129, "image2video": 132, "image": 41, "image_edit": 55}
_OFFICIAL_PREFIX_TOKENS = {"video": 129, "image2video": 132, "image": 41, "image_edit": 52}
_QWEN_REAL_VOCAB = 151643  # tokenizers at least this large are the real Qwen2.5 one

_IMAGE_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"

# Qwen/Qwen2.5-VL-7B-Instruct config.json (the weights' architecture; nothing is fetched to build the model).
QWEN25_VL_7B_CONFIG: dict = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}

# openai/clip-vit-large-patch14 text_config. eos_token_id 2 keeps transformers' original pooling (argmax of ids).
CLIP_L_TEXT_CONFIG: dict = {
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# Qwen2.5-VL-7B-Instruct preprocessor_config.json: what its image processor does to a picture.
QWEN_IMAGE_PROCESSING = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": (0.48145466, 0.4578275, 0.40821073),
    "image_std": (0.26862954, 0.26130258, 0.27577711),
}

# Qwen2.5-VL-7B-Instruct generation_config.json sampling settings, used by the official `generate` calls.
# top_k=1 makes the sampling greedy in effect; the seed still drives torch's sampler for exact repeatability.
QWEN_GENERATION = {"do_sample": True, "top_k": 1, "top_p": 0.001, "temperature": 0.1, "repetition_penalty": 1.05}

_QWEN_TOKENIZER_FILES = ("tokenizer.json or vocab.json + merges.txt", "tokenizer_config.json")
_CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json (optional)")
_HF_QWEN_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"
_HF_CLIP_REPO = "openai/clip-vit-large-patch14"


# ---------------------------------------------------------------------------------------------------------------------
# Safetensors sources: which file holds each tensor, and ComfyUI's fp8 quantisation markers.

_QUANT_SUFFIXES = (
    ".scale_weight",
    ".scale_input",
    ".weight_scale",
    ".input_scale",
    ".comfy_quant",
    ".weight_scale_2",
    ".pre_quant_scale",
)
_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")


@dataclass
class _Source:
    """One model's safetensors file(s): tensor name -> file, plus per-layer quantisation formats."""

    path: Path
    files: dict[str, Path]
    formats: dict[str, str] = field(default_factory=dict)


@contextmanager
def _open(file: Path) -> Iterator:
    from safetensors import safe_open

    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:
        raise WeightsError(
            f"{file} cannot be read as a safetensors file ({e}). It is truncated or not safetensors: "
            "download it again (only .safetensors weights are supported)."
        ) from e
    with handle as f:
        yield f


def _safetensors_files(path: Path, what: str) -> list[Path]:
    if path.is_dir():
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
    if not path.is_file():
        raise MissingFilesError(f"{what}: {path} does not exist. Check the path or download the file.")
    if not path.name.endswith(".safetensors"):
        raise WeightsError(
            f"{what}: {path} is not a .safetensors file. Only safetensors weights are supported: "
            "use the .safetensors release of this model."
        )
    return [path]


def check_weight_files(path: str | os.PathLike, what: str) -> list[Path]:
    """The safetensors files a text encoder's file or folder holds, checked without reading any weights: the
    index's shards exist and lie inside the folder. MissingFilesError / WeightsError name the fault and the fix."""
    return _safetensors_files(Path(path), what)


def _scan(path: str | os.PathLike, what: str) -> _Source:
    path = Path(path)
    source = _Source(path=path, files={})
    for file in _safetensors_files(path, what):
        with _open(file) as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                source.files[key] = file
                if key.endswith(".comfy_quant"):
                    conf = json.loads(bytes(f.get_tensor(key).tolist()).decode("utf-8"))
                    source.formats[key[: -len(".comfy_quant")]] = conf.get("format", "?")
        if "_quantization_metadata" in metadata:
            for layer, conf in json.loads(metadata["_quantization_metadata"]).get("layers", {}).items():
                source.formats[layer] = conf.get("format", "?")
    if any(key.endswith("scaled_fp8") for key in source.files):
        # Older ComfyUI scaled fp8: a `scaled_fp8` marker and `<layer>.scale_weight` per-tensor scales.
        for key in source.files:
            if key.endswith(".scale_weight"):
                source.formats.setdefault(key[: -len(".scale_weight")], "float8_e4m3fn")
    unsupported = sorted({fmt for fmt in source.formats.values() if fmt not in _FP8_FORMATS})
    if unsupported:
        raise WeightsError(
            f"{what}: {path} is quantised as {', '.join(unsupported)}, which this loader does not read. "
            "Allowed: bf16/fp16/fp32 weights or ComfyUI fp8 scaled (float8_e4m3fn / float8_e5m2 per-tensor scales). "
            "Use qwen_2.5_vl_7b.safetensors or qwen_2.5_vl_7b_fp8_scaled.safetensors."
        )
    return source


def _is_aux(key: str) -> bool:
    return key.endswith(_QUANT_SUFFIXES) or key.endswith("scaled_fp8")


def _dequantize(weight: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """fp8 weight * its scale in float32, then the compute dtype (per-tensor or per-output-channel scales)."""
    if scale is None:
        return weight.to(dtype)
    scale = scale.to(device=weight.device, dtype=torch.float32)
    if scale.numel() > 1:
        scale = scale.reshape(-1, *([1] * (weight.ndim - 1)))
    return (weight.to(torch.float32) * scale).to(dtype)


def _load(source: _Source, names: dict[str, str], dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """Reads the tensors `names` (file key -> model key), dequantising fp8 and casting floats to `dtype`."""
    by_file: dict[Path, list[str]] = {}
    for key in names:
        by_file.setdefault(source.files[key], []).append(key)
    state = {}
    for file, keys in by_file.items():
        with _open(file) as f:
            for key in keys:
                tensor = f.get_tensor(key).to(device)
                layer = key.rsplit(".", 1)[0]
                scale = None
                if key.endswith(".weight") and layer in source.formats:
                    scale_key = next(
                        (k for k in (f"{layer}.weight_scale", f"{layer}.scale_weight") if k in source.files), None
                    )
                    if scale_key is not None and source.files[scale_key] == file:
                        scale = f.get_tensor(scale_key)
                    elif scale_key is not None:
                        with _open(source.files[scale_key]) as g:
                            scale = g.get_tensor(scale_key)
                if tensor.is_floating_point():
                    tensor = _dequantize(tensor, scale, dtype)
                state[names[key]] = tensor
    return state


def _describe(keys: Sequence[str]) -> str:
    """A guess at what a wrong file is, for error messages."""
    joined = " ".join(keys[:2000])
    if "transformer.resblocks." in joined:
        return "an OpenCLIP-format CLIP (not read here: use the Hugging Face or ComfyUI clip_l.safetensors)"
    if "text_model.encoder.layers." in joined:
        return "a CLIP text encoder"
    if "visual_transformer_blocks." in joined or "text_transformer_blocks." in joined:
        return "a Kandinsky 5 DiT"
    if "decoder.up_blocks." in joined or "decoder.conv_in." in joined or "encoder.down_blocks." in joined:
        return "a VAE"
    if "layers.0.self_attn.q_proj.weight" in joined:
        return "a different language model"
    if "encoder.block.0.layer.0.SelfAttention" in joined:
        return "a T5 encoder"
    return "not a known text encoder"


def _wrong_file(what: str, source: _Source, expected: str) -> WeightsError:
    keys = sorted(k for k in source.files if not _is_aux(k))
    return WeightsError(
        f"{what}: {source.path} is {_describe(keys)}, not {expected} (found keys like {', '.join(keys[:3])}). "
        f"Pick {expected} instead (Qwen2.5-VL-7B for qwen_name, CLIP ViT-L/14 for clip_name)."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Key layouts. Canonical names are transformers' own (model.language_model.*, model.visual.*, lm_head.weight).

_QWEN_PREFIXES = (
    ("model.language_model.", "model.language_model."),
    ("model.visual.", "model.visual."),
    ("model.lm_head.", "lm_head."),  # ComfyUI renames lm_head this way
    ("model.", "model.language_model."),  # official HF files and ComfyUI single files
    ("visual.", "model.visual."),
    ("lm_head.", "lm_head."),
)
_QWEN_MARKER = "model.language_model.layers.0.self_attn.k_proj.bias"


def _qwen_names(source: _Source) -> dict[str, str]:
    names = {}
    for key in source.files:
        if _is_aux(key):
            continue
        for old, new in _QWEN_PREFIXES:
            if key.startswith(old):
                names[key] = new + key[len(old) :]
                break
    return names


_CLIP_MARKER = "text_model.encoder.layers.0.mlp.fc1.weight"


def _clip_names(source: _Source) -> dict[str, str]:
    """HF CLIPModel / CLIPTextModel files and ComfyUI clip_l, with any checkpoint prefix before `text_model.`."""
    marker = next((k for k in source.files if k.endswith(_CLIP_MARKER)), None)
    if marker is None:
        return {}
    prefix = marker[: -len(_CLIP_MARKER)]
    names = {}
    for key in source.files:
        if key.startswith(prefix + "text_model.") and not _is_aux(key):
            name = key[len(prefix) :]
            if name != "text_model.embeddings.position_ids":  # a buffer some old saves contain
                names[key] = name
    return names


def _select(names: dict[str, str], prefix: str) -> dict[str, str]:
    return {k: v[len(prefix) :] for k, v in names.items() if v.startswith(prefix)}


def _check_complete(what: str, source: _Source, module: torch.nn.Module, state: dict[str, Tensor]) -> None:
    expected = set(module.state_dict().keys())
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing:
        raise WeightsError(
            f"{what}: {source.path} lacks {len(missing)} of the {len(expected)} tensors the model needs "
            f"(e.g. {', '.join(missing[:4])}). The file is incomplete or a different model: download it again."
        )
    if unexpected:
        raise WeightsError(
            f"{what}: {source.path} holds tensors this architecture does not have (e.g. {', '.join(unexpected[:4])}): "
            "it is a different model or size. Use the file named in the variant's requirements."
        )
    for name, param in module.state_dict().items():
        if tuple(param.shape) != tuple(state[name].shape):
            raise WeightsError(
                f"{what}: {source.path} has {name} of shape {tuple(state[name].shape)}, the model expects "
                f"{tuple(param.shape)}: it is a different model size. Use the file named in the variant's requirements."
            )


@contextmanager
def _empty_init(dtype: torch.dtype) -> Iterator[None]:
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


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers.


def _tokenizer_dirs(tokenizer_dir: str | os.PathLike | None, weights: Path, names: Sequence[str]) -> list[Path]:
    dirs = []
    if tokenizer_dir is not None:
        root = Path(tokenizer_dir)
        dirs += [root] + [root / name for name in names]
    if weights.is_dir():
        dirs += [weights, weights / "tokenizer"]
    return dirs


def _is_qwen_tokenizer_dir(d: Path) -> bool:
    has_files = (d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())
    if not has_files:
        return False
    config = d / "tokenizer_config.json"
    return (config.is_file() and "<|im_start|>" in config.read_text(encoding="utf-8")) or (
        (d / "tokenizer.json").is_file() and "<|im_start|>" in (d / "tokenizer.json").read_text(encoding="utf-8")
    )


def _is_clip_tokenizer_dir(d: Path) -> bool:
    vocab = d / "vocab.json"
    return vocab.is_file() and (d / "merges.txt").is_file() and "<|startoftext|>" in vocab.read_text(encoding="utf-8")


def _find_dir(candidates: list[Path], repo: str, patterns: list[str], accept) -> Path | None:
    """The first candidate folder `accept` takes, else the model's snapshot in the local Hugging Face cache."""
    for d in candidates:
        if accept(d):
            return d
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached (nothing is downloaded here)
        return None
    return cached if accept(cached) else None


def load_qwen_tokenizer(tokenizer_dir: str | os.PathLike | None = None, weights: str | os.PathLike = ""):
    """The Qwen2.5 tokenizer from `tokenizer_dir` (the folder itself, or ComfyUI's root or `comfy` folder), the
    weights folder, or the local Hugging Face cache."""
    from transformers import AutoTokenizer

    names = ("qwen25_tokenizer", "text_encoders/qwen25_tokenizer", "comfy/text_encoders/qwen25_tokenizer")
    candidates = _tokenizer_dirs(tokenizer_dir, Path(weights), names)
    found = _find_dir(candidates, _HF_QWEN_REPO, ["tokenizer*", "vocab.json", "merges.txt"], _is_qwen_tokenizer_dir)
    if found is None:
        raise MissingFilesError(
            f"No Qwen2.5-VL tokenizer found (looked in: {', '.join(map(str, candidates)) or 'nothing'} and the "
            f"Hugging Face cache). It needs {' and '.join(_QWEN_TOKENIZER_FILES)} from {_HF_QWEN_REPO}: put them in "
            "the text encoder's folder or models/text_encoders/qwen25_tokenizer (`python -m kandinsky_core download` "
            "fetches them), or pass tokenizer_dir (inside ComfyUI: its comfy/text_encoders/qwen25_tokenizer folder)."
        )
    tokenizer = _build_tokenizer(AutoTokenizer, found, "Qwen2.5-VL")
    tokenizer.padding_side = "right"
    return tokenizer


def _build_tokenizer(cls: Any, folder: Path, what: str) -> Any:
    """`cls.from_pretrained(folder)`, with a message naming the folder and the fix when its files are broken."""
    try:
        return cls.from_pretrained(str(folder))
    except Exception as e:  # transformers / tokenizers raise many types for broken files
        raise WeightsError(
            f"The {what} tokenizer in {folder} cannot be built ({type(e).__name__}: {str(e)[:300]}). Its files "
            "(tokenizer.json / vocab.json / merges.txt / tokenizer_config.json) are broken or incomplete: download "
            "them again."
        ) from e


def load_clip_tokenizer(tokenizer_dir: str | os.PathLike | None = None, weights: str | os.PathLike = ""):
    """The CLIP ViT-L/14 tokenizer, found like `load_qwen_tokenizer` (ComfyUI: comfy/sd1_tokenizer)."""
    from transformers import CLIPTokenizer

    names = ("sd1_tokenizer", "comfy/sd1_tokenizer")
    candidates = _tokenizer_dirs(tokenizer_dir, Path(weights), names)
    patterns = ["tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json"]
    found = _find_dir(candidates, _HF_CLIP_REPO, patterns, _is_clip_tokenizer_dir)
    if found is None:
        raise MissingFilesError(
            f"No CLIP tokenizer found (looked in: {', '.join(map(str, candidates)) or 'nothing'} and the Hugging "
            f"Face cache). It needs {', '.join(_CLIP_TOKENIZER_FILES)} from {_HF_CLIP_REPO}: put them in the CLIP "
            "folder or models/text_encoders/sd1_tokenizer (`python -m kandinsky_core download` fetches them), or pass "
            "tokenizer_dir (inside ComfyUI: its comfy/sd1_tokenizer folder)."
        )
    return _build_tokenizer(CLIPTokenizer, found, "CLIP")


# ---------------------------------------------------------------------------------------------------------------------
# Images for Qwen2.5-VL's vision tower (what its image processor does, in torch).


def _as_uint8(image: Tensor) -> Tensor:
    """`[3, H, W]` (or `[1, 3, H, W]`) in 0..1 float or 0..255 uint8 -> uint8 `[3, H, W]`."""
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[0] != 3:
        raise InputError(f"image of shape {tuple(image.shape)} is not allowed: pass [3, H, W] RGB (0..1 or uint8).")
    if image.dtype == torch.uint8:
        return image
    return (image.float().clamp(0, 1) * 255).round().to(torch.uint8)


def _resize(image: Tensor, height: int, width: int, mode: str) -> Tensor:
    """Antialiased resize of a uint8 image, rounded back to uint8 (torchvision's tensor resize)."""
    if (height, width) == tuple(image.shape[-2:]):
        return image
    out = torch.nn.functional.interpolate(image[None].float(), size=(height, width), mode=mode, antialias=True)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def _pil_quarter(image: Tensor) -> Tensor:
    """PIL's default (bicubic) resize to a quarter of each side, as the official i2i expansion does."""
    import numpy as np
    from PIL import Image

    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    pil = pil.resize((pil.width // 4, pil.height // 4), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def _smart_size(height: int, width: int) -> tuple[int, int]:
    """Qwen2-VL's resize target: multiples of patch*merge (28) with the pixel count inside [min, max]."""
    cfg = QWEN_IMAGE_PROCESSING
    factor = cfg["patch_size"] * cfg["merge_size"]
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"image of {width}x{height} is not allowed: the aspect ratio must be under 200.")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > cfg["max_pixels"]:
        beta = math.sqrt(height * width / cfg["max_pixels"])
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < cfg["min_pixels"]:
        beta = math.sqrt(cfg["min_pixels"] / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def qwen_image_patches(image: Tensor) -> tuple[Tensor, Tensor]:
    """uint8 `[3, H, W]` -> (pixel_values `[N, 3*2*14*14]` float32, image_grid_thw `[1, 3]`) for the vision tower."""
    cfg = QWEN_IMAGE_PROCESSING
    p, m, tp = cfg["patch_size"], cfg["merge_size"], cfg["temporal_patch_size"]
    image = _resize(image, *_smart_size(*image.shape[-2:]), mode="bicubic")
    mean = torch.tensor(cfg["image_mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["image_std"]).view(3, 1, 1)
    pixels = (image.float() / 255 - mean) / std
    frames = pixels[None].expand(tp, -1, -1, -1)  # a still image fills the temporal patch with copies
    patches = rearrange(
        frames, "(t tp) c (hb m1 p1) (wb m2 p2) -> (t hb wb m1 m2) (c tp p1 p2)", tp=tp, m1=m, m2=m, p1=p, p2=p
    )
    grid = torch.tensor([[1, image.shape[-2] // p, image.shape[-1] // p]])
    return patches.contiguous(), grid


def _expand_image_pads(text: str, grids: Sequence[Tensor]) -> str:
    """One `<|image_pad|>` per image becomes as many as the vision tower outputs for it (grid / merge^2)."""
    parts = text.split("<|image_pad|>")
    if len(parts) - 1 != len(grids):
        raise InputError(f"{len(parts) - 1} image placeholders but {len(grids)} images were given.")
    merge = QWEN_IMAGE_PROCESSING["merge_size"] ** 2
    out = parts[0]
    for grid, part in zip(grids, parts[1:], strict=True):
        out += "<|image_pad|>" * (int(grid.prod()) // merge) + part
    return out


def _chat(contents: Sequence[tuple[str, str]]) -> str:
    """Qwen2.5-VL's chat template for one user message (default system prompt) and the assistant's turn."""
    body = "".join(_IMAGE_TOKENS if kind == "image" else text for kind, text in contents)
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
    )


# ---------------------------------------------------------------------------------------------------------------------
# The encoders.


def _check_kind(content_kind: str) -> None:
    if content_kind not in CONTENT_KINDS:
        raise InputError(f"content_kind={content_kind!r} is not allowed: use one of {', '.join(CONTENT_KINDS)}.")


def crop_starts_for(tokenizer) -> dict[str, int]:
    """Official crop starts for the real Qwen tokenizer; for any other tokenizer (tests) the same crop relative to
    the template: its prefix tokens, plus the 3 extra tokens the official image_edit crop removes."""
    if len(tokenizer) >= _QWEN_REAL_VOCAB:
        return dict(OFFICIAL_CROP_START)
    starts = {}
    for kind in CONTENT_KINDS:
        prefix = "\n".join(PROMPT_TEMPLATES[kind]).split("{}")[0]
        extra = OFFICIAL_CROP_START[kind] - _OFFICIAL_PREFIX_TOKENS[kind]
        starts[kind] = len(tokenizer(prefix)["input_ids"]) + extra
    return starts


class TextEncoders:
    """Qwen2.5-VL (text path; vision tower and LM head loaded on first need) and CLIP-L, with their tokenizers."""

    def __init__(self, qwen, clip, qwen_tokenizer, clip_tokenizer, qwen_source: _Source, dtype: torch.dtype):
        self.qwen = qwen
        self.clip = clip
        self.qwen_tokenizer = qwen_tokenizer
        self.clip_tokenizer = clip_tokenizer
        self.qwen_source = qwen_source
        self.dtype = dtype
        self.crop_starts = crop_starts_for(qwen_tokenizer)
        self.generation = _generation_config(qwen_source.path)

    @property
    def device(self) -> torch.device:
        return self.qwen.model.language_model.embed_tokens.weight.device

    def to(self, device: torch.device | str) -> "TextEncoders":
        self.qwen.to(device)
        self.clip.to(device)
        return self

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], content_kind: str, max_length: int, images: Sequence[Tensor] | None = None
    ) -> TextConditioning:
        """Prompts -> Qwen hidden states after the template crop (+ mask) and CLIP pooled outputs.

        `max_length` is the variant's text_max_length (256 video, 512 image). `images` (image_edit only): one
        `[3, H, W]` image per prompt at the generation size; it is halved and read by the vision tower.
        The official pipelines use "video" for T2V and I2V alike ("image2video" is defined there but unused),
        "image" for T2I and I2I without an image, "image_edit" for I2I with one.
        """
        _check_kind(content_kind)
        if isinstance(prompts, str):
            prompts = [prompts]
        if images is not None and content_kind != "image_edit":
            raise InputError(f"images were given with content_kind={content_kind!r}: only image_edit reads images.")
        if images is not None and len(images) != len(prompts):
            raise InputError(f"{len(images)} images for {len(prompts)} prompts: give one image per prompt.")
        embeds, mask = self.encode_qwen(prompts, content_kind, max_length, images)
        return TextConditioning(text_embeds=embeds, text_mask=mask, pooled=self.encode_clip(prompts))

    @torch.no_grad()
    def encode_qwen(
        self, prompts: Sequence[str], content_kind: str, max_length: int, images: Sequence[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        template = "\n".join(PROMPT_TEMPLATES[content_kind])
        crop = self.crop_starts[content_kind]
        texts = [template.format(prompt) for prompt in prompts]
        device = self.device
        if content_kind == "image_edit" and images is not None:
            self._ensure_vision()
            pixels, grids = [], []
            for image in images:
                image = _as_uint8(image)
                image = _resize(image, image.shape[-2] // 2, image.shape[-1] // 2, mode="bilinear")
                patches, grid = qwen_image_patches(image)
                pixels.append(patches)
                grids.append(grid)
            texts = [
                _expand_image_pads(t + _IMAGE_TOKENS + "<|im_end|>", [g]) for t, g in zip(texts, grids, strict=True)
            ]
            tokens = self.qwen_tokenizer(texts, padding=True, return_tensors="pt").to(device)
            hidden = self.qwen.model(
                input_ids=tokens["input_ids"],
                attention_mask=tokens["attention_mask"],
                pixel_values=torch.cat(pixels).to(device, self.qwen.model.visual.dtype),
                image_grid_thw=torch.cat(grids).to(device),
                use_cache=False,
            ).last_hidden_state
        else:
            # The official call pads to max_length + crop (longest for image_edit) and passes no attention mask:
            # right padding under a causal mask leaves real tokens unchanged, the mask is returned for the DiT.
            padding = "longest" if content_kind == "image_edit" else "max_length"
            tokens = self.qwen_tokenizer(
                texts, max_length=max_length + crop, truncation=True, padding=padding, return_tensors="pt"
            ).to(device)
            hidden = self.qwen.model.language_model(input_ids=tokens["input_ids"], use_cache=False).last_hidden_state
        return hidden[:, crop:], tokens["attention_mask"][:, crop:].bool()

    @torch.no_grad()
    def encode_clip(self, prompts: Sequence[str]) -> Tensor:
        tokens = self.clip_tokenizer(
            list(prompts),
            max_length=CLIP_MAX_LENGTH,
            truncation=True,
            add_special_tokens=True,
            padding="max_length",
            return_tensors="pt",
        ).to(self.clip.device)
        return self.clip(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output

    @torch.no_grad()
    def expand_prompt(
        self,
        prompt: str,
        content_kind: str,
        image: Tensor | None = None,
        seed: int | None = None,
        max_new_tokens: int = 256,
    ) -> str:
        """The official prompt beautifier: Qwen generates up to `max_new_tokens` with the instruction of
        `content_kind` (image2video and image_edit also see `image`, `[3, H, W]`; "video" or "image" given an
        image mean those two, so a pipeline can pass its encode kind), and the whole generated text
        is returned. Sampling uses Qwen's generation config (the folder's generation_config.json, else
        QWEN_GENERATION: top_k=1, so greedy in effect), seeded by `seed` without touching the global RNG."""
        _check_kind(content_kind)
        if image is not None:  # the encode kinds of I2V ("video") and I2I ("image") with their input image
            content_kind = {"video": "image2video", "image": "image_edit"}.get(content_kind, content_kind)
        instruction = EXPAND_INSTRUCTIONS[content_kind].replace("{prompt}", prompt)
        if content_kind in ("image2video", "image_edit"):
            if image is None:
                raise InputError(f"expand_prompt for {content_kind} needs the input image: pass image=[3, H, W].")
            image = _as_uint8(image)
            if content_kind == "image_edit":  # the official edit expansion shows the model a quarter-size image
                image = _pil_quarter(image)
            contents = [("image", ""), ("text", instruction)]  # i2v: image first; i2i: text first
            if content_kind == "image_edit":
                contents.reverse()
        else:
            image, contents = None, [("text", instruction)]
        self._ensure_lm_head()
        device = self.device
        inputs = {}
        text = _chat(contents)
        if image is not None:
            self._ensure_vision()
            patches, grid = qwen_image_patches(image)
            text = _expand_image_pads(text, [grid])
            inputs = {
                "pixel_values": patches.to(device, self.qwen.model.visual.dtype),
                "image_grid_thw": grid.to(device),
            }
        tokens = self.qwen_tokenizer([text], return_tensors="pt").to(device)
        stop = [self.qwen_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        with _seeded(seed, device):
            generated = self.qwen.generate(
                **tokens,
                **inputs,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop,
                pad_token_id=stop[1],
                **self.generation,
            )
        new_tokens = generated[0, tokens["input_ids"].shape[1] :]
        return self.qwen_tokenizer.decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _ensure_vision(self) -> None:
        if self.qwen.model.visual is not None:
            return
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        names = _select(_qwen_names(self.qwen_source), "model.visual.")
        if not names:
            raise WeightsError(
                f"Qwen2.5-VL: {self.qwen_source.path} has no vision tower (model.visual.* / visual.*), which reading "
                "an image needs. Use the full Qwen2.5-VL-7B file (qwen_2.5_vl_7b.safetensors) or the HF folder."
            )
        with _empty_init(self.dtype):
            visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(self.qwen.config.vision_config)
        state = _load(self.qwen_source, names, self.dtype, self.device)
        _check_complete("Qwen2.5-VL vision tower", self.qwen_source, visual, state)
        visual.load_state_dict(state, assign=True)
        log.info("Qwen2.5-VL vision tower loaded from %s", self.qwen_source.path)
        self.qwen.model.visual = visual.requires_grad_(False).eval().to(self.device)

    def _ensure_lm_head(self) -> None:
        if self.qwen.lm_head is not None:
            return
        names = _select(_qwen_names(self.qwen_source), "lm_head.")
        config = self.qwen.config.get_text_config()
        head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
        if names:
            state = _load(self.qwen_source, names, self.dtype, self.device)
            _check_complete("Qwen2.5-VL LM head", self.qwen_source, head, state)
            head.load_state_dict(state, assign=True)
        elif self.qwen.config.tie_word_embeddings:
            head.weight = self.qwen.model.language_model.embed_tokens.weight
        else:
            raise WeightsError(
                f"Prompt expansion needs Qwen's LM head (lm_head.weight), which {self.qwen_source.path} does not "
                "hold (ComfyUI's text-encoder files drop it). Use the Hugging Face folder of "
                f"{_HF_QWEN_REPO} for prompt expansion, or turn expansion off."
            )
        self.qwen.lm_head = head.requires_grad_(False)


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def _generation_config(path: Path) -> dict:
    """Sampling settings from a HF folder's generation_config.json (what the official generate uses)."""
    file = path / "generation_config.json"
    if not (path.is_dir() and file.is_file()):
        return dict(QWEN_GENERATION)
    config = json.loads(file.read_text())
    return {k: config[k] for k in QWEN_GENERATION if k in config} or dict(QWEN_GENERATION)


def _config_for(path: Path, override: dict | None, default: dict) -> dict:
    if override is not None:
        return override
    if path.is_dir() and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    return default


def _load_qwen(path: Path, config: dict, dtype: torch.dtype, device: torch.device):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    what = "Qwen2.5-VL text encoder"
    source = _scan(path, what)
    names = _qwen_names(source)
    if _QWEN_MARKER not in names.values():
        raise _wrong_file(what, source, "a Qwen2.5-VL-7B text encoder")
    with _empty_init(dtype):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
    if not hasattr(model.model, "language_model"):
        raise KandinskyError("The installed transformers is too old for Qwen2.5-VL here: install transformers>=4.52.")
    model.model.visual = None  # read from disk on first image
    model.lm_head = None  # read from disk on first prompt expansion
    language = model.model.language_model
    state = _load(source, _select(names, "model.language_model."), dtype, device)
    _check_complete(what, source, language, state)
    language.load_state_dict(state, assign=True)
    if source.formats:
        log.info("%s: %d fp8-scaled layers dequantised to %s", path, len(source.formats), dtype)
    return model.requires_grad_(False).eval().to(device), source


def _load_clip(path: Path, config: dict, dtype: torch.dtype, device: torch.device):
    from transformers import CLIPTextConfig, CLIPTextModel

    what = "CLIP-L text encoder"
    source = _scan(path, what)
    names = _clip_names(source)
    if not names:
        raise _wrong_file(what, source, "a CLIP ViT-L/14 text encoder (clip_l)")
    config = config.get("text_config", config) if config.get("model_type") == "clip" else config
    with _empty_init(dtype):
        model = CLIPTextModel(CLIPTextConfig(**config))
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 drops the prefix
        names = {k: v[len("text_model.") :] for k, v in names.items()}
    state = _load(source, names, dtype, device)
    _check_complete(what, source, model, state)
    model.load_state_dict(state, assign=True)
    return model.requires_grad_(False).eval().to(device)


def load_text_encoders(
    qwen_path: str | os.PathLike,
    clip_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    tokenizer_dir: str | os.PathLike | None = None,
    qwen_config: dict | None = None,
    clip_config: dict | None = None,
    clip_dtype: torch.dtype = torch.float32,
) -> TextEncoders:
    """Loads Qwen2.5-VL-7B (`qwen_path`: HF `text_encoder/` folder or ComfyUI single file, bf16 or fp8 scaled,
    dequantised to `dtype`) and CLIP-L (`clip_path`: HF `text_encoder2/` folder or `clip_l.safetensors`, run in
    `clip_dtype`, float32 as the official code does). Tokenizers come from `tokenizer_dir`, the weight folders or
    the local Hugging Face cache. `qwen_config` / `clip_config` replace the shipped configs (tests, other sizes)."""
    device = torch.device(device)
    qwen_path, clip_path = Path(qwen_path), Path(clip_path)
    qwen_tokenizer = load_qwen_tokenizer(tokenizer_dir, qwen_path)
    clip_tokenizer = load_clip_tokenizer(tokenizer_dir, clip_path)
    qwen, source = _load_qwen(qwen_path, _config_for(qwen_path, qwen_config, QWEN25_VL_7B_CONFIG), dtype, device)
    clip = _load_clip(clip_path, _config_for(clip_path, clip_config, CLIP_L_TEXT_CONFIG), clip_dtype, device)
    return TextEncoders(qwen, clip, qwen_tokenizer, clip_tokenizer, source, dtype)
