"""ComfyUI's real memory manager told that a CUDA card with N GiB free is the load device (no GPU needed).

Run by test_gpu_memory.py with COMFYUI_PYTHON (ComfyUI's own interpreter and dependencies), as
`python fake_cuda.py SCENARIO FREE_GIB [ARGS...]`; prints one JSON line with what ComfyUI decided.

How the card is faked, on top of ComfyUI v0.33.0's `comfy.model_management` imported from COMFYUI_DIR:
- it is imported with `--cpu` (a CPU-only torch cannot answer its start-up CUDA queries), then told the GPU story:
  cpu_state GPU, vram_state NORMAL_VRAM, `get_torch_device()` = cuda:0, `get_free_memory` / `get_total_memory` of a
  CUDA device = the given figures, NVIDIA's MIN_WEIGHT_MEMORY_RATIO (0), no-op cache emptying;
- every weight ComfyUI's ModelPatcher moves to the device goes through `ModelPatcher.patch_weight_to_device` (and
  `Module.to` for whole modules): those record the parameter names and then do the real move, which raises on a
  CPU-only torch ("Torch not compiled with CUDA enabled"). A recorded name plus that error proves the attempt;
  with `--record-only` the moves are recorded and skipped, so the whole load decision can be listed.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30


record: dict = {}


def install(free_gib: float, total_gib: float, record_only: bool) -> dict:
    sys.path.insert(0, os.environ["COMFYUI_DIR"])
    sys.path.insert(0, str(REPO))
    import comfy.options

    comfy.options.args_parsing = False
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management as mm
    import comfy.model_patcher as mp
    import torch

    cuda = torch.device("cuda", 0)
    mm.cpu_state = mm.CPUState.GPU
    mm.vram_state = mm.VRAMState.NORMAL_VRAM
    mm.MIN_WEIGHT_MEMORY_RATIO = 0.0  # NVIDIA's value in v0.33.0
    mm.get_torch_device = lambda: cuda
    real_free, real_total = mm.get_free_memory, mm.get_total_memory

    def get_free_memory(dev=None, torch_free_too=False):
        dev = cuda if dev is None else dev
        if getattr(dev, "type", None) != "cuda":
            return real_free(dev, torch_free_too)
        free = int(free_gib * GIB) - record["moved_bytes"]
        return (free, 0) if torch_free_too else free

    def get_total_memory(dev=None, torch_total_too=False):
        dev = cuda if dev is None else dev
        if getattr(dev, "type", None) != "cuda":
            return real_total(dev, torch_total_too)
        return (int(total_gib * GIB),) * 2 if torch_total_too else int(total_gib * GIB)

    mm.get_free_memory, mm.get_total_memory = get_free_memory, get_total_memory
    mm.soft_empty_cache = lambda *a, **k: None
    torch.cuda.synchronize = lambda *a, **k: None

    record.update({"moved": [], "moved_bytes": 0, "load_calls": []})
    real_patch = mp.ModelPatcher.patch_weight_to_device

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, **kw):
        if device_to is not None and torch.device(device_to).type == "cuda":
            record["moved"].append(key)
            weight = mp.get_key_weight(self.model, key)[0] if hasattr(mp, "get_key_weight") else None
            record["moved_bytes"] += 0 if weight is None else weight.numel() * weight.element_size()
            if record_only:
                return None
        return real_patch(self, key, device_to, inplace_update, **kw)

    mp.ModelPatcher.patch_weight_to_device = patch_weight_to_device
    real_load = mp.ModelPatcher.load

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        record["load_calls"].append({"device": str(device_to), "lowvram_model_memory": lowvram_model_memory,
                                     "full_load": full_load, "model_size": self.model_size()})  # fmt: skip
        return real_load(self, device_to, lowvram_model_memory, force_patch_weights, full_load)

    mp.ModelPatcher.load = load
    real_to = torch.nn.Module.to

    def module_to(self, *a, **k):
        target = k.get("device", a[0] if a else None)
        if record_only and isinstance(target, (str, torch.device)) and torch.device(target).type == "cuda":
            return self
        return real_to(self, *a, **k)

    torch.nn.Module.to = module_to
    return record


def pack():
    """The node pack's `nodes` package, imported as ComfyUI imports a custom node (under its own package name)."""
    import importlib

    root = types.ModuleType("k5pack")
    root.__path__ = [str(REPO)]
    sys.modules["k5pack"] = root
    return importlib.import_module("k5pack.nodes")


def write_full_size_vae(path: Path) -> None:
    """The released HunyuanVideo VAE's keys, shapes and dtype (bf16) with uninitialised values."""
    import torch
    from safetensors.torch import save_file

    from kandinsky_core.hunyuan_vae import HunyuanVideoVAE

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in HunyuanVideoVAE().state_dict().items()}
    save_file({k: torch.zeros(s, dtype=torch.bfloat16) for k, s in shapes.items()}, str(path))


def record_memory_requests(nodes) -> list[int]:
    """The memory_required of every load the pack asks ComfyUI for from now on (appended as they come)."""
    requested: list[int] = []
    real_load = nodes.comfy_glue.load

    def load(patcher, memory_required):
        requested.append(int(memory_required))
        return real_load(patcher, memory_required)

    nodes.comfy_glue.load = load
    return requested


