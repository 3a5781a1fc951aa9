"""`TextEncoders`: Qwen2.5-VL and CLIP-L with their tokenizers, turning prompts into the DiT's text conditioning."""

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import InputError
from ..sampling import TextConditioning
from .clip import CLIP_MAX_LENGTH
from .expansion import expand_prompt as _expand_prompt
from .expansion import generation_config
from .images import IMAGE_TOKENS, as_uint8, expand_image_pads, qwen_image_patches, resize
from .qwen import load_lm_head, load_vision_tower
from .sources import Source
from .templates import PROMPT_TEMPLATES, check_kind, crop_starts_for


class TextEncoders:
    """Qwen2.5-VL (text path; vision tower and LM head loaded on first need) and CLIP-L, with their tokenizers."""

    def __init__(self, qwen, clip, qwen_tokenizer, clip_tokenizer, qwen_source: Source, dtype: torch.dtype):
        self.qwen = qwen
        self.clip = clip
        self.qwen_tokenizer = qwen_tokenizer
        self.clip_tokenizer = clip_tokenizer
        self.qwen_source = qwen_source
        self.dtype = dtype
        self.crop_starts = crop_starts_for(qwen_tokenizer)
        self.generation = generation_config(qwen_source.path)

    @property
    def device(self) -> torch.device:
        return self.qwen.model.language_model.embed_tokens.weight.device

    def to(self, device: torch.device | str) -> "TextEncoders":
        self.qwen.to(device)
        self.clip.to(device)
        return self

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], content_kind: str, max_length: int, images: Sequence[Tensor] | None = None
    ) -> TextConditioning:
        """Prompts -> Qwen hidden states after the template crop (+ mask) and CLIP pooled outputs.

        `max_length` is the variant's text_max_length (256 video, 512 image). `images` (image_edit only): one
        `[3, H, W]` image per prompt at the generation size; it is halved and read by the vision tower.
        The official pipelines use "video" for T2V and I2V alike ("image2video" is defined there but unused),
        "image" for T2I and I2I without an image, "image_edit" for I2I with one.
        """
        check_kind(content_kind)
        if isinstance(prompts, str):
            prompts = [prompts]
        if images is not None and content_kind != "image_edit":
            raise InputError(f"images were given with content_kind={content_kind!r}: only image_edit reads images.")
        if images is not None and len(images) != len(prompts):
            raise InputError(f"{len(images)} images for {len(prompts)} prompts: give one image per prompt.")
        embeds, mask = self.encode_qwen(prompts, content_kind, max_length, images)
        return TextConditioning(text_embeds=embeds, text_mask=mask, pooled=self.encode_clip(prompts))

    @torch.no_grad()
    def encode_qwen(
        self, prompts: Sequence[str], content_kind: str, max_length: int, images: Sequence[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        template = "\n".join(PROMPT_TEMPLATES[content_kind])
        crop = self.crop_starts[content_kind]
        texts = [template.format(prompt) for prompt in prompts]
        device = self.device
        if content_kind == "image_edit" and images is not None:
            self.ensure_vision()
            pixels, grids = [], []
            for image in images:
                image = as_uint8(image)
                image = resize(image, image.shape[-2] // 2, image.shape[-1] // 2, mode="bilinear")
                patches, grid = qwen_image_patches(image)
                pixels.append(patches)
                grids.append(grid)
            texts = [expand_image_pads(t + IMAGE_TOKENS + "<|im_end|>", [g]) for t, g in zip(texts, grids, strict=True)]
            tokens = self.qwen_tokenizer(texts, padding=True, return_tensors="pt").to(device)
            hidden = self.qwen.model(
                input_ids=tokens["input_ids"],
                attention_mask=tokens["attention_mask"],
                pixel_values=torch.cat(pixels).to(device, self.qwen.model.visual.dtype),
                image_grid_thw=torch.cat(grids).to(device),
                use_cache=False,
            ).last_hidden_state
        else:
            # The official call pads to max_length + crop (longest for image_edit) and passes no attention mask:
            # right padding under a causal mask leaves real tokens unchanged, the mask is returned for the DiT.
            padding = "longest" if content_kind == "image_edit" else "max_length"
            tokens = self.qwen_tokenizer(
                texts, max_length=max_length + crop, truncation=True, padding=padding, return_tensors="pt"
            ).to(device)
            hidden = self.qwen.model.language_model(input_ids=tokens["input_ids"], use_cache=False).last_hidden_state
        return hidden[:, crop:], tokens["attention_mask"][:, crop:].bool()

    @torch.no_grad()
    def encode_clip(self, prompts: Sequence[str]) -> Tensor:
        tokens = self.clip_tokenizer(
            list(prompts),
            max_length=CLIP_MAX_LENGTH,
            truncation=True,
            add_special_tokens=True,
            padding="max_length",
            return_tensors="pt",
        ).to(self.clip.device)
        return self.clip(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output

    # The official prompt beautifier: expand_prompt(prompt, content_kind, image=None, seed=None, max_new_tokens=256).
    expand_prompt = _expand_prompt

    def ensure_vision(self) -> None:
        """Read the vision tower from disk, once, before the first image."""
        if self.qwen.model.visual is None:
            self.qwen.model.visual = load_vision_tower(self.qwen, self.qwen_source, self.dtype, self.device)

    def ensure_lm_head(self) -> None:
        """Read the LM head from disk, once, before the first prompt expansion."""
        if self.qwen.lm_head is None:
            self.qwen.lm_head = load_lm_head(self.qwen, self.qwen_source, self.dtype, self.device)
