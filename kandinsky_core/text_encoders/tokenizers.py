"""Finding and building the Qwen2.5 and CLIP tokenizers: a given folder, the weights' folder, ComfyUI's bundled
copies, or the local Hugging Face cache (nothing is downloaded here)."""

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import MissingFilesError, WeightsError
from .clip import HF_CLIP_REPO
from .qwen import HF_QWEN_REPO

_QWEN_TOKENIZER_FILES = ("tokenizer.json or vocab.json + merges.txt", "tokenizer_config.json")
_CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json (optional)")


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
    found = _find_dir(candidates, HF_QWEN_REPO, ["tokenizer*", "vocab.json", "merges.txt"], _is_qwen_tokenizer_dir)
    if found is None:
        raise MissingFilesError(
            f"No Qwen2.5-VL tokenizer found (looked in: {', '.join(map(str, candidates)) or 'nothing'} and the "
            f"Hugging Face cache). It needs {' and '.join(_QWEN_TOKENIZER_FILES)} from {HF_QWEN_REPO}: put them in "
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
    found = _find_dir(candidates, HF_CLIP_REPO, patterns, _is_clip_tokenizer_dir)
    if found is None:
        raise MissingFilesError(
            f"No CLIP tokenizer found (looked in: {', '.join(map(str, candidates)) or 'nothing'} and the Hugging "
            f"Face cache). It needs {', '.join(_CLIP_TOKENIZER_FILES)} from {HF_CLIP_REPO}: put them in the CLIP "
            "folder or models/text_encoders/sd1_tokenizer (`python -m kandinsky_core download` fetches them), or pass "
            "tokenizer_dir (inside ComfyUI: its comfy/sd1_tokenizer folder)."
        )
    return _build_tokenizer(CLIPTokenizer, found, "CLIP")
