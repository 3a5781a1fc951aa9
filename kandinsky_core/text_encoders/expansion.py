"""Prompt expansion: the official instructions and Qwen's generation settings, and the beautifier itself."""

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import InputError
from .images import IMAGE_TOKENS, as_uint8, expand_image_pads, pil_quarter, qwen_image_patches
from .templates import check_kind

if TYPE_CHECKING:
    from .encoders import TextEncoders

_EXPAND_VIDEO = (
    "You are a prompt beautifier that transforms short user video descriptions into rich, detailed "
    "English prompts specifically optimized for video generation models.\n"
    "        Here are some example descriptions from the dataset that the model was trained:\n"
    '        1. "In a dimly lit room with a cluttered background, papers are pinned to the wall and '
    "various objects rest on a desk. Three men stand present: one wearing a red sweater, another in "
    "a black sweater, and the third in a gray shirt. The man in the gray shirt speaks and makes hand "
    "gestures, while the other two men look forward. The camera remains stationary, focusing on the "
    "three men throughout the sequence. A gritty and realistic visual style prevails, marked by a "
    "greenish tint that contributes to a moody atmosphere. Low lighting casts shadows, enhancing the "
    'tense mood of the scene."\n'
    '        2. "In an office setting, a man sits at a desk wearing a gray sweater and seated in a '
    "black office chair. A wooden cabinet with framed pictures stands beside him, alongside a small "
    "plant and a lit desk lamp. Engaged in a conversation, he makes various hand gestures to "
    "emphasize his points. His hands move in different positions, indicating different ideas or "
    "points. The camera remains stationary, focusing on the man throughout. Warm lighting creates a "
    "cozy atmosphere. The man appears to be explaining something. The overall visual style is "
    'professional and polished, suitable for a business or educational context."\n'
    '        3. "A person works on a wooden object resembling a sunburst pattern, holding it in '
    "their left hand while using their right hand to insert a thin wire into the gaps between the "
    "wooden pieces. The background features a natural outdoor setting with greenery and a tree trunk "
    "visible. The camera stays focused on the hands and the wooden object throughout, capturing the "
    "detailed process of assembling the wooden structure. The person carefully threads the wire "
    "through the gaps, ensuring the wooden pieces are securely fastened together. The scene unfolds "
    "with a naturalistic and instructional style, emphasizing the craftsmanship and the methodical "
    'steps taken to complete the task."\n'
    "        IImportantly! These are just examples from a large training dataset of 200 million "
    "videos.\n"
    '        Rewrite Prompt: "{prompt}" to get high-quality video generation. Answer only with '
    "expanded prompt."
)

_EXPAND_IMAGE2VIDEO = (
    "You are a prompt beautifier that transforms short user video descriptions into rich, detailed "
    "English prompts specifically optimized for video generation models.\n"
    "    Here are some example descriptions from the dataset that the model was trained:\n"
    '    1. "Create a video showing a nighttime urban driving scene from inside a car. The driver is '
    "focused on the road ahead, with the city lights visible through the windshield. The GPS device "
    "on the dashboard continues to display navigation information. The camera remains steady, "
    "capturing the interior of the car and the changing street view outside as the vehicle moves "
    "forward. The background shifts slightly to show different parts of the cityscape, including "
    'illuminated buildings and street signs."\n'
    '    2. "Create a video where the character, dressed in historical attire, is seen holding an '
    "umbrella with a logo. The character should move closer to the camera while maintaining a steady "
    "pace, keeping the umbrella raised. The background remains consistent with a foggy, outdoor "
    "setting, but the focus shifts more towards the character as they approach. The lighting should "
    'emphasize the details of the costume and the umbrella, enhancing the dramatic effect."\n'
    '    3. "Darken the scene while keeping the characters and setting unchanged, emphasizing a '
    'serious atmosphere."\n'
    "    IImportantly! These are just examples from a large training dataset of 20 mln videos.\n"
    '    Rewrite Prompt: "{prompt}" to get high-quality image to video generation from this image. '
    "Pay main attention to information about changes of objects.\n"
    "    Make prompt dynamic. Answer only with expanded prompt."
)

_EXPAND_IMAGE = (
    "Rewrite and enhance the original prompt with richer detail, clearer structure, and improved "
    "descriptive quality. Expand the scene, atmosphere, and context while preserving the user’s "
    "intent. When adding text that should appear inside an image, place that text inside double "
    "quotes and in capital letters. Strengthen visual clarity, style, and specificity, but do not "
    "change the meaning. Output only the enhanced prompt, written in polished, vivid language "
    "suitable for high-quality image generation.\n"
    "        example:\n"
    "        Original text: white mini police car with blue stripes, with 911 and 'Police' text \n"
    "        Result: A miniature model car simulating the official transport of the relevant "
    'authorities. The body is white with blue stripes. The word "911" is written in large blue '
    'letters on the hood and side. Below it, "POLICE" is used in a font. The windows are '
    "transparent, and the interior has black seats. The headlights have plastic lenses, and the roof "
    "has blue and red beacons. The radiator grille has vertical slots. The wheels are black with "
    "white rims. The doors are closed, the windows have black frames. The background is uniform "
    "white.\n"
    "        Here 911 in double quotes because it is text on image, 'Police' -> \"POLICE\" because it "
    "should be in double quotes and capital letters.\n"
    '        Rewrite Prompt: "{prompt}". Answer only with expanded prompt.'
)

