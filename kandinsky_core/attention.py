"""Dense attention backends: flash-attn 3, flash-attn 2 and PyTorch SDPA, chosen once and logged; SageAttention
(the optional `sageattention` package, 8-bit quantised attention as ComfyUI's --use-sage-attention) when asked for.

All functions take and return [B, S, H, D]. Backends are probed lazily (on first use), never at import. A flash
backend that fails on the first call (a build without kernels for this card) is dropped for the process, once
logged, and the next one runs.
"""

import importlib
import logging
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError

log = logging.getLogger("kandinsky5")

BACKENDS = ("flash_attn_3", "flash_attn_2", "sdpa", "sageattention")
AUTO_ORDER = ("flash_attn_3", "flash_attn_2", "sdpa")  # SageAttention is approximate: only when asked for
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_MODULES = {"flash_attn_3": "flash_attn_interface", "flash_attn_2": "flash_attn", "sageattention": "sageattention"}
# What a usable module provides: flash-attn 4 installs `flash_attn` as a bare namespace (only flash_attn.cute).
_NEEDS = {
    "flash_attn_3": ("flash_attn_func", "flash_attn_varlen_func"),
    "flash_attn_2": ("flash_attn_func", "flash_attn_varlen_func"),
    "sageattention": ("sageattn",),
}
_logged: set[str] = set()
_failed: dict[str, str] = {}  # backend -> why it was dropped after failing on this machine


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


@cache
def _module(name: str):
    """The imported module for a backend name, or None when it cannot be imported or lacks the functions."""
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception:  # missing, or built for another torch/CUDA: either way not usable
        return None
    missing = [f for f in _NEEDS[name] if not hasattr(module, f)]
    if missing:
        _log_once(f"{_MODULES[name]} imports but has no {', '.join(missing)} (e.g. flash-attn 4's bare namespace): "
                  f"{name} is not used")  # fmt: skip
        return None
    return module


def available_backends() -> list[str]:
    """Backends that can be imported here, best first."""
    return [b for b in BACKENDS if b == "sdpa" or _module(b) is not None]


@cache
def _auto_backend() -> str:
    installed = [b for b in available_backends() if b in AUTO_ORDER]
    log.info(f"Kandinsky attention backend: {installed[0]} (auto; installed: {', '.join(available_backends())})")
    return installed[0]


_validated: set[str] = set()  # concrete names already checked: the hot path (and compiled blocks) skip the probe


def select_backend(name: str | None = "auto") -> str:
    """Resolve a backend name ("auto", "flash_attn_3", "flash_attn_2", "sdpa") to one that is installed."""
    if name in _validated:
        return name
    name = name or "auto"
    if name == "auto":
        name = _auto_backend()
        _validated.add(name)  # blocks get the resolved name: their lookup must not re-probe (an import breaks graphs)
        return name
    if name not in BACKENDS:
        raise InputError(f"Attention backend {name!r} is unknown. Allowed: 'auto', {', '.join(map(repr, BACKENDS))}.")
    if name not in available_backends():
        raise InputError(
            f"Attention backend {name!r} was requested but its package cannot be imported. "
            f"Installed backends: {', '.join(available_backends())}. Install it or choose 'auto'."
        )
    _log_once(f"Kandinsky attention backend: {name}")
    _validated.add(name)
    return name


def _sdpa(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).contiguous()


def _first(out):
    # flash_attn_interface returns (out, lse) in some releases and out alone in others
    return out[0] if isinstance(out, tuple) else out


def _flash(module, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    if key_mask is None:
        return _first(module.flash_attn_func(q, k, v)).contiguous()
    b, sq = q.shape[:2]
    lengths = key_mask.sum(1, dtype=torch.int32)
    cu_k = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
    out = module.flash_attn_varlen_func(q.flatten(0, 1), k[key_mask], v[key_mask], cu_q, cu_k, sq, int(lengths.max()))
    return _first(out).unflatten(0, (b, sq)).contiguous()


def _sage(module, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    if key_mask is not None:  # sageattn has no key padding mask: masked (text) attention stays exact
        _log_once("sageattention takes no key mask: masked attention (padded text) runs with SDPA")
        return _sdpa(q, k, v, key_mask)
    return module.sageattn(q, k, v, tensor_layout="NHD", is_causal=False).contiguous()


def _on_cuda(x: Tensor) -> bool:
    return x.is_cuda


def _next_backend(name: str) -> str:
    later = [b for b in AUTO_ORDER[AUTO_ORDER.index(name) + 1 :] if b not in _failed] if name in AUTO_ORDER else []
    return next((b for b in later if b == "sdpa" or _module(b) is not None), "sdpa")


def attention(q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None, backend: str | None = None) -> Tensor:
    """Softmax attention with scale 1/sqrt(D). q [B, Sq, H, D], k/v [B, Sk, H, D], key_mask [B, Sk] bool
    (True = attend; every row needs at least one True). Returns a contiguous [B, Sq, H, D].
    """
    name = select_backend(backend)
    while name in _failed:
        name = _next_backend(name)
    if name == "sdpa":
        return _sdpa(q, k, v, key_mask)
    if not _on_cuda(q) or q.dtype not in _FLASH_DTYPES:
        _log_once(f"{name} needs CUDA fp16/bf16 tensors, got {q.device.type} {q.dtype}: using SDPA for those")
        return _sdpa(q, k, v, key_mask)
    module = _module(name)
    try:
        return _sage(module, q, k, v, key_mask) if name == "sageattention" else _flash(module, q, k, v, key_mask)
    except (RuntimeError, NotImplementedError, AttributeError) as e:  # e.g. an FA3 build without this card's kernels
        _failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        fallback = _next_backend(name)
        log.warning("Kandinsky attention backend %s failed on this device (%s): using %s from now on",
                    name, _failed[name], fallback)  # fmt: skip
        return attention(q, k, v, key_mask=key_mask, backend=fallback)
