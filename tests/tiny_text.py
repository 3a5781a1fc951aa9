"""Tiny Qwen2.5-VL and CLIP text encoders with their tokenizers, saved in the layouts users have.

`make_tiny_text_encoders(root, layout)` writes random-weight models with the official key names:
- layout="folder": the official download, `text_encoder/` (sharded Qwen, old HF key names, index, config.json,
  tokenizer files) and `text_encoder2/` (a whole CLIPModel, config.json, tokenizer files);
- layout="comfy": ComfyUI's `text_encoders/qwen_2.5_vl_7b.safetensors` (or `_fp8_scaled`) and `clip_l.safetensors`,
  with the tokenizers where ComfyUI bundles them (`comfy/text_encoders/qwen25_tokenizer`, `comfy/sd1_tokenizer`).
Load them with `load_text_encoders(t.qwen, t.clip, tokenizer_dir=t.tokenizer_dir, qwen_config=t.qwen_config,
clip_config=t.clip_config)`.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from kandinsky_core.text_encoders import EXPAND_INSTRUCTIONS, PROMPT_TEMPLATES

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
SAMPLE_PROMPTS = (
    "A red fox runs through a snowy forest at dawn, the camera follows it.",
    "A cat sits on a wooden chair next to a window.",
    "Make the sky purple and add the text 'HELLO'.",
)


@dataclass
class TinyTextEncoders:
    qwen: Path  # folder or single file
    clip: Path
    tokenizer_dir: Path | None  # None for the folder layout (tokenizers sit next to the weights)
    qwen_config: dict
    clip_config: dict
    qwen_reference: torch.nn.Module  # the transformers models whose weights were saved (float32)
    clip_reference: torch.nn.Module


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE alphabet)."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    visible += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in visible:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_qwen_tokenizer(folder: Path, vocab_size: int = 600) -> int:
    """A small byte-level BPE trained on the templates and instructions, with Qwen's special tokens after the vocab
    (as ComfyUI's qwen25_tokenizer stores them). Returns the tokenizer length."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = ["\n".join(t) for t in PROMPT_TEMPLATES.values()] + list(EXPAND_INSTRUCTIONS.values())
    tokenizer.train_from_iterator(corpus + list(SAMPLE_PROMPTS), trainer=trainer)
    tokenizer.model.save(str(folder))  # vocab.json + merges.txt
    base = tokenizer.get_vocab_size()
    added = {
        str(base + i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False}
        for i, t in enumerate(QWEN_SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "split_special_tokens": False,
        "add_prefix_space": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return base + len(QWEN_SPECIAL_TOKENS)


def write_clip_tokenizer(folder: Path) -> int:
    """A character-level CLIP BPE vocabulary (no merges) with <|startoftext|> and <|endoftext|> last, as in CLIP."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "<|endoftext|>"}))
    config = {"tokenizer_class": "CLIPTokenizer", **special, "pad_token": "<|endoftext|>", "model_max_length": 77}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(tokens)


def tiny_qwen_config(tokenizer_length: int, hidden: int = 32) -> dict:
    """The Qwen2.5-VL-7B config.json shape (flat text fields, nested vision_config), tiny."""
    base = tokenizer_length - len(QWEN_SPECIAL_TOKENS)
    ids = {t: base + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 4096,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vocab_size": tokenizer_length + 8,
        "rope_scaling": {"type": "mrope", "mrope_section": [hidden // 32, hidden // 32, hidden // 16]},
        "vision_config": {
            "depth": 2,
            "hidden_act": "silu",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_chans": 3,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 56,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
    }


def tiny_clip_config(tokenizer_length: int, hidden: int = 32) -> dict:
    """openai/clip-vit-large-patch14 config.json shape (a whole CLIPModel), tiny."""
    text = {
        "vocab_size": tokenizer_length,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "projection_dim": hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision.update({"image_size": 28, "patch_size": 14, "projection_dim": hidden})
    return {"model_type": "clip", "projection_dim": hidden, "text_config": text, "vision_config": vision}


def _old_hf_qwen_names(state: dict) -> dict:
    """transformers>=4.52 names -> the names in Qwen's published files (and ComfyUI's)."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model.") :]
        elif key.startswith("model.visual."):
            key = "visual." + key[len("model.visual.") :]
        out[key] = value.contiguous()
    return out


