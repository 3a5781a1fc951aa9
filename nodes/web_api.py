"""GET /kandinsky5/variants: the variants table and the variant each DiT file is detected as, for js/kandinsky5.js.

The front end fills the sampler's widgets from this answer; the numbers all come from kandinsky_core.variants.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from kandinsky_core.errors import KandinskyError
from kandinsky_core.settings import NABLA_TILE_PX
from kandinsky_core.variants import FPS, VARIANTS, Variant

ROUTE = "/kandinsky5/variants"
log = logging.getLogger("kandinsky5")
_detected: dict[tuple[str, int, int], dict[str, Any]] = {}  # (path, mtime_ns, size) -> answer; headers never change


def sampler_defaults(v: Variant) -> dict[str, Any]:
    """The Kandinsky 5 Sampler widget values that reproduce the variant's official settings. I2V / I2I: width and
    height 0, so that the sampler follows its input latent, which VAE Encode sized from the image."""
    from_image = v.task in ("i2v", "i2i")
    return {
        "width": 0 if from_image else v.default_width,
        "height": 0 if from_image else v.default_height,
        "length": v.default_frames,
        "steps": v.steps,
        "guidance": v.guidance,
        "scheduler_scale": v.scheduler_scale,
    }


def variant_json(v: Variant) -> dict[str, Any]:
    p = v.nabla
    return {
        "name": v.name,
        "title": v.title,
        "task": v.task,
        "family": v.family,
        "quality": v.quality,
        "is_video": v.is_video,
        "steps": v.steps,
        "guidance": v.guidance,
        "scheduler_scale": v.scheduler_scale,
        "nabla": {"P": p.P, "wT": p.wT, "wH": p.wH, "wW": p.wW} if p else None,
        "resolutions": [list(r) for r in v.resolutions],
        "default_size": list(v.default_size),
        "max_frames": v.max_frames,
        "durations": list(v.durations),
        "i2v_max_area": v.i2v_max_area,
        "defaults": sampler_defaults(v),
    }


def detect_file(path: str) -> dict[str, Any]:
    """{"variant": detected, "fits": the variants the loader accepts for it (DetectionResult.accepted), "guess": what
    to tell the user when the file name left several variants (else None)} for a Kandinsky 5 DiT,
    {"variant": None, "error": why} for anything else. Reads the header only."""
    from kandinsky_core import loading

    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _detected:
        try:
            found = loading.detect_variant(loading.read_safetensors_header(path), filename=Path(path).name)
            _detected[key] = {"variant": found.variant, "fits": list(found.accepted), "guess": found.guess}
        except KandinskyError as e:
            _detected[key] = {"variant": None, "error": str(e)}
    return _detected[key]


def dit_files() -> dict[str, dict[str, Any]]:
    """Every file the DiT loader lists, with the variant it is detected as."""
    from . import files

    out = {}
    for name in files.list_models("diffusion_models"):
        try:
            out[name] = detect_file(str(files.resolve("diffusion_models", name, "dit_name")))
        except (KandinskyError, OSError) as e:
            out[name] = {"variant": None, "error": str(e)}
    return out


def payload() -> dict[str, Any]:
    return {
        "fps": FPS,
        "nabla_tile_px": NABLA_TILE_PX,
        "variants": {name: variant_json(v) for name, v in VARIANTS.items()},
        "files": dit_files(),
    }


def register_routes() -> bool:
    """Add the route to ComfyUI's server when running inside ComfyUI; False (and nothing done) elsewhere. ComfyUI's
    main.py has imported its `server` before it loads custom nodes; importing it here would start ComfyUI's model
    management when ComfyUI's source is merely on sys.path (the unit tests)."""
    module = sys.modules.get("server")
    prompt_server = getattr(module, "PromptServer", None)
    server = getattr(prompt_server, "instance", None)
    if server is None:
        return False
    from aiohttp import web

    @server.routes.get(ROUTE)
    async def kandinsky5_variants(request):
        return web.json_response(payload())

    return True
