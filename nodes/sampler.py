"""Kandinsky 5 Sampler: seeded noise, the flow-matching Euler sampler (CFG, NABLA, I2V / I2I), LATENT out."""

from __future__ import annotations

import contextlib

import torch
from comfy_api.latest import io

from kandinsky_core.errors import InputError
from kandinsky_core.settings import (
    GUIDANCE_MAX,
    SCHEDULER_SCALE_MAX,
    STEPS_MAX,
    Problem,
    input_problems,
    raise_problems,
    resolve,
    text_width_problem,
)
from kandinsky_core.variants import FPS, MAX_SIZE, Variant

from . import comfy_glue, comfy_model, queued_graph
from .common import CATEGORY, fail, validation_result, widget_range_problem
from .model_options import options_of
from .text import from_conditioning


def latent_frames(length: int) -> int:
    return (length - 1) // 4 + 1


def memory_estimate(model, batch: int, t: int, h: int, w: int, cfg: bool, text_len: int = 256, nabla=None) -> int:
    """Bytes of activations one sampling step needs beyond the DiT's weights (Kandinsky5Model.memory_estimate, the
    same estimate ComfyUI's own samplers get from the model's memory_required)."""
    return comfy_model.k5_model(model).memory_estimate((batch, 16, t, h, w), text_len, cfg, nabla)


class Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="K5Sampler",
            display_name="Kandinsky 5 Sampler",
            category=f"{CATEGORY}/sampling",
            description="Generates a Kandinsky 5 video or image latent: flow-matching Euler sampling with "
            "classifier-free guidance, NABLA sparse attention where the variant uses it (or as Kandinsky 5 NABLA "
            "sets it), a start image (I2V) or an edit image (I2I). 0 / -1 mean the variant's official setting. It "
            "also runs ComfyUI's own Kandinsky 5 model (Load Diffusion Model, with ComfyUI's LoRA and fp8 weights; the "
            "variant is taken from its tensors and the run, and logged) and takes ComfyUI's Kandinsky 5 text encode. "
            "Note: ComfyUI's text encoder corrects the official video template's spelling ('promt engineer' -> "
            "'prompt engineer'); the DiT was trained with the misspelt template, which Kandinsky 5 Text Encode keeps.",
            inputs=[
                io.Model.Input("model", tooltip="A Kandinsky 5 DiT: from Load Kandinsky 5 DiT or ComfyUI's Load "
                               "Diffusion Model, a LoRA loader (ours or ComfyUI's) or a Kandinsky 5 option node "
                               "(NABLA, MagCache, Compile)."),
                io.Conditioning.Input("positive", tooltip="The prompt, from Kandinsky 5 Text Encode (or ComfyUI's "
                                      "CLIPTextEncodeKandinsky5, whose video template differs: see the description)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (ignored when guidance is 1)."),
                io.Int.Input("width", default=768, min=0, max=MAX_SIZE, step=16, tooltip=
                             "Width in pixels: a multiple of 16 (128 when NABLA is on). Lite/Pro SD: 768x512, 512x512, "
                             "512x768; Pro HD and Image: 1024 px class. 0 (with height 0) = the size of start_latent "
                             "/ edit_latent (set by Kandinsky 5 VAE Encode), else the variant's default."),
                io.Int.Input("height", default=512, min=0, max=MAX_SIZE, step=16, tooltip=
                             "Height in pixels: a multiple of 16 (128 when NABLA is on). 0 = from the input latent "
                             "(see width)."),
                io.Int.Input("length", default=121, min=1, max=481, step=4, tooltip=
                             f"Frames, 4k+1, at {FPS} fps: 121 = 5 s, 241 = 10 s, 25 = 1 s. 1 for image models."),
                io.Int.Input("batch_size", default=1, min=1, max=16, tooltip="Videos/images per run."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=True, tooltip=
                             "Noise seed (CPU generator: the same seed gives the same result on any device)."),
                io.Int.Input("steps", default=0, min=0, max=STEPS_MAX, tooltip=
                             "Sampling steps. 0 = the variant's (50; distilled: 16)."),
                io.Float.Input("guidance", default=-1.0, min=-1.0, max=GUIDANCE_MAX, step=0.1, tooltip=
                               "Classifier-free guidance. -1 = the variant's (5 video, 3.5 image, 1 distilled/no-CFG); "
                               "1 turns CFG off (the negative prompt is not evaluated)."),
                io.Float.Input("scheduler_scale", default=0.0, min=0.0, max=SCHEDULER_SCALE_MAX, step=0.5, tooltip=
                               "Timestep shift of the flow schedule. 0 = the variant's (10, or 5 / 3 where the "
                               "official config says so)."),
                io.Latent.Input("start_latent", optional=True, tooltip=
                                "I2V: the start image from Kandinsky 5 VAE Encode, at width x height. Needed by I2V "
                                "models, refused by the others."),
                io.Latent.Input("edit_latent", optional=True, tooltip=
                                "I2I edit: the image to edit from Kandinsky 5 VAE Encode, at width x height. Needed by "
                                "I2I models, refused by the others."),
            ],
            hidden=[io.Hidden.unique_id],  # validate_inputs finds the node in the queued graph (queued_graph.py)
            outputs=[
                io.Latent.Output(display_name="latent", tooltip=
                                 "[B, 16, T, H/8, W/8] in the VAE's own (unscaled) latent space: decode it with "
                                 "Kandinsky 5 VAE Decode, or ComfyUI's VAE Decode with the HunyuanVideo VAE."),
            ],
        )  # fmt: skip

    @classmethod
    def validate_inputs(
        cls, width, height, length, guidance, scheduler_scale, model=None, start_latent=None, edit_latent=None
    ):  # fmt: skip
        """Every problem, one per line, each starting with the input it concerns: those the widgets alone show and,
        when the server kept the queued graph, those of the variant of the DiT behind `model` (sizes, frames, NABLA
        tiles as the NABLA node on the way sets them, a start / edit image it needs or refuses)."""
        queued = queued_graph.queued_node(cls.hidden.unique_id if cls.hidden else None)
        dit = queued and queued_graph.dit_behind(*queued)
        if dit:
            has = queued[1].get("inputs", {})
            _, problems = resolve(
                dit.variant, width=width, height=height, length=length, steps=None, guidance=guidance,
                scheduler_scale=scheduler_scale, nabla=dit.nabla, has_start="start_latent" in has,
                has_edit="edit_latent" in has,
            )  # fmt: skip
        else:
            problems = input_problems(width=width, height=height, length=length, guidance=guidance,
                                      scheduler_scale=scheduler_scale, steps=None)  # fmt: skip
        length_range = widget_range_problem(cls, length=length)
        if length_range and not any(p.input == "length" for p in problems):
            problems.append(Problem("length", length_range))
        return validation_result(problems)

    @classmethod
    def execute(
        cls, model, positive, negative, width, height, length, batch_size, seed, steps, guidance, scheduler_scale,
        start_latent=None, edit_latent=None,
    ) -> io.NodeOutput:  # fmt: skip
        from kandinsky_core.sampling import dit_to_latent, flow_timesteps, latent_to_dit, make_noise
        from kandinsky_core.sampling import sample as run_sampler

        with fail("Kandinsky 5 Sampler"):
            image = "start" if start_latent is not None else "edit" if edit_latent is not None else None
            k5 = comfy_model.run_model(model, length, image)
            v = k5.variant
            width, height = follow_size(v, width, height, start_latent if start_latent is not None else edit_latent)
            options = options_of(model)  # from the option nodes (NABLA, MagCache, Compile); nothing else is read
            s, problems = resolve(
                v, width=width, height=height, length=length, steps=steps, guidance=guidance,
                scheduler_scale=scheduler_scale, nabla=options.nabla, has_start=start_latent is not None,
                has_edit=edit_latent is not None,
            )  # fmt: skip
            cond = from_conditioning(positive, "positive")
            uncond = from_conditioning(negative, "negative") if s.cfg else None
            for label, c in (("positive", cond), ("negative", uncond)):
                problem = c and text_width_problem(v, label, c.text_embeds.shape[-1], c.pooled.shape[-1])
                if problem:
                    problems.append(problem)
            raise_problems(problems)
            warn_template(v, length, positive)

            shape = (batch_size, 16, latent_frames(length), height // 8, width // 8)
            comfy_glue.log.info(
                "Kandinsky 5 Sampler: %s, %dx%d, %d frames, %d steps, guidance %g, scheduler scale %g, NABLA %s",
                v.name, width, height, length, s.steps, s.guidance, s.scheduler_scale, s.nabla or "off",
            )  # fmt: skip
            cfg = uncond is not None
            text_len = max(cond.text_embeds.shape[1], uncond.text_embeds.shape[1] if cfg else 0)
            estimate = k5.memory_estimate((batch_size, 16, *shape[2:]), text_len, cfg, s.nabla)
            if k5 is not getattr(model, "model", None) and options.compile:
                raise InputError(
                    "model: Kandinsky 5 Compile works on Load Kandinsky 5 DiT's model; ComfyUI's own Kandinsky 5 model "
                    "(Load Diffusion Model) has ComfyUI's TorchCompileModel node. Remove Kandinsky 5 Compile, or load "
                    "the DiT with Load Kandinsky 5 DiT."
                )
            problem = comfy_model.scaled_weight_patch_problem(model)
            if problem:
                raise InputError(problem)
            comfy_glue.load(model, estimate)  # ComfyUI applies the LoRA weight patches here
            device = comfy_glue.load_device()
            dit = k5.diffusion_model
            dtype = dit.compute_dtype
            noise = make_noise(shape, seed, dtype=torch.float32, device=device)
            conditions = {}
            for name, lat in (("start_latent", start_latent), ("edit_latent", edit_latent)):
                if lat is not None:
                    conditions[name] = latent_to_dit(image_latent(lat, name, shape).to(device), v.latent_scale)
            callback = comfy_glue.step_callback(
                noise, flow_timesteps(s.steps, s.scheduler_scale), v.latent_scale, v.vae, s.steps
            )
            cache_setting, compile_setting = options.block_cache, options.compile
            block_cache = None if cache_setting is None else cache_setting.make(v)
            compiled = compile_setting.applied(dit) if compile_setting else contextlib.nullcontext()
            # Cancel stops between DiT blocks too (not in compiled blocks: a check there would break the graph)
            cancellable = contextlib.nullcontext() if compile_setting else comfy_glue.cancellable(dit)
            with compiled, cancellable:
                x = run_sampler(
                    dit,
                    noise,
                    cond.to(device, dtype),
                    uncond.to(device, dtype) if cfg else None,
                    steps=s.steps,
                    guidance=s.guidance,
                    scheduler_scale=s.scheduler_scale,
                    rope_scale=v.rope_scale,
                    nabla=s.nabla,
                    first_frame_latent=conditions.get("start_latent"),
                    edit_latent=conditions.get("edit_latent"),
                    callback=callback,
                    attention_backend=None if k5.attention == "auto" else k5.attention,
                    block_cache=block_cache,
                )
            if cache_setting is not None:
                cache_setting.done(block_cache, s.steps, cfg, v)
            # the VAE it belongs to, so that VAE Decode refuses the other one
            return io.NodeOutput({"samples": dit_to_latent(x, v.latent_scale).float().cpu(), "kandinsky5_vae": v.vae})


def warn_template(v: Variant, length: int, positive: list) -> str | None:
    """A one-frame run of a video model encoded under "video": the official pipelines use "image" there. Logged
    (the run goes on: Text Encode cannot see the length); the message is returned, None when all is well."""
    from kandinsky_core.variants import encode_template

    used = positive[0][1].get("kandinsky5_template") if isinstance(positive[0][1], dict) else None
    wanted = encode_template(v, length)
    if used is None or used == wanted or not v.is_video:
        return None
    message = (
        f"Kandinsky 5 Sampler: length={length} with {v.name}, but the prompt was encoded under the {used!r} template; "
        f"the official pipelines use {wanted!r} for this. Set template to {wanted} in Kandinsky 5 Text Encode."
    )
    comfy_glue.log.warning(message)
    return message


def follow_size(v: Variant, width: int, height: int, latent: dict | None) -> tuple[int, int]:
    """width = height = 0: the size of the input latent (Kandinsky 5 VAE Encode sized it from the image), else the
    variant's default; any other size is the user's, kept."""
    if width or height:
        return width, height
    if latent is None:
        return v.default_size
    x = latent["samples"] if isinstance(latent, dict) and "samples" in latent else None
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
        raise InputError("width and height are 0 but the input latent has no [B, 16, (T,) h, w] samples to size from.")
    return int(x.shape[-1]) * 8, int(x.shape[-2]) * 8


def image_latent(latent: dict, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The first frame of a LATENT ([B, 16, T, h, w], or [B, 16, h, w] from an image VAE) as [b, 16, 1, h, w]."""
    x = latent["samples"]
    if x.ndim == 4:
        x = x[:, :, None]
    h, w = shape[3], shape[4]
    if x.ndim != 5 or x.shape[1] != 16 or tuple(x.shape[3:]) != (h, w):
        raise InputError(
            f"{name} has shape {tuple(x.shape)}: it must be a 16-channel latent of the output size, [1, 16, 1, {h}, "
            f"{w}] ({w * 8}x{h * 8} px). Resize the image to width x height in Kandinsky 5 VAE Encode."
        )
    return x[:, :, :1].float()
