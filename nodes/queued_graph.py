"""The graph being queued, for the checks ComfyUI's validation cannot make alone.

ComfyUI validates a prompt node by node (`validate_inputs`), before anything runs, and a node sees only its own
widget values: not the DiT file behind its model link, nor the VAE behind its vae link. So a T2V file in an I2V
graph, an image model decoded by the video VAE or a NABLA size the model's variant cannot take would only fail when
the node runs, after the models loaded or the sampling ran. ComfyUI hands each queued prompt to its on-prompt
handlers first, in the task that then validates it; `remember` keeps it in a context variable of that task, and the
nodes' `validate_inputs` walk its links back to the loaders (`dit_behind`, `vae_behind`). Elsewhere (a prompt run
without the server) nothing is remembered, every check here answers None, and the nodes' run-time checks still
refuse the same mismatches.
"""

from __future__ import annotations

import contextvars
import sys
from dataclasses import dataclass
from typing import Any

from kandinsky_core.errors import KandinskyError
from kandinsky_core.settings import NablaChoice
from kandinsky_core.variants import Variant

from . import files

_prompt: contextvars.ContextVar[dict | None] = contextvars.ContextVar("kandinsky5_queued_prompt", default=None)

LOADER = "K5LoadDiT"
VAE_LOADER = "K5LoadVAE"
NABLA = "K5Nabla"
MAX_HOPS = 64


def remember(json_data: Any) -> Any:
    """ComfyUI on-prompt handler: keep the queued prompt (API format) for this request's validation."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    _prompt.set(prompt if isinstance(prompt, dict) else None)
    return json_data


def register() -> bool:
    """Add `remember` to ComfyUI's on-prompt handlers; False (nothing done) outside a ComfyUI server."""
    server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    if server is None:
        return False
    server.add_on_prompt_handler(remember)
    return True


def queued_node(node_id: Any) -> tuple[dict, dict] | None:
    """(prompt, node) of the node being validated, when the server remembered the prompt it belongs to."""
    prompt = _prompt.get()
    node = prompt.get(str(node_id)) if prompt and node_id is not None else None
    return (prompt, node) if isinstance(node, dict) else None


def linked(prompt: dict, node: dict, name: str) -> dict | None:
    """The node feeding input `name` of `node`, or None (not connected, a widget value, or a missing node)."""
    value = node.get("inputs", {}).get(name)
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))):
        return None
    source = prompt.get(str(value[0]))
    return source if isinstance(source, dict) else None


@dataclass(frozen=True)
class DitSource:
    """The Load Kandinsky 5 DiT behind a model link: its file, the variant it runs as, the NABLA choice of the
    Kandinsky 5 NABLA node nearest the model's user (None without one: the variant's)."""

    dit_name: str
    variant: Variant
    nabla: NablaChoice | None


def _nabla_choice(node: dict) -> NablaChoice | None:
    """A Kandinsky 5 NABLA node's choice from its widget values (the DynamicCombo's as "mode.P" ... on v0.33.0)."""
    from .nabla import choice

    inputs = node.get("inputs", {})
    mode = inputs.get("mode", "auto")
    tuning = {k: inputs.get(f"mode.{k}", inputs.get(k)) for k in ("P", "wT", "wH", "wW")}
    if not isinstance(mode, str) or any(isinstance(v, list) for v in tuning.values()):
        return None  # linked values: known only when it runs
    try:
        return choice(mode, **tuning)
    except (TypeError, ValueError):
        return None


def dit_behind(prompt: dict, node: dict, name: str = "model") -> DitSource | None:
    """The Kandinsky 5 DiT loader behind input `name`, through any node that passes a model on (LoRA loaders, option
    nodes, ComfyUI's model patches: whatever has a linked `model` input). None when the chain ends elsewhere
    (ComfyUI's own loaders), or the loader's own inputs are wrong (the loader reports that itself)."""
    from .loaders import inspect_dit

    nabla = None
    source = linked(prompt, node, name)
    for _ in range(MAX_HOPS):
        if source is None:
            return None
        if source.get("class_type") == LOADER:
            break
        if source.get("class_type") == NABLA and nabla is None:
            nabla = _nabla_choice(source) or NablaChoice()
        source = linked(prompt, source, "model")
    else:
        return None
    dit_name, variant = source.get("inputs", {}).get("dit_name"), source.get("inputs", {}).get("variant", "auto")
    if not isinstance(dit_name, str) or not isinstance(variant, str):
        return None
    try:
        v = inspect_dit(files.resolve("diffusion_models", dit_name, "dit_name"), variant)
    except (KandinskyError, OSError):
        return None
    return DitSource(dit_name, v, nabla)


def vae_behind(prompt: dict, node: dict, name: str = "vae") -> tuple[str, str] | None:
    """(vae_name, "hunyuan" | "flux") of the Load Kandinsky 5 VAE feeding input `name`, or None."""
    from .loaders import vae_kind

    source = linked(prompt, node, name)
    if source is None or source.get("class_type") != VAE_LOADER:
        return None
    vae_name = source.get("inputs", {}).get("vae_name")
    if not isinstance(vae_name, str):
        return None
    try:
        return vae_name, vae_kind(files.resolve("vae", vae_name, "vae_name"))
    except (KandinskyError, OSError):
        return None


VAE_NAMES = {
    "hunyuan": "the HunyuanVideo VAE (hunyuan_video_vae_bf16.safetensors, video models)",
    "flux": "the FLUX VAE (ae.safetensors, image models)",
}


def vae_problem(vae: tuple[str, str] | None, dit: DitSource | None, what: str) -> str | None:
    """A VAE of the other kind than the DiT's variant was trained with ("vae: ..."), or None."""
    if vae is None or dit is None or vae[1] == dit.variant.vae:
        return None
    return (
        f"vae: {vae[0]} is {VAE_NAMES[vae[1]]}, but {what} {dit.dit_name}, a {dit.variant.name} model made for "
        f"{VAE_NAMES[dit.variant.vae]}. Pick that one in Load Kandinsky 5 VAE."
    )
