"""Model files and folders in ComfyUI's model folders (diffusion_models, text_encoders, vae).

Hugging Face folders (config.json + safetensors) are offered next to single files; a folder's name ends in "/".
"""

from __future__ import annotations

import os
from pathlib import Path

from kandinsky_core.errors import MissingFilesError

_MODEL_SUFFIXES = (".safetensors", ".sft")
_MAX_DEPTH = 3


def _folder_paths():
    import folder_paths

    return folder_paths


def _is_model_folder(d: Path) -> bool:
    if (d / "config.json").is_file():
        return any(d.glob("*.safetensors"))
    return False


def _model_folders(base: Path) -> list[str]:
    out = []
    for root, dirs, _ in os.walk(base, followlinks=True):
        depth = len(Path(root).relative_to(base).parts)
        if depth >= _MAX_DEPTH:
            dirs[:] = []
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if depth and _is_model_folder(Path(root)):
            out.append(Path(root).relative_to(base).as_posix() + "/")
    return out


def list_models(kind: str, folders: bool = False) -> list[str]:
    """Safetensors files (and, with `folders`, model folders) under ComfyUI's folder `kind`, sorted."""
    fp = _folder_paths()
    files = [f for f in fp.get_filename_list(kind) if f.lower().endswith(_MODEL_SUFFIXES)]
    dirs = []
    if folders:
        for base in fp.get_folder_paths(kind):
            if os.path.isdir(base):
                dirs += _model_folders(Path(base))
    return sorted(set(dirs)) + sorted(set(files))


def resolve(kind: str, name: str, what: str) -> Path:
    """The full path of a listed file or folder; MissingFilesError naming the folder when it is not there."""
    fp = _folder_paths()
    if name.endswith("/"):
        for base in fp.get_folder_paths(kind):
            d = Path(base) / name.rstrip("/")
            if d.is_dir():
                return d
    else:
        full = fp.get_full_path(kind, name)
        if full and os.path.isfile(full):
            return Path(full)
    for base in fp.get_folder_paths(kind):
        entry = Path(base) / name.rstrip("/")
        if not os.path.lexists(entry):
            continue
        if entry.is_symlink() and not entry.exists():
            raise MissingFilesError(
                f"{what} {name!r} is a broken link in ComfyUI's {kind} folder: it points to {os.readlink(entry)!r}, "
                "which does not exist. Fix or remove the link, or put the file itself there."
            )
        raise MissingFilesError(
            f"{what} {name!r} in ComfyUI's {kind} folder is not a regular file (a FIFO, device, socket or a link to "
            "one). Put the model file itself there."
        )
    bases = ", ".join(fp.get_folder_paths(kind)) or f"models/{kind}"
    raise MissingFilesError(
        f"{what} {name!r} is not in ComfyUI's {kind} folder ({bases}). Put the file there (or pick one from the "
        "list) and press R in ComfyUI to refresh the lists."
    )
