"""TEST ONLY - never shipped. A ComfyUI custom node pack that the integration fixture copies into the test
server's custom_nodes folder, next to comfyui-kandinsky5.

Tiny random DiTs have architectures no released variant has, so the real loaders (rightly) refuse them. When
K5_TINY_VARIANTS names a JSON file {variant name: DiTArch fields}, this pack swaps the `arch` of those variants
in kandinsky_core's variants table, in the server process, before any node runs - exactly what
tests/test_pipeline.py does with monkeypatch. Every other number of a variant (steps, guidance, scheduler scale,
rope scale, template, VAE, latent scale) stays the released one, and every loader stays the real one.
"""

import dataclasses
import json
import logging
import os
import sys

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

_spec = os.environ.get("K5_TINY_VARIANTS")
if _spec:
    pack = os.environ["K5_PACK_DIR"]
    if pack not in sys.path:
        sys.path.append(pack)
    from kandinsky_core import variants

    with open(_spec) as f:
        tiny = json.load(f)
    for name, fields in tiny.items():
        arch = variants.DiTArch(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        variants.VARIANTS[name] = dataclasses.replace(variants.VARIANTS[name], arch=arch)
    logging.warning("K5 TEST PACK: tiny architectures swapped into variants %s", ", ".join(tiny))
