"""ComfyUI entry point of the Kandinsky 5 node pack. Nodes live in `nodes/`, the engine in `kandinsky_core/`.

The classic NODE_CLASS_MAPPINGS API loads on every ComfyUI release (v0.3.64 and v0.33.0 alike). Importing is
cheap: torch is already loaded by ComfyUI; transformers and all weights load only when a node runs.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)  # `kandinsky_core` is imported by its own name, as the CLI and the tests do

if __package__:  # ComfyUI imports the pack as a package. pytest imports this file as a plain module when the
    # checkout's folder name is not an identifier (e.g. comfyui-kandinsky5): then there is nothing to register.
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .nodes.web_api import register_routes

    register_routes()  # GET /kandinsky5/variants for js/kandinsky5.js (a no-op outside ComfyUI)

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
