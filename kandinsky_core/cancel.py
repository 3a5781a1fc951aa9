"""Stopping a long stage between blocks: a check (ComfyUI's Cancel) run before every block of the models at work.

Text encoding, prompt expansion, sampling and VAE decoding each run for seconds to minutes inside one call; a check
before every transformer layer, DiT block and VAE block (every module held in an nn.ModuleList) lets Cancel stop
them within one layer, one generated token or one tile, whatever the model, without touching its code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn


def blocks(*roots: nn.Module | None) -> list[nn.Module]:
    """The modules held in an nn.ModuleList under `roots` (layers, blocks, VAE levels), each once."""
    seen: dict[int, nn.Module] = {}
    for root in roots:
        if root is None:
            continue
        for module in root.modules():
            if isinstance(module, nn.ModuleList):
                for child in module:
                    seen.setdefault(id(child), child)
    return list(seen.values())


@contextmanager
def checks_between(roots: tuple[nn.Module | None, ...], check: Callable[[], None]) -> Iterator[None]:
    """Within the block, `check()` runs before every block of `roots`; it stops the work by raising."""
    handles = [m.register_forward_pre_hook(lambda *_: check()) for m in blocks(*roots)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
