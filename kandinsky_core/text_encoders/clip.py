"""CLIP ViT-L/14 (text model, pooled output): its config, the key layouts of its files and loading."""

from pathlib import Path

import torch

from ..weights import is_quant_aux
from .sources import Source, check_complete, empty_init, load_tensors, scan, wrong_file

HF_CLIP_REPO = "openai/clip-vit-large-patch14"
CLIP_MAX_LENGTH = 77

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


CLIP_MARKER = "text_model.encoder.layers.0.mlp.fc1.weight"


def clip_names(source: Source) -> dict[str, str]:
    """HF CLIPModel / CLIPTextModel files and ComfyUI clip_l, with any checkpoint prefix before `text_model.`."""
    marker = next((k for k in source.files if k.endswith(CLIP_MARKER)), None)
    if marker is None:
        return {}
    prefix = marker[: -len(CLIP_MARKER)]
    names = {}
    for key in source.files:
        if key.startswith(prefix + "text_model.") and not is_quant_aux(key):
            name = key[len(prefix) :]
            if name != "text_model.embeddings.position_ids":  # a buffer some old saves contain
                names[key] = name
    return names


def load_clip(path: Path, config: dict, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    what = "CLIP-L text encoder"
    source = scan(path, what)
    names = clip_names(source)
    if not names:
        raise wrong_file(source, "a CLIP ViT-L/14 text encoder (clip_l)")
    config = config.get("text_config", config) if config.get("model_type") == "clip" else config
    with empty_init(dtype):
        model = CLIPTextModel(CLIPTextConfig(**config))
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 drops the prefix
        names = {k: v[len("text_model.") :] for k, v in names.items()}
    state = load_tensors(source, names, dtype, device)
    check_complete(what, source, model, state)
    model.load_state_dict(state, assign=True)
    return model.requires_grad_(False).eval().to(device)
