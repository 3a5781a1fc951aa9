"""The Kandinsky 5 options a model carries, as a ComfyUI model patch.

Option nodes (NABLA, MagCache, MagCache Calibrate, Compile) do what ComfyUI's own model-patch nodes do:
clone the ModelPatcher and write into its model options. Ours live in one declared place,
`model_options["transformer_options"]["kandinsky5"]`, as a frozen `Kandinsky5Options`; nothing else is attached to
the model. Clones share the weights, so options compose with each other and with LoRA patches in any order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kandinsky_core.settings import NABLA_MODES, NablaChoice

KEY = "kandinsky5"
__all__ = [
    "KEY", "NABLA_MODES", "Kandinsky5Options", "NablaChoice", "options_in", "options_of", "patcher_of", "with_options",
]  # fmt: skip


@dataclass(frozen=True)
class Kandinsky5Options:
    """Every option of a Kandinsky 5 model; None means "not set" (the variant's official behaviour).

    nabla: NABLA (auto / on / off with P and windows, 0 = the variant's).
    block_cache: a MagCache or MagCache Calibrate setting (`make(variant)` gives a fresh cache per run).
    compile: a torch.compile setting (`applied(dit)` compiles for one run).
    """

    nabla: NablaChoice = NablaChoice()  # NABLA as a node chooses it (rules and parameters: kandinsky_core.settings)
    block_cache: Any = None
    compile: Any = None


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
