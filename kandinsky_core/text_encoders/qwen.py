"""Qwen2.5-VL-7B: its config, the key layouts of its files (HF folders, ComfyUI single files, fp8 scaled) and
loading, the vision tower and LM head only when first needed."""

import logging
from pathlib import Path

import torch

from ..errors import KandinskyError, WeightsError
from ..weights import is_quant_aux
from .sources import Source, check_complete, empty_init, load_tensors, scan, select, wrong_file

log = logging.getLogger(__name__)

HF_QWEN_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"

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


# ---------------------------------------------------------------------------------------------------------------------
# Key layouts. Canonical names are transformers' own (model.language_model.*, model.visual.*, lm_head.weight).

QWEN_PREFIXES = (
    ("model.language_model.", "model.language_model."),
    ("model.visual.", "model.visual."),
    ("model.lm_head.", "lm_head."),  # ComfyUI renames lm_head this way
    ("model.", "model.language_model."),  # official HF files and ComfyUI single files
    ("visual.", "model.visual."),
    ("lm_head.", "lm_head."),
)
QWEN_MARKER = "model.language_model.layers.0.self_attn.k_proj.bias"


def qwen_names(source: Source) -> dict[str, str]:
    names = {}
    for key in source.files:
        if is_quant_aux(key):
            continue
        for old, new in QWEN_PREFIXES:
            if key.startswith(old):
                names[key] = new + key[len(old) :]
                break
    return names


def load_qwen(path: Path, config: dict, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, Source]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    what = "Qwen2.5-VL text encoder"
    source = scan(path, what)
    names = qwen_names(source)
    if QWEN_MARKER not in names.values():
        raise wrong_file(source, "a Qwen2.5-VL-7B text encoder")
    with empty_init(dtype):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
    if not hasattr(model.model, "language_model"):
        raise KandinskyError("The installed transformers is too old for Qwen2.5-VL here: install transformers>=4.52.")
    model.model.visual = None  # read from disk on first image
    model.lm_head = None  # read from disk on first prompt expansion
    language = model.model.language_model
    state = load_tensors(source, select(names, "model.language_model."), dtype, device)
    check_complete(what, source, language, state)
    language.load_state_dict(state, assign=True)
    if source.formats:
        log.info("%s: %d fp8-scaled layers dequantised to %s", path, len(source.formats), dtype)
    return model.requires_grad_(False).eval().to(device), source


def load_vision_tower(
    qwen: torch.nn.Module, source: Source, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    """The vision tower of a loaded Qwen2.5-VL (built with `visual=None`), read from `source`."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    names = select(qwen_names(source), "model.visual.")
    if not names:
        raise WeightsError(
            f"Qwen2.5-VL: {source.path} has no vision tower (model.visual.* / visual.*), which reading "
            "an image needs. Use the full Qwen2.5-VL-7B file (qwen_2.5_vl_7b.safetensors) or the HF folder."
        )
    with empty_init(dtype):
        visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(qwen.config.vision_config)
    state = load_tensors(source, names, dtype, device)
    check_complete("Qwen2.5-VL vision tower", source, visual, state)
    visual.load_state_dict(state, assign=True)
    log.info("Qwen2.5-VL vision tower loaded from %s", source.path)
    return visual.requires_grad_(False).eval().to(device)


def load_lm_head(qwen: torch.nn.Module, source: Source, dtype: torch.dtype, device: torch.device) -> torch.nn.Linear:
    """The LM head of a loaded Qwen2.5-VL (built with `lm_head=None`): from `source`, else the tied embeddings."""
    names = select(qwen_names(source), "lm_head.")
    config = qwen.config.get_text_config()
    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
    if names:
        state = load_tensors(source, names, dtype, device)
        check_complete("Qwen2.5-VL LM head", source, head, state)
        head.load_state_dict(state, assign=True)
    elif qwen.config.tie_word_embeddings:
        head.weight = qwen.model.language_model.embed_tokens.weight
    else:
        raise WeightsError(
            f"Prompt expansion needs Qwen's LM head (lm_head.weight), which {source.path} does not "
            "hold (ComfyUI's text-encoder files drop it). Use the Hugging Face folder of "
            f"{HF_QWEN_REPO} for prompt expansion, or turn expansion off."
        )
    return head.requires_grad_(False)
