"""The official Qwen2.5-VL prompt templates and how many tokens of each the encoders crop (content kinds)."""

from ..errors import InputError

CONTENT_KINDS = ("video", "image2video", "image", "image_edit")

_VIDEO_GUIDE = (  # the lines the video and image2video templates share
    "Describe the dynamism of the video and presented actions.",
    (
        "Name the visual style of the video: whether it is a professional footage, user generated "
        "content, some kind of animation, video game or scren content."
    ),
    "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
    "Pay attention to the order of key actions shown in the scene.<|im_end|>",
    "<|im_start|>user\n{}<|im_end|>",
)
_CAMERA = "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects."

# Official Qwen2.5-VL prompt templates (text_embedders.py PROMPT_TEMPLATE), verbatim: their spelling
# ("promt", "scren") is what the DiT was trained with. Lines are joined with "\n".
PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "video": (
        "<|im_start|>system\nYou are a promt engineer. Describe the video in detail.",
        _CAMERA,
        "Describe the location of the video, main characters or objects and their action.",
        *_VIDEO_GUIDE,
    ),
    "image2video": (
        (
            "<|im_start|>system\nYou are a promt engineer. Your task is to create a highly detailed and "
            "effective video description based on a provided input image."
        ),
        _CAMERA,
        "Describe main characters actions.",
        *_VIDEO_GUIDE,
    ),
    "image": (
        (
            "<|im_start|>system\nYou are a promt engineer. Describe the image by detailing the color, shape, "
            "size, texture, quantity, text, spatial relationships of the objects and background:<|im_end|>"
        ),
        "<|im_start|>user\n{}<|im_end|>",
    ),
    "image_edit": (
        (
            "<|im_start|>system\nYou are a promt engineer. Based on the provided source image (first image) "
            "and target image (second image), create an interesting text prompt that can be used together "
            "with the source image to create the target image:<|im_end|>"
        ),
        "<|im_start|>user\n{}",
    ),
}

# Tokens the official code crops from the front of the hidden states. For video, image2video and image this is the
# template prefix (everything before the prompt) under the real Qwen tokenizer; image_edit crops 3 more tokens than
# its 52-token prefix, as the official code does.
OFFICIAL_CROP_START = {"video": 129, "image2video": 132, "image": 41, "image_edit": 55}
_OFFICIAL_PREFIX_TOKENS = {"video": 129, "image2video": 132, "image": 41, "image_edit": 52}
_QWEN_REAL_VOCAB = 151643  # tokenizers at least this large are the real Qwen2.5 one


def check_kind(content_kind: str) -> None:
    if content_kind not in CONTENT_KINDS:
        raise InputError(f"content_kind={content_kind!r} is not allowed: use one of {', '.join(CONTENT_KINDS)}.")


def crop_starts_for(tokenizer) -> dict[str, int]:
    """Official crop starts for the real Qwen tokenizer; for any other tokenizer (tests) the same crop relative to
    the template: its prefix tokens, plus the 3 extra tokens the official image_edit crop removes."""
    if len(tokenizer) >= _QWEN_REAL_VOCAB:
        return dict(OFFICIAL_CROP_START)
    starts = {}
    for kind in CONTENT_KINDS:
        prefix = "\n".join(PROMPT_TEMPLATES[kind]).split("{}")[0]
        extra = OFFICIAL_CROP_START[kind] - _OFFICIAL_PREFIX_TOKENS[kind]
        starts[kind] = len(tokenizer(prefix)["input_ids"]) + extra
    return starts
