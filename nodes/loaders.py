"""Load DiT, Load Text Encoders and Load VAE: files from ComfyUI's model folders, wrapped in ModelPatchers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from comfy_api.latest import io

from kandinsky_core.errors import KandinskyError, WeightsError
from kandinsky_core.variants import VARIANTS, Variant

from . import comfy_glue, comfy_model, files
from .common import CATEGORY, K5_TEXT_ENCODERS, K5_VAE, fail

AUTO = "auto"
DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DIT_DTYPES = (*DTYPES, "fp8_e4m3fn")
ATTENTION = ("auto", "sdpa", "flash_attn_2", "flash_attn_3", "sageattention")


@dataclass
class TextEncodersModel:
    patcher: Any
    encoders: Any  # kandinsky_core.text_encoders.TextEncoders


@dataclass
class VAEModel:
    patcher: Any
    kind: str  # "hunyuan" | "flux"
    name: str

    @property
    def vae(self) -> torch.nn.Module:
        return self.patcher.model.inner


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    return DTYPES.get(choice) or comfy_glue.default_dtype(device)


def inspect_dit(path: Path, variant: str) -> Variant:
    """The variant a DiT file is used as (detected, or the override after checking it fits the file); reads the
    header only. Raises WeightsError / InputError with what the file is and what to pick instead."""
    from kandinsky_core import loading

    header = loading.read_safetensors_header(path)
    if variant == AUTO:
        return loading.detect_variant(header, filename=path.name).get()
    if variant not in VARIANTS:
        raise WeightsError(f"variant {variant!r} is unknown. Allowed: auto, {', '.join(VARIANTS)}.")
    return loading.chosen_variant(header, path.name, variant)


class LoadDiT(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="K5LoadDiT",
            display_name="Load Kandinsky 5 DiT",
            category=f"{CATEGORY}/loaders",
            description="Loads a Kandinsky 5 diffusion transformer (DiT) from models/diffusion_models as a ComfyUI "
            "MODEL: it works with the Kandinsky 5 Sampler and with ComfyUI's KSampler / SamplerCustomAdvanced "
            "(text-to-video and text-to-image) and LoRA loaders.",
            inputs=[
                io.Combo.Input("dit_name", options=files.list_models("diffusion_models"), tooltip=
                               "A Kandinsky 5 DiT .safetensors in models/diffusion_models "
                               "(e.g. kandinsky5lite_t2v_sft_5s.safetensors)."),
                io.Combo.Input("variant", options=[AUTO, *VARIANTS], default=AUTO, tooltip=
                               "auto: recognised from the file's tensor shapes and name. Or pick the variant whose "
                               "settings (steps, guidance, scheduler scale, sizes, NABLA) should apply; it must fit "
                               "the file."),
                io.Combo.Input("weight_dtype", options=list(DIT_DTYPES), default="default", tooltip=
                               "Storage dtype of the weights. default: bf16 on a GPU, fp32 on the CPU. fp8_e4m3fn "
                               "halves memory (block weights in float8, computed in bf16)."),
                io.Combo.Input("attention", options=list(ATTENTION), default="auto", tooltip=
                               "Dense attention backend: auto picks FlashAttention 3, then 2, then PyTorch SDPA, "
                               "whichever is installed. sageattention (8-bit, approximate; the optional sageattention "
                               "package) only when chosen here."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip=
                                "The Kandinsky 5 DiT as a ComfyUI MODEL with its variant's settings (steps, guidance, "
                                "flow shift = scheduler scale, sizes, NABLA)."),
            ],
        )  # fmt: skip

    @classmethod
    def validate_inputs(cls, dit_name, variant):
        if dit_name not in files.list_models("diffusion_models"):
            return f"dit_name {dit_name!r} is not in models/diffusion_models. Pick a file from the list."
        if variant != AUTO and variant not in VARIANTS:
            return f"variant {variant!r} is unknown. Allowed: auto, {', '.join(VARIANTS)}."
        try:
            path = files.resolve("diffusion_models", dit_name, "dit_name")
            inspect_dit(path, AUTO)
        except KandinskyError as e:
            return f"dit_name: {e}"
        try:
            inspect_dit(path, variant)
        except KandinskyError as e:
            return f"variant: {e}"
        return True

    @classmethod
    def execute(cls, dit_name, variant, weight_dtype, attention) -> io.NodeOutput:
        from kandinsky_core.loading import load_dit

        with fail("Load Kandinsky 5 DiT"):
            path = files.resolve("diffusion_models", dit_name, "dit_name")
            if variant == AUTO:
                warn_guess(path)
            device = comfy_glue.load_device()
            fp8 = weight_dtype == "fp8_e4m3fn"
            dtype = torch.bfloat16 if fp8 else pick_dtype(weight_dtype, device)
            model, v = load_dit(
                path,
                None if variant == AUTO else variant,
                dtype=dtype,
                device=comfy_glue.offload_device("dit"),
                operations=comfy_glue.dit_operations(),
                fp8=fp8,
            )
            comfy_glue.log.info("Kandinsky 5 DiT %s loaded as %s (%s)", dit_name, v.name, dtype)
            return io.NodeOutput(comfy_model.make_patcher(model, v, attention, dit_name))


def warn_guess(path: Path) -> str | None:
    """Log (and return) what detection had to guess for `path`: the candidates, the variant taken and how to choose.
    The front end shows the same text under the loader (GET /kandinsky5/variants)."""
    from kandinsky_core import loading

    guess = loading.detect_variant(loading.read_safetensors_header(path), filename=path.name).guess
    if guess:
        comfy_glue.log.warning("Load Kandinsky 5 DiT: %s: %s", path.name, guess)
    return guess


class LoadTextEncoders(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = files.list_models("text_encoders", folders=True)
        return io.Schema(
            node_id="K5LoadTextEncoders",
            display_name="Load Kandinsky 5 Text Encoders",
            category=f"{CATEGORY}/loaders",
            description="Loads Qwen2.5-VL-7B and CLIP ViT-L/14 from models/text_encoders: ComfyUI's single files "
            "(qwen_2.5_vl_7b*.safetensors, clip_l.safetensors) or the Hugging Face folders (names ending in /).",
            inputs=[
                io.Combo.Input("qwen_name", options=names, tooltip=
                               "Qwen2.5-VL-7B: qwen_2.5_vl_7b.safetensors (bf16 or fp8_scaled) or the text_encoder/ "
                               "folder. Single files use the tokenizer ComfyUI bundles "
                               "(comfy/text_encoders/qwen25_tokenizer)."),
                io.Combo.Input("clip_name", options=names, tooltip=
                               "CLIP ViT-L/14: clip_l.safetensors or the text_encoder2/ folder. Single files use "
                               "ComfyUI's bundled comfy/sd1_tokenizer."),
                io.Combo.Input("dtype", options=list(DTYPES), default="default", tooltip=
                               "Qwen's compute dtype (CLIP always runs in fp32, as the official code does). default: "
                               "bf16 on a GPU, fp32 on the CPU."),
            ],
            outputs=[
                K5_TEXT_ENCODERS.Output(display_name="text_encoders", tooltip=
                                        "Qwen2.5-VL and CLIP-L, for Kandinsky 5 Text Encode and Prompt Expansion."),
            ],
        )  # fmt: skip

    @classmethod
    def validate_inputs(cls, qwen_name, clip_name):
        names = files.list_models("text_encoders", folders=True)
        from kandinsky_core.text_encoders import check_weight_files

        for label, name in (("qwen_name", qwen_name), ("clip_name", clip_name)):
            if name not in names:
                return f"{label} {name!r} is not in models/text_encoders. Pick a file or folder from the list."
            try:
                check_weight_files(files.resolve("text_encoders", name, label), label)
            except KandinskyError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, qwen_name, clip_name, dtype) -> io.NodeOutput:
        from kandinsky_core.text_encoders import load_text_encoders

        with fail("Load Kandinsky 5 Text Encoders"):
            qwen = files.resolve("text_encoders", qwen_name, "qwen_name")
            clip = files.resolve("text_encoders", clip_name, "clip_name")
            # Single files carry no tokenizer: ComfyUI ships both in its comfy/ folder. Folders bring their own.
            tokenizer_dir = comfy_glue.comfy_dir() if (qwen.is_file() or clip.is_file()) else None
            encoders = load_text_encoders(
                qwen,
                clip,
                dtype=pick_dtype(dtype, comfy_glue.load_device()),
                device=comfy_glue.offload_device("text"),
                tokenizer_dir=tokenizer_dir,
            )
            module = torch.nn.ModuleDict({"qwen": encoders.qwen, "clip": encoders.clip})
            return io.NodeOutput(TextEncodersModel(comfy_glue.wrap(module, "text"), encoders))


def vae_kind(path: Path) -> str:
    """ "hunyuan" (3D convolutions) or "flux" (2D), from a folder's config.json or a file's tensor shapes."""
    from kandinsky_core.loading import read_safetensors_header

    if path.is_dir():
        for config in (path / "config.json", path / "vae" / "config.json"):
            if config.is_file():
                name = str(json.loads(config.read_text()).get("_class_name", ""))
                return "hunyuan" if "Hunyuan" in name else "flux"
        raise WeightsError(
            f"vae_name {path.name!r}: the folder has no config.json. Pick the VAE .safetensors file or a diffusers "
            "vae/ folder (config.json + diffusion_pytorch_model.safetensors)."
        )
    header = read_safetensors_header(path)
    convs = [shape for name, (_, shape) in header.items() if name.endswith(".weight") and len(shape) >= 4]
    if not convs:
        raise WeightsError(
            f"vae_name {path.name!r} has no convolution weights: it is not a VAE. Pick the HunyuanVideo VAE "
            "(hunyuan_video_vae_bf16.safetensors, video models) or the FLUX VAE (ae.safetensors, image models)."
        )
    return "hunyuan" if any(len(s) == 5 for s in convs) else "flux"


class LoadVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="K5LoadVAE",
            display_name="Load Kandinsky 5 VAE",
            category=f"{CATEGORY}/loaders",
            description="Loads the Kandinsky 5 VAE from models/vae: HunyuanVideo (video models) or FLUX (image "
            "models), recognised from the file.",
            inputs=[
                io.Combo.Input("vae_name", options=files.list_models("vae", folders=True), tooltip=
                               "hunyuan_video_vae_bf16.safetensors for the video models, ae.safetensors (FLUX.1) for "
                               "the image models; diffusers vae/ folders work too."),
                io.Combo.Input("dtype", options=list(DTYPES), default="default", tooltip=
                               "VAE compute dtype. default: bf16 on a GPU, fp32 on the CPU."),
            ],
            outputs=[K5_VAE.Output(display_name="vae", tooltip="The VAE, for Kandinsky 5 VAE Decode / VAE Encode.")],
        )  # fmt: skip

    @classmethod
    def validate_inputs(cls, vae_name):
        if vae_name not in files.list_models("vae", folders=True):
            return f"vae_name {vae_name!r} is not in models/vae. Pick a file or folder from the list."
        try:
            vae_kind(files.resolve("vae", vae_name, "vae_name"))
        except KandinskyError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, vae_name, dtype) -> io.NodeOutput:
        with fail("Load Kandinsky 5 VAE"):
            path = files.resolve("vae", vae_name, "vae_name")
            kind = vae_kind(path)
            kw = dict(dtype=pick_dtype(dtype, comfy_glue.load_device()), device=comfy_glue.offload_device("vae"))
            if kind == "hunyuan":
                from kandinsky_core.hunyuan_vae import load_hunyuan_vae

                vae = load_hunyuan_vae(path, **kw)
            else:
                from kandinsky_core.flux_vae import load_flux_vae

                vae = load_flux_vae(path, **kw)
            return io.NodeOutput(VAEModel(comfy_glue.wrap(vae, "vae"), kind, vae_name))
