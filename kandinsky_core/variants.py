"""The one table of released Kandinsky 5.0 variants. Loaders, nodes, workflows, docs and the CLI all read it.

Numbers come from the official repository (kandinskylab/kandinsky-5): configs/*.yaml, the pipelines'
RESOLUTIONS and call defaults (kandinsky/*_pipeline.py), kandinsky/utils.py and README.md.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from .errors import InputError
from .nabla import NablaParams

FPS = 24
HUNYUAN_LATENT_SCALE = 0.476986  # HunyuanVideo VAE config scaling_factor (used by the official pipelines)
FLUX_LATENT_SCALE = 0.3611  # FLUX VAE scaling_factor; the official image pipeline applies no shift


@dataclass(frozen=True)
class DiTArch:
    """Shape of one DiT: enough to build `Kandinsky5DiT` and to recognise a checkpoint by its tensor shapes."""

    time_dim: int
    model_dim: int
    ff_dim: int
    num_text_blocks: int
    num_visual_blocks: int
    axes_dims: tuple[int, int, int]
    visual_cond: bool = False
    instruct: bool = False  # I2I "channel" edit: the edit latent and a mask are concatenated to the input
    in_visual_dim: int = 16
    out_visual_dim: int = 16
    in_text_dim: int = 3584
    in_text_dim2: int = 768
    patch_size: tuple[int, int, int] = (1, 2, 2)

    @property
    def head_dim(self) -> int:
        return sum(self.axes_dims)

    @property
    def num_heads(self) -> int:
        return self.model_dim // self.head_dim

    @property
    def in_channels(self) -> int:
        return 2 * self.in_visual_dim + 1 if (self.visual_cond or self.instruct) else self.in_visual_dim

    def __post_init__(self) -> None:
        if self.model_dim % self.head_dim:
            raise ValueError(f"model_dim {self.model_dim} is not a multiple of head_dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dims):
            raise ValueError(f"axes_dims {self.axes_dims} must be even (RoPE rotates pairs)")


# configs/k5_lite_*.yaml dit_params (and utils.get_default_conf)
LITE_VIDEO = DiTArch(
    time_dim=512, model_dim=1792, ff_dim=7168, num_text_blocks=2, num_visual_blocks=32,
    axes_dims=(16, 24, 24), visual_cond=True,
)  # fmt: skip
# configs/k5_pro_*.yaml dit_params
PRO_VIDEO = DiTArch(
    time_dim=1024, model_dim=4096, ff_dim=16384, num_text_blocks=4, num_visual_blocks=60,
    axes_dims=(32, 48, 48), visual_cond=True,
)  # fmt: skip
# configs/k5_lite_t2i_sft_hd.yaml and k5_lite_i2i_sft_hd.yaml (instruct_type: channel)
IMAGE_T2I = DiTArch(
    time_dim=512, model_dim=2560, ff_dim=10240, num_text_blocks=2, num_visual_blocks=50, axes_dims=(32, 48, 48),
)  # fmt: skip
IMAGE_I2I = DiTArch(
    time_dim=512, model_dim=2560, ff_dim=10240, num_text_blocks=2, num_visual_blocks=50, axes_dims=(32, 48, 48),
    instruct=True,
)  # fmt: skip

# t2v_pipeline.py / i2i_pipeline.py RESOLUTIONS hold (height, width); we store (width, height).
_SD_HW = ((512, 512), (512, 768), (768, 512))
_HD_HW = ((1024, 1024), (640, 1408), (1408, 640), (768, 1280), (1280, 768), (896, 1152), (1152, 896))
SD_RESOLUTIONS = tuple((w, h) for h, w in _SD_HW)
HD_RESOLUTIONS = tuple((w, h) for h, w in _HD_HW)


@dataclass(frozen=True)
class Variant:
    """One released checkpoint with the inference settings its authors ship for it."""

    name: str
    title: str
    task: str  # "t2v" | "i2v" | "t2i" | "i2i"
    family: str  # "lite" | "pro" | "image"
    stage: str  # "sft" | "pretrain" | "nocfg" | "distilled"
    arch: DiTArch
    nabla: NablaParams | None
    rope_scale: tuple[float, float, float]
    steps: int
    guidance: float
    scheduler_scale: float
    resolutions: tuple[tuple[int, int], ...]  # (width, height) the model was trained for
    default_size: tuple[int, int]  # (width, height)
    durations: tuple[int, ...]  # seconds offered to users; () for image variants
    max_frames: int
    hf_repo: str
    hf_filename: str
    text_template: str  # "video" | "image" | "image_edit" (I2V uses "video", as generation_utils.generate_sample_i2v)
    text_max_length: int
    vae: str  # "hunyuan" | "flux"
    latent_scale: float
    quality: str  # "sd" (512 px class) | "hd" (1024 px class)
    config: str | None  # official config file, None where the authors ship none
    i2v_max_area: int | None = None  # I2V: the input image is resized to about this many pixels

    @property
    def is_video(self) -> bool:
        return self.task in ("t2v", "i2v")

    @property
    def is_distilled(self) -> bool:
        return self.stage == "distilled"

    @property
    def default_frames(self) -> int:
        return self.max_frames

    @property
    def default_width(self) -> int:
        return self.default_size[0]

    @property
    def default_height(self) -> int:
        return self.default_size[1]


def seconds_to_frames(seconds: int) -> int:
    """Frames the official pipelines generate for a duration: 24 fps, 4k+1 (5 s -> 121, 10 s -> 241)."""
    return seconds * FPS // 4 * 4 + 1 if seconds > 0 else 1


_REPO = "kandinskylab/Kandinsky-5.0-"
_LITE_NABLA = NablaParams(P=0.9, wT=11, wH=3, wW=3)  # k5_lite_t2v_10s_*.yaml attention


def _lite_t2v(stage: str, seconds: int, steps: int, guidance: float, sched: float, config: str, title: str) -> Variant:
    # Lite 10 s checkpoints are NABLA-trained (README); 5 s ones use dense attention (configs say "flash").
    file_stage = "distilled16steps" if stage == "distilled" else stage
    return Variant(
        name=f"t2v-lite-{file_stage}-{seconds}s",
        title=f"T2V Lite {title} {seconds}s",
        task="t2v",
        family="lite",
        stage=stage,
        arch=LITE_VIDEO,
        nabla=_LITE_NABLA if seconds == 10 else None,
        rope_scale=(1.0, 2.0, 2.0),
        steps=steps,
        guidance=guidance,
        scheduler_scale=sched,
        resolutions=SD_RESOLUTIONS,
        default_size=(768, 512),  # test.py defaults
        durations=(5,) if seconds == 5 else (5, 10),
        max_frames=seconds_to_frames(seconds),
        hf_repo=f"{_REPO}T2V-Lite-{file_stage}-{seconds}s",
        hf_filename=f"model/kandinsky5lite_t2v_{file_stage}_{seconds}s.safetensors",
        text_template="video",
        text_max_length=256,
        vae="hunyuan",
        latent_scale=HUNYUAN_LATENT_SCALE,
        quality="sd",
        config=config,
    )


def _pro(task: str, stage: str, seconds: int, quality: str, sched: float, config: str | None) -> Variant:
    hd = quality == "hd"
    # NABLA P per configs/k5_pro_*: 10 s SD 0.9, 10 s HD 0.7, 5 s HD 0.8 (T2V and I2V); 5 s SD is dense.
    p = {(10, "sd"): 0.9, (10, "hd"): 0.7, (5, "hd"): 0.8}.get((seconds, quality))
    stage_part = f"{stage}-" if task == "t2v" else ""
    stage_title = {"t2v": {"sft": "SFT ", "pretrain": "pretrain "}[stage], "i2v": ""}[task]
    return Variant(
        name=f"{task}-pro-{stage_part}{seconds}s-{quality}",
        title=f"{task.upper()} Pro {stage_title}{seconds}s {quality.upper()}",
        task=task,
        family="pro",
        stage=stage,
        arch=PRO_VIDEO,
        nabla=NablaParams(P=p, wT=11, wH=3, wW=3) if p is not None else None,
        rope_scale=(1.0, 3.16, 3.16) if hd else (1.0, 2.0, 2.0),
        steps=50,
        guidance=5.0,
        scheduler_scale=sched,
        resolutions=HD_RESOLUTIONS if hd else SD_RESOLUTIONS,
        default_size=(1280, 768) if hd else (768, 512),
        durations=(5,) if seconds == 5 else (5, 10),
        max_frames=seconds_to_frames(seconds),
        hf_repo=f"{_REPO}{task.upper()}-Pro-{stage}-{seconds}s",
        hf_filename=f"model/kandinsky5pro_{task}_{stage}_{seconds}s.safetensors",
        text_template="video",  # the official I2V pipeline encodes with the "video" template too
        text_max_length=256,
        vae="hunyuan",
        latent_scale=HUNYUAN_LATENT_SCALE,
        quality=quality,
        config=config,
        # i2v_pipeline.py: max_area 512*768 at resolution 512, 1024*1024 at 1024
        i2v_max_area=(1024 * 1024 if hd else 512 * 768) if task == "i2v" else None,
    )


def _image(task: str, stage: str) -> Variant:
    suffix = "" if stage == "sft" else "-pretrain"
    file_suffix = "" if stage == "sft" else "_pretrain"
    return Variant(
        name=f"{task}-lite{suffix}",
        title=f"{'T2I' if task == 't2i' else 'I2I Edit'} Lite{' pretrain' if suffix else ''}",
        task=task,
        family="image",
        stage=stage,
        arch=IMAGE_T2I if task == "t2i" else IMAGE_I2I,
        nabla=None,
        rope_scale=(1.0, 1.0, 1.0),  # configs/k5_lite_t2i_sft_hd.yaml metrics.scale_factor
        steps=50,
        guidance=3.5,
        scheduler_scale=3.0,  # t2i_pipeline.py / i2i_pipeline.py __call__ default
        resolutions=HD_RESOLUTIONS,  # i2i_pipeline.py RESOLUTIONS[1024], also used by T2I
        default_size=(1024, 1024),
        durations=(),
        max_frames=1,
        hf_repo=f"{_REPO}{task.upper()}-Lite{suffix}",
        # sft names from utils.get_T2I_pipeline / get_I2I_pipeline; the pretrain names are our best guess
        # (the repos are published without an official config): detection also accepts any file name.
        hf_filename=f"model/kandinsky5lite_{task}{file_suffix}.safetensors",
        text_template="image" if task == "t2i" else "image_edit",
        text_max_length=512,
        vae="flux",
        latent_scale=FLUX_LATENT_SCALE,
        quality="hd",
        config=f"k5_lite_{task}_sft_hd.yaml" if stage == "sft" else None,
    )


def _build_table() -> dict[str, Variant]:
    v: list[Variant] = [
        # steps / guidance: configs/k5_lite_t2v_*.yaml model.num_steps / guidance_weight.
        # scheduler_scale: metrics.scheduler_scale where the config sets it, else the t2v pipeline default 10.0.
        _lite_t2v("sft", 5, 50, 5.0, 10.0, "k5_lite_t2v_5s_sft_sd.yaml", "SFT"),
        _lite_t2v("sft", 10, 50, 5.0, 10.0, "k5_lite_t2v_10s_sft_sd.yaml", "SFT"),
        _lite_t2v("pretrain", 5, 50, 5.0, 10.0, "k5_lite_t2v_5s_pretrain_sd.yaml", "pretrain"),
        _lite_t2v("pretrain", 10, 50, 5.0, 10.0, "k5_lite_t2v_10s_pretrain_sd.yaml", "pretrain"),
        # nocfg 10 s: its config points at the sft_10s file by mistake; README lists kandinsky5lite_t2v_nocfg_10s.
        _lite_t2v("nocfg", 5, 50, 1.0, 10.0, "k5_lite_t2v_5s_nocfg_sd.yaml", "no-CFG"),
        _lite_t2v("nocfg", 10, 50, 1.0, 10.0, "k5_lite_t2v_10s_nocfg_sd.yaml", "no-CFG"),
        _lite_t2v("distilled", 5, 16, 1.0, 5.0, "k5_lite_t2v_5s_distil_sd.yaml", "distilled 16 steps"),
        _lite_t2v("distilled", 10, 16, 1.0, 10.0, "k5_lite_t2v_10s_distil_sd.yaml", "distilled 16 steps"),
    ]
    # configs/k5_lite_i2v_5s_sft_sd.yaml: 50 steps, guidance 5, scheduler_scale 10, dense attention.
    v.append(
        Variant(
            name="i2v-lite-5s",
            title="I2V Lite 5s",
            task="i2v",
            family="lite",
            stage="sft",
            arch=LITE_VIDEO,
            nabla=None,
            rope_scale=(1.0, 2.0, 2.0),
            steps=50,
            guidance=5.0,
            scheduler_scale=10.0,
            resolutions=SD_RESOLUTIONS,
            default_size=(768, 512),
            durations=(5,),
            max_frames=seconds_to_frames(5),
            hf_repo=f"{_REPO}I2V-Lite-5s",
            hf_filename="model/kandinsky5lite_i2v_5s.safetensors",
            text_template="video",  # generate_sample_i2v uses "video"; "image2video" is defined but unused
            text_max_length=256,
            vae="hunyuan",
            latent_scale=HUNYUAN_LATENT_SCALE,
            quality="sd",
            config="k5_lite_i2v_5s_sft_sd.yaml",
            i2v_max_area=512 * 768,
        )
    )
    # Pro: configs/k5_pro_*.yaml (50 steps, guidance 5). T2V configs lack scheduler_scale -> pipeline default 10;
    # I2V SD sets 10, I2V HD sets 5. SD and HD share one checkpoint file; they differ in resolution,
    # rope scale and NABLA. Pretrain checkpoints ship without configs: they take their sft sibling's numbers.
    for stage in ("sft", "pretrain"):
        for seconds in (5, 10):
            for quality in ("sd", "hd"):
                cfg = f"k5_pro_t2v_{seconds}s_sft_{quality}.yaml" if stage == "sft" else None
                v.append(_pro("t2v", stage, seconds, quality, 10.0, cfg))
    v.append(_pro("i2v", "sft", 5, "sd", 10.0, "k5_pro_i2v_5s_sft_sd.yaml"))
    v.append(_pro("i2v", "sft", 5, "hd", 5.0, "k5_pro_i2v_5s_sft_hd.yaml"))
    # Image Lite: configs/k5_lite_t2i_sft_hd.yaml, k5_lite_i2i_sft_hd.yaml (50 steps, guidance 3.5, Qwen length 512).
    # Pretrain image checkpoints take the sft numbers.
    v += [_image("t2i", "sft"), _image("t2i", "pretrain"), _image("i2i", "sft"), _image("i2i", "pretrain")]
    table = {x.name: x for x in v}
    assert len(table) == len(v), "duplicate variant names"
    return table


VARIANTS: dict[str, Variant] = _build_table()


def get_variant(name: str | Variant) -> Variant:
    """Look a variant up by name (a `Variant` passes through)."""
    if isinstance(name, Variant):
        return name
    key = str(name).strip().lower()
    if key in VARIANTS:
        return VARIANTS[key]
    close = difflib.get_close_matches(key, list(VARIANTS), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise InputError(
        f"Unknown Kandinsky 5 variant {name!r}.{hint} Valid variants: {', '.join(VARIANTS)}. "
        "Pick one of these names (`python -m kandinsky_core variants` lists them with their settings)."
    )


def _fmt_size(v: Variant) -> str:
    return ", ".join(f"{w}x{h}" for w, h in v.resolutions)


def variants_markdown() -> str:
    """A Markdown table of every variant (for the README and docs)."""
    head = (
        "| name | model | task | steps | CFG | scheduler scale | NABLA P | max frames | sizes (WxH) | checkpoint |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    rows = []
    for v in VARIANTS.values():
        nabla = f"{v.nabla.P:g}" if v.nabla else "-"
        sizes = f"any, ~{v.i2v_max_area} px area" if v.i2v_max_area else _fmt_size(v)
        rows.append(
            f"| `{v.name}` | {v.title} | {v.task.upper()} | {v.steps} | {v.guidance:g} | {v.scheduler_scale:g} "
            f"| {nabla} | {v.max_frames} | {sizes} | [{v.hf_repo}](https://huggingface.co/{v.hf_repo}) "
            f"`{v.hf_filename}` |"
        )
    return head + "\n".join(rows) + "\n"


MAX_SIZE = 4096  # px per side (ComfyUI's own limit for image sizes; far beyond every trained size)


def i2v_size(variant: Variant | str, image_width: int, image_height: int) -> tuple[int, int]:
    """(width, height) the official I2V pipeline generates for a start image of image_width x image_height: the
    image's aspect at about `i2v_max_area` pixels, each side rounded to the nearest multiple of `settings.size_multiple`
    (i2v_pipeline.py resize_image: k = sqrt(max_area / area) / d, side -> round(side * k) * d with Python's round,
    d = 16 at 512 px, 128 at 1024 px, which are exactly the I2V variants without / with NABLA). The whole image is
    kept: it is resized to this size, never cropped."""
    from .settings import size_multiple

    v = get_variant(variant)
    if v.task != "i2v" or v.i2v_max_area is None:
        raise ValueError(f"{v.name} is not an I2V variant")
    d = size_multiple(v.nabla is not None)
    k = (v.i2v_max_area / (image_width * image_height)) ** 0.5 / d
    return max(1, round(image_width * k)) * d, max(1, round(image_height * k)) * d


def i2i_size(variant: Variant | str, image_width: int, image_height: int) -> tuple[int, int]:
    """(width, height) the official I2I pipeline edits at: the trained size whose height / width ratio is nearest
    the image's (i2i_pipeline.py find_nearest compares height / width; the first in table order wins a tie). The
    image is then resized to cover it and centre-cropped (media.resize_center_crop)."""
    v = get_variant(variant)
    aspect = image_height / image_width
    return min(v.resolutions, key=lambda wh: abs(wh[1] / wh[0] - aspect))


def size_for_image(variant: Variant | str, image_width: int, image_height: int) -> tuple[int, int]:
    """The size an I2V / I2I run takes from its input image when the user sets none, as the official pipelines
    choose it (I2V: `i2v_size`, whole image; I2I: `i2i_size`, cover-crop)."""
    v = get_variant(variant)
    if v.task == "i2v":
        return i2v_size(v, image_width, image_height)
    if v.task == "i2i":
        return i2i_size(v, image_width, image_height)
    raise ValueError(f"{v.name} takes no input image")


def crops_input_image(variant: Variant | str, size_from_image: bool) -> bool:
    """Whether the input image is cropped to the generated size: I2V keeps the whole image when the size came from
    the image (a plain resize to `i2v_size`); I2I, and any size the user set, cover-crop as the official resize
    does."""
    return not (get_variant(variant).task == "i2v" and size_from_image)


def encode_template(variant: Variant | str, frames: int) -> str:
    """The Qwen template the prompts are encoded under: a one-frame run of a video model uses "image", as the
    official generate_sample / generate_sample_i2v choose it by the number of frames (duration 1 -> "image")."""
    v = get_variant(variant)
    return "image" if v.is_video and frames == 1 else v.text_template
