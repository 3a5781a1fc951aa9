"""Kandinsky 5 VAE Decode (LATENT -> IMAGE frames) and VAE Encode (IMAGE -> LATENT for I2V / I2I)."""

from __future__ import annotations

import dataclasses

import torch
from comfy_api.latest import io

from kandinsky_core.errors import InputError
from kandinsky_core.settings import Problem

from . import comfy_glue, comfy_model, queued_graph
from .common import ADVANCED, CATEGORY, K5_VAE, fail, validation_result, widget_range_problem

TILING = ("auto", "on", "off")


def pixels_to_image(pixels: torch.Tensor) -> torch.Tensor:
    """VAE output [B, 3, F, H, W] (or [B, 3, H, W]) in -1..1 -> ComfyUI IMAGE [B*F, H, W, 3] in 0..1."""
    if pixels.ndim == 4:
        pixels = pixels[:, :, None]
    frames = pixels.float().clamp(-1, 1).add(1).div(2)
    return frames.permute(0, 2, 3, 4, 1).reshape(-1, *frames.shape[3:], 3).contiguous().cpu()


def image_to_pixels(image: torch.Tensor, width: int, height: int, crop: bool = True) -> torch.Tensor:
    """ComfyUI IMAGE [N, H, W, C] in 0..1 -> [N, 3, H', W'] in -1..1, resized to width x height when they are given
    (non-zero): to cover it and centre-cropped (crop), else the whole image scaled to it (the official I2V start).

    Pixels go through 8-bit values first, as an image file read by the official pipeline does."""
    from kandinsky_core.media import resize, resize_center_crop

    if image.ndim != 4 or image.shape[-1] < 3:
        raise InputError(f"image has shape {tuple(image.shape)}: expected a ComfyUI IMAGE [N, H, W, 3].")
    u8 = (image[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 3, 1, 2)
    if width and height:
        fit = resize_center_crop if crop else resize
        u8 = torch.stack([fit(x, width, height) for x in u8])
    return u8.float() / 127.5 - 1.0


def param_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def decode_memory(vae_kind: str, shape: tuple[int, ...]) -> int:
    """Rough untiled activation bytes (FLUX decode, and encoding one image)."""
    frames = 4 * (shape[2] - 1) + 1 if vae_kind == "hunyuan" and len(shape) == 5 else 1
    return int(shape[0] * frames * shape[-2] * shape[-1] * 64 * 128 * 4 * 3)


def hunyuan_decode_plan(vae, shape: tuple[int, ...], tiling: str, tiles) -> tuple[bool, object, int]:
    """(tiled, VAETiling, bytes to ask ComfyUI for) of a HunyuanVideo decode. auto: the largest tiles that fit the
    device's memory (kandinsky_core.hunyuan_vae.plan_decode, from measured peaks); on / off: the given tiles or
    none. The bytes are the measured peak of that decode, so ComfyUI moves the whole VAE to the device (it would
    leave a plain-torch VAE on the CPU, silently, when asked for more than it has)."""
    from kandinsky_core.hunyuan_vae import decode_peak_bytes, plan_decode
    from kandinsky_core.memory import ALLOCATOR_MARGIN

    model = vae.vae
    if tiling == "auto":
        budget = comfy_glue.available_memory(vae.patcher) / ALLOCATOR_MARGIN
        plan = plan_decode(model.config, param_dtype(model), shape, budget)
        tiled, tiles, peak = plan.tiled, plan.tiling, plan.peak_bytes
    else:
        tiled = tiling == "on"
        peak = decode_peak_bytes(model.config, param_dtype(model), shape, tiled, tiles)
    return tiled, tiles, int(peak * ALLOCATOR_MARGIN)


class VAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="K5VAEDecode",
            display_name="Kandinsky 5 VAE Decode",
            category=f"{CATEGORY}/latent",
            description="Decodes a Kandinsky 5 (HunyuanVideo or FLUX) latent into frames, tiled to bound memory.",
            inputs=[
                K5_VAE.Input("vae", tooltip="From Load Kandinsky 5 VAE."),
                io.Latent.Input("samples", tooltip="From Kandinsky 5 Sampler (or any HunyuanVideo / FLUX latent)."),
                io.Combo.Input("tiling", options=list(TILING), default="auto", tooltip=
                               "auto: untiled when it fits the device, else the largest tiles that fit (HunyuanVideo; "
                               "sizes below are ignored); on: the tile sizes below; off: untiled. Tiles are "
                               "cross-faded; tiled output differs slightly."),
                io.Int.Input("tile_px", **ADVANCED, default=256, min=64, max=2048, step=32, tooltip=
                             "Spatial tile size in pixels."),
                io.Int.Input("overlap_px", **ADVANCED, default=64, min=0, max=512, step=16, tooltip=
                             "Spatial tile overlap in pixels (less than tile_px)."),
                io.Int.Input("tile_frames", **ADVANCED, default=16, min=4, max=256, step=4, tooltip=
                             "Temporal tile length in frames (HunyuanVideo only), a multiple of 4."),
                io.Int.Input("overlap_frames", **ADVANCED, default=8, min=0, max=128, step=4, tooltip=
                             "Temporal tile overlap in frames, a multiple of 4 and less than tile_frames."),
            ],
            hidden=[io.Hidden.unique_id],  # validate_inputs finds the node in the queued graph (queued_graph.py)
            outputs=[
                io.Image.Output(display_name="images", tooltip=
                                "Frames [N, H, W, 3] in 0..1 (all frames of every batch item), for Save Image / video "
                                "nodes."),
            ],
        )  # fmt: skip

    @classmethod
    def validate_inputs(cls, tile_px, overlap_px, tile_frames, overlap_frames, vae=None, samples=None):
        """The tile sizes and, in a queued graph, a VAE of the other kind than the DiT behind the samples."""
        from kandinsky_core.hunyuan_vae import VAETiling, tiling_problem

        sizes = dict(tile_px=tile_px, overlap_px=overlap_px, tile_frames=tile_frames, overlap_frames=overlap_frames)
        problems = [widget_range_problem(cls, **sizes) or tiling_problem(VAETiling(**sizes))]
        queued = queued_graph.queued_node(cls.hidden.unique_id if cls.hidden else None)
        if queued:
            prompt, node = queued
            sampler = queued_graph.linked(prompt, node, "samples")
            dit = sampler and sampler.get("class_type") == "K5Sampler" and queued_graph.dit_behind(prompt, sampler)
            problems.append(queued_graph.vae_problem(queued_graph.vae_behind(prompt, node), dit or None,
                                                     "the samples come from"))  # fmt: skip
        return "\n".join(p for p in problems if p) or True

    @classmethod
    def execute(cls, vae, samples, tiling, tile_px, overlap_px, tile_frames, overlap_frames) -> io.NodeOutput:
        with fail("Kandinsky 5 VAE Decode"):
            z = samples["samples"]
            if z.ndim not in (4, 5) or z.shape[1] != 16:
                raise InputError(
                    f"samples has shape {tuple(z.shape)}: expected a 16-channel latent [B, 16, T, H/8, W/8] (or "
                    "[B, 16, H/8, W/8]). Connect a Kandinsky 5 / HunyuanVideo / FLUX latent."
                )
            made_for = samples.get("kandinsky5_vae")
            if made_for not in (None, vae.kind):
                names = {"hunyuan": "the HunyuanVideo VAE (video models)", "flux": "the FLUX VAE (image models)"}
                raise InputError(
                    f"samples were made for {names.get(made_for, made_for)} but the connected VAE is "
                    f"{names.get(vae.kind, vae.kind)}. Load {names.get(made_for, made_for)} in Load Kandinsky 5 VAE."
                )
            model = vae.vae
            if vae.kind == "hunyuan":
                from kandinsky_core.hunyuan_vae import VAETiling

                if z.ndim == 4:
                    z = z[:, :, None]
                tiles = VAETiling(tile_px, overlap_px, tile_frames, overlap_frames)
                tiled, tiles, memory = hunyuan_decode_plan(vae, tuple(z.shape), tiling, tiles)
                comfy_glue.load(vae.patcher, memory)
                z = z.to(device=comfy_glue.load_device(), dtype=param_dtype(model))
                with comfy_glue.cancellable(model):  # Cancel stops between VAE blocks, in every tile
                    pixels = model.decode(z, tiled=tiled, tiling=tiles)
            else:
                comfy_glue.load(vae.patcher, decode_memory(vae.kind, tuple(z.shape)))
                tiled = {"auto": "auto", "on": True, "off": False}[tiling]
                z = z.to(device=comfy_glue.load_device(), dtype=param_dtype(model))
                tile = None if tiled is False or (tiled == "auto" and max(z.shape[-2:]) * 8 <= 2048) else tile_px // 8
                with comfy_glue.cancellable(model):
                    pixels = model.decode(z, tile=tile, overlap=max(1, overlap_px // 8)) if tile else model.decode(z)
            return io.NodeOutput(pixels_to_image(pixels))


class VAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="K5VAEEncode",
            display_name="Kandinsky 5 VAE Encode",
            category=f"{CATEGORY}/latent",
            description="Encodes images into a Kandinsky 5 latent: the I2V start image or the I2I image to edit.",
            inputs=[
                K5_VAE.Input("vae", tooltip="From Load Kandinsky 5 VAE (the same VAE as for decoding)."),
                io.Image.Input("images", tooltip="The start image (I2V) or the image to edit (I2I)."),
                io.Int.Input("width", default=0, min=0, max=4096, step=16, tooltip=
                             "Resize to cover this width and centre-crop. 0 = the size the official pipelines take "
                             "from the image for the connected model (I2V: the whole image at the model's area, no "
                             "crop; I2I: the nearest trained aspect, cover-cropped); with no model, the image's own "
                             "size."),
                io.Int.Input("height", default=0, min=0, max=4096, step=16, tooltip=
                             "Resize height (with width). 0 = from the image (see width)."),
                io.Model.Input("model", optional=True, tooltip=
                             "The DiT, so that width = height = 0 sizes the image as the official pipeline of its "
                             "variant does. Leave the sampler's width and height at 0 to follow."),
            ],
            hidden=[io.Hidden.unique_id],  # validate_inputs finds the node in the queued graph (queued_graph.py)
            outputs=[
                io.Latent.Output(display_name="latent", tooltip=
                                 "One one-frame latent [N, 16, 1, H/8, W/8] per image, in the VAE's own (unscaled) "
                                 "space."),
                io.Image.Output(display_name="image", tooltip=
                                "The images as encoded (resized / cropped). I2I: connect to Text Encode's edit_image, "
                                "so that Qwen sees the image the official pipeline shows it."),
            ],
        )  # fmt: skip

    @classmethod
    def validate_inputs(cls, width, height, vae=None, model=None):
        """The size and, in a queued graph, a VAE of the other kind than the connected DiT's."""
        from kandinsky_core.settings import NODE_WORDING, input_problems

        wording = dataclasses.replace(NODE_WORDING, both_sizes="0 for both to take the size from the image")
        problems = input_problems(width=width, height=height, steps=None, guidance=None, scheduler_scale=None,
                                  wording=wording)  # fmt: skip
        queued = queued_graph.queued_node(cls.hidden.unique_id if cls.hidden else None)
        if queued:
            prompt, node = queued
            dit = queued_graph.dit_behind(prompt, node)
            problem = queued_graph.vae_problem(queued_graph.vae_behind(prompt, node), dit, "the model is")
            if problem:
                problems.append(Problem("vae", problem))
        return validation_result(problems)

    @classmethod
    def execute(cls, vae, images, width, height, model=None) -> io.NodeOutput:
        with fail("Kandinsky 5 VAE Encode"):
            crop = True
            variant = None if model is None else comfy_model.k5_model(model).variant
            if width == height == 0 and variant is not None and variant.task in ("i2v", "i2i"):
                from kandinsky_core.variants import crops_input_image, size_for_image

                width, height = size_for_image(variant, int(images.shape[2]), int(images.shape[1]))
                crop = crops_input_image(variant, size_from_image=True)
            pixels = image_to_pixels(images, width, height, crop)
            n, _, h, w = pixels.shape
            if h % 16 or w % 16:
                raise InputError(
                    f"images are {w}x{h} px: Kandinsky 5 needs multiples of 16. Set width and height here (e.g. the "
                    "sampler's) to resize and crop."
                )
            comfy_glue.load(vae.patcher, decode_memory(vae.kind, (n, 16, 1, h // 8, w // 8)))
            model = vae.vae
            x = pixels.to(device=comfy_glue.load_device(), dtype=param_dtype(model))[:, :, None]  # [N, 3, 1, H, W]
            with comfy_glue.cancellable(model):
                latent = model.encode(x).float()
            if latent.ndim == 4:
                latent = latent[:, :, None]
            return io.NodeOutput({"samples": latent.cpu()}, pixels_to_image(pixels))
