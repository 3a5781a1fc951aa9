"""The Kandinsky 5 options a model carries, as a ComfyUI model patch.

Option nodes (NABLA, MagCache, MagCache Calibrate, Compile, Block Swap) do what ComfyUI's own model-patch nodes do:
clone the ModelPatcher and write into its model options. Ours live in one declared place,
`model_options["transformer_options"]["kandinsky5"]`, as a frozen `Kandinsky5Options`; nothing else is attached to
the model. Clones share the weights, so options compose with each other and with LoRA patches in any order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kandinsky_core.nabla import NablaParams

KEY = "kandinsky5"
NABLA_MODES = ("auto", "on", "off")
OFFICIAL_NABLA = NablaParams(P=0.9, wT=11, wH=3, wW=3)


@dataclass(frozen=True)
class NablaSetting:
    """NABLA as chosen on a node: auto follows the variant (on for the 10 s and HD variants trained with it); on uses
    the variant's P and windows (or the official 0.9 / 11, 3, 3) where P / windows are 0; off is dense attention."""

    mode: str = "auto"
    P: float = 0.0
    wT: int = 0
    wH: int = 0
    wW: int = 0

    def params(self, variant: Any) -> NablaParams | None:
        """The NABLA parameters for `variant`, or None for dense attention."""
        if self.mode == "off" or (self.mode == "auto" and variant.nabla is None):
            return None
        base = variant.nabla or OFFICIAL_NABLA
        return NablaParams(P=self.P or base.P, wT=self.wT or base.wT, wH=self.wH or base.wH, wW=self.wW or base.wW)


@dataclass(frozen=True)
class Kandinsky5Options:
    """Every option of a Kandinsky 5 model; None means "not set" (the variant's official behaviour).

    nabla: NABLA (auto / on / off with P and windows, 0 = the variant's).
    block_cache: a MagCache or MagCache Calibrate setting (`make(variant)` gives a fresh cache per run).
    compile: a torch.compile setting (`applied(dit)` compiles for one run).
    block_swap: a block-swap setting (`place(...)` / `release(...)`).
    """

    nabla: NablaSetting = NablaSetting()
    block_cache: Any = None
    compile: Any = None
    block_swap: Any = None


def patcher_of(model: Any) -> Any:
    """The ModelPatcher behind what flows on a model link: a MODEL link carries the patcher itself."""
    return model


def options_in(transformer_options: dict) -> Kandinsky5Options:
    """The options in a `transformer_options` dict (what ComfyUI hands the model's `_apply_model`)."""
    return transformer_options.get(KEY) or Kandinsky5Options()


def options_of(model: Any) -> Kandinsky5Options:
    """The options `model` carries (all unset when no option node touched it)."""
    return options_in(patcher_of(model).model_options.get("transformer_options", {}))


def with_options(model: Any, **changes: Any) -> Any:
    """A clone of `model` (weights shared) whose options have `changes` applied; `model` itself is unchanged."""
    patcher = patcher_of(model).clone()
    options = dataclasses.replace(options_of(patcher), **changes)
    transformer_options = dict(patcher.model_options.get("transformer_options", {}))
    transformer_options[KEY] = options
    patcher.model_options = {**patcher.model_options, "transformer_options": transformer_options}
    return patcher
