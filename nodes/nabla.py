"""Kandinsky 5 NABLA: model in, a patched clone out whose Kandinsky 5 options carry a NABLA choice (auto / on / off,
P and windows); the Kandinsky 5 Sampler takes NABLA from it (kandinsky_core.settings.NablaChoice.params).

Where ComfyUI has `io.DynamicCombo` (v0.33.0), P and the windows are shown only when mode is on; older releases
(v0.3.64) show them as plain optional inputs, ignored unless mode is on.
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from kandinsky_core.settings import NABLA_MODES, NablaChoice, raise_problems

from . import native
from .common import CATEGORY, fail
from .model_options import with_options

DYNAMIC = hasattr(io, "DynamicCombo")
MODE_TOOLTIP = (
    "auto: NABLA where the variant was trained with it (the 10 s and HD variants), with its official P and windows; "
    "on: NABLA with P and the windows below (0 = the variant's, or the official 0.9 / 11, 3, 3), width and height in "
    "multiples of 128; off: dense attention."
)


def tuning_inputs(optional: bool) -> list[Any]:
    """P and the three windows (0 = the variant's)."""
    return [
        io.Float.Input("P", default=0.0, min=0.0, max=1.0, step=0.05, optional=optional, tooltip=
                       "Attention mass each query block keeps (0 = the variant's, e.g. 0.9; 1 = dense). Lower: "
                       "sparser and faster, less faithful."),
        io.Int.Input("wT", default=0, min=0, max=63, optional=optional, tooltip=
                     "Sliding window in latent frames, odd (0 = the variant's, 11)."),
        io.Int.Input("wH", default=0, min=0, max=63, optional=optional, tooltip=
                     "Sliding window in tiles along the height, odd (0 = the variant's, 3)."),
        io.Int.Input("wW", default=0, min=0, max=63, optional=optional, tooltip=
                     "Sliding window in tiles along the width, odd (0 = the variant's, 3)."),
    ]  # fmt: skip


def mode_inputs() -> list[Any]:
    if DYNAMIC:
        options = [io.DynamicCombo.Option(m, tuning_inputs(False) if m == "on" else []) for m in NABLA_MODES]
        return [io.DynamicCombo.Input("mode", options=options, tooltip=MODE_TOOLTIP)]
    return [io.Combo.Input("mode", options=list(NABLA_MODES), default="auto", tooltip=MODE_TOOLTIP),
            *tuning_inputs(True)]  # fmt: skip


def choice(mode: Any, **tuning: Any) -> NablaChoice:
    """The NablaChoice of the node's inputs: `mode` is the DynamicCombo's dict ({"mode": "on", "P": ...}) or, on
    releases without it, the mode's name with P / windows as separate inputs."""
    if isinstance(mode, dict):
        tuning, mode = mode, mode.get("mode", "auto")
    if mode != "on":
        return NablaChoice(mode)
    return NablaChoice(mode, *(tuning.get(k) or 0 for k in ("P", "wT", "wH", "wW")))


class Nabla(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="K5Nabla",
            display_name="Kandinsky 5 NABLA",
            category=f"{CATEGORY}/speed",
            description="NABLA sparse attention (the official block-sparse attention of the 10 s and HD variants: "
            "each block of tokens attends to the blocks holding most of its attention plus a sliding neighbourhood), "
            "for the Kandinsky 5 Sampler and, on ComfyUI's own Kandinsky 5 model (Load Diffusion Model), for KSampler "
            "and SamplerCustomAdvanced too (exact: the tokens are put in NABLA's tile order inside the attention and "
            "back; auto takes the variant from the model's tensors and logs which). Without this node the Sampler "
            "uses auto and ComfyUI's own model stays dense.",
            inputs=[io.Model.Input("model", tooltip="From Load Kandinsky 5 DiT or ComfyUI's Load "
                                   "Diffusion Model, a LoRA loader or an option node."),
                    *mode_inputs()],
            outputs=[io.Model.Output(display_name="model", tooltip=
                                   "The same DiT (a clone: the input keeps its options); the Kandinsky 5 Sampler uses "
                                   "this NABLA setting.")],
        )  # fmt: skip

    if DYNAMIC:

        @classmethod
        def execute(cls, model: Any, mode: dict) -> io.NodeOutput:
            return cls.apply(model, choice(mode))

    else:

        @classmethod
        def execute(cls, model: Any, mode: str, P=None, wT=None, wH=None, wW=None) -> io.NodeOutput:  # noqa: N803
            return cls.apply(model, choice(mode, P=P, wT=wT, wH=wH, wW=wW))

    @classmethod
    def apply(cls, model: Any, setting: NablaChoice) -> io.NodeOutput:
        with fail("Kandinsky 5 NABLA"):
            raise_problems(setting.problems())
            return io.NodeOutput(native.patched(with_options(model, nabla=setting), nabla=True))
