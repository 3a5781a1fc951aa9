"""ComfyUI nodes: thin adapters over kandinsky_core (model management, folder_paths, progress, previews).

Every node is a V3 node (comfy_api.latest io.ComfyNode); its ID, display name, category, inputs and outputs are in
its define_schema. IDs start with K5 so that none collides with the official kandinsky-5 `comfyui/` nodes
(Kandinsky5LoadDiT, ...) or with ComfyUI core's Kandinsky 5 nodes (tests/test_node_ids.py checks both)."""

from comfy_api.latest import ComfyExtension, io

from .compile import Compile
from .loaders import LoadDiT, LoadTextEncoders, LoadVAE
from .lora import LoadLoRA
from .magcache import MagCacheCalibrate, MagCacheNode
from .nabla import Nabla
from .sampler import Sampler
from .text import PromptExpansion, TextEncode
from .vae import VAEDecode, VAEEncode

NODES: list[type[io.ComfyNode]] = [
    LoadDiT,
    LoadTextEncoders,
    LoadVAE,
    LoadLoRA,
    TextEncode,
    PromptExpansion,
    Sampler,
    VAEDecode,
    VAEEncode,
    MagCacheNode,
    MagCacheCalibrate,
    Nabla,
    Compile,
]


class K5Extension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


def node_ids() -> dict[str, type[io.ComfyNode]]:
    """Node ID -> class, as ComfyUI registers them (from each schema)."""
    return {cls.define_schema().node_id: cls for cls in NODES}
