"""Measured activation peaks: run a function on meta tensors and count the bytes of the tensors alive at once.

This is how the pack sizes what it asks the memory manager (ComfyUI's `load_models_gpu`, the pipeline's budget
planner) for: instead of a hand-written formula, the real forward runs once on the meta device (shapes only, no
compute, milliseconds) under a dispatch mode that tracks every storage an op creates until it is freed. The peak is
exact for the eager graph; the CUDA caching allocator adds fragmentation and kernels add workspaces on top, which
callers cover with `ALLOCATOR_MARGIN`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Fragmentation of the caching allocator and kernel workspaces (cuDNN convolution, SDPA) on top of the live tensors.
ALLOCATOR_MARGIN = 1.25


class PeakTracker(TorchDispatchMode):
    """Live and peak bytes of the storages created while the mode is active (inputs and weights not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # views and in-place results share an input's storage: not a new allocation
        inputs = {id(a.untyped_storage()) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key in self._tracked or key in inputs:
                    continue
                nbytes = storage.nbytes()
                self._tracked.add(key)
                self.live += nbytes
                # torch keeps a storage's Python object alive as long as the storage: this fires when it is freed
                weakref.finalize(storage, self._release, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


class FusedAttention(TorchFunctionMode):
    """scaled_dot_product_attention as the fused CUDA kernels (flash, memory-efficient, cuDNN) allocate: the output
    and a float32 log-sum-exp, never the [Sq, Sk] score matrix the meta device's math fallback builds."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, v = args[0], args[2] if len(args) > 2 else kwargs["value"]
            out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
            lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
            del lse
            return out
        return func(*args, **kwargs)


def measure_peak(fn: Callable[[], Any], fused_attention: bool = True) -> int:
    """Peak bytes of the tensors `fn` allocates (its result included while it is alive inside fn).

    Run it on meta tensors and a meta copy of the model to measure any size in milliseconds. With
    `fused_attention`, attention is counted as the fused CUDA kernels allocate (see FusedAttention)."""
    with torch.no_grad(), PeakTracker() as tracker:
        if fused_attention:
            with FusedAttention():
                result = fn()
        else:
            result = fn()
        del result
    return tracker.peak
