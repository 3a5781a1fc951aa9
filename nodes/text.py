"""Text Encode (prompt and negative prompt -> CONDITIONING) and Prompt Expansion (the official beautifier)."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from kandinsky_core.errors import InputError
from kandinsky_core.sampling import TextConditioning

from . import comfy_glue, queued_graph
from .common import CATEGORY, K5_TEXT_ENCODERS, fail

AUTO = "auto"
TEMPLATES = ("video", "image2video", "image", "image_edit")
MAX_LENGTH = {"video": 256, "image2video": 256, "image": 512, "image_edit": 512}  # Qwen tokens after the template
NEGATIVE_DEFAULT = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, deformed, "
    "walking backwards"
)  # the official video pipelines' default; the image pipelines use ""
TEMPLATE_TOOLTIP = (
    "Qwen prompt template. auto: the one of the connected model's variant (video for T2V and I2V, as the official "
    "I2V pipeline encodes; image for T2I, image_edit for I2I), and image when the Kandinsky 5 Sampler it feeds makes "
    "one frame with a video model, as the official pipelines do."
)


def pick_template(template: str, model, frames: int | None = None) -> tuple[str, int]:
    """(template, Qwen max length): for auto, the DiT's variant's template for a run of `frames` frames (None: not
    known, the variant's own); else the chosen template."""
    if template == AUTO:
        if model is None:
            raise InputError(
                "template is auto but no model is connected: connect the Load Kandinsky 5 DiT output to `model`, or "
                f"pick a template ({', '.join(TEMPLATES)})."
            )
        from kandinsky_core.variants import encode_template

        from .comfy_model import k5_model

        v = k5_model(model).variant
        kind = v.text_template if frames is None else encode_template(v, frames)
        if kind != v.text_template:
            comfy_glue.log.info(
                "Kandinsky 5 Text Encode: template auto -> %s: the sampler makes %d frame(s) with %s, as the official "
                "pipelines encode such a run", kind, frames, v.name,
            )  # fmt: skip
        return kind, v.text_max_length
    if template not in TEMPLATES:
        raise InputError(f"template {template!r} is unknown. Allowed: auto, {', '.join(TEMPLATES)}.")
    return template, MAX_LENGTH[template]


def image_to_uint8(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [N, H, W, 3] float 0..1 -> the first image as uint8 [3, H, W]."""
    return (image[0, ..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(2, 0, 1).contiguous()


def to_conditioning(c: TextConditioning, template: str) -> list:
    """Our TextConditioning as ComfyUI CONDITIONING: [[text_embeds, {pooled_output, attention_mask, ...}]]."""
    extra = {"pooled_output": c.pooled, "attention_mask": c.text_mask, "kandinsky5_template": template}
    return [[c.text_embeds, extra]]


def from_conditioning(conditioning: list, label: str) -> TextConditioning:
    """The first entry of a CONDITIONING made by Kandinsky 5 Text Encode, or by ComfyUI's own Kandinsky 5 text encode
    (CLIPTextEncodeKandinsky5: no padding, so no mask needed)."""
    try:
        embeds, extra = conditioning[0][0], conditioning[0][1]
        pooled = extra["pooled_output"]
    except (IndexError, KeyError, TypeError):
        raise InputError(
            f"{label} is not a Kandinsky 5 conditioning (it lacks Qwen embeddings and a pooled CLIP output). "
            "Connect the output of Kandinsky 5 Text Encode."
        ) from None
    mask = extra.get("attention_mask")
    if mask is None and embeds.ndim == 3:  # ComfyUI's CLIPTextEncodeKandinsky5: unpadded, every token real
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool)
    if embeds.ndim != 3 or pooled.ndim != 2 or mask.shape != embeds.shape[:2]:
        raise InputError(
            f"{label} has shapes {tuple(embeds.shape)} / {tuple(pooled.shape)}: it was made by another text encoder. "
            "Connect the output of Kandinsky 5 Text Encode."
        )
    return TextConditioning(text_embeds=embeds, text_mask=mask.bool(), pooled=pooled)


def activation_memory(encoders, max_length: int) -> int:
    """Bytes Qwen needs beyond its weights for two prompts of max_length tokens (plus the template)."""
    try:
        hidden = encoders.qwen.config.get_text_config().hidden_size
    except AttributeError:
        hidden = 3584
    return 2 * (max_length + 256) * hidden * 4 * 24


def qwen_layers(encoders) -> torch.nn.ModuleList:
    """Qwen's decoder layers: the bulk of the text encoders' weights (28 x 0.47 GB in bf16), swapped layer by
    layer when the encoders do not fit the device."""
    return encoders.qwen.model.language_model.layers


class TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="K5TextEncode",
            display_name="Kandinsky 5 Text Encode",
            category=f"{CATEGORY}/conditioning",
            description="Encodes the prompt and negative prompt with Qwen2.5-VL (under the variant's template) and "
            "CLIP-L.",
            inputs=[
                K5_TEXT_ENCODERS.Input("text_encoders", tooltip="From Load Kandinsky 5 Text Encoders."),
                io.String.Input("prompt", multiline=True, default="", tooltip="What to generate."),
                io.String.Input("negative_prompt", multiline=True, default=NEGATIVE_DEFAULT, tooltip=
                                "What to avoid (used with guidance > 1). The official video default is filled in; the "
                                "image models use an empty one."),
                io.Combo.Input("template", options=[AUTO, *TEMPLATES], default=AUTO, tooltip=TEMPLATE_TOOLTIP),
                io.Model.Input("model", optional=True, tooltip=
                             "The Kandinsky 5 DiT: template=auto takes its variant's template."),
                io.Image.Input("edit_image", optional=True, tooltip=
                               "I2I edit only: the image to edit, at the output size; Qwen sees it (image_edit)."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],  # the sampler's length, for template auto
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="The encoded prompt."),
                io.Conditioning.Output(display_name="negative", tooltip=
                                       "The encoded negative prompt (unused when guidance is 1)."),
            ],
        )  # fmt: skip

    @classmethod
    def execute(cls, text_encoders, prompt, negative_prompt, template, model=None, edit_image=None) -> io.NodeOutput:
        with fail("Kandinsky 5 Text Encode"):
            if not prompt.strip():
                raise InputError("prompt is empty. Describe what to generate in the prompt box.")
            hidden = cls.hidden
            frames = hidden and queued_graph.sampler_length(hidden.prompt, hidden.unique_id)
            kind, max_length = pick_template(template, model, frames or None)
            images = None
            if edit_image is not None:
                if kind != "image_edit":
                    raise InputError(
                        f"edit_image is connected but the template is {kind!r}: only image_edit (I2I) reads an image. "
                        "Disconnect it, or use an I2I model / the image_edit template."
                    )
                images = [image_to_uint8(edit_image)]
            enc = text_encoders.encoders
            with (
                comfy_glue.loaded_or_swapped(
                    text_encoders.patcher, qwen_layers(enc), activation_memory(enc, max_length)
                ),
                comfy_glue.cancellable(enc.qwen, enc.clip),
            ):
                cond = enc.encode([prompt], kind, max_length, images=images).to("cpu")
                neg = enc.encode([negative_prompt], kind, max_length, images=images).to("cpu")
            return io.NodeOutput(to_conditioning(cond, kind), to_conditioning(neg, kind))


class PromptExpansion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="K5PromptExpansion",
            display_name="Kandinsky 5 Prompt Expansion",
            category=f"{CATEGORY}/conditioning",
            description="Rewrites a short prompt into a detailed one with Qwen2.5-VL, as the official pipelines' "
            "expand_prompt does (on by default there). Needs Qwen's LM head (lm_head.weight); a Qwen file without it "
            "is refused with the fix. expand off passes the prompt through as written.",
            inputs=[
                K5_TEXT_ENCODERS.Input("text_encoders", tooltip="From Load Kandinsky 5 Text Encoders."),
                io.String.Input("prompt", multiline=True, default="", tooltip="The short prompt to expand."),
                io.Combo.Input("template", options=[AUTO, *TEMPLATES], default=AUTO, tooltip=TEMPLATE_TOOLTIP),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, tooltip="Sampling seed of the rewrite."),
                io.Int.Input("max_new_tokens", default=256, min=16, max=1024, tooltip=
                             "Longest expansion in Qwen tokens."),
                io.Model.Input("model", optional=True, tooltip=
                             "The Kandinsky 5 DiT: template=auto takes its variant's template."),
                io.Image.Input("image", optional=True, tooltip=
                               "I2V start image or I2I source image, as loaded: Qwen looks at it (I2I: at a quarter "
                               "of its size, as the official I2I pipeline shows it)."),
                io.Boolean.Input("expand", optional=True, default=True, label_on="on", label_off="off (as written)",
                                 tooltip="off: the prompt goes to Text Encode as written; Qwen generates nothing."),
            ],
            outputs=[
                io.String.Output(display_name="prompt", tooltip=
                                 "The expanded prompt (the prompt as written when expand is off): connect it to "
                                 "Kandinsky 5 Text Encode's prompt."),
            ],
        )  # fmt: skip

    @classmethod
    def execute(
        cls, text_encoders, prompt, template, seed, max_new_tokens, model=None, image=None, expand=None
    ) -> io.NodeOutput:
        with fail("Kandinsky 5 Prompt Expansion"):
            if not prompt.strip():
                raise InputError("prompt is empty. Write a short prompt to expand.")
            if expand is not None and not expand:  # absent (a graph saved before the switch): on
                return io.NodeOutput(prompt)
            kind, _ = pick_template(template, model)
            picture = image_to_uint8(image) if image is not None else None
            enc = text_encoders.encoders
            with (
                comfy_glue.loaded_or_swapped(text_encoders.patcher, qwen_layers(enc), activation_memory(enc, 512)),
                comfy_glue.cancellable(enc.qwen),  # every generated token runs the layers
            ):
                text = enc.expand_prompt(prompt, kind, image=picture, seed=seed, max_new_tokens=max_new_tokens)
            comfy_glue.log.info("Kandinsky 5 Prompt Expansion (%s): %s", kind, text)
            return io.NodeOutput(text, ui={"text": [text]})  # in the log and /history, as the official node shows it
