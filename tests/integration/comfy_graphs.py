"""API-format graphs (what POST /prompt takes) for the integration tests."""

from __future__ import annotations

NEGATIVE = "blurry, low quality"


def loaders(dit: str, vae: str, qwen: str, clip: str, variant: str = "auto") -> dict:
    return {
        "1": {
            "class_type": "K5LoadDiT",
            "inputs": {"dit_name": dit, "variant": variant, "weight_dtype": "fp32", "attention": "auto"},
        },
        "2": {
            "class_type": "K5LoadTextEncoders",
            "inputs": {"qwen_name": qwen, "clip_name": clip, "dtype": "fp32"},
        },
        "3": {"class_type": "K5LoadVAE", "inputs": {"vae_name": vae, "dtype": "fp32"}},
    }


def sampler_inputs(width: int, height: int, length: int, seed: int, steps: int, **extra) -> dict:
    inputs = {
        "model": ["1", 0],
        "positive": ["4", 0],
        "negative": ["4", 1],
        "width": width,
        "height": height,
        "length": length,
        "batch_size": 1,
        "seed": seed,
        "steps": steps,
        "guidance": -1.0,
        "scheduler_scale": 0.0,
    }
    inputs.update(extra)
    return inputs


def text2x(
    dit: str, vae: str, qwen: str, clip: str, prompt: str, width: int, height: int, length: int, seed: int,
    steps: int = 2, prefix: str = "k5", variant: str = "auto", **sampler_extra,
) -> dict:  # fmt: skip
    """Load DiT / text encoders / VAE -> Text Encode -> Sampler -> VAE Decode -> SaveImage (node 7)."""
    g = loaders(dit, vae, qwen, clip, variant)
    g["4"] = {
        "class_type": "K5TextEncode",
        "inputs": {
            "text_encoders": ["2", 0],
            "prompt": prompt,
            "negative_prompt": NEGATIVE,
            "template": "auto",
            "model": ["1", 0],
        },
    }
    g["5"] = {"class_type": "K5Sampler", "inputs": sampler_inputs(width, height, length, seed, steps)}
    g["5"]["inputs"].update(sampler_extra)
    g["6"] = {
        "class_type": "K5VAEDecode",
        "inputs": {
            "vae": ["3", 0],
            "samples": ["5", 0],
            "tiling": "auto",
            "tile_px": 256,
            "overlap_px": 64,
            "tile_frames": 16,
            "overlap_frames": 8,
        },
    }
    g["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}}
    return g


def with_start_image(g: dict, image: str, width: int, height: int) -> dict:
    """I2V: LoadImage (node 8) -> Kandinsky 5 VAE Encode (node 9) -> the sampler's start_latent."""
    g["8"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    g["9"] = {
        "class_type": "K5VAEEncode",
        "inputs": {"vae": ["3", 0], "images": ["8", 0], "width": width, "height": height},
    }
    g["5"]["inputs"]["start_latent"] = ["9", 0]
    return g


def with_edit_image(g: dict, image: str, width: int, height: int) -> dict:
    """I2I: LoadImage (node 8) -> Kandinsky 5 VAE Encode (node 9) -> the sampler's edit_latent; the same image goes to
    Text Encode's edit_image (Qwen sees it with the image_edit template)."""
    g["8"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    g["9"] = {
        "class_type": "K5VAEEncode",
        "inputs": {"vae": ["3", 0], "images": ["8", 0], "width": width, "height": height},
    }
    g["5"]["inputs"]["edit_latent"] = ["9", 0]
    g["4"]["inputs"]["edit_image"] = ["8", 0]
    return g
