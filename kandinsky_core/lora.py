"""LoRA, LoKr and LoHa adapters for the Kandinsky 5 DiT, in the key formats its trainers write.

`read_lora(path)` recognises the format from the tensor names, maps every adapted module to the official module
name of `Kandinsky5DiT` (e.g. ``visual_transformer_blocks.3.self_attention.to_query``) and returns its factors with
the effective scale; `LoraFile.check(arch)` refuses a LoRA made for another model or another Kandinsky size;
`apply_lora(model, lora, strength)` adds ``strength * delta`` to a loaded DiT's weights (the core loaders' result,
float8 storage included). The ComfyUI node turns the same targets into ModelPatcher weight patches.

Formats (key layout, and what the trainer means when there is no alpha):

- official kandinsky-5 LoRA trainer (PEFT): ``base_model.model.<module>.lora_A.default.weight`` / ``lora_B``, no alpha
  tensor; the trainer saves ``model.safetensors`` with the trigger word in the safetensors metadata (``trigger``) and
  the LoRA config (``r``, ``lora_alpha``, ``target_modules``) as ``config_lora.json`` beside it, which the official
  pipeline passes to ``peft.LoraConfig(**config)`` (kandinsky/t2v_pipeline.py ``load_adapter``). Scale is PEFT's:
  ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``); a config without ``lora_alpha`` means PEFT's
  LoraConfig default, 8. ``rank_pattern`` / ``alpha_pattern`` entries override per module (key = a module-name
  suffix, as PEFT matches them).
- bare PEFT: ``<module>.lora_A[.default].weight`` (``get_peft_model_state_dict`` output); scale as above from
  ``config_lora.json`` or PEFT's ``adapter_config.json`` beside the file.
- diffusers / SimpleTuner: ``transformer.<module>.lora_A.weight``; alpha from the safetensors metadata
  ``lora_adapter_metadata`` (diffusers >= 0.34 writes ``lora_alpha`` there) or a ``<module>.alpha`` tensor; absent,
  diffusers loads the LoRA with ``lora_alpha = r`` (scale 1).
- musubi-tuner (kohya's sd-scripts layout): ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``lora_up`` /
  ``.alpha``; kohya's LoRAModule sets ``alpha = rank`` when the alpha is absent or 0 (scale 1).
- ComfyUI's trainer: ``diffusion_model.<module>.lora_up.weight`` / ``lora_down`` (+ ``.alpha``, which it saves);
  ComfyUI's loader uses scale 1 when the alpha is absent.
- LyCORIS: ``lycoris_<module_with_underscores>.lokr_w1`` / ``lokr_w2`` (or their ``_a`` / ``_b`` factor pairs) for
  LoKr, ``hada_w1_a`` / ``hada_w1_b`` / ``hada_w2_a`` / ``hada_w2_b`` for LoHa, plus ``.alpha``. LyCORIS (modules/
  lokr.py, loha.py) sets ``alpha = rank`` when absent or 0, so scale = alpha / rank, rank being the inner dimension of
  the factor pairs; a LoKr whose two Kronecker factors are both full matrices has scale 1 (LyCORIS forces it).
  ``delta = kron(w1, w2)`` for LoKr (w1 the small factor), ``(w1_a @ w1_b) * (w2_a @ w2_b)`` for LoHa.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from .errors import WeightsError
from .loading import read_safetensors_header, to_scaled_fp8
from .model import Kandinsky5DiT
from .variants import VARIANTS, DiTArch

PEFT_DEFAULT_ALPHA = 8.0  # peft.LoraConfig's lora_alpha default
CONFIG_NAMES = ("config_lora.json", "adapter_config.json")

# (format name, key prefix); the first prefix a file's keys carry decides (longest first).
_PREFIXES = (
    ("official kandinsky-5 trainer (PEFT)", "base_model.model."),
    ("diffusers / SimpleTuner", "transformer."),
    ("ComfyUI trainer", "diffusion_model."),
    ("musubi-tuner", "lora_unet_"),
    ("LyCORIS", "lycoris_"),
)
_SUFFIXES = (
    # (regex on what follows the module name, factor name)
    (r"\.lora_A(?:\.default)?\.weight", "down"),
    (r"\.lora_B(?:\.default)?\.weight", "up"),
    (r"\.lora_down\.weight", "down"),
    (r"\.lora_up\.weight", "up"),
    (r"\.alpha", "alpha"),
    (r"\.lokr_w1", "w1"),
    (r"\.lokr_w1_a", "w1_a"),
    (r"\.lokr_w1_b", "w1_b"),
    (r"\.lokr_w2", "w2"),
    (r"\.lokr_w2_a", "w2_a"),
    (r"\.lokr_w2_b", "w2_b"),
    (r"\.hada_w1_a", "hada_w1_a"),
    (r"\.hada_w1_b", "hada_w1_b"),
    (r"\.hada_w2_a", "hada_w2_a"),
    (r"\.hada_w2_b", "hada_w2_b"),
)
_SUFFIX_RE = re.compile("^(.*?)(" + "|".join(f"(?:{s})" for s, _ in _SUFFIXES) + ")$")
_UNSUPPORTED = ("dora_scale", "lokr_t2", "hada_t1", "hada_t2", "oft_", "lora_mid", "diff_b", ".diff")


@dataclass
class LoraTarget:
    """The adapter of one module: factors (float32, on the CPU) and the effective alpha/rank scale."""

    module: str  # official module name, e.g. visual_transformer_blocks.0.self_attention.to_query
    kind: str  # "lora" | "lokr" | "loha"
    factors: dict[str, torch.Tensor]
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the weight this adapter changes."""
        f = self.factors
        if self.kind == "lora":
            return (f["up"].shape[0], f["down"].shape[1])
        if self.kind == "loha":
            return (f["hada_w1_a"].shape[0], f["hada_w1_b"].shape[1])
        w1, w2 = _lokr_sides(f)
        return (w1[0] * w2[0], w1[1] * w2[1])

    def delta(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale * the adapter's weight difference (strength 1), computed in `dtype` on `device`."""
        f = {k: v.to(device=device, dtype=dtype) for k, v in self.factors.items()}
        if self.kind == "lora":
            d = f["up"] @ f["down"]
        elif self.kind == "loha":
            d = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        else:
            w1 = f["w1"] if "w1" in f else f["w1_a"] @ f["w1_b"]
            w2 = f["w2"] if "w2" in f else f["w2_a"] @ f["w2_b"]
            d = torch.kron(w1, w2)
        return d * self.scale


@dataclass
class LoraFile:
    path: Path
    format: str  # e.g. "official kandinsky-5 trainer (PEFT)"
    targets: dict[str, LoraTarget]  # by official module name
    trigger: str = ""  # trigger word the LoRA was trained with ("" when it names none)
    notes: list[str] = field(default_factory=list)  # assumptions worth telling the user (e.g. no config found)

    def check(self, arch: DiTArch, model_name: str = "the loaded model") -> None:
        """Raise WeightsError unless every target exists in a DiT of `arch` with the same weight shape."""
        expected = _linear_shapes(arch)
        bad = {m: t.shape for m, t in self.targets.items() if expected.get(m) != t.shape}
        if not bad:
            return
        fits = _arch_of_targets(self.targets)
        ours = _family_of(arch.model_dim)
        if fits is not None and fits[0] != arch.model_dim:
            raise WeightsError(
                f"LoRA {self.path.name!r} targets a DiT with model_dim {fits[0]} ({_family_of(fits[0])}); "
                f"{model_name} is {ours} (model_dim {arch.model_dim}). Use a LoRA trained for this model, or load "
                f"the {_family_of(fits[0])} DiT."
            )
        m, shape = next(iter(sorted(bad.items())))
        where = f"{m} does not exist in it" if m not in expected else f"{m} has shape {expected[m]}, the LoRA {shape}"
        raise WeightsError(
            f"LoRA {self.path.name!r} ({self.format}) does not fit {model_name} ({ours}, "
            f"{arch.num_text_blocks} text / {arch.num_visual_blocks} visual blocks): {where} "
            f"({len(bad)} of {len(self.targets)} adapted modules do not fit). It was trained for another Kandinsky 5 "
            "variant: use a LoRA made for this one."
        )


def _lokr_sides(f: dict[str, torch.Tensor]) -> tuple[tuple[int, int], tuple[int, int]]:
    w1 = tuple(f["w1"].shape) if "w1" in f else (f["w1_a"].shape[0], f["w1_b"].shape[1])
    w2 = tuple(f["w2"].shape) if "w2" in f else (f["w2_a"].shape[0], f["w2_b"].shape[1])
    return w1, w2  # type: ignore[return-value]


@lru_cache(maxsize=16)
def _linear_shapes(arch: DiTArch) -> dict[str, tuple[int, int]]:
    """{module name: weight shape} of every Linear of a DiT of `arch` (built on the meta device)."""
    with torch.device("meta"):
        sd = Kandinsky5DiT(arch).state_dict()
    return {k[: -len(".weight")]: tuple(v.shape) for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2}


@lru_cache(maxsize=1)
def _module_templates() -> tuple[dict[str, str], dict[str, str]]:
    """({underscored top-level module: dotted}, {underscored in-block suffix: dotted}) for every Linear of the DiT."""
    arch = next(iter(VARIANTS.values())).arch
    top: dict[str, str] = {}
    block: dict[str, str] = {}
    for name in _linear_shapes(arch):
        m = re.match(r"(?:text|visual)_transformer_blocks\.\d+\.(.*)$", name)
        if m:
            block[m.group(1).replace(".", "_")] = m.group(1)
        else:
            top[name.replace(".", "_")] = name
    return top, block


def _dotted(name: str) -> str | None:
    """The official module name for a kohya / LyCORIS underscored one, or None."""
    top, block = _module_templates()
    if name in top:
        return top[name]
    m = re.match(r"((?:text|visual)_transformer_blocks)_(\d+)_(.*)$", name)
    if m and m.group(3) in block:
        return f"{m.group(1)}.{m.group(2)}.{block[m.group(3)]}"
    return None


def _family_of(model_dim: int) -> str:
    names = {"lite": "Kandinsky 5 Video Lite", "image": "Kandinsky 5 Image Lite", "pro": "Kandinsky 5 Pro"}
    fams = sorted({names.get(v.family, v.family) for v in VARIANTS.values() if v.arch.model_dim == model_dim})
    return " / ".join(fams) if fams else "no released Kandinsky 5 model"


def _arch_of_targets(targets: dict[str, LoraTarget]) -> tuple[int] | None:
    """(model_dim,) read from an attention / feed-forward input projection, whose in_features is the model width."""
    for m, t in targets.items():
        if re.search(r"(attention\.to_(query|key|value)|feed_forward\.in_layer)$", m):
            return (t.shape[1],)
    return None


def _read_config(path: Path) -> tuple[dict, Path | None]:
    for name in (f"{path.stem}.json", *CONFIG_NAMES):
        p = path.with_name(name)
        if p.is_file() and p != path:
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise WeightsError(f"LoRA config {str(p)!r} is not valid JSON ({e}). Fix or remove it.") from None
            if isinstance(data, dict) and ("r" in data or "lora_alpha" in data):
                return data, p
    return {}, None


def _pattern(patterns: dict, module: str):
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(str(key), module):
            return value
    return None


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA / LoKr / LoHa safetensors file in any supported trainer format (see the module docstring)."""
    path = Path(path)
    header = read_safetensors_header(path)
    if not header:
        raise WeightsError(f"LoRA {path.name!r} holds no tensors. Re-download it.")
    prefix, fmt = "", "bare PEFT"
    for name, p in _PREFIXES:
        if any(k.startswith(p) for k in header):
            prefix, fmt = p, name
            break
    if fmt == "bare PEFT" and not any(re.search(r"\.lora_[AB]\.", k) for k in header):
        fmt = "kohya-style (no prefix)"

    groups: dict[str, dict[str, str]] = {}
    foreign: list[str] = []
    for key in header:
        if any(u in key for u in _UNSUPPORTED):
            raise WeightsError(
                f"LoRA {path.name!r} uses an adapter part this loader does not read ({key}: DoRA, Tucker, OFT, "
                "bias or full-diff patches). Supported: plain LoRA, LoKr and LoHa (see docs/comfyui.md)."
            )
        stem = key[len(prefix) :] if key.startswith(prefix) else key
        m = _SUFFIX_RE.match(stem)
        if not m:
            foreign.append(key)
            continue
        module, suffix = m.group(1), m.group(2)
        part = next(n for s, n in _SUFFIXES if re.fullmatch(s, suffix))
        dotted = module if "." in module else _dotted(module)
        if dotted is None:
            foreign.append(key)
            continue
        groups.setdefault(dotted, {})[part] = key

    known = set(_module_templates()[0].values())
    block_re = re.compile(r"(?:text|visual)_transformer_blocks\.\d+\.(.*)$")
    block_parts = set(_module_templates()[1].values())
    for module in list(groups):
        bm = block_re.match(module)
        if not (module in known or (bm and bm.group(1) in block_parts)):
            foreign += list(groups.pop(module).values())
    if not groups:
        raise WeightsError(
            f"{path.name!r} is not a LoRA for the Kandinsky 5 DiT: none of its {len(header)} tensors names a module "
            f"of it (e.g. {', '.join(sorted(header)[:4])}). It was made for another model; pick a Kandinsky 5 LoRA."
        )
    if foreign:
        raise WeightsError(
            f"LoRA {path.name!r} ({fmt}) has {len(foreign)} tensors that match no Kandinsky 5 DiT module "
            f"(e.g. {', '.join(sorted(foreign)[:4])}): it is for another model or a format this loader does not "
            "know. Supported formats are listed in docs/comfyui.md."
        )

    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k).float() for part in groups.values() for k in part.values()}

    config, config_path = _read_config(path)
    meta_cfg: dict = {}
    if "lora_adapter_metadata" in metadata:  # diffusers >= 0.34
        try:
            raw = json.loads(metadata["lora_adapter_metadata"])
            meta_cfg = {k.split(".", 1)[-1]: v for k, v in raw.items()} if isinstance(raw, dict) else {}
        except ValueError:
            meta_cfg = {}
    peft_like = any(".lora_A" in k for k in header)
    notes: list[str] = []
    if peft_like and not config and "lora_alpha" not in meta_cfg and not any(k.endswith(".alpha") for k in header):
        if fmt.startswith("official"):
            notes.append(
                f"no config_lora.json beside {path.name}: alpha taken as the rank (scale 1); put the trainer's "
                "config_lora.json next to the LoRA for its lora_alpha"
            )
    cfg = config or meta_cfg

    targets: dict[str, LoraTarget] = {}
    for module, parts in sorted(groups.items()):
        t = {n: tensors[k] for n, k in parts.items() if n != "alpha"}
        alpha = float(tensors[parts["alpha"]]) if "alpha" in parts else None
        try:
            kind, rank = _kind_and_rank(t)
        except KeyError as e:
            raise WeightsError(
                f"LoRA {path.name!r}: module {module} lacks its {e.args[0]} factor (it has {', '.join(sorted(t))}). "
                "The file is incomplete: re-download or re-export it."
            ) from None
        if kind == "lora" and t["up"].shape[1] != t["down"].shape[0]:
            raise WeightsError(
                f"LoRA {path.name!r}: module {module} has up {tuple(t['up'].shape)} and down "
                f"{tuple(t['down'].shape)}, whose ranks differ. The file is damaged: re-download it."
            )
        if kind == "lora" and peft_like and alpha is None:
            if cfg:  # PEFT semantics: the config's lora_alpha (LoraConfig default 8), per-module patterns first
                r = _pattern(cfg.get("rank_pattern"), module) or rank
                a = _pattern(cfg.get("alpha_pattern"), module) or cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA)
                scale = float(a) / (math.sqrt(r) if cfg.get("use_rslora") else float(r))
            else:  # diffusers: lora_alpha = r when the file says nothing
                scale = 1.0
        elif kind == "lokr" and rank is None:
            scale = 1.0  # both Kronecker factors full: LyCORIS forces alpha = lora_dim
        else:  # kohya / musubi / LyCORIS: absent or 0 means alpha = rank; ComfyUI: absent means scale 1
            scale = 1.0 if not alpha else alpha / float(rank)
        targets[module] = LoraTarget(module, kind, t, scale)

    trigger = str(metadata.get("trigger") or config.get("trigger") or config.get("trigger_word") or "")
    if config_path is not None and not fmt.startswith(("official", "bare", "diffusers")):
        notes.append(f"{config_path.name} beside the LoRA ignored: a {fmt} file carries its own alpha")
    return LoraFile(path, fmt, targets, trigger, notes)


def _kind_and_rank(t: dict[str, torch.Tensor]) -> tuple[str, int | None]:
    if "up" in t or "down" in t:
        for k, name in (("up", "lora_B / lora_up"), ("down", "lora_A / lora_down")):
            if k not in t:
                raise KeyError(name)
        return "lora", t["down"].shape[0]
    if any(k.startswith("hada_") for k in t):
        for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            if k not in t:
                raise KeyError(k)
        return "loha", t["hada_w1_b"].shape[0]
    for side in ("w1", "w2"):
        if side not in t and (f"{side}_a" not in t or f"{side}_b" not in t):
            raise KeyError(f"lokr_{side}")
    if "w2_b" in t:
        return "lokr", t["w2_b"].shape[0]
    if "w1_b" in t:
        return "lokr", t["w1_b"].shape[0]
    return "lokr", None


def apply_lora(model: Kandinsky5DiT, lora: LoraFile, strength: float = 1.0, arch: DiTArch | None = None) -> None:
    """Add strength * delta to `model`'s weights in place (a DiT from kandinsky_core.loading.load_dit). float8
    weights are dequantised with their `weight_scale`, patched, and re-quantised with a fresh scale."""
    lora.check(arch or model.arch, "the loaded DiT")
    for module, target in lora.targets.items():
        layer = model.get_submodule(module)
        w = layer.weight
        scale = layer._buffers.get("weight_scale")
        real = w.float() * scale.float() if scale is not None else w.float()
        real = real + strength * target.delta(device=w.device)
        if scale is not None:
            q, s = to_scaled_fp8(real)
            layer.weight.data = q
            layer.register_buffer("weight_scale", s.to(scale.device), persistent=False)
        else:
            layer.weight.data = real.to(w.dtype)
