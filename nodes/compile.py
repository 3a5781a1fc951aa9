"""Kandinsky 5 Compile: MODEL in, MODEL out carrying a torch.compile setting the Kandinsky 5 Sampler honours.

The setting compiles the DiT's blocks for the sampler's run only (`applied`), so the loaded model that other
branches of the workflow share stays uncompiled, and a compiler failure falls back to eager with one warning
(kandinsky_core.compile).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from comfy_api.latest import io

from kandinsky_core.errors import InputError

from .common import CATEGORY, fail
from .model_options import with_options

MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune")
BACKENDS = ("inductor", "aot_eager", "eager")


def torch_mode(mode: str) -> str | None:
    """torch.compile's mode for the node's choice. "max-autotune" would turn CUDA graphs on, which clash with block
    swap, weight casting and ComfyUI's offloading: it runs as max-autotune-no-cudagraphs (saved workflows keep it)."""
    return {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)


@dataclass(frozen=True)
class CompileSetting:
    mode: str = "default"
    backend: str = "inductor"

    @contextmanager
    def applied(self, dit: Any) -> Iterator[Any]:
        """The DiT compiled (lazily: the first step compiles) for the duration of the block; eager again after."""
        from kandinsky_core.compile import compile_dit, compile_state, uncompile_dit

        compile_dit(dit, mode=torch_mode(self.mode), backend=self.backend)
        try:
            yield compile_state(dit)
        finally:
            uncompile_dit(dit)


class Compile(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="K5Compile",
            display_name="Kandinsky 5 Compile",
            category=f"{CATEGORY}/speed",
            description="Runs the Kandinsky 5 DiT's transformer blocks through torch.compile in the Kandinsky 5 "
            "Sampler: the first step compiles (minutes for a large model), later steps and runs at the same size are "
            "faster. If compiling fails (no Triton / compiler), the sampler runs uncompiled with the same result and "
            "logs a warning.",
            inputs=[
                io.Model.Input("model", tooltip="From Load Kandinsky 5 DiT, a LoRA loader or an option node."),
                io.Combo.Input("mode", options=list(MODES), default="default", tooltip=
                               "torch.compile mode. max-autotune searches faster kernels (much longer compile); it "
                               "runs without CUDA graphs (max-autotune-no-cudagraphs), which conflict with ComfyUI's "
                               "offloading and partial loading."),
                io.Combo.Input("backend", options=list(BACKENDS), default="inductor", tooltip=
                               "inductor generates fused kernels (needs Triton on GPU, a C++ compiler on CPU); "
                               "aot_eager and eager only trace (for debugging, no speed-up)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip=
                                   "The same DiT (a clone: the input keeps its options); the Kandinsky 5 Sampler "
                                   "compiles its blocks.")],
        )  # fmt: skip

    @classmethod
    def execute(cls, model, mode, backend) -> io.NodeOutput:
        with fail("Kandinsky 5 Compile"):
            if mode not in MODES or backend not in BACKENDS:
                raise InputError(
                    f"mode {mode!r} / backend {backend!r}: allowed modes {', '.join(MODES)}; backends "
                    f"{', '.join(BACKENDS)}."
                )
            return io.NodeOutput(with_options(model, compile=CompileSetting(mode, backend)))
