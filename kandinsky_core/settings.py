"""One place for a run's settings: every default comes from the variants table, every rule a size, a length, NABLA
tiles, guidance or an input image must follow is written here once. The CLI / pipeline and the ComfyUI nodes call
`resolve` (or, before the model is known, `input_problems`) and get back ALL the problems at once, each tagged with
the input it concerns; they differ only in how they name their inputs and what the user does to fix them
(`Wording`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError
from .nabla import TILE, NablaParams
from .variants import FPS, MAX_SIZE, Variant, get_variant

CFG_TOLERANCE = 1e-6  # the official threshold: guidance within this of 1 runs without CFG
NABLA_TILE_PX = TILE * 16  # 8x8 tokens of 16 px (patch 2 x VAE 8)
SIZE_STEP_PX = 16  # patch 2 x VAE 8
NABLA_WHY = " (NABLA sparse attention works on 8x8-token tiles = 128 px)"
NABLA_MODES = ("auto", "on", "off")
OFFICIAL_NABLA = NablaParams(P=0.9, wT=11, wH=3, wW=3)
AREA_SLACK = 1.5  # sizes up to 1.5x the largest trained area are allowed (e.g. 768x768 on a 768x512 model)
GUIDANCE_MAX = 30.0
SCHEDULER_SCALE_MAX = 50.0
STEPS_MAX = 200


def uses_cfg(guidance: float) -> bool:
    """Whether a run with this guidance evaluates the negative prompt (classifier-free guidance)."""
    return abs(guidance - 1.0) > CFG_TOLERANCE


def size_multiple(nabla: bool) -> int:
    """Width and height are multiples of this many pixels: 128 with NABLA (8x8-token tiles), else 16."""
    return NABLA_TILE_PX if nabla else SIZE_STEP_PX


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a run's settings: the input it concerns and the message (what is allowed, what to do)."""

    input: str
    message: str

    def __str__(self) -> str:
        return self.message


class SettingsInputError(InputError):
    """Every problem found at once; the message lists them all, one per line."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...] | str) -> None:
        if isinstance(problems, str):  # rebuilt from its message (copy, pickle); the problems come with __dict__
            super().__init__(problems)
            self.problems: tuple[Problem, ...] = ()
            return
        self.problems = tuple(problems)
        super().__init__("\n".join(p.message for p in self.problems))


def raise_problems(problems: list[Problem]) -> None:
    if problems:
        raise SettingsInputError(problems)


@dataclass(frozen=True)
class Wording:
    """How a front end names its inputs (`names`: our input name -> its own) and says how to fix a problem."""

    names: Mapping[str, str] = field(default_factory=dict)
    both_sizes: str = "0 for both to take the size from the input latent"
    add_image: str = "Encode one with Kandinsky 5 VAE Encode and connect it to {input}"
    remove_image: str = "Disconnect it"
    other_model: str = "load {article} {task} model"
    nabla_off: str = "or turn NABLA off"

    def name(self, key: str) -> str:
        return self.names.get(key, key)


NODE_WORDING = Wording(
    names={"length": "length", "start_image": "start_latent", "edit_image": "edit_latent"},
    nabla_off="or set mode to off in Kandinsky 5 NABLA",
)
CLI_WORDING = Wording(
    names={"length": "frames", "start_image": "--image", "edit_image": "--image"},
    both_sizes="neither --width nor --height (then the size comes from the input image or the variant's default)",
    add_image="Pass --image FILE",
    remove_image="Remove --image",
    other_model="pick {article} {task} variant (`python -m kandinsky_core variants`)",
    nabla_off="or add --no-nabla",
)


@dataclass(frozen=True)
class NablaChoice:
    """NABLA as a user chooses it: auto follows the variant (on for the 10 s and HD variants trained with it); on
    uses the variant's P and windows (or the official 0.9 / 11, 3, 3) where P / windows are 0; off is dense."""

    mode: str = "auto"
    P: float = 0.0
    wT: int = 0
    wH: int = 0
    wW: int = 0

    def problems(self) -> list[Problem]:
        if self.mode not in NABLA_MODES:
            return [Problem("nabla", f"nabla mode {self.mode!r} is unknown. Allowed: {', '.join(NABLA_MODES)}.")]
        if self.mode == "off":
            return []
        try:  # 0 = the official value; anything else must make valid NablaParams (their rules, their messages)
            o = OFFICIAL_NABLA
            NablaParams(P=self.P or o.P, wT=self.wT or o.wT, wH=self.wH or o.wH, wW=self.wW or o.wW)
        except InputError as e:
            return [Problem("nabla", str(e))]
        return []

    def params(self, variant: Variant) -> NablaParams | None:
        """The NABLA parameters for `variant`, or None for dense attention."""
        if self.mode == "off" or (self.mode == "auto" and variant.nabla is None):
            return None
        base = variant.nabla or OFFICIAL_NABLA
        return NablaParams(P=self.P or base.P, wT=self.wT or base.wT, wH=self.wH or base.wH, wW=self.wW or base.wW)


