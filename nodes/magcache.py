"""Kandinsky 5 MagCache and MagCache Calibrate: MODEL in, MODEL out carrying a block-cache setting that the
Kandinsky 5 Sampler hands to kandinsky_core.sampling.sample (`block_cache=`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfy_api.latest import io

from kandinsky_core.errors import InputError
from kandinsky_core.loading import magcache_variant
from kandinsky_core.magcache import (
    DEFAULT_K,
    DEFAULT_RETENTION,
    DEFAULT_THRESHOLD,
    OFFICIAL_MAG_RATIOS,
    MagCache,
    MagCacheParams,
    MagCalibration,
)

from . import comfy_glue, comfy_model, native
from .common import CATEGORY, fail
from .model_options import with_options


def parse_ratios(text: str) -> tuple[float, ...] | None:
    """None for an empty string; else the ratios of a calibration file's JSON, a JSON list, or numbers separated
    by commas / whitespace."""
    from kandinsky_core.magcache import read_mag_ratios

    text = text.strip()
    if not text:
        return None
    if text[0] in "[{":
        return read_mag_ratios(text, "ratios")
    try:
        numbers = tuple(float(v) for v in re.split(r"[,\s]+", text) if v)
    except ValueError:
        raise InputError(
            f"ratios {text[:40]!r}... is not a list of numbers. Paste the JSON a Kandinsky 5 MagCache Calibrate run "
            'wrote (or its "ratios" list), numbers separated by commas, or leave it empty for the official ratios.'
        ) from None
    return MagCacheParams(numbers).ratios  # its own message for numbers that cannot be ratios (negative, NaN)


MAX_PREFIX = 160  # bytes: file names are at most 255, and _<variant>_<steps>steps.json follows


@dataclass(frozen=True)
class MagCacheSetting:
    """What the MagCache node puts in a MODEL's Kandinsky 5 options: the sampler calls `make()` for a fresh cache and
    `done(cache)`."""

    params: MagCacheParams

    def make(self, variant: Any) -> MagCache:
        return MagCache(self.params)

    def done(self, cache: MagCache, steps: int, cfg: bool, variant: Any = None) -> None:
        comfy_glue.log.info(
            "Kandinsky 5 MagCache: %d of %d DiT calls reused the cached residual", len(cache.skipped),
            steps * (2 if cfg else 1),
        )  # fmt: skip


@dataclass(frozen=True)
class CalibrationSetting:
    """Measures the ratios during the sampler's run and writes them as JSON into ComfyUI's output folder."""

    filename_prefix: str

    def make(self, variant: Any) -> MagCalibration:
        return MagCalibration()

    def done(self, cache: MagCalibration, steps: int, cfg: bool, variant: Any = None) -> Path:
        import folder_paths

        name = getattr(variant, "name", "model")
        path = Path(folder_paths.get_output_directory()) / f"{self.filename_prefix}_{name}_{steps}steps.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        ratios = list(cache.ratios())
        path.write_text(json.dumps({"variant": name, "steps": steps, "cfg": cfg, "ratios": ratios}, indent=1))
        comfy_glue.log.info(
            "Kandinsky 5 MagCache Calibrate: wrote %s; paste its contents into Kandinsky 5 MagCache's ratios", path
        )
        return path


class MagCacheNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="K5MagCache",
            display_name="Kandinsky 5 MagCache",
            category=f"{CATEGORY}/speed",
            description="MagCache for the Kandinsky 5 Sampler: at steps where the visual blocks' residual is "
            "predictable from the last computed one (magnitude ratios calibrated per model), the blocks are skipped "
            "and the cached residual reused; about 1.5-2x faster sampling. Official ratios exist for Lite and Pro "
            "sft / no-CFG video and Image Lite; calibrate others with Kandinsky 5 MagCache Calibrate. Works in "
            "KSampler too on ComfyUI's own Kandinsky 5 model (Load Diffusion Model; official ratios from its tensors, "
            "logged).",
            inputs=[
                io.Model.Input("model", tooltip="From Load Kandinsky 5 DiT, a LoRA loader or an option node."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.0, max=1.0, step=0.01, tooltip=
                               "Accumulated ratio error allowed before the blocks must run again. Higher: faster, "
                               "less faithful. Official: 0.12."),
                io.Int.Input("K", default=DEFAULT_K, min=0, max=20, tooltip=
                             "Most steps skipped in a row per CFG branch. Official: 2."),
                io.Float.Input("retention", default=DEFAULT_RETENTION, min=0.0, max=1.0, step=0.05, tooltip=
                               "First fraction of the steps that always run the blocks (they shape the layout). "
                               "Official: 0.2."),
                io.String.Input("ratios", default="", multiline=True, tooltip=
                                "Empty: the variant's official ratios. Or the JSON a Kandinsky 5 MagCache Calibrate "
                                "run wrote to the output folder (or numbers separated by commas), for distilled, "
                                "pretrain, I2V or fine-tuned models."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip=
                                   "The same DiT (a clone: the input keeps its options); the Kandinsky 5 Sampler uses "
                                   "MagCache with it.")],
        )  # fmt: skip

    @classmethod
    def validate_inputs(cls, ratios):
        try:
            parse_ratios(ratios)
        except InputError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, threshold, K, retention, ratios) -> io.NodeOutput:
        with fail("Kandinsky 5 MagCache"):
            values = parse_ratios(ratios)
            if values is None and native.is_native(model):
                variant, said = magcache_variant(native.shapes_of(model), OFFICIAL_MAG_RATIOS)
                comfy_glue.log.info("Kandinsky 5 MagCache on ComfyUI's own model: %s", said)
                values = OFFICIAL_MAG_RATIOS[variant.name]
            if values is None:
                name = comfy_model.k5_model(model).variant.name
                if name not in OFFICIAL_MAG_RATIOS:
                    raise InputError(
                        f"ratios: {name} has no official MagCache ratios (they exist for "
                        f"{', '.join(OFFICIAL_MAG_RATIOS)}). Run the model once through Kandinsky 5 MagCache Calibrate "
                        "and the Sampler, then paste the JSON it writes to the output folder into ratios."
                    )
                values = OFFICIAL_MAG_RATIOS[name]
            params = MagCacheParams(values, threshold=threshold, K=K, retention=retention)
            return io.NodeOutput(native.patched(with_options(model, block_cache=MagCacheSetting(params)), cache=True))


class MagCacheCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="K5MagCacheCalibrate",
            display_name="Kandinsky 5 MagCache Calibrate",
            category=f"{CATEGORY}/speed",
            description="Measures this model's MagCache ratios during one full Kandinsky 5 Sampler run (nothing is "
            "skipped) and writes them to the output folder as JSON, for Kandinsky 5 MagCache's ratios. Use the step "
            "count, guidance and a size you will generate with. On ComfyUI's own Kandinsky 5 model KSampler's run "
            "is measured too.",
            inputs=[
                io.Model.Input("model", tooltip="From Load Kandinsky 5 DiT, a LoRA loader or an option node."),
                io.String.Input("filename_prefix", default="kandinsky5_magcache", tooltip=
                                "The ratios go to output/<prefix>_<variant>_<steps>steps.json."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip=
                                   "The same DiT; the next Kandinsky 5 Sampler run measures the ratios.")],
        )  # fmt: skip

    @classmethod
    def validate_inputs(cls, filename_prefix):
        if not re.fullmatch(r"[\w.\-]+", filename_prefix or ""):
            return f"filename_prefix {filename_prefix!r}: use letters, digits, '_', '-' and '.' only."
        if len(filename_prefix.encode("utf-8")) > MAX_PREFIX:
            return (
                f"filename_prefix is {len(filename_prefix)} characters long: at most {MAX_PREFIX} fit in a file name "
                "(with the variant and step count added). Shorten it."
            )
        return True

    @classmethod
    def execute(cls, model, filename_prefix) -> io.NodeOutput:
        with fail("Kandinsky 5 MagCache Calibrate"):
            problem = cls.validate_inputs(filename_prefix)
            if problem is not True:
                raise InputError(problem)
            patched = with_options(model, block_cache=CalibrationSetting(filename_prefix))
            return io.NodeOutput(native.patched(patched, cache=True))
