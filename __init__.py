"""ComfyUI entry point of the Kandinsky 5 node pack. Nodes live in `nodes/`, the engine in `kandinsky_core/`.

The nodes are V3 nodes: ComfyUI (v0.3.64 to v0.33.0 alike) calls `comfy_entrypoint()` and registers the nodes of the
extension it returns. There is deliberately no NODE_CLASS_MAPPINGS here: ComfyUI takes that older API first when a
module has it. Importing is cheap: torch is already loaded by ComfyUI; transformers and all weights load only when a
node runs.
"""

import importlib.util
import logging
import os
import sys

WEB_DIRECTORY = "./js"


def _import_engine() -> None:
    """Make the engine importable as `kandinsky_core`, its own name (as the CLI and the tests import it), without
    putting the pack folder on sys.path: there, our `nodes` package would share a name with ComfyUI's nodes.py."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kandinsky_core")
    loaded = sys.modules.get("kandinsky_core")
    if loaded is not None:
        theirs = os.path.realpath(os.path.dirname(getattr(loaded, "__file__", None) or "?"))
        if theirs != os.path.realpath(folder):
            logging.getLogger(__name__).warning(
                "Kandinsky 5: another kandinsky_core (%s) was imported before this pack's (%s) and is used instead. "
                "Remove the other copy (another install of this pack?) and restart ComfyUI.",
                theirs,
                folder,
            )
        return
    spec = importlib.util.spec_from_file_location(
        "kandinsky_core", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["kandinsky_core"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kandinsky_core"]
        raise


if __package__:  # ComfyUI imports the pack as a package. pytest imports this file as a plain module when the
    # checkout's folder name is not an identifier (e.g. comfyui-kandinsky5): then there is nothing to register.
    _import_engine()

    from .nodes import K5Extension, queued_graph
    from .nodes.web_api import register_routes

    register_routes()  # GET /kandinsky5/variants for js/kandinsky5.js (a no-op outside ComfyUI)
    queued_graph.register()  # the queued prompt, for validation that follows links (a no-op outside ComfyUI)

    async def comfy_entrypoint() -> K5Extension:
        return K5Extension()

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
else:
    __all__ = ["WEB_DIRECTORY"]