def vae_decode(frames: int, width: int, height: int, models: str) -> dict:
    """Kandinsky 5 VAE Decode (the real node, the real loader) of a [1, 16, T, H/8, W/8] latent, tiling auto."""
    import folder_paths
    import torch

    nodes = pack()
    folder_paths.add_model_folder_path("vae", models)
    path = Path(models) / "hunyuan_video_vae_bf16.safetensors"
    if not path.exists():
        write_full_size_vae(path)
    (vae,) = nodes.loaders.LoadVAE.execute(path.name, "bf16")
    requested = record_memory_requests(nodes)
    z = torch.zeros(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    names = [n for n, _ in vae.patcher.model.named_parameters()]
    try:
        nodes.vae.VAEDecode.execute(vae, {"samples": z}, "auto", 256, 64, 16, 8)
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    return {"memory_required": requested, "error": error, "weights": names, "vae_bytes": vae.patcher.model_size()}


def text_encode(record_only: bool) -> dict:
    """Kandinsky 5 Text Encode (the real node) on the released Qwen2.5-VL-7B language model (bf16) and CLIP-L
    (fp32) as the loader builds them, on the meta device (sizes without the 16 GB of weights)."""
    from types import SimpleNamespace

    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from kandinsky_core import offload
    from kandinsky_core.text_encoders import CLIP_L_TEXT_CONFIG, QWEN25_VL_7B_CONFIG

    nodes = pack()
    with torch.device("meta"):
        qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_7B_CONFIG)).to(torch.bfloat16)
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))
    qwen.model.visual, qwen.lm_head = None, None  # as the loader leaves them until an image / an expansion
    module = torch.nn.ModuleDict({"qwen": qwen, "clip": clip})

    def encode(*args, **kwargs):
        raise AssertionError("encoded with weights not on the device")

    encoders = SimpleNamespace(qwen=qwen, clip=clip, encode=encode)
    model = nodes.loaders.TextEncodersModel(nodes.comfy_glue.wrap(module, "text"), encoders)
    swaps = []
    real_swap = offload.swap_layers

    def swap_layers(model, layers, device, resident=0, offload_device="cpu", prefetch=True):
        swaps.append({"resident": resident, "layers": len(layers), "device": str(device),
                      "layer_bytes": offload.block_bytes(layers[0])})  # fmt: skip
        if record_only:  # meta weights cannot be copied: record the plan only
            return SimpleNamespace(remove=lambda: None)
        return real_swap(model, layers, device, resident, offload_device, prefetch)

    offload.swap_layers = swap_layers
    requested = record_memory_requests(nodes)
    names = [n for n, _ in model.patcher.model.named_parameters()]
    try:
        nodes.text.TextEncode.execute(model, "a red fox", "", "video")
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    return {"memory_required": requested, "swaps": swaps, "error": error, "weights": names,
            "model_bytes": model.patcher.model_size()}  # fmt: skip


def dit_partial(arch: str, activations_gib: float, blocks_on_device: int) -> dict:
    """Where the DiT's weights are while it samples on a card too small for it, with `activations_gib` of
    activations asked for, two ways (record-only, meta weights: sizes without the 8-70 GB):
    - ComfyUI's own partial loading: the DiT as the loader builds it (comfy.ops.manual_cast layers) handed to
      `comfy_glue.load` -> load_models_gpu; what it moved stays on the card, every other layer is cast to the card
      at use (one layer, plus the next one on ComfyUI's offload stream);
    - block swap (kandinsky_core.offload) with `blocks_on_device` visual blocks kept: the non-block layers and those
      blocks stay on the card, the other blocks come in whole, the running one and its prefetched successor."""
    import torch

    from kandinsky_core import variants
    from kandinsky_core.model import Kandinsky5DiT
    from kandinsky_core.offload import block_bytes

    nodes = pack()
    v = variants.VARIANTS[{"lite": "t2v-lite-sft-5s", "pro": "t2v-pro-sft-5s-sd"}[arch]]
    with torch.device("meta"):
        dit = Kandinsky5DiT(v.arch, dtype=torch.bfloat16, operations=nodes.comfy_glue.dit_operations())
    patcher = nodes.comfy_model.make_patcher(dit, v, "auto", f"{arch} (meta)")  # as Load Kandinsky 5 DiT wraps it
    nodes.comfy_glue.load(patcher, int(activations_gib * GIB))
    moved = set(record["moved"])
    cast_layers = []  # bytes of each module ComfyUI casts at use (its weights were not moved)
    for name, module in patcher.model.named_modules():
        own = [(f"{name}.{k}", p) for k, p in module._parameters.items() if p is not None]
        left = [p for key, p in own if key not in moved]
        if left:
            cast_layers.append(sum(p.numel() * p.element_size() for p in left))
    cast_layers.sort()
    blocks = [block_bytes(b) for b in dit.visual_transformer_blocks]
    total = patcher.model_size()
    swapped = blocks[blocks_on_device:]
    return {
        "model_bytes": total,
        "comfy_resident": record["moved_bytes"],
        "comfy_in_flight": sum(cast_layers[-2:]),
        "comfy_cast_layers": len(cast_layers),
        "swap_resident": total - sum(swapped),
        "swap_in_flight": sum(sorted(swapped)[-2:]),
        "block_bytes": max(blocks),
    }


def main() -> None:
    scenario, free_gib, *rest = sys.argv[1:]
    record_only = "--record-only" in rest
    rest = [r for r in rest if r != "--record-only"]
    record = install(float(free_gib), max(float(free_gib) + 1.0, 24.0), record_only)
    try:
        scenarios = {
            "vae_decode": lambda: vae_decode(int(rest[0]), int(rest[1]), int(rest[2]), rest[3]),
            "text_encode": lambda: text_encode(record_only),
            "dit_partial": lambda: dit_partial(rest[0], float(rest[1]), int(rest[2])),
        }
        result = scenarios[scenario]()
    except Exception:
        result = {"crash": traceback.format_exc()}
    print("RESULT " + json.dumps({**result, **record}))


if __name__ == "__main__":
    main()
