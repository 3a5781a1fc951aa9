"""Run with COMFYUI_PYTHON (COMFYUI_DIR set, ComfyUI v0.33.0 or later): our NABLA patch on ComfyUI's own Kandinsky 5
model against our Kandinsky5DiT with NABLA, on the same file.

A Lite-width (model_dim 1792, ff 7168, 33 input channels) DiT with reduced depth (1 text block, 2 visual blocks) and
random weights is written with the official key names; ComfyUI's own loader (`comfy.sd.load_diffusion_model`, what
Load Diffusion Model runs) detects it as Kandinsky 5, and `kandinsky_core.loading.load_dit` loads it too (the Lite
variants' depth swapped in the table, as the tiny-variants pack does). Both run one float32 forward on the same
inputs: dense, and with NABLA (auto: the Lite 10 s P and windows). Prints `RESULT {json}`: velocity differences,
whether every block mask is identical, the kept fraction, and the variant auto took.

Optional argument `plant=<name>`: `no_untile` (the override returns tile-ordered rows), `cross` (NABLA also on the
first cross-attention-shaped call: the override's visual test drops the block-order check), `p` (the native patch
uses P 0.8 under auto).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GRID = (3, 32, 64)  # latent frames, height, width: tokens 3 x 16 x 32, 24 NABLA blocks
TEXT_LEN = 24


def scratch() -> Path:
    """A folder for this process's real-width test files (about 1 GB each), removed when the process exits."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = Path(tempfile.mkdtemp(prefix="k5_native_check_", dir=os.environ.get("K5_SCRATCH_DIR")))
        atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
    return _SCRATCH


_SCRATCH: Path | None = None


