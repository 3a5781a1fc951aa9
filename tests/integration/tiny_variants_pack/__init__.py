"""TEST ONLY - never shipped. A ComfyUI custom node pack that the integration fixture copies into the test
server's custom_nodes folder, next to comfyui-kandinsky5.

Tiny random DiTs have architectures no released variant has, so the real loaders (rightly) refuse them. When
K5_TINY_VARIANTS names a JSON file {variant name: DiTArch fields}, this pack swaps the `arch` of those variants
in kandinsky_core's variants table, in the server process, before any node runs - exactly what
tests/test_pipeline.py does with monkeypatch. Every other number of a variant (steps, guidance, scheduler scale,
rope scale, template, VAE, latent scale) stays the released one, and every loader stays the real one.

ComfyUI's single-file text encoders carry no config: kandinsky_core builds them with Qwen2.5-VL-7B's and CLIP-L's.
When tiny_text_configs.json sits next to that JSON file, the tiny configs replace those two (the tests' tiny
qwen_2.5_vl_7b*.safetensors / clip_l.safetensors), tokenizers staying ComfyUI's bundled ones.

Cancel tests: while a file `slow_blocks` next to that JSON file holds "SECONDS CLASS [CLASS ...]", every block of
those classes (Qwen / CLIP layers, DiT blocks, VAE resnet blocks) sleeps SECONDS after it ran, so that a stage of
the tiny models lasts long enough to be cancelled in its middle.

GET /k5test/registrations lists the node IDs every loaded custom node pack registers (V1 mappings or V3 node lists),
so that a test can see an ID two packs claim, whichever ComfyUI kept.
"""

import dataclasses
import json
import logging
import os
import sys


class RandomConditioning:
    """A CONDITIONING of random Qwen-width embeddings and a pooled CLIP vector, as ComfyUI's own Kandinsky 5 text
    encode gives (unpadded, no mask): ComfyUI's native model at real width needs 3584-wide text, which the tests' tiny
    text encoders do not give."""

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's V1 API)
        return {"required": {"seed": ("INT", {"default": 0}), "tokens": ("INT", {"default": 8, "min": 1})}}

    def make(self, seed, tokens):
        import torch

        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, 3584, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]],)


NODE_CLASS_MAPPINGS: dict = {"K5TestRandomConditioning": RandomConditioning}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

_spec = os.environ.get("K5_TINY_VARIANTS")
if _spec:
    if "kandinsky_core" not in sys.modules:  # ComfyUI loaded this pack first: import the engine as the K5 pack's
        # __init__ does, under its own name and without the pack folder on sys.path (ComfyUI has a `nodes` too)
        import importlib.util

        folder = os.path.join(os.environ["K5_PACK_DIR"], "kandinsky_core")
        spec = importlib.util.spec_from_file_location(
            "kandinsky_core", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
        )
        sys.modules["kandinsky_core"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["kandinsky_core"])
    from kandinsky_core import variants

    with open(_spec) as f:
        tiny = json.load(f)
    for name, fields in tiny.items():
        arch = variants.DiTArch(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        variants.VARIANTS[name] = dataclasses.replace(variants.VARIANTS[name], arch=arch)
    logging.warning("K5 TEST PACK: tiny architectures swapped into variants %s", ", ".join(tiny))
    _text = os.path.join(os.path.dirname(_spec), "tiny_text_configs.json")
    if os.path.isfile(_text):
        from kandinsky_core import text_encoders

        with open(_text) as f:
            configs = json.load(f)
        text_encoders.QWEN25_VL_7B_CONFIG = configs["qwen"]
        text_encoders.CLIP_L_TEXT_CONFIG = configs["clip"]
        logging.warning("K5 TEST PACK: tiny configs for single-file text encoders")

    import time

    import torch

    _SLOW_FILE = os.path.join(os.path.dirname(_spec), "slow_blocks")
    _BLOCKS = {"Qwen2_5_VLDecoderLayer", "CLIPEncoderLayer", "TextBlock", "VisualBlock", "ResnetBlock"}

    def _slow_blocks(module, args, output):
        name = type(module).__name__
        if name not in _BLOCKS or not type(module).__module__.startswith(("kandinsky_core", "transformers")):
            return
        if getattr(output, "is_meta", False):  # memory planning on meta tensors: no real work to slow down
            return
        try:
            with open(_SLOW_FILE) as f:
                seconds, *classes = f.read().split()
        except OSError:
            return
        if name in classes:
            time.sleep(float(seconds))

    torch.nn.modules.module.register_module_forward_hook(_slow_blocks)


def _custom_node_registrations() -> dict[str, list[str]]:
    """{custom node pack module file: the node IDs it registers}, for every pack the server has loaded: its
    NODE_CLASS_MAPPINGS (V1) or the schemas of its comfy_entrypoint()'s node list (V3). Which module wins an ID two
    of them register depends on the load order; this lists every claim."""
    import asyncio
    import inspect

    import folder_paths

    roots = {os.path.abspath(p) for p in folder_paths.get_folder_paths("custom_nodes")}
    out: dict[str, list[str]] = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path:
            continue
        path = os.path.abspath(path)  # not realpath: a pack may be a symlink (ours is, in the tests)
        folder = os.path.dirname(path)
        if not (folder in roots or (os.path.basename(path) == "__init__.py" and os.path.dirname(folder) in roots)):
            continue  # not a pack's own module (a single file, or a folder's __init__.py, in custom_nodes)
        mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
        if mappings is not None:
            out[path] = sorted(mappings)
        elif callable(getattr(module, "comfy_entrypoint", None)):
            ext = module.comfy_entrypoint()
            ext = asyncio.run(ext) if inspect.isawaitable(ext) else ext
            node_list = ext.get_node_list()
            node_list = asyncio.run(node_list) if inspect.isawaitable(node_list) else node_list
            out[path] = sorted(cls.GET_SCHEMA().node_id for cls in node_list)
    return out


_server = sys.modules.get("server")
if _spec and getattr(getattr(_server, "PromptServer", None), "instance", None) is not None:

    @_server.PromptServer.instance.routes.get("/k5test/registrations")
    async def _registrations(request):
        import asyncio

        from aiohttp import web

        # the entrypoints are coroutines: run them away from the server's own event loop
        return web.json_response(await asyncio.to_thread(_custom_node_registrations))
