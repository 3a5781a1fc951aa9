"""The DiT's weight files: variant detection, strict loading, weight dtypes and fp8 storage.

Detection works from the safetensors header alone (weights.read_safetensors_header), so a 40 GB file costs nothing
to recognise. What every weights reader shares (headers, prefixes, fp8, "what is this file") is in weights.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError, WeightsError
from .model import Kandinsky5DiT
from .variants import VARIANTS, DiTArch, Variant, get_variant
from .weights import (  # read_safetensors_header, to_scaled_fp8 and FP8_DTYPE are imported from here too
    FP8_DTYPE,
    compare_shapes,
    is_quant_aux,
    listing,
    open_safetensors,
    read_safetensors_header,
    shape_of,
    split_prefix,
    to_scaled_fp8,
    what_is_it,
)

# Prefixes other tools put in front of the official names (ComfyUI checkpoints and exports, Lightning, ...).
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "dit.", "transformer.")


def strip_prefix(names) -> tuple[str, dict[str, str]]:
    """(prefix found, {stripped name: original name}) for a DiT saved under a wrapper prefix."""
    return split_prefix(names, _PREFIXES, ("text_embeddings.",))


@dataclass(frozen=True)
class DetectionResult:
    """The variant a DiT file most likely is, and every variant with the same tensor shapes."""

    variant: str
    candidates: tuple[str, ...]
    arch: DiTArch
    prefix: str = ""
    reason: str = ""
    tied: tuple[str, ...] = ()  # the candidates the file name fits equally well, when more than one
    released: tuple[str, ...] = ()  # the variants released under this very file name (it names one release)

    @property
    def accepted(self) -> tuple[str, ...]:
        """The variants this file may be run as: those released under its name, else every one of its tensors."""
        return self.released or self.candidates

    def get(self) -> Variant:
        return get_variant(self.variant)

    @property
    def guess(self) -> str | None:
        """What to tell the user when the tensors and the file name leave several variants (sft / pretrain / nocfg /
        distilled, T2V / I2V Lite share their tensors): which one was taken, its settings, and how to choose.
        None when the file name singles one out."""
        if len(self.tied) < 2:
            return None
        v = self.get()
        return (
            f"the tensors fit {len(self.tied)} variants ({', '.join(self.tied)}) and the file name does not say which: "
            f"took {v.name} ({v.steps} steps, guidance {v.guidance:g}). If the file is another of them, pick it in "
            "variant (a renamed distilled model run at 50 steps and guidance 5 looks poor), or keep the official file "
            "name."
        )


def _block_count(names, stem: str) -> int:
    idx = [int(m.group(1)) for n in names if (m := re.match(rf"{stem}\.(\d+)\.", n))]
    return max(idx) + 1 if idx else 0


def _arch_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """Shape facts that identify an architecture (head split into axes is not visible in the weights)."""
    try:
        model_dim, in_text_dim = shapes["text_embeddings.in_layer.weight"]
        time_dim = shapes["time_embeddings.in_layer.weight"][0]
        in_text_dim2 = shapes["pooled_text_embeddings.in_layer.weight"][1]
        patch_in = shapes["visual_embeddings.in_layer.weight"][1]
        patch_out = shapes["out_layer.out_layer.weight"][0]
        ff_dim = shapes["visual_transformer_blocks.0.feed_forward.in_layer.weight"][0]
        head_dim = shapes["visual_transformer_blocks.0.self_attention.query_norm.weight"][0]
    except (KeyError, ValueError, IndexError) as e:
        raise KeyError(str(e)) from None
    patch = 4  # (1, 2, 2) in every released model
    return dict(
        model_dim=model_dim,
        in_text_dim=in_text_dim,
        in_text_dim2=in_text_dim2,
        time_dim=time_dim,
        in_channels=patch_in // patch,
        out_visual_dim=patch_out // patch,
        ff_dim=ff_dim,
        head_dim=head_dim,
        num_text_blocks=_block_count(shapes, "text_transformer_blocks"),
        num_visual_blocks=_block_count(shapes, "visual_transformer_blocks"),
    )


def _arch_facts(a: DiTArch) -> dict:
    return dict(
        model_dim=a.model_dim, in_text_dim=a.in_text_dim, in_text_dim2=a.in_text_dim2, time_dim=a.time_dim,
        in_channels=a.in_channels, out_visual_dim=a.out_visual_dim, ff_dim=a.ff_dim, head_dim=a.head_dim,
        num_text_blocks=a.num_text_blocks, num_visual_blocks=a.num_visual_blocks,
    )  # fmt: skip


def _name_hints(filename: str) -> dict[str, str]:
    """Task / stage / duration / quality hints from a file name (official or renamed)."""
    s = Path(filename).name.lower()
    s = re.sub(r"\.(safetensors|sft)$", "", s)
    s = re.sub(r"no[\s_\-.]?cfg", "nocfg", s)
    tokens = set(re.split(r"[^a-z0-9]+", s))
    hints: dict[str, str] = {}
    for task in ("t2v", "i2v", "t2i", "i2i"):
        if task in tokens or re.search(rf"(?<![a-z0-9]){task}|{task}(?![a-z0-9])", s):
            hints["task"] = task
            break
    else:
        if "edit" in s:
            hints["task"] = "i2i"
    if "distil" in s:
        hints["stage"] = "distilled"
    elif "nocfg" in s:
        hints["stage"] = "nocfg"
    elif "pretrain" in s:
        hints["stage"] = "pretrain"
    elif "sft" in tokens:
        hints["stage"] = "sft"
    m = re.search(r"(?<![0-9])(5|10)\s?(s|sec)(?![a-z])", s)
    if m:
        hints["seconds"] = m.group(1)
    if "hd" in tokens or "1024" in tokens:
        hints["quality"] = "hd"
    elif "sd" in tokens or "512" in tokens:
        hints["quality"] = "sd"
    return hints


def _matches(v: Variant, key: str, value: str) -> bool:
    if key == "seconds":
        return v.is_video and str(v.max_frames // 24) == value
    return getattr(v, key) == value


def _file_facts(header_or_shapes: Mapping, fname: str) -> tuple[str, dict]:
    """(prefix, architecture facts) of a DiT file; WeightsError saying what the file is if it is no K5 DiT."""
    prefix, rename = strip_prefix(header_or_shapes.keys())
    shapes = {k: shape_of(header_or_shapes[orig]) for k, orig in rename.items()}
    if "text_embeddings.in_layer.weight" not in shapes or "visual_embeddings.in_layer.weight" not in shapes:
        guess = what_is_it(header_or_shapes)
        looks = f"{guess.text}; {guess.use}, not as the DiT" if guess.use and guess.kind != "dit" else guess.text
        raise WeightsError(
            f"{fname!r} is not a Kandinsky 5 DiT: it looks like {looks}. "
            f"A Kandinsky 5 DiT has tensors such as text_embeddings.in_layer.weight and visual_transformer_blocks.*; "
            f"this file has: {listing(sorted(header_or_shapes), 6)}. Pick a kandinsky5*.safetensors DiT file."
        )
    try:
        return prefix, _arch_from_shapes(shapes)
    except KeyError as e:
        raise WeightsError(
            f"{fname!r} looks like a Kandinsky 5 DiT but lacks tensor {e}; it is incomplete or a partial export. "
            "Re-download the checkpoint."
        ) from None


def _describe_facts(facts: dict) -> str:
    return (
        f"a {facts['model_dim']}-wide DiT with {facts['in_channels']} input channels, "
        f"{facts['num_text_blocks']} text and {facts['num_visual_blocks']} visual blocks"
    )


def detect_variant(header_or_shapes: Mapping, filename: str | Path | None = None) -> DetectionResult:
    """Recognise a Kandinsky 5 DiT from tensor names and shapes; the file name breaks ties between variants
    that share an architecture (task, training stage, duration, SD/HD). Raises WeightsError for other files."""
    fname = Path(filename).name if filename else "the weights"
    prefix, facts = _file_facts(header_or_shapes, fname)
    cands = [v for v in VARIANTS.values() if _arch_facts(v.arch) == facts]
    if not cands:
        known = sorted({f"{v.family}: {_describe_facts(_arch_facts(v.arch))}" for v in VARIANTS.values()})
        raise WeightsError(
            f"{fname!r} is {_describe_facts(facts)} ({', '.join(f'{k}={v}' for k, v in facts.items())}), "
            f"an architecture no released Kandinsky 5 variant has. Known: {'; '.join(known)}. "
            "Use an official Kandinsky 5.0 checkpoint."
        )
    hints = _name_hints(str(filename)) if filename else {}
    scored = sorted((-sum(_matches(v, k, h) for k, h in hints.items()), i, v) for i, v in enumerate(cands))
    best = scored[0][2]
    tied = tuple(v.name for score, _, v in scored if score == scored[0][0])
    official = _released_as(Path(filename).name, facts) if filename else []
    if len(official) == 1:  # the released file's own name (the image sft files name no stage)
        best, tied = get_variant(official[0]), ()
    reason = f"{_describe_facts(facts)} ({best.family})"
    if hints:
        reason += f"; file name hints {hints}"
    return DetectionResult(
        variant=best.name, candidates=tuple(v.name for v in cands), arch=best.arch, prefix=prefix, reason=reason,
        tied=tied if len(tied) > 1 else (), released=tuple(official),
    )  # fmt: skip


def _released_as(filename: str, facts: dict) -> list[str]:
    """The variants released under `filename` whose tensors are `facts` (SD and HD Pro share a file)."""
    return [v.name for v in VARIANTS.values() if Path(v.hf_filename).name == filename and _arch_facts(v.arch) == facts]


def chosen_variant(header_or_shapes: Mapping, filename: str, variant: str | Variant) -> Variant:
    """`variant` for the DiT file `filename`, after checking that the file can be run as it: the tensors must fit,
    and a file under its released name is run as what was released under it (the 10 s file with the 5 s variant's
    frames and dense attention, or the sft file with the distilled 16 steps, would run silently with wrong settings).
    Raises WeightsError naming the variants that fit."""
    v = get_variant(variant)
    name = Path(filename).name
    _, facts = _file_facts(header_or_shapes, name)
    released = _released_as(name, facts)
    if facts != _arch_facts(v.arch):
        matching = released or [x.name for x in VARIANTS.values() if _arch_facts(x.arch) == facts]
        raise WeightsError(
            f"variant {v.name!r} does not fit {name!r}: the file holds {_describe_facts(facts)}, but {v.name} needs "
            f"{_describe_facts(_arch_facts(v.arch))}. "
            + (f"Variants that fit: {', '.join(matching)}." if matching else "No released variant fits this file.")
            + " Pick one of those, or auto."
        )
    if released and v.name not in released:
        mine = get_variant(released[0])
        raise WeightsError(
            f"variant {v.name!r} does not fit {name!r}: that is the released {' / '.join(released)} file, and "
            f"{v.name} would run it with {v.name}'s settings ({_settings(v)}) instead of its own ({_settings(mine)}). "
            f"Set variant to auto (or {' / '.join(released)}); for {v.name}, load its own file "
            f"{Path(v.hf_filename).name}."
        )
    return v


def _settings(v: Variant) -> str:
    frames = f"up to {v.max_frames} frames, " if v.is_video else ""
    nabla = "NABLA" if v.nabla else "dense attention"
    return f"{frames}{v.steps} steps, guidance {v.guidance:g}, {nabla}"


def _target_dtype(name: str, stored: torch.dtype, dtype: torch.dtype, fp8: bool) -> torch.dtype:
    is_matrix = name.endswith(".weight") and ("_layer." in name or ".to_" in name)
    if is_matrix and (fp8 or stored == FP8_DTYPE) and "transformer_blocks." in name:
        return FP8_DTYPE
    return dtype


def load_dit(
    path: str | Path,
    variant: str | Variant | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    operations=None,
    fp8: bool = False,
) -> tuple[Kandinsky5DiT, Variant]:
    """Load a Kandinsky 5 DiT checkpoint strictly.

    variant: None to detect it from the file, or a name / Variant to use (it must match the file's architecture).
    dtype: compute and storage dtype (bfloat16, float16, float32). fp8=True stores the transformer blocks' matrix
    weights as float8_e4m3fn (upcast at use); a file already stored in float8 keeps that storage.
    """
    path = Path(path)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise InputError(f"dtype {dtype} is not supported for the DiT: use torch.bfloat16, float16 or float32.")
    header = read_safetensors_header(path)
    if variant is None:
        v = get_variant(detect_variant(header, filename=path.name).variant)
    else:
        v = chosen_variant(header, path.name, variant)

    with torch.device("meta"):
        model = Kandinsky5DiT(v.arch, dtype=dtype, operations=operations, compute_dtype=dtype)
    expected = model.state_dict()
    _, rename = strip_prefix(header.keys())
    diff = compare_shapes(expected, {name: header[orig] for name, orig in rename.items()})
    missing, unexpected = diff.missing, diff.unexpected + sorted(set(header) - set(rename.values()))
    scales = [n for n in unexpected if is_quant_aux(n)]
    if scales:
        raise WeightsError(
            f"{path.name!r} is a scaled-fp8 export (it has per-tensor scale tensors such as "
            f"{next((n for n in scales if 'scale' in n), scales[0])}), which this loader does not read. Use the "
            "official bf16 checkpoint and choose fp8 storage (fp8=True / the weight dtype option) instead."
        )
    if missing or unexpected:
        raise WeightsError(
            f"{path.name!r} does not fit the {v.name} DiT: "
            + (f"missing {len(missing)} tensors ({listing(missing)}); " if missing else "")
            + (f"unexpected {len(unexpected)} tensors ({listing(unexpected)}); " if unexpected else "")
            + "the file is incomplete or from another model. Use the official checkpoint for this variant."
        )
    if diff.wrong:
        raise WeightsError(
            f"{path.name!r}: tensors have other shapes than the {v.name} DiT needs ({listing(diff.wrong, 4)}). "
            "The file belongs to another variant; let auto-detection pick it."
        )

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    state: dict[str, torch.Tensor] = {}
    # One tensor at a time, converted on arrival: peak memory is the model plus one tensor.
    fp8_scales: dict[str, torch.Tensor] = {}
    with open_safetensors(path, f"DiT {v.name}", device=str(device)) as f:
        for name, orig in rename.items():
            t = f.get_tensor(orig)
            target = _target_dtype(name, t.dtype, dtype, fp8)
            if target == FP8_DTYPE and t.dtype != FP8_DTYPE:
                t, fp8_scales[name] = to_scaled_fp8(t)
            elif t.dtype != target:
                t = t.to(target)
            elif t.device.type == "cpu":
                # safetensors maps CPU tensors straight from the file, at any byte offset: an owned copy is aligned
                # as every other tensor is, so the same weights give the same numbers wherever they are copied
                t = t.clone()
            state[name] = t
    model.load_state_dict(state, strict=True, assign=True)
    for name, scale in fp8_scales.items():
        # not in the state dict: the model keeps the checkpoint's keys; layers multiply it back at use
        model.get_submodule(name.rsplit(".", 1)[0]).register_buffer("weight_scale", scale, persistent=False)
    return model.eval().requires_grad_(False), v


def nabla_variant(header_or_shapes: Mapping, width: int, height: int) -> tuple[Variant, str]:
    """NABLA "auto" for a DiT known only by its tensors (ComfyUI's own loader keeps no variant): the variant whose
    official NABLA applies at width x height px, and a sentence saying which it took. Among the variants with these
    tensors it prefers one trained at that size, then a NABLA-trained one (the 10 s / HD checkpoints share their
    tensors with dense 5 s / SD ones, so a NABLA patch means the NABLA-trained one), then the longest, then sft."""
    det = detect_variant(header_or_shapes)
    cands = [get_variant(n) for n in det.candidates]
    best = max(
        cands, key=lambda v: ((width, height) in v.resolutions, v.nabla is not None, v.max_frames, v.stage == "sft")
    )
    n = best.nabla
    what = f"P={n.P:g}, windows wT={n.wT} wH={n.wH} wW={n.wW}" if n else "dense attention (trained without NABLA)"
    others = [c.name for c in cands if c.name != best.name]
    note = f"; the same tensors fit {', '.join(others)}: set NABLA on / off to choose" if others else ""
    return best, f"NABLA auto took {best.name} ({best.title}) at {width}x{height} px: {what}{note}"


def variant_for_run(header_or_shapes: Mapping, frames: int, image: str | None = None) -> tuple[Variant, str]:
    """The variant whose settings apply to a run of a DiT known only by its tensors (ComfyUI's own loader keeps no
    file name or variant): `frames` frames, `image` "start" (I2V), "edit" (I2I) or None. Among the variants with these
    tensors it takes the task the inputs say, then one whose length fits (5 s before 10 s), then sft; and a
    sentence saying which it took and what else the tensors fit."""
    det = detect_variant(header_or_shapes)
    cands = [get_variant(n) for n in det.candidates]
    task = {"start": "i2v", "edit": "i2i"}.get(image or "")

    def score(v: Variant) -> tuple:
        fits_task = v.task == task if task else v.task in ("t2v", "t2i")
        return (fits_task, frames <= v.max_frames, -v.max_frames, v.stage == "sft")

    best = max(cands, key=score)
    others = [c.name for c in cands if c.name != best.name]
    note = f" (the same tensors fit {', '.join(others)})" if others else ""
    return best, f"took {best.name} ({best.title}) for {frames} frame(s){note}"


def magcache_variant(header_or_shapes: Mapping, with_ratios: Iterable[str]) -> tuple[Variant, str]:
    """For MagCache's official ratios on a DiT known only by its tensors: among the variants with these tensors that
    have ratios (`with_ratios`), an sft one, the longest (the Lite 5 s and 10 s sft ratios differ by under 1%); and a
    sentence saying which it took. WeightsError when none of them has ratios."""
    det = detect_variant(header_or_shapes)
    names = set(with_ratios)
    cands = [get_variant(n) for n in det.candidates if n in names]
    if not cands:
        raise WeightsError(
            f"ratios: the model is {', '.join(det.candidates)} by its tensors, and none of them has official MagCache "
            "ratios. Calibrate them with Kandinsky 5 MagCache Calibrate and paste them into ratios."
        )
    best = max(cands, key=lambda v: (v.stage == "sft", v.max_frames))
    return best, f"MagCache took the official ratios of {best.name} ({best.title})"