def main(plant: str = "") -> dict:
    sys.path[:0] = [str(REPO), str(REPO / "tests"), os.environ["COMFYUI_DIR"]]
    import comfy.options

    comfy.options.args_parsing = False
    from comfy.cli_args import args

    args.cpu = True
    import comfy.patcher_extension
    import comfy.sd
    import torch
    from safetensors.torch import save_file
    from tiny import random_state_dict

    import kandinsky_core.layers as layers
    from kandinsky_core import nabla as core_nabla
    from kandinsky_core import variants
    from kandinsky_core.loading import load_dit
    from nodes import native
    from nodes.model_options import KEY, Kandinsky5Options, NablaChoice

    torch.manual_seed(0)
    arch = dataclasses.replace(variants.LITE_VIDEO, num_text_blocks=1, num_visual_blocks=2)
    for name, v in list(variants.VARIANTS.items()):
        if v.arch == variants.LITE_VIDEO:
            variants.VARIANTS[name] = dataclasses.replace(v, arch=arch)
    tmp = scratch()
    path = tmp / "kandinsky5lite_t2v_sft_10s.safetensors"
    save_file(random_state_dict(arch, seed=3), str(path))

    patcher = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    kind = type(patcher.model).__name__
    native_dit = patcher.model.diffusion_model.float()
    ours, variant = load_dit(path, dtype=torch.float32)

    g = torch.Generator().manual_seed(1)
    t, h, w = GRID
    x = torch.randn(1, arch.in_channels, t, h, w, generator=g)
    context = torch.randn(1, TEXT_LEN, arch.in_text_dim, generator=g)
    pooled = torch.randn(1, arch.in_text_dim2, generator=g)
    timestep = torch.tensor([700.0])

    stats: dict = {"masks": []}
    if plant == "p":
        orig_params = NablaChoice.params
        NablaChoice.params = lambda self, v: dataclasses.replace(orig_params(self, v), P=0.8)
    if plant == "cross":
        orig_call = native._VisualSelfAttention.__call__

        def no_order(self, func, q, k, v, heads, *a, **kw):
            self.seen.clear()
            return orig_call(self, func, q, k, v, heads, *a, **kw)

        native._VisualSelfAttention.__call__ = no_order
        # make the text as long as the visual tokens, so cross-attention has the visual shape
        context = torch.randn(1, t * h * w // 4, arch.in_text_dim, generator=g)
    if plant == "no_untile":
        native.nabla_attention_raster = lambda q, k, v, grid, params, **kw: core_nabla.nabla_attention(
            core_nabla.tile_tokens(q, grid), core_nabla.tile_tokens(k, grid), core_nabla.tile_tokens(v, grid), grid,
            params, **kw)  # fmt: skip

    nabla_patcher = native.add_nabla(patcher.clone(), stats)

    def native_forward(p, setting):
        to = {
            "wrappers": comfy.patcher_extension.copy_nested_dicts(p.wrappers),
            KEY: Kandinsky5Options(nabla=setting),
        }
        with torch.no_grad():
            return native_dit(x, timestep, context, pooled, transformer_options=to).float()

    our_masks: list = []
    orig_nabla = layers.nabla_attention

    def recording(q, k, v, grid, params, **kw):
        out, mask = orig_nabla(q, k, v, grid, params, return_mask=True, **kw)
        our_masks.append(mask)
        return out

    layers.nabla_attention = recording

    def our_forward(params):
        with torch.no_grad():
            return ours(x, context, pooled, timestep, rope_scale=variant.rope_scale, nabla=params).float()

    dense_native = native_forward(patcher, NablaChoice("auto"))
    dense_ours = our_forward(None)
    sparse_native = native_forward(nabla_patcher, NablaChoice("auto"))
    auto_variant, said = native.nabla_variant(native_nabla_shapes(nabla_patcher), w * 8, h * 8)
    sparse_ours = our_forward(variants.VARIANTS["t2v-lite-sft-10s"].nabla)
    off_native = native_forward(nabla_patcher, NablaChoice("off"))
    on_native = native_forward(nabla_patcher, NablaChoice("on", P=0.5, wT=1, wH=1, wW=1))
    on_ours = our_forward(core_nabla.NablaParams(P=0.5, wT=1, wH=1, wW=1))

    masks = stats["masks"]
    scale = float(dense_ours.abs().max())
    return {
        "kind": kind,
        "variant": variant.name,
        "auto": auto_variant.name,
        "said": said,
        "scale": scale,
        "dense_diff": float((dense_native - dense_ours).abs().max()),
        "nabla_diff": float((sparse_native - sparse_ours).abs().max()),
        "on_diff": float((on_native - on_ours).abs().max()),
        "nabla_vs_dense": float((sparse_ours - dense_ours).abs().max()),
        "off_diff": float((off_native - dense_native).abs().max()),
        "masks": len(masks[:2]),
        "our_masks": len(our_masks[:2]),
        "masks_equal": len(masks) >= 2
        and all(torch.equal(a, b) for a, b in zip(masks[:2], our_masks[:2], strict=True)),
        "kept": [float(m.float().mean()) for m in masks[:2]],
        "calls": stats["calls"],
    }


def magcache(steps: int, plant: str = "") -> dict:
    """KSampler's own code (comfy.sample.sample, euler / simple, cfg 5, positive and negative batched together) on
    ComfyUI's native model loaded from the same kind of file, with our MagCache option (Lite 10 s official ratios):
    the (step, branch) calls that reused the cached residual, and the latent's distance from the plain run."""
    sys.path[:0] = [str(REPO), str(REPO / "tests"), os.environ["COMFYUI_DIR"]]
    import comfy.options

    comfy.options.args_parsing = False
    from comfy.cli_args import args

    args.cpu = True
    import comfy.patcher_extension
    import comfy.sample
    import comfy.sd
    import torch
    from safetensors.torch import save_file
    from tiny import random_state_dict

    from kandinsky_core import variants
    from kandinsky_core.magcache import MagCacheParams
    from nodes import native
    from nodes.magcache import MagCacheSetting
    from nodes.model_options import with_options

    arch = dataclasses.replace(variants.LITE_VIDEO, num_text_blocks=1, num_visual_blocks=2)
    path = scratch() / "k5.safetensors"
    save_file(random_state_dict(arch, seed=3), str(path))
    patcher = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    params = MagCacheParams(variants_ratios("t2v-lite-sft-10s"))
    cached = native.install(with_options(patcher, block_cache=MagCacheSetting(params)), cache=True)
    g = torch.Generator().manual_seed(5)
    pos = [[torch.randn(1, 8, arch.in_text_dim, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
    neg = [[torch.randn(1, 8, arch.in_text_dim, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
    latent = torch.zeros(1, 16, 1, 16, 16)
    noise = comfy.sample.prepare_noise(latent, seed=7)

    def run(p):
        return comfy.sample.sample(p, noise, steps, 5.0, "euler", "simple", pos, neg, latent, seed=7,
                                   disable_pbar=True)  # fmt: skip

    plain = run(patcher)
    wrapper = cached.wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL][native.CACHE_KEY][0]
    ran: list = []  # (step, branch) of every call that ran the first visual block, from what KSampler passed

    def record(module, a, kw):
        to = kw["transformer_options"]
        step = int((to["sample_sigmas"][:-1] - to["sigmas"].flatten()[0]).abs().argmin())
        ran.extend((step, int(b)) for b in to["cond_or_uncond"])

    first_block = patcher.model.diffusion_model.visual_transformer_blocks[0]
    hook = first_block.register_forward_pre_hook(record, with_kwargs=True)
    fast = run(cached)
    hook.remove()
    skipped = [list(s) for s in wrapper.run["cache"].skipped]
    not_run = sorted({(i, b) for i in range(steps) for b in (0, 1)} - set(ran))
    again = run(cached)  # a second run starts a fresh cache
    return {
        "skipped": skipped,
        "not_run": [list(s) for s in not_run],
        "skipped_again": [list(s) for s in wrapper.run["cache"].skipped],
        "diff": float((fast - plain).abs().max()),
        "repeat_diff": float((again - fast).abs().max()),
    }


def i2i() -> dict:
    """The I2I edit checkpoint (Image Lite width, 33 input channels), reduced depth: what ComfyUI's own loader makes
    of it, and what kandinsky_core.loading.load_dit (Load Kandinsky 5 DiT) makes of it."""
    sys.path[:0] = [str(REPO), str(REPO / "tests"), os.environ["COMFYUI_DIR"]]
    import comfy.options

    comfy.options.args_parsing = False
    from comfy.cli_args import args

    args.cpu = True
    import comfy.sd
    import torch
    from safetensors.torch import save_file
    from tiny import random_state_dict

    from kandinsky_core import variants
    from kandinsky_core.loading import load_dit

    arch = dataclasses.replace(variants.IMAGE_I2I, num_text_blocks=1, num_visual_blocks=1)
    for name, v in list(variants.VARIANTS.items()):
        if v.arch == variants.IMAGE_I2I:
            variants.VARIANTS[name] = dataclasses.replace(v, arch=arch)
    path = scratch() / "kandinsky5lite_i2i.safetensors"
    save_file(random_state_dict(arch, seed=4), str(path))
    patcher = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    _, variant = load_dit(path, dtype=torch.float32)
    return {
        "comfy_class": type(patcher.model).__name__,
        "comfy_latent": type(patcher.model.latent_format).__name__,
        "comfy_shift": float(patcher.model.model_sampling.shift),
        "ours": variant.name,
        "ours_vae": variant.vae,
        "ours_shift": variant.scheduler_scale,
    }


def sampler(plant: str = "") -> dict:
    """The Kandinsky 5 Sampler node on ComfyUI's own model (comfy.sd.load_diffusion_model of a Lite-width, 2-block
    file) and on our loader's model of the same file: T2V with NABLA on (official P and windows), 3 steps, CFG; T2V
    from an unpadded ComfyUI-style CONDITIONING (no mask); I2V with a start latent. The latents' distances."""
    sys.path[:0] = [str(REPO), str(REPO / "tests"), os.environ["COMFYUI_DIR"]]
    import comfy.options

    comfy.options.args_parsing = False
    from comfy.cli_args import args

    args.cpu = True
    import comfy.sd
    import torch
    from safetensors.torch import save_file
    from tiny import random_state_dict

    from kandinsky_core import variants
    from kandinsky_core.loading import load_dit
    from kandinsky_core.sampling import TextConditioning
    from nodes import comfy_model, text
    from nodes import sampler as sampler_node
    from nodes.model_options import NablaChoice, with_options

    arch = dataclasses.replace(variants.LITE_VIDEO, num_text_blocks=1, num_visual_blocks=2)
    for name, v in list(variants.VARIANTS.items()):
        if v.arch == variants.LITE_VIDEO:
            variants.VARIANTS[name] = dataclasses.replace(v, arch=arch)
    path = scratch() / "kandinsky5lite_t2v_sft_5s.safetensors"
    save_file(random_state_dict(arch, seed=3), str(path))
    native_model = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    dit, variant = load_dit(path, dtype=torch.float32)
    ours = comfy_model.make_patcher(dit, variant, "auto", path.name)
    if plant == "mask":  # the padding of the prompt reaches the native model
        import nodes.native as native

        orig = native.NativeDiT.__call__

        def keep_padding(self, x, text_embeds, pooled, timestep, text_mask=None, **kw):
            return orig(self, x, text_embeds, pooled, timestep, text_mask=None, **kw)

        native.NativeDiT.__call__ = keep_padding

    g = torch.Generator().manual_seed(2)

    def cond(n_real: int, padded: int) -> TextConditioning:
        mask = torch.zeros(1, padded, dtype=torch.bool)
        mask[:, :n_real] = True
        embeds = torch.randn(1, padded, arch.in_text_dim, generator=g)
        return TextConditioning(text_embeds=embeds, text_mask=mask, pooled=torch.randn(1, 768, generator=g))

    pos, neg = cond(6, 10), cond(9, 10)
    kw = dict(width=768, height=256, length=5, batch_size=1, seed=3, steps=3, guidance=-1.0, scheduler_scale=0.0)

    def run(model, p, n, nabla="on", **over):  # NABLA as Kandinsky 5 NABLA sets it (official P and windows)
        model = with_options(model, nabla=NablaChoice(nabla))
        return sampler_node.Sampler.execute(model, p, n, **{**kw, **over})[0]["samples"]

    out: dict = {}
    ours_t2v = run(ours, text.to_conditioning(pos, "video"), text.to_conditioning(neg, "video"))
    native_t2v = run(native_model, text.to_conditioning(pos, "video"), text.to_conditioning(neg, "video"))
    dense = run(ours, text.to_conditioning(pos, "video"), text.to_conditioning(neg, "video"), nabla="off")
    out["t2v_diff"] = float((ours_t2v - native_t2v).abs().max())
    out["nabla_vs_dense"] = float((ours_t2v - dense).abs().max())
    # ComfyUI's own CONDITIONING: the real tokens only, no attention_mask
    bare = [[pos.text_embeds[:, :6], {"pooled_output": pos.pooled}]]
    bare_neg = [[neg.text_embeds[:, :9], {"pooled_output": neg.pooled}]]
    out["bare_diff"] = float((run(native_model, bare, bare_neg) - native_t2v).abs().max())
    start = torch.randn(1, 16, 1, 32, 96, generator=g)
    ours_i2v = comfy_model.make_patcher(dit, variants.VARIANTS["i2v-lite-5s"], "auto", path.name)
    i2v_ours = run(ours_i2v, text.to_conditioning(pos, "video"), text.to_conditioning(neg, "video"),
                   start_latent={"samples": start})  # fmt: skip
    i2v_native = run(native_model, text.to_conditioning(pos, "video"), text.to_conditioning(neg, "video"),
                     start_latent={"samples": start})  # fmt: skip
    out["i2v_diff"] = float((i2v_ours - i2v_native).abs().max())
    # a LoRA in ComfyUI's layout applied by ComfyUI's own loader (what LoraLoaderModelOnly runs) to the native model,
    # against our loader's model of the file merged by hand; and float8 weights stored by ComfyUI's loader
    base = random_state_dict(arch, seed=3)
    lora_sd, gl = {}, torch.Generator().manual_seed(9)
    for key, w in list(base.items()):
        if key.endswith(("to_query.weight", "feed_forward.out_layer.weight")):
            stem = "diffusion_model." + key[: -len(".weight")]
            down, up = torch.randn(2, w.shape[1], generator=gl) * 0.05, torch.randn(w.shape[0], 2, generator=gl) * 0.05
            lora_sd.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                            f"{stem}.alpha": torch.tensor(2.0)})  # fmt: skip
            base[key] = w + up @ down
    merged_path = path.with_name("kandinsky5lite_t2v_sft_5s_merged.safetensors")
    save_file(base, str(merged_path))
    merged_dit, _ = load_dit(merged_path, dtype=torch.float32)
    merged = comfy_model.make_patcher(merged_dit, variant, "auto", merged_path.name)
    native_lora, _ = comfy.sd.load_lora_for_models(native_model, None, lora_sd, 1.0, 0)
    t2v = (text.to_conditioning(pos, "video"), text.to_conditioning(neg, "video"))
    lora_native = run(native_lora, *t2v)
    out["lora_diff"] = float((lora_native - run(merged, *t2v)).abs().max())
    out["lora_effect"] = float((lora_native - native_t2v).abs().max())
    fp8_model = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float8_e4m3fn})
    fp8 = run(fp8_model, *t2v)
    out["fp8_storage"] = str(next(fp8_model.model.diffusion_model.visual_transformer_blocks.parameters()).dtype)
    out["fp8_diff"] = float((fp8 - native_t2v).abs().max())
    out["fp8_finite"] = bool(torch.isfinite(fp8).all())
    out["scale"] = float(ours_t2v.abs().max())
    return out


def variants_ratios(name: str) -> tuple:
    from kandinsky_core.magcache import official_mag_ratios

    return official_mag_ratios(name)


def native_nabla_shapes(patcher) -> dict:
    return {k: tuple(v.shape) for k, v in patcher.model.diffusion_model.state_dict().items()}


if __name__ == "__main__":
    plant = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("plant=")), "")
    if "sampler" in sys.argv[1:]:
        print("RESULT " + json.dumps(sampler(plant)), flush=True)
    elif "i2i" in sys.argv[1:]:
        print("RESULT " + json.dumps(i2i()), flush=True)
    elif "magcache" in sys.argv[1:]:
        print("RESULT " + json.dumps(magcache(50, plant)), flush=True)
    else:
        print("RESULT " + json.dumps(main(plant)), flush=True)
