"""Run with COMFYUI_PYTHON (COMFYUI_DIR set): Load LoRA's patches (or, with the argument `comfy`, those ComfyUI's
own LoraLoaderModelOnly makes from the file) through ComfyUI's own ModelPatcher code paths, on the Kandinsky 5 MODEL, in
this process, on the CPU. Prints one line `RESULT {json}`: the largest difference from kandinsky_core's apply_lora
for a full load (patch_model), the low-VRAM per-layer patch (LowVramPatch, used by partial loading), the adapter
rebuilt by ComfyUI's GPU prefetch (prefetch_prepared_value, v0.33.0), and after unpatch_model from the original."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(lora_path: str, strength: float, comfy_format: bool = False) -> dict:
    sys.path[:0] = [str(REPO), str(REPO / "tests"), os.environ["COMFYUI_DIR"]]
    import comfy.options

    comfy.options.args_parsing = False
    from comfy.cli_args import args

    args.cpu = True
    import comfy.lora
    import comfy.model_patcher as mp
    from tiny import TINY_ARCHS, make_tiny_dit

    from kandinsky_core import variants
    from kandinsky_core.lora import apply_lora, read_lora
    from nodes import comfy_glue, comfy_model

    lora = read_lora(lora_path)
    want = make_tiny_dit(TINY_ARCHS["lite"])
    apply_lora(want, lora, strength)
    want = {f"diffusion_model.{k}": v for k, v in want.state_dict().items()}
    original = {f"diffusion_model.{k}": v for k, v in make_tiny_dit(TINY_ARCHS["lite"]).state_dict().items()}

    v = variants.VARIANTS["t2v-lite-sft-5s"]
    patcher = comfy_model.make_patcher(make_tiny_dit(TINY_ARCHS["lite"]), v, "auto", "tiny").clone()
    if comfy_format:  # ComfyUI's own loader (LoraLoaderModelOnly's code) on the file it reads
        import comfy.sd
        import comfy.utils

        patcher, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(lora_path), strength, 0)
        keys = list(patcher.patches)
    else:
        keys = patcher.add_patches(comfy_glue.lora_patches(patcher, lora), strength)
    out = {"keys": len(keys), "targets": len(lora.targets)}

    def max_diff(sd, ref, names):
        return max((float((sd[k].float() - ref[k].float()).abs().max()) for k in names), default=0.0)

    # low-VRAM path: each layer's weight patched on its way to the device
    sd = patcher.model.state_dict()
    low = {k: mp.LowVramPatch(k, patcher.patches)(sd[k].clone()) for k in keys}
    out["lowvram"] = max_diff(low, want, keys)
    if hasattr(comfy.lora, "prefetch_prepared_value"):
        rebuilt = {}
        for k in keys:
            patches = [(p[0], comfy.lora.prefetch_prepared_value(p[1], [0], None, None, False), *p[2:])
                       for p in patcher.patches[k]]  # fmt: skip
            rebuilt[k] = comfy.lora.calculate_weight(patches, sd[k].clone(), k)
        out["prefetch"] = max_diff(rebuilt, want, keys)
    patcher.patch_model()
    out["full"] = max_diff(patcher.model.state_dict(), want, list(want))
    patcher.unpatch_model()
    out["restored"] = max_diff(patcher.model.state_dict(), original, list(original))
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1], float(sys.argv[2]), "comfy" in sys.argv[3:])))
