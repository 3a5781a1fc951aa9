"""Dense attention backends: flash-attn 3, flash-attn 2 and PyTorch SDPA, chosen once and logged.

All functions take and return [B, S, H, D]. Backends are probed lazily (on first use), never at import.
"""

import importlib
import logging
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError

log = logging.getLogger("kandinsky5")

BACKENDS = ("flash_attn_3", "flash_attn_2", "sdpa")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


@cache
def _module(name: str):
    """The imported flash-attn module for a backend name, or None when it cannot be imported."""
    module_name = {"flash_attn_3": "flash_attn_interface", "flash_attn_2": "flash_attn"}[name]
    try:
        return importlib.import_module(module_name)
    except Exception:  # missing, or built for another torch/CUDA: either way not usable
        return None


def available_backends() -> list[str]:
    """Backends that can be imported here, best first."""
    return [b for b in BACKENDS if b == "sdpa" or _module(b) is not None]


@cache
def _auto_backend() -> str:
    installed = available_backends()
    log.info(f"Kandinsky attention backend: {installed[0]} (auto; installed: {', '.join(installed)})")
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


def attention(q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None, backend: str | None = None) -> Tensor:
    """Softmax attention with scale 1/sqrt(D). q [B, Sq, H, D], k/v [B, Sk, H, D], key_mask [B, Sk] bool
    (True = attend; every row needs at least one True). Returns a contiguous [B, Sq, H, D].
    """
    name = select_backend(backend)
    if name != "sdpa":
        if not q.is_cuda or q.dtype not in _FLASH_DTYPES:
            _log_once(f"{name} needs CUDA fp16/bf16 tensors, got {q.device.type} {q.dtype}: using SDPA for those")
        else:
            return _flash(_module(name), q, k, v, key_mask)
    return _sdpa(q, k, v, key_mask)
