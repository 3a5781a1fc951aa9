"""Run with COMFYUI_PYTHON (COMFYUI_DIR set): a tiny Kandinsky 5 MODEL (our loader's patcher over Kandinsky5Model)
sampled by ComfyUI's own KSampler code (comfy.sample.sample: euler, simple scheduler, cfg = the variant's guidance)
and by kandinsky_core.sampling.sample (what the Kandinsky 5 Sampler runs), on the same seed, in this process, on the
CPU. Prints one line `RESULT {json}`: the largest differences of the sigmas from our flow_timesteps and of the final
latents, for T2V (5-D latent) and T2I (4-D image latent, EmptyLatentImage's 4 channels), plus what ComfyUI's
memory_required says next to our estimate.

Optional argument: `plant=<name>` changes one thing first (for the planted-bug checks): `no_scale` (process_in
without the latent scale), `shift` (the model's flow shift off by one), `image_shift` (ComfyUI's Flux latent shift).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEXT_DIM = 32


def main(plant: str = "") -> dict:
    sys.path[:0] = [str(REPO), str(REPO / "tests"), os.environ["COMFYUI_DIR"]]
    import comfy.options

    comfy.options.args_parsing = False
    from comfy.cli_args import args

    args.cpu = True
    import comfy.sample
    import comfy.samplers
    import torch
    from tiny import TINY_ARCHS, make_tiny_dit

    from kandinsky_core import variants
    from kandinsky_core.sampling import (
        TextConditioning,
        dit_to_latent,
        flow_timesteps,
        latent_to_dit,
        make_noise,
        sample,
    )
    from nodes import comfy_model, text

    out: dict = {}
    cases = (("t2v-lite-sft-5s", "lite", (1, 16, 2, 8, 12)), ("t2i-lite", "image", (1, 4, 8, 8)))
    for name, arch_name, shape in cases:
        arch = dataclasses.replace(TINY_ARCHS[arch_name], in_text_dim=TEXT_DIM, in_text_dim2=TEXT_DIM)
        v = dataclasses.replace(variants.VARIANTS[name], arch=arch, steps=4)
        dit = make_tiny_dit(arch)
        patcher = comfy_model.make_patcher(dit, v, "auto", f"tiny-{name}")
        model = patcher.model
        if plant == "no_scale":
            model.latent_format.process_in = lambda x: x
            model.latent_format.process_out = lambda x: x
        if plant == "shift":
            model.model_sampling.set_parameters(shift=v.scheduler_scale + 1.0)
        if plant == "image_shift" and not v.is_video:
            model.latent_format.process_in = lambda x: (x - 0.1159) * 0.3611
        g = torch.Generator().manual_seed(1)
        cond = TextConditioning(torch.randn(1, 7, TEXT_DIM, generator=g), torch.ones(1, 7, dtype=torch.bool),
                                torch.randn(1, TEXT_DIM, generator=g))  # fmt: skip
        mask = torch.ones(1, 5, dtype=torch.bool)
        mask[0, 4] = False  # a padded token in the negative: the mask must reach the DiT
        uncond = TextConditioning(torch.randn(1, 5, TEXT_DIM, generator=g), mask, torch.randn(1, TEXT_DIM, generator=g))
        positive = text.to_conditioning(cond, v.text_template)
        negative = text.to_conditioning(uncond, v.text_template)

        empty = torch.zeros(shape)  # EmptyHunyuanLatentVideo / EmptyLatentImage (4 channels)
        latent = comfy.sample.fix_empty_latent_channels(patcher, empty)
        noise = comfy.sample.prepare_noise(latent, seed=7)
        sampler = comfy.samplers.KSampler(patcher, steps=v.steps, device="cpu", sampler="euler", scheduler="simple",
                                          denoise=1.0, model_options=patcher.model_options)  # fmt: skip
        sigmas = sampler.sigmas.float()
        ours_t = flow_timesteps(v.steps, v.scheduler_scale)
        got = comfy.sample.sample(patcher, noise, v.steps, v.guidance, "euler", "simple", positive, negative, latent,
                                  seed=7, disable_pbar=True)  # fmt: skip
        x5 = noise if noise.ndim == 5 else noise[:, :, None]
        want = dit_to_latent(
            sample(dit, make_noise(x5.shape, 7), cond, uncond, steps=v.steps, guidance=v.guidance,
                   scheduler_scale=v.scheduler_scale, rope_scale=v.rope_scale),
            v.latent_scale,
        )  # fmt: skip
        got5 = got if got.ndim == 5 else got[:, :, None]
        got16 = comfy.sample.sample(patcher, noise, 16, v.guidance, "euler", "simple", positive, negative, latent,
                                    seed=7, disable_pbar=True)  # fmt: skip
        want16 = dit_to_latent(
            sample(dit, make_noise(x5.shape, 7), cond, uncond, steps=16, guidance=v.guidance,
                   scheduler_scale=v.scheduler_scale, rope_scale=v.rope_scale),
            v.latent_scale,
        )  # fmt: skip
        probe = torch.randn(shape[:1] + (16,) + shape[2:], generator=g)
        schedules = {}
        for steps in (4, 7, 16, 50, 64):
            k = comfy.samplers.KSampler(patcher, steps=steps, device="cpu", sampler="euler", scheduler="simple",
                                        denoise=1.0, model_options=patcher.model_options)  # fmt: skip
            schedules[steps] = float((k.sigmas.float() - flow_timesteps(steps, v.scheduler_scale)).abs().max())
        mem = model.memory_required(tuple(latent.shape), {"text_embeds": [torch.Size((1, 7, TEXT_DIM))]})
        out[name] = {
            "latent_shape": list(got.shape),
            "noise_equal": bool(torch.equal(x5, make_noise(x5.shape, 7))),
            "sigma_diff": float((sigmas - ours_t).abs().max()),
            "latent_diff": float((got5 - want).abs().max()),
            "latent_diff_16_steps": float((got16.reshape(want16.shape) - want16).abs().max()),
            "process_in_diff": float(
                (model.process_latent_in(probe) - latent_to_dit(probe, v.latent_scale)).abs().max()
            ),
            "process_out_diff": float(
                (model.process_latent_out(probe) - dit_to_latent(probe, v.latent_scale)).abs().max()
            ),
            "shift": float(model.model_sampling.shift),
            "schedules": schedules,
            "latent_scale": float(want.abs().max()),
            "memory_required": int(mem),
            "our_estimate": model.memory_estimate(tuple(x5.shape), 7, False),
        }
    out["nabla"] = nabla_case(plant)
    return out


def nabla_case(plant: str) -> dict:
    """A 10 s Lite variant (NABLA on by default): KSampler runs it with NABLA (our model options' auto), equal to
    kandinsky_core's sample with the variant's NABLA and different from dense attention; a size that is not a
    multiple of 128 px is an InputError."""
    import comfy.sample
    import torch
    from tiny import TINY_ARCHS, make_tiny_dit

    from kandinsky_core import variants
    from kandinsky_core.errors import InputError
    from kandinsky_core.sampling import TextConditioning, dit_to_latent, make_noise, sample
    from nodes import comfy_model, text
    from nodes.model_options import NablaChoice, with_options

    arch = dataclasses.replace(TINY_ARCHS["lite"], in_text_dim=TEXT_DIM, in_text_dim2=TEXT_DIM)
    v = dataclasses.replace(variants.VARIANTS["t2v-lite-sft-10s"], arch=arch)
    dit = make_tiny_dit(arch, seed=3)
    patcher = comfy_model.make_patcher(dit, v, "auto", "tiny-10s")
    if plant == "nabla_off":
        patcher = with_options(patcher, nabla=NablaChoice("off"))
    g = torch.Generator().manual_seed(2)
    cond = TextConditioning(torch.randn(1, 6, TEXT_DIM, generator=g), torch.ones(1, 6, dtype=torch.bool),
                            torch.randn(1, TEXT_DIM, generator=g))  # fmt: skip
    positive = negative = text.to_conditioning(cond, "video")
    result = {"nabla": str(v.nabla)}
    for name, shape in (("ok", (1, 16, 2, 64, 64)), ("bad", (1, 16, 2, 8, 12))):  # 512 px: 4x4 tiles
        noise = comfy.sample.prepare_noise(torch.zeros(shape), seed=3)
        try:
            got = comfy.sample.sample(patcher, noise, 4, 1.0, "euler", "simple", positive, negative,
                                      torch.zeros(shape), seed=3, disable_pbar=True)  # fmt: skip
        except InputError as e:
            result[name] = f"InputError: {e}"
            continue
        kw = dict(steps=4, guidance=1.0, scheduler_scale=v.scheduler_scale, rope_scale=v.rope_scale)
        sparse = dit_to_latent(sample(dit, make_noise(shape, 3), cond, None, nabla=v.nabla, **kw), v.latent_scale)
        dense = dit_to_latent(sample(dit, make_noise(shape, 3), cond, None, **kw), v.latent_scale)
        result[name] = {"diff_nabla": float((got - sparse).abs().max()), "diff_dense": float((got - dense).abs().max())}
    return result


if __name__ == "__main__":
    plant = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("plant=")), "")
    print("RESULT " + json.dumps(main(plant)))
