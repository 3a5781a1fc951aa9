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
    """The blocks of `roots`: the modules held in an nn.ModuleList (layers, DiT blocks, VAE resnet blocks), and every
    other module of a block's class (e.g. the VAE mid-block's resnet blocks), each once."""
    roots = tuple(r for r in roots if r is not None)
    kinds = {type(child) for root in roots for m in root.modules() if isinstance(m, nn.ModuleList) for child in m} - {
        nn.Module
    }  # plain nn.Module() holders are iterated, never called
    seen: dict[int, nn.Module] = {}
    for root in roots:
        for module in root.modules():
            if type(module) in kinds:
                seen.setdefault(id(module), module)
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
