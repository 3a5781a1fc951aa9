"""Parity with the official Kandinsky 5 code, through fixtures that tests/reference/make_fixtures.py computed by
running the official implementation (see tests/reference/README.md).

Weights go through our real `load_dit` (from the fixture's safetensors file, float32). The official layout
(visual `[T, H, W, C]`, no batch) is converted to ours (`[B, C, T, H, W]`) here. Tolerances come from the
fixture's measured float32-vs-float64 error of the official code itself.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from einops import rearrange
from safetensors.torch import load_file
from tiny import TINY_ARCHS

import kandinsky_core.layers as layers
from kandinsky_core.loading import load_dit
from kandinsky_core.nabla import NablaParams
from kandinsky_core.sampling import TextConditioning, flow_timesteps, sample
from kandinsky_core.variants import get_variant

FIXTURES = Path(__file__).parent / "reference" / "fixtures"
REPORT = json.loads((FIXTURES / "tolerances.json").read_text())
FLOOR = 2e-5


def tolerance(case: str, key: str) -> float:
    entry = REPORT["cases"][case]
    assert entry["determinism"][key] == 0.0
    return max(10 * entry["fp32_vs_fp64"][key], FLOOR)


def fixture(case: str) -> dict[str, torch.Tensor]:
    return {
        k: v.float() if v.is_floating_point() else v
        for k, v in load_file(str(FIXTURES / f"{case}.safetensors")).items()
    }


def ours(x: torch.Tensor) -> torch.Tensor:
    """Official visual layout [..., T, H, W, C] to ours [B, C, T, H, W]."""
    return rearrange(x, "t h w c -> 1 c t h w") if x.ndim == 4 else rearrange(x, "n t h w c -> n 1 c t h w")


def official(x: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "1 c t h w -> t h w c")


_MODELS: dict[str, torch.nn.Module] = {}


def _as_json(v):
    return list(v) if isinstance(v, tuple) else v


def model(name: str) -> torch.nn.Module:
    if name == "lite_i2i":  # an instruct DiT has the visual_cond DiT's tensors: the fixtures reuse the Lite weights
        if name not in _MODELS:
            arch = dataclasses.replace(TINY_ARCHS["lite"], visual_cond=False, instruct=True)
            variant = dataclasses.replace(get_variant("i2i-lite"), arch=arch)
            _MODELS[name] = load_dit(FIXTURES / "weights_lite.safetensors", variant=variant, dtype=torch.float32)[0]
        return _MODELS[name]
    if name not in _MODELS:
        arch, recorded = TINY_ARCHS[name], REPORT["archs"][name]
        stale = [k for k, v in recorded.items() if v != _as_json(getattr(arch, k))]
        assert not stale, f"fixtures were made for another TINY_ARCHS[{name!r}] ({stale}): run make_fixtures.py"
        base = {"lite": "t2v-lite-sft-5s", "pro": "t2v-pro-sft-5s-sd"}[name]
        variant = dataclasses.replace(get_variant(base), arch=TINY_ARCHS[name])
        dit, _ = load_dit(FIXTURES / f"weights_{name}.safetensors", variant=variant, dtype=torch.float32)
        _MODELS[name] = dit.eval()
    return _MODELS[name]


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= tol, (
        f"{what}: max abs error {err:.3e} > tolerance {tol:.3e} (scale {float(expected.abs().max()):.2f})"
    )


def velocity(dit, f: dict, rope_scale, nabla=None) -> torch.Tensor:
    with torch.no_grad():
        v = dit(
            ours(f["x"]), f["text_embeds"], f["pooled"], f["time"], text_mask=f["text_mask"], rope_scale=rope_scale,
            nabla=nabla,
        )  # fmt: skip
    return official(v)


@pytest.mark.parametrize(
    "case, name, rope_scale", [("dense_lite", "lite", (1, 2, 2)), ("dense_pro", "pro", (1, 3.16, 3.16))]
)
def test_dense_velocity(case, name, rope_scale):
    f = fixture(case)
    assert_matches(velocity(model(name), f, rope_scale), f["velocity"], tolerance(case, "velocity"), case)


def test_nabla_block_mask_and_velocity(monkeypatch):
    f = fixture("nabla_pro")
    masks = []
    nabla_attention = layers.nabla_attention

    def recording(*args, **kwargs):
        out, mask = nabla_attention(*args, **kwargs, return_mask=True)
        masks.append(mask)
        return out

    monkeypatch.setattr(layers, "nabla_attention", recording)
    params = NablaParams(**REPORT["nabla"])
    x = torch.cat([f["x"], torch.zeros(*f["x"].shape[:-1], 17)], dim=-1)  # the zero visual_cond channels
    v = velocity(model("pro"), {**f, "x": x}, (1, 2, 2), nabla=params)

    ours_mask = torch.cat(masks, dim=0).bool()
    expected = f["block_mask"].bool()
    assert ours_mask.shape == expected.shape
    assert torch.equal(ours_mask, expected), f"{int((ours_mask != expected).sum())} of {expected.numel()} blocks differ"
    assert REPORT["cases"]["nabla_pro"]["block_mask_density"] < 0.7  # the official mask is genuinely sparse
    assert_matches(v, f["velocity"], tolerance("nabla_pro", "velocity"), "NABLA velocity")


def conditioning(f: dict, prefix: str = "") -> TextConditioning:
    return TextConditioning(f[prefix + "text_embeds"], f[prefix + "text_mask"], f[prefix + "pooled"])


def test_i2v_velocity_and_sampler():
    f = fixture("i2v_lite")
    dit = model("lite")
    for i in range(f["inputs"].shape[0]):  # the official DiT inputs (33 channels) and velocities
        v = velocity(dit, {**f, "x": f["inputs"][i], "time": f["times"][i : i + 1]}, (1, 2, 2))
        assert_matches(v, f["velocities"][i], tolerance("i2v_lite", "velocities"), f"I2V velocity, call {i}")

    seen = []

    def spy(x, *args, **kwargs):
        seen.append(x.clone())
        return dit(x, *args, **kwargs)

    spy.arch = dit.arch
    out = sample(
        spy, ours(f["noise"]), conditioning(f), None, steps=2, guidance=1.0, scheduler_scale=5.0,
        rope_scale=(1, 2, 2), first_frame_latent=ours(f["image"]),
    )  # fmt: skip
    for i, x in enumerate(seen):  # frame-0 overwrite, zero visual_cond, mask channel: as the official generate
        assert_matches(official(x), f["inputs"][i], tolerance("i2v_lite", "output"), f"I2V DiT input, step {i}")
    assert_matches(official(out), f["output_normalized"], tolerance("i2v_lite", "output_normalized"), "I2V result")


def test_guided_trajectory():
    f = fixture("traj_lite")
    dit = model("lite")
    steps = []
    out = sample(
        dit, ours(f["noise"]), conditioning(f), conditioning(f, "null_"), steps=4, guidance=5.0, scheduler_scale=5.0,
        rope_scale=(1, 2, 2), callback=lambda i, n, x: steps.append(x.clone()),
    )  # fmt: skip
    tol = tolerance("traj_lite", "output")
    # the official DiT inputs are cond, uncond per step: every second one is the latent before steps 1, 2, 3
    for i in range(3):
        assert_matches(official(steps[i]), f["inputs"][2 * (i + 1)], tol, f"latent after step {i}")
    assert torch.equal(f["times"][::2], flow_timesteps(4, 5.0)[:-1] * 1000)  # the schedule, bit for bit
    assert_matches(official(out), f["output"], tol, "4-step guided trajectory")


def test_i2i_edit_sampling():
    f = fixture("i2i_lite")
    dit = model("lite_i2i")
    seen = []

    def spy(x, *args, **kwargs):
        seen.append(x.clone())
        return dit(x, *args, **kwargs)

    spy.arch = dit.arch
    out = sample(
        spy, ours(f["noise"]), conditioning(f), conditioning(f, "null_"), steps=3, guidance=3.5, scheduler_scale=3.0,
        edit_latent=ours(f["image"]),
    )  # fmt: skip
    tol = tolerance("i2i_lite", "output")
    for i, x in enumerate(seen):  # noisy latent, edit latent, ones mask: the official generate_sample_ti2i input
        assert_matches(official(x), f["inputs"][i], tol, f"I2I DiT input, call {i}")
    assert_matches(official(out), f["output"], tol, "I2I result")
