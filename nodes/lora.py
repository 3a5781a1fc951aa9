"""Load LoRA: a LoRA / LoKr / LoHa from models/loras as ComfyUI weight patches on a clone of the DiT's ModelPatcher."""

from __future__ import annotations

from comfy_api.latest import io

from kandinsky_core.errors import KandinskyError

from . import comfy_glue, comfy_model, files
from .common import CATEGORY, fail


class LoadLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="K5LoadLoRA",
            display_name="Load Kandinsky 5 LoRA",
            category=f"{CATEGORY}/loaders",
            description="Applies a LoRA to a Kandinsky 5 DiT at the given strength; chain several to stack them. Reads "
            "the official kandinsky-5 trainer's files (with config_lora.json beside them), diffusers / SimpleTuner, "
            "musubi-tuner, ComfyUI's trainer, bare PEFT and LyCORIS LoKr / LoHa. ComfyUI patches the weights when it "
            "loads the model.",
            inputs=[
                io.Model.Input("model", tooltip="A Kandinsky 5 DiT (from Load Kandinsky 5 DiT, another LoRA loader "
                               "or a Kandinsky 5 option node)."),
                io.Combo.Input("lora_name", options=files.list_models("loras"), tooltip=
                               "A LoRA .safetensors in models/loras, made for this Kandinsky 5 model size. Keep the "
                               "official trainer's config_lora.json next to it (it holds the LoRA's alpha)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip=
                               "How much of the LoRA to add: 0 leaves the model unchanged, 1 is the LoRA as trained, "
                               "negative values subtract it."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip=
                              "The DiT with the LoRA patched in (the input model is left unchanged)."),
                io.String.Output(display_name="trigger_word", tooltip=
                                 "The trigger word the LoRA was trained with (empty when the file names none): put it "
                                 "in the prompt."),
            ],
        )  # fmt: skip

    @classmethod
    def validate_inputs(cls, lora_name):
        if lora_name not in files.list_models("loras"):
            return f"lora_name {lora_name!r} is not in models/loras. Pick a file from the list."
        return True

    @classmethod
    def execute(cls, model, lora_name: str, strength: float) -> io.NodeOutput:
        from kandinsky_core.lora import read_lora

        with fail("Load Kandinsky 5 LoRA"):
            k5 = comfy_model.k5_model(model)
            try:
                lora = read_lora(files.resolve("loras", lora_name, "lora_name"))
                lora.check(k5.diffusion_model.arch, f"the loaded DiT {k5.name!r} ({k5.variant.title})")
            except KandinskyError as e:
                raise type(e)(f"lora_name: {e}") from None
            for note in lora.notes:
                comfy_glue.log.warning("Kandinsky 5 LoRA %s: %s", lora_name, note)
            patcher = model.clone()  # keeps the Kandinsky 5 options (model_options) and earlier LoRAs
            patcher.add_patches(comfy_glue.lora_patches(patcher, lora), float(strength))
            comfy_glue.log.info(
                "Kandinsky 5 LoRA %s (%s, %d modules) at strength %s", lora_name, lora.format, len(lora.targets),
                strength,
            )  # fmt: skip
            return io.NodeOutput(patcher, lora.trigger, ui={"text": [lora.trigger]})