@dataclass(frozen=True)
class Settings:
    """A run's settings with every default filled in from the variant."""

    variant: Variant
    width: int
    height: int
    length: int
    steps: int
    guidance: float
    scheduler_scale: float
    nabla: NablaParams | None

    @property
    def cfg(self) -> bool:
        return uses_cfg(self.guidance)


def _nearest(value: int, m: int) -> str:
    """The multiples of m around value, kept between m and MAX_SIZE."""
    top = MAX_SIZE // m * m
    lo = min(max(m, value // m * m), top)
    hi = min(max(m, -(-value // m) * m), top)
    return f"{lo}" if lo == hi else f"{lo} or {hi}"


def side_problems(
    width: Any, height: Any, multiple: int, why: str = "", wording: Wording = NODE_WORDING
) -> list[Problem]:
    """Width and height: whole numbers, multiples of `multiple` px, between `multiple` and MAX_SIZE."""
    out = []
    for key, value in (("width", width), ("height", height)):
        label = wording.name(key)
        if isinstance(value, bool) or not isinstance(value, int):
            out.append(
                Problem(
                    key,
                    f"{label}={value!r} is not a whole number of pixels. Give a multiple of "
                    f"{multiple} between {multiple} and {MAX_SIZE}.",
                )
            )
        elif value < multiple or value > MAX_SIZE or value % multiple:
            out.append(
                Problem(
                    key,
                    f"{label}={value} must be a multiple of {multiple} px between {multiple} and "
                    f"{MAX_SIZE}{why}. Nearest: {_nearest(value, multiple)}.",
                )
            )
    return out


def length_problems(length: Any, wording: Wording = NODE_WORDING) -> list[Problem]:
    """Frame counts are whole numbers 4k+1 (the VAE packs 4 frames per latent)."""
    label = wording.name("length")
    if isinstance(length, bool) or not isinstance(length, int):
        return [
            Problem(
                "length",
                f"{label}={length!r} is not a whole number of frames. Give 4k+1 frames: 1, 5, 9, ..., 121 (5 s).",
            )
        ]
    if length < 1 or (length - 1) % 4:
        lo = max(1, (length - 1) // 4 * 4 + 1)
        return [
            Problem(
                "length",
                f"{label}={length} frames must be 4k+1 (1, 5, 9, ..., 121 = 5 s, 241 = 10 s at "
                f"{FPS} fps): the VAE packs 4 frames per latent. Nearest: {lo} or {lo + 4}.",
            )
        ]
    return []


def number_problems(
    key: str, value: Any, lo: float, hi: float, note: str = "", wording: Wording = NODE_WORDING
) -> list[Problem]:
    """A finite number within lo..hi; NaN and infinity never pass (they would give black frames or silently switch
    CFG off)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo <= value <= hi:
        return []
    return [
        Problem(key, f"{wording.name(key)}={value!r} is not allowed: give a finite number from {lo:g} to {hi:g}{note}.")
    ]


def input_problems(
    *,
    width: Any = 0,
    height: Any = 0,
    length: Any = None,
    steps: Any = 0,
    guidance: Any = -1.0,
    scheduler_scale: Any = 0.0,
    wording: Wording = NODE_WORDING,
    nabla: bool = False,
) -> list[Problem]:
    """Every problem that needs no model: sizes (multiples of 16; both or neither), frame count, steps, guidance,
    scheduler scale. 0 / None width and height, steps 0, guidance -1 and scheduler_scale 0 mean the variant's.
    `nabla`: NABLA is on, so the sides are multiples of 128 px."""
    out: list[Problem] = []
    auto_w, auto_h = width in (0, None), height in (0, None)
    if auto_w != auto_h:
        key, other = ("height", "width") if auto_h else ("width", "height")
        values = {"width": width, "height": height}
        out.append(
            Problem(
                key,
                f"{wording.name(key)}={values[key]} with {wording.name(other)}={values[other]}: give both, or "
                f"{wording.both_sizes}.",
            )
        )
    elif not auto_w:
        why = f"{NABLA_WHY}; {wording.nabla_off}" if nabla else ""
        out += side_problems(width, height, size_multiple(nabla), why, wording)
    if length is not None:
        out += length_problems(length, wording)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= STEPS_MAX):
        out.append(
            Problem(
                "steps",
                f"{wording.name('steps')}={steps!r} is not allowed: give a whole number from 0 to "
                f"{STEPS_MAX} (0 = the variant's).",
            )
        )
    if guidance is not None:
        out += number_problems("guidance", guidance, -1, GUIDANCE_MAX, " (-1 = the variant's, 1 = no CFG)", wording)
    if scheduler_scale is not None:
        out += number_problems(
            "scheduler_scale", scheduler_scale, 0, SCHEDULER_SCALE_MAX, " (0 = the variant's)", wording
        )
    return out


def area_problem(v: Variant, width: int, height: int) -> Problem | None:
    """A size far above what the variant was trained at (more than AREA_SLACK x its largest trained area)."""
    largest = max(w * h for w, h in v.resolutions)
    if width * height <= AREA_SLACK * largest:
        return None
    sizes = ", ".join(f"{w}x{h}" for w, h in v.resolutions)
    hd = " or load a Pro HD model for 1024 px class video" if v.is_video and v.quality != "hd" else ""
    return Problem(
        "width",
        f"width x height = {width}x{height} is too large for {v.name} ({v.quality.upper()}, "
        f"trained at {sizes}). Pick one of those sizes (at most {AREA_SLACK:g}x the largest "
        f"area){hd}.",
    )


def image_problems(v: Variant, has_start: bool, has_edit: bool, wording: Wording = NODE_WORDING) -> list[Problem]:
    """I2V needs a start image and I2I the image to edit; the other tasks take neither."""
    out = []
    for key, task, has, what, other in (
        ("start_image", "i2v", has_start, "an image-to-video model and needs a start image", "T2V"),
        ("edit_image", "i2i", has_edit, "an image-edit model and needs the image to edit", "T2I"),
    ):
        label = wording.name(key)
        if v.task == task and not has:
            fix = wording.add_image.format(input=label)
            out.append(
                Problem(
                    key,
                    f"{label}: {v.name} is {what}. {fix}, or {wording.other_model.format(article='a', task=other)}.",
                )
            )
        elif v.task != task and has:
            out.append(
                Problem(
                    key,
                    f"{label} is given but {v.name} is a {v.task.upper()} model. "
                    f"{wording.remove_image}, or "
                    f"{wording.other_model.format(article='an', task=task.upper())}.",
                )
            )
    return out


def resolve(
    variant: Variant | str,
    *,
    width: int | None = None,
    height: int | None = None,
    length: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    scheduler_scale: float | None = None,
    nabla: NablaChoice | None = None,
    has_start: bool = False,
    has_edit: bool = False,
    wording: Wording = NODE_WORDING,
) -> tuple[Settings, list[Problem]]:
    """The run's settings (every "auto" filled from the variant) and every problem with them.

    Auto values: width / height 0 or None (the variant's default size), length None (the variant's frames), steps
    0 or None, guidance None or below 0, scheduler_scale 0 or None, nabla None (auto). Front ends that size from an
    input image pass the size they took from it."""
    v = get_variant(variant)
    if width in (0, None) and height in (0, None):
        width, height = v.default_size
    length = (v.default_frames if v.is_video else 1) if length is None else length
    nabla = nabla or NablaChoice()
    problems = nabla.problems()
    params = None if problems else nabla.params(v)
    problems += input_problems(
        width=width,
        height=height,
        length=length,
        steps=steps,
        guidance=guidance,
        scheduler_scale=scheduler_scale,
        wording=wording,
        nabla=params is not None,
    )
    label = wording.name("length")
    if not any(p.input == "length" for p in problems):
        if v.is_video and length > v.max_frames:
            problems.append(
                Problem(
                    "length",
                    f"{label}={length} frames is more than {v.name} makes: at most "
                    f"{v.max_frames} ({v.max_frames // FPS} s at {FPS} fps). Lower "
                    f"{label}, or {wording.other_model.format(article='a', task='10 s')}.",
                )
            )
        if not v.is_video and length != 1:
            problems.append(
                Problem("length", f"{label}={length}: {v.name} is an image model and makes 1 frame. Set {label} to 1.")
            )
    if not any(p.input in ("width", "height") for p in problems):
        area = area_problem(v, width, height)
        if area:
            problems.append(area)
    problems += image_problems(v, has_start, has_edit, wording)
    settings = Settings(
        variant=v,
        width=width,
        height=height,
        length=length,
        steps=steps or v.steps,
        guidance=v.guidance if guidance is None or (isinstance(guidance, (int, float)) and guidance < 0) else guidance,
        scheduler_scale=scheduler_scale or v.scheduler_scale,
        nabla=params,
    )
    return settings, problems


def text_width_problem(variant: Variant | str, label: str, qwen_width: int, clip_width: int) -> Problem | None:
    """Embeddings from text encoders of another width than the DiT takes (e.g. a Qwen2.5-VL-3B folder instead of
    the 7B): what the model needs and which files give it. None when the widths fit."""
    v = get_variant(variant)
    a = v.arch
    if (qwen_width, clip_width) == (a.in_text_dim, a.in_text_dim2):
        return None
    return Problem(
        label,
        f"{label} was encoded by text encoders {qwen_width} (Qwen) / {clip_width} (CLIP) wide, but "
        f"{v.name} takes Qwen2.5-VL-7B ({a.in_text_dim} wide) and CLIP ViT-L/14 ({a.in_text_dim2} "
        "wide) embeddings. In Load Kandinsky 5 Text Encoders pick qwen_2.5_vl_7b*.safetensors (or "
        "the Qwen2.5-VL-7B-Instruct folder) and clip_l.safetensors (or the clip-vit-large-patch14 "
        "folder).",
    )


def block_swap_problem(variant: Variant | str, label: str, blocks: Any) -> str | None:
    """Block swap keeps 0 .. num_visual_blocks visual blocks on the accelerator; None when `blocks` is one of those."""
    v = get_variant(variant)
    total = v.arch.num_visual_blocks
    if not isinstance(blocks, bool) and isinstance(blocks, int) and 0 <= blocks <= total:
        return None
    return (
        f"{label}={blocks!r}: {v.name} has {total} visual blocks. Use 0 .. {total} ({total} keeps them all on the "
        "GPU, i.e. no swapping; 0 swaps them all)."
    )


def nabla_grid_problems(width: int, height: int) -> list[Problem]:
    """For the attention layers' own guard (a caller that bypassed `resolve`): the NABLA size rule."""
    return side_problems(width, height, NABLA_TILE_PX, NABLA_WHY + "; resize, or turn NABLA off")
