"""Kandinsky 5 Block Swap: MODEL in, MODEL out carrying a block-swap setting the Kandinsky 5 Sampler honours.

ComfyUI already offloads on its own: when a DiT does not fit, its ModelPatcher loads what fits and comfy.ops casts
the rest to the GPU layer by layer at use (partial loading; the loader builds the DiT from comfy.ops for this). That
is the default and usually the best choice: it adapts to the free memory and to the other models in the workflow.
Block swap instead pins the peak: the non-block layers and `blocks_on_device` visual blocks stay on the GPU, every
other block is copied in whole just before it runs (the next one prefetched on a side stream) and dropped after.
Prefer it when ComfyUI's estimate still runs out of memory (long videos: activations grow with the frame count),
when a fixed budget matters (e.g. Lite 5 s 768x512 on a 12 GB card) or with --highvram / --gpu-only, where ComfyUI
does not load partially.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from comfy_api.latest import io

from kandinsky_core.errors import InputError
from kandinsky_core.variants import block_swap_problem

from . import comfy_glue, comfy_model
from .common import CATEGORY, fail
from .model_options import with_options


def release_from_comfy(patcher: Any) -> None:
    """If ComfyUI holds this DiT loaded (through this patcher or a clone sharing its model), unload it (its weights
    go back to the offload device)."""
    mm = comfy_glue.model_management()
    loaded = getattr(mm, "current_loaded_models", [])
    for entry in list(loaded):
        held = getattr(entry, "model", None)
        if held is patcher or getattr(held, "model", None) is patcher.model:
            entry.model_unload()
            loaded.remove(entry)


@dataclass(frozen=True)
class BlockSwapSetting:
    blocks_on_device: int
    prefetch: bool = True

    def resident_bytes(self, dit: Any) -> int:
        """Weights on the GPU during sampling: everything but the swapped blocks, plus the two in flight."""
        from kandinsky_core.offload import block_bytes

        blocks = dit.visual_transformer_blocks
        total = sum(p.numel() * p.element_size() for p in dit.parameters())
        swapped = [block_bytes(b) for b in blocks[self.blocks_on_device :]]
        return total - sum(swapped) + sum(sorted(swapped)[-2:])

    def place(self, patcher: Any, activations: int) -> Any:
        """Make room in ComfyUI for the resident part and the activations, then start swapping the DiT of
        `patcher` (a Kandinsky 5 MODEL); returns the swap."""
        from kandinsky_core.offload import enable_block_swap

        release_from_comfy(patcher)
        dit = patcher.model.diffusion_model
        device = comfy_glue.load_device()
        comfy_glue.model_management().free_memory(self.resident_bytes(dit) + activations, device)
        offload = getattr(patcher, "offload_device", "cpu")
        return enable_block_swap(dit, device, self.blocks_on_device, offload_device=offload, prefetch=self.prefetch)

    def release(self, patcher: Any, swap: Any) -> None:
        swap.remove()
        patcher.model.diffusion_model.to(getattr(patcher, "offload_device", "cpu"))


class BlockSwap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="K5BlockSwap",
            display_name="Kandinsky 5 Block Swap",
            category=f"{CATEGORY}/speed",
            description="Runs the Kandinsky 5 DiT with most of its visual blocks in system memory: each is copied to "
            "the GPU just before it runs (the next one prefetched) and dropped after, with exactly the same result. "
            "For small GPUs; ComfyUI's own partial loading needs no node and is usually enough.",
            inputs=[
                io.Model.Input("model", tooltip="From Load Kandinsky 5 DiT (or MagCache)."),
                io.Int.Input("blocks_on_device", default=0, min=0, max=128, tooltip=
                             "Visual blocks kept on the GPU (Lite has 32, Pro 60); the others are swapped in one at a "
                             "time. More: faster, more memory. 0 swaps all of them."),
                io.Boolean.Input("prefetch", default=True, tooltip=
                                 "Copy the next block on a side CUDA stream while the current one computes."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip=
                                   "The same DiT; the Kandinsky 5 Sampler swaps its blocks.")],
        )  # fmt: skip

    @classmethod
    def execute(cls, model, blocks_on_device, prefetch) -> io.NodeOutput:
        with fail("Kandinsky 5 Block Swap"):
            problem = block_swap_problem(comfy_model.k5_model(model).variant, "blocks_on_device", blocks_on_device)
            if problem:
                raise InputError(problem)
            return io.NodeOutput(with_options(model, block_swap=BlockSwapSetting(blocks_on_device, bool(prefetch))))