_EXPAND_IMAGE_EDIT = (
    "Rewrite and enhance the original editing instruction with richer detail, clearer structure, and "
    "improved descriptive quality. When adding text that should appear inside an image, place that "
    "text inside double quotes and in capital letters. Explain what needs to be changed and what "
    "needs to be left unchanged. Explain in details how to change  camera potision or tell that "
    "camera position shouldn't be changed.\n"
    "example:\n"
    "Original text: add text 911 and 'Police' \n"
    'Result: Add the word "911" in large blue letters to the hood. Below that, add the word '
    '"POLICE." Keep the camera position unchanged, as do the background, car position, and lighting.\n'
    'Rewrite Prompt: "{prompt}". Answer only with expanded prompt.'
)

# Prompt-expansion instructions, verbatim from the official pipelines (t2v, i2v, t2i, i2i); `{prompt}` is the user's.
EXPAND_INSTRUCTIONS: dict[str, str] = {
    "video": _EXPAND_VIDEO,
    "image2video": _EXPAND_IMAGE2VIDEO,
    "image": _EXPAND_IMAGE,
    "image_edit": _EXPAND_IMAGE_EDIT,
}

# Qwen2.5-VL-7B-Instruct generation_config.json sampling settings, used by the official `generate` calls.
# top_k=1 makes the sampling greedy in effect; the seed still drives torch's sampler for exact repeatability.
QWEN_GENERATION = {"do_sample": True, "top_k": 1, "top_p": 0.001, "temperature": 0.1, "repetition_penalty": 1.05}


def chat(contents: Sequence[tuple[str, str]]) -> str:
    """Qwen2.5-VL's chat template for one user message (default system prompt) and the assistant's turn."""
    body = "".join(IMAGE_TOKENS if kind == "image" else text for kind, text in contents)
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
    )


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def generation_config(path: Path) -> dict:
    """Sampling settings from a HF folder's generation_config.json (what the official generate uses)."""
    file = path / "generation_config.json"
    if not (path.is_dir() and file.is_file()):
        return dict(QWEN_GENERATION)
    config = json.loads(file.read_text())
    return {k: config[k] for k in QWEN_GENERATION if k in config} or dict(QWEN_GENERATION)


@torch.no_grad()
def expand_prompt(
    encoders: "TextEncoders",
    prompt: str,
    content_kind: str,
    image: Tensor | None = None,
    seed: int | None = None,
    max_new_tokens: int = 256,
) -> str:
    """The official prompt beautifier: Qwen generates up to `max_new_tokens` with the instruction of
    `content_kind` (image2video and image_edit also see `image`, `[3, H, W]`; "video" or "image" given an
    image mean those two, so a pipeline can pass its encode kind), and the whole generated text
    is returned. Sampling uses Qwen's generation config (the folder's generation_config.json, else
    QWEN_GENERATION: top_k=1, so greedy in effect), seeded by `seed` without touching the global RNG."""
    check_kind(content_kind)
    if image is not None:  # the encode kinds of I2V ("video") and I2I ("image") with their input image
        content_kind = {"video": "image2video", "image": "image_edit"}.get(content_kind, content_kind)
    instruction = EXPAND_INSTRUCTIONS[content_kind].replace("{prompt}", prompt)
    if content_kind in ("image2video", "image_edit"):
        if image is None:
            raise InputError(f"expand_prompt for {content_kind} needs the input image: pass image=[3, H, W].")
        image = as_uint8(image)
        if content_kind == "image_edit":  # the official edit expansion shows the model a quarter-size image
            image = pil_quarter(image)
        contents = [("image", ""), ("text", instruction)]  # i2v: image first; i2i: text first
        if content_kind == "image_edit":
            contents.reverse()
    else:
        image, contents = None, [("text", instruction)]
    encoders.ensure_lm_head()
    device = encoders.device
    inputs = {}
    text = chat(contents)
    if image is not None:
        encoders.ensure_vision()
        patches, grid = qwen_image_patches(image)
        text = expand_image_pads(text, [grid])
        inputs = {
            "pixel_values": patches.to(device, encoders.qwen.model.visual.dtype),
            "image_grid_thw": grid.to(device),
        }
    tokens = encoders.qwen_tokenizer([text], return_tensors="pt").to(device)
    stop = [encoders.qwen_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with seeded(seed, device):
        generated = encoders.qwen.generate(
            **tokens,
            **inputs,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop,
            pad_token_id=stop[1],
            **encoders.generation,
        )
    new_tokens = generated[0, tokens["input_ids"].shape[1] :]
    return encoders.qwen_tokenizer.decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