def quantize_fp8_scaled(state: dict, style: str = "scaled_fp8", dtype: torch.dtype = torch.bfloat16) -> dict:
    """ComfyUI fp8 scaled: 2D Linear weights of the transformer layers as float8_e4m3fn with per-tensor scales
    (style "scaled_fp8": `scaled_fp8` marker + `.scale_weight`; style "comfy_quant": `.weight_scale` +
    `.comfy_quant`); everything else in `dtype`."""
    out = {}
    for key, value in state.items():
        if key.endswith(".weight") and value.ndim == 2 and (".layers." in key or ".blocks." in key):
            layer = key[: -len(".weight")]
            scale = value.abs().max().float() / torch.finfo(torch.float8_e4m3fn).max
            out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            if style == "scaled_fp8":
                out[f"{layer}.scale_weight"] = scale.reshape(())
            else:
                out[f"{layer}.weight_scale"] = scale.reshape(())
                conf = json.dumps({"format": "float8_e4m3fn"}).encode("utf-8")
                out[f"{layer}.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
        else:
            out[key] = value.to(dtype)
    if style == "scaled_fp8":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def _save_sharded(state: dict, folder: Path, shards: int = 2) -> None:
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def make_tiny_text_encoders(
    root: Path,
    layout: str = "folder",
    *,
    fp8: str | None = None,
    lm_head: bool = True,
    qwen_hidden: int = 32,
    clip_hidden: int = 32,
    seed: int = 0,
    vocab: tuple[int, int] | None = None,
) -> TinyTextEncoders:
    """Writes tiny encoders under `root`. fp8 (comfy layout only): None, "scaled_fp8" or "comfy_quant".
    Embeddings are `[B, L, qwen_hidden]` (a multiple of 32) and pooled `[B, clip_hidden]`. `vocab` (Qwen, CLIP)
    sizes the embeddings for other tokenizers, e.g. ComfyUI's bundled ones (152064, 49408) in a real server."""
    if layout not in ("folder", "comfy") or qwen_hidden % 32:
        raise ValueError(f"layout={layout!r}, qwen_hidden={qwen_hidden}: use folder/comfy and a multiple of 32")
    from transformers import CLIPConfig, CLIPModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    root = Path(root)
    if layout == "folder":
        qwen_dir, clip_dir = root / "text_encoder", root / "text_encoder2"
        qwen_tok_dir, clip_tok_dir, tokenizer_dir = qwen_dir, clip_dir, None
    else:
        tokenizer_dir = root / "comfy"
        qwen_tok_dir, clip_tok_dir = (
            tokenizer_dir / "text_encoders" / "qwen25_tokenizer",
            tokenizer_dir / "sd1_tokenizer",
        )
    qwen_length = write_qwen_tokenizer(qwen_tok_dir)
    clip_length = write_clip_tokenizer(clip_tok_dir)
    if vocab is not None:
        qwen_length, clip_length = vocab[0] - 8, vocab[1]
    qwen_config = tiny_qwen_config(qwen_length, qwen_hidden)
    clip_config = tiny_clip_config(clip_length, clip_hidden)
    if vocab is not None:  # read with ComfyUI's bundled tokenizer: its special-token ids (<|image_pad|> 151655 ...)
        from kandinsky_core.text_encoders import QWEN25_VL_7B_CONFIG

        for key in ("bos_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id",
                    "vision_token_id", "image_token_id", "video_token_id"):  # fmt: skip
            qwen_config[key] = QWEN25_VL_7B_CONFIG[key]

    torch.manual_seed(seed)
    qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**qwen_config)).eval()
    clip = CLIPModel(CLIPConfig(**clip_config)).eval()
    with torch.no_grad():  # a larger spread than the 0.02 init so that numeric differences show
        for param in list(qwen.parameters()) + list(clip.parameters()):
            if param.ndim >= 2:
                param.normal_(0, 0.2)
    qwen_state = _old_hf_qwen_names(qwen.state_dict())
    clip_state = {k: v.contiguous() for k, v in clip.state_dict().items()}

    if layout == "folder":
        _save_sharded(qwen_state, qwen_dir)
        (qwen_dir / "config.json").write_text(json.dumps(qwen_config, indent=1))
        save_file(clip_state, str(clip_dir / "model.safetensors"), metadata={"format": "pt"})
        (clip_dir / "config.json").write_text(json.dumps(clip_config, indent=1))
        qwen_path, clip_path = qwen_dir, clip_dir
    else:
        folder = root / "text_encoders"
        folder.mkdir(parents=True, exist_ok=True)
        if not lm_head:
            qwen_state.pop("lm_head.weight")
        if fp8 is not None:
            qwen_path = folder / "qwen_2.5_vl_7b_fp8_scaled.safetensors"
            save_file(quantize_fp8_scaled(qwen_state, fp8), str(qwen_path))
        else:
            qwen_path = folder / "qwen_2.5_vl_7b.safetensors"
            save_file(qwen_state, str(qwen_path))
        clip_path = folder / "clip_l.safetensors"
        text_only = {
            k: v for k, v in clip_state.items() if k.startswith("text_model.") or k == "text_projection.weight"
        }
        save_file(text_only, str(clip_path))
    return TinyTextEncoders(
        qwen=qwen_path,
        clip=clip_path,
        tokenizer_dir=tokenizer_dir,
        qwen_config=qwen_config,
        clip_config=clip_config,
        qwen_reference=qwen,
        clip_reference=clip,
    )
