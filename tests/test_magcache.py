"""MagCache on the tiny DiT: which calls skip the visual blocks (checked against the blocks actually running and an
independent rendering of the official rule), what a skipped call computes, interpolation and calibration."""

import numpy as np
import pytest
import torch
from magcache_reference import official_rule
from tiny import TINY_ARCHS, make_tiny_dit

from kandinsky_core.errors import InputError
from kandinsky_core.magcache import (
    OFFICIAL_MAG_RATIOS,
    MagCache,
    MagCacheParams,
    MagCalibration,
    nearest_interp,
    official_mag_ratios,
    per_step_ratios,
)
from kandinsky_core.sampling import TextConditioning, sample
from kandinsky_core.settings import uses_cfg
from kandinsky_core.variants import get_variant

GRID = (2, 4, 6)  # latent T, H, W: 2 x 2 x 3 visual tokens


@pytest.fixture(scope="module")
def dit():
    return make_tiny_dit(TINY_ARCHS["lite_t2v_16ch"], seed=3)


def text(seed: int, length: int = 4) -> TextConditioning:
    g = torch.Generator().manual_seed(seed)
    return TextConditioning(
        torch.randn(1, length, 3584, generator=g),
        torch.ones(1, length, dtype=torch.bool),
        torch.randn(1, 768, generator=g),
    )


def noise() -> torch.Tensor:
    return torch.randn(1, 16, *GRID, generator=torch.Generator().manual_seed(7))


class Probe:
    """Records, per DiT call, whether the visual blocks ran, and the visual residual they added (from module hooks
    on the first and the last visual block, independent of MagCache's own bookkeeping)."""

    def __init__(self, dit):
        self.calls: list[dict] = []
        blocks = dit.visual_transformer_blocks
        self.handles = [
            blocks[0].register_forward_pre_hook(self._before),
            blocks[-1].register_forward_hook(self._after),
        ]

    def new_call(self, step, branch):
        self.calls.append(dict(step=step, branch=branch, ran=False))

    def _before(self, module, args):
        self.calls[-1]["ran"] = True
        self.calls[-1]["input"] = args[0].clone()

    def _after(self, module, args, output):
        self.calls[-1]["residual"] = output - self.calls[-1]["input"]

    def close(self):
        for h in self.handles:
            h.remove()


class Traced:
    """Wraps a block cache: tells the probe about each call and records the hook's input and output."""

    def __init__(self, cache, probe):
        self.cache, self.probe = cache, probe

    def begin(self, steps, cfg):
        self.cache.begin(steps, cfg)

    def hook(self, step, branch):
        inner = self.cache.hook(step, branch)

        def run(visual, run_blocks):
            self.probe.new_call(step, branch)
            out = inner(visual, run_blocks)
            self.probe.calls[-1].update(visual=visual.clone(), out=out.clone())
            return out

        return run


def run(dit, cache=None, steps=10, guidance=5.0):
    """(final latent, per-call records); without a cache the sampler runs as it always does (no hook passed)."""
    args = (dit, noise(), text(1), text(2) if guidance != 1.0 else None)
    kwargs = dict(steps=steps, guidance=guidance, scheduler_scale=5.0)
    if cache is None:
        return sample(*args, **kwargs), []
    probe = Probe(dit)
    try:
        x = sample(*args, **kwargs, block_cache=Traced(cache, probe))
    finally:
        probe.close()
    return x, probe.calls


def interleave(pos, neg):
    return tuple(v for pair in zip(pos, neg, strict=True) for v in pair)


# positive ratio 1.02 every step, negative 1.1: see test_skip_schedule_by_hand
RATIOS_10 = interleave([1.02] * 9, [1.1] * 9)


def test_skip_schedule_by_hand(dit):
    # 10 steps with CFG: calls 0..19, retention 0.2 -> calls >= 4 (step 2 on) may skip.
    # positive, ratio 1.02: errors .02, .02+.0404 -> skip 2, 3; step 4 is the third in a row (> K=2) -> runs, resets;
    # then 5, 6 skip, 7 runs, 8, 9 skip.  negative, ratio 1.1: error .1 skips step 2, then .1+.21 > .12 -> step 3
    # runs; so every other step from 2 skips.
    expected = [(2, 0), (2, 1), (3, 0), (4, 1), (5, 0), (6, 0), (6, 1), (8, 0), (8, 1), (9, 0)]
    assert official_rule(RATIOS_10, 10, cfg=True) == expected

    cache = MagCache(MagCacheParams(RATIOS_10))
    reference, plain_calls = run(dit)
    x, calls = run(dit, cache)
    assert cache.skipped == expected
    assert [(c["step"], c["branch"]) for c in calls if not c["ran"]] == expected  # the blocks really did not run
    assert len(calls) == 20 and len(plain_calls) == 0

    # A skipped call returns its own visual tokens plus the residual of the branch's last call that ran.
    last = {}
    for c in calls:
        if c["ran"]:
            last[c["branch"]] = c["residual"]
            torch.testing.assert_close(c["out"], c["visual"] + c["residual"], rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(c["out"], c["visual"] + last[c["branch"]], rtol=0, atol=0)

    # 10 of 20 calls skipped on a random (uncalibrated) model: the result moves, but stays close.
    rel = float((x - reference).norm() / reference.norm())
    assert 1e-3 < rel < 0.2, rel


def test_never_skipping_is_exact(dit):
    reference, _ = run(dit, steps=6)
    x, calls = run(dit, MagCache(MagCacheParams(RATIOS_10, threshold=0.0)), steps=6)
    assert all(c["ran"] for c in calls)
    torch.testing.assert_close(x, reference, rtol=0, atol=0)


@pytest.mark.parametrize(
    "steps, K, retention",
    [(10, 2, 0.2), (10, 1, 0.2), (12, 3, 0.5), (7, 2, 0.25), (9, 0, 0.2)],
)
def test_retention_and_k(dit, steps, K, retention):
    # Ratios of exactly 1 accumulate no error: only K and retention stop skipping.
    ratios = (1.0,) * (2 * (steps - 1))
    cache = MagCache(MagCacheParams(ratios, K=K, retention=retention))
    _, calls = run(dit, cache, steps=steps)
    skipped = [(c["step"], c["branch"]) for c in calls if not c["ran"]]
    assert skipped == official_rule(ratios, steps, cfg=True, K=K, retention=retention)
    first = int(2 * steps * retention)
    assert all(2 * s + b >= first for s, b in skipped)
    for branch in (0, 1):
        ran = [c["ran"] for c in calls if c["branch"] == branch]
        # with no error, the calls after the retention window go: K skips, one run, K skips, one run, ...
        eligible = [i for i in range(steps) if 2 * i + branch >= first]
        expected = [True] * (steps - len(eligible)) + [j % (K + 1) == K for j in range(len(eligible))]
        assert ran == expected
        assert max(len(r) for r in "".join("s" if not r else "." for r in ran).split(".")) == K


def test_retention_counts_calls_not_steps(dit):
    # 7 steps, retention 0.25: int(14 * 0.25) = 3 -> the negative call of step 1 (call 3) may skip, the positive
    # call of step 1 (call 2) may not.
    ratios = (1.0,) * 12
    cache = MagCache(MagCacheParams(ratios, retention=0.25))
    _, calls = run(dit, cache, steps=7)
    assert cache.skipped[:3] == [(1, 1), (2, 0), (2, 1)]


def test_no_cfg_uses_positive_ratios_only(dit):
    # The no-CFG official lists carry 0 for the negative branch; one-branch sampling must never read them.
    ratios = interleave([1.03] * 7, [0.0] * 7)
    cache = MagCache(MagCacheParams(ratios))
    _, calls = run(dit, cache, steps=8, guidance=1.0)
    assert {c["branch"] for c in calls} == {0}
    # calls 0, 2, .. 14; retention int(16 * .2) = 3 -> step 2 on. errors .03, .03+.0609 -> skip 2, 3; 4 runs, ...
    assert cache.skipped == [(2, 0), (3, 0), (5, 0), (6, 0)]
    assert cache.skipped == official_rule(ratios, 8, cfg=False)


@pytest.mark.parametrize("name", ["t2v-lite-sft-5s", "t2v-pro-sft-5s-sd"])
def test_official_ratios_interpolated_to_other_step_counts(dit, name):
    ratios = official_mag_ratios(name)
    cache = MagCache(MagCacheParams(ratios))
    _, calls = run(dit, cache, steps=12)
    assert cache.skipped == official_rule(ratios, 12, cfg=True)
    assert [(c["step"], c["branch"]) for c in calls if not c["ran"]] == cache.skipped
    assert cache.skipped  # the official ratios skip some of 12 steps at the default threshold


def test_nearest_interp_hand_computed():
    assert nearest_interp([10, 11, 12, 13, 14], 3) == [10, 12, 14]
    # scale 4/3: 0, 1.33, 2.67, 4 -> 0, 1, 3, 4
    assert nearest_interp([10, 11, 12, 13, 14], 4) == [10, 11, 13, 14]
    # scale 0.5: 0, .5, 1, 1.5, 2 -> halves round to even: 0, 0, 1, 2, 2 (numpy's round, as the official code)
    assert nearest_interp([1.0, 2.0, 3.0], 5) == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert nearest_interp([1.0, 2.0, 3.0], 1) == [3.0]
    assert nearest_interp([5.0], 3) == [5.0, 5.0, 5.0]


def test_per_step_ratios():
    ratios = official_mag_ratios("t2v-lite-sft-5s")
    pos, neg = per_step_ratios(ratios, 50)  # official length: used as is, step 0 = 1
    assert pos[:3] == [1.0, 0.91607, 0.95254] and neg[:3] == [1.0, 0.91507, 0.95349]
    assert pos[-1] == 0.84336 and neg[-1] == 0.84193
    pos, neg = per_step_ratios(ratios, 4)  # 50 -> 4: scale 49/3 -> indices 0, 16, 33, 49
    full = [1.0, 1.0, *ratios]
    assert pos == [full[0], full[32], full[66], full[98]]
    assert neg == [full[1], full[33], full[67], full[99]]


def test_official_ratio_table():
    for name, ratios in OFFICIAL_MAG_RATIOS.items():
        v = get_variant(name)
        assert len(ratios) == 2 * (v.steps - 1), name
        zeros = ratios[1::2] == (0,) * (v.steps - 1)
        assert zeros == (not uses_cfg(v.guidance)), name  # no-CFG lists: negative entries are 0
        assert all(0.5 < r < 1.5 for r in ratios[0::2]), name
    assert set(OFFICIAL_MAG_RATIOS) >= {"t2v-lite-sft-5s", "t2v-lite-sft-10s", "t2v-lite-nocfg-5s",
                                        "t2v-lite-nocfg-10s", "t2v-pro-sft-5s-sd", "i2v-pro-5s-hd"}  # fmt: skip
    assert official_mag_ratios("t2v-lite-nocfg-10s")[:3] == (0.8736, 0, 1.12136)
    assert official_mag_ratios(get_variant("t2v-pro-sft-5s-sd"))[-1] == pytest.approx(official_mag_ratios(
        "t2v-pro-sft-5s-sd")[-1])  # fmt: skip


def test_calibration_measures_residual_norm_ratios(dit):
    cal = MagCalibration()
    reference, _ = run(dit, steps=4)
    x, calls = run(dit, cal, steps=4)
    torch.testing.assert_close(x, reference, rtol=0, atol=0)  # calibration never changes the result
    by_branch = {b: [c["residual"].double() for c in calls if c["branch"] == b] for b in (0, 1)}
    expected = []
    for step in range(1, 4):
        for b in (0, 1):
            now, prev = by_branch[b][step], by_branch[b][step - 1]
            expected.append(float((now.norm(dim=-1) / prev.norm(dim=-1)).mean()))
    got = cal.ratios()
    assert len(got) == 6
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert any(abs(r - 1) > 1e-3 for r in got)  # a real measurement, not the placeholder 1


def test_calibration_without_cfg_and_reuse(dit):
    cal = MagCalibration()
    run(dit, cal, steps=3, guidance=1.0)
    got = cal.ratios()
    assert len(got) == 4 and got[1::2] == (0.0, 0.0) and all(r > 0 for r in got[0::2])
    # calibrated ratios drive MagCache directly
    cache = MagCache(MagCacheParams(got, threshold=10.0, retention=0.0))
    _, calls = run(dit, cache, steps=3, guidance=1.0)
    assert [c["ran"] for c in calls] == [True, False, False]


def test_errors():
    with pytest.raises(InputError, match="t2v-lite-distilled16steps-5s.*no official MagCache ratios"):
        official_mag_ratios("t2v-lite-distilled16steps-5s")
    with pytest.raises(InputError, match="threshold"):
        MagCacheParams((1.0,), threshold=-1)
    with pytest.raises(InputError, match="K="):
        MagCacheParams((1.0,), K=-1)
    with pytest.raises(InputError, match="retention"):
        MagCacheParams((1.0,), retention=1.5)
    with pytest.raises(InputError, match="non-empty"):
        MagCacheParams(())
    with pytest.raises(InputError, match="must be numbers"):
        MagCacheParams(("fast",))
    assert MagCacheParams([1, "1.5"]).ratios == (1.0, 1.5)  # lists (e.g. from JSON) become float tuples
    with pytest.raises(InputError, match="no measurements"):
        MagCalibration().ratios()
    assert MagCacheParams.for_variant("i2v-lite-5s").ratios == OFFICIAL_MAG_RATIOS["i2v-lite-5s"]


def test_identity_hook_is_bit_exact(dit):
    from tiny import make_inputs

    inputs = make_inputs(dit.arch, grid=GRID)
    plain = dit(**inputs)
    hooked = dit(**inputs, block_cache=lambda visual, run_blocks: run_blocks(visual))
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)


def drive(cache: MagCache, steps: int, cfg: bool) -> list[tuple[int, int]]:
    """Runs the cache's decisions without a model (the 'blocks' add a constant residual)."""
    cache.begin(steps, cfg)
    visual = torch.zeros(1, 2, 3)
    for step in range(steps):
        for branch in (0, 1) if cfg else (0,):
            cache.hook(step, branch)(visual, lambda v: v + 1)
    return cache.skipped


# Recorded from the official kandinsky/magcache_utils.py (set_magcache_params + magcache_forward inside the official
# generate, on a tiny DiT): which (step, branch) calls it served from the cache, with the official default controls.
OFFICIAL_SCHEDULES = {
    ("t2v-pro-sft-5s-sd", 50, True): [(s, b) for s in (10, 11, 13, 14, 16, 17, 19, 20, 22, 23, 25, 26, 28, 29, 31, 32,
                                                       34, 35, 37, 38, 40, 41, 43, 44, 46, 48) for b in (0, 1)],
    ("t2v-lite-sft-5s", 12, True): [(s, b) for s in (2, 3, 5, 6, 8, 9) for b in (0, 1)],
    ("t2v-lite-nocfg-5s", 12, False): [(2, 0), (3, 0), (5, 0), (6, 0), (8, 0), (9, 0)],
}  # fmt: skip


@pytest.mark.parametrize("name, steps, cfg", list(OFFICIAL_SCHEDULES))
def test_schedules_recorded_from_the_official_code(name, steps, cfg):
    assert drive(MagCache(MagCacheParams.for_variant(name)), steps, cfg) == OFFICIAL_SCHEDULES[name, steps, cfg]


# ---------------------------------------------------------------------------------------------------------------------
# Front ends: `generate --magcache / --calibrate-magcache / --block-swap` through the real pipeline on tiny files


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A models folder with a tiny t2v-lite-sft-5s DiT, the tiny official text encoders and the tiny HunyuanVideo VAE
    (the layout of tests/test_pipeline.py); yields (folder, tiny arch)."""
    import dataclasses
    import shutil

    import tiny_text
    import tiny_vae
    from tiny import make_tiny_dit_file

    from kandinsky_core import download, variants

    root = tmp_path_factory.mktemp("magcache_models")
    models = root / "models"
    t = tiny_text.make_tiny_text_encoders(root / "official", "folder", qwen_hidden=32, clip_hidden=32)
    (models / "text_encoders").mkdir(parents=True)
    shutil.move(t.qwen, models / "text_encoders" / download.QWEN_DIR)
    shutil.move(t.clip, models / "text_encoders" / download.CLIP_DIR)
    tiny_vae.write_diffusers_folder(models / "vae" / download.HUNYUAN_VAE_DIR / "vae", seed=0)
    arch = dataclasses.replace(TINY_ARCHS["lite"], in_text_dim=32, in_text_dim2=32)
    filename = variants.VARIANTS["t2v-lite-sft-5s"].hf_filename.split("/")[-1]
    make_tiny_dit_file(models / "diffusion_models" / filename, arch, seed=0)
    return models, arch


@pytest.fixture
def spied(tiny_models, monkeypatch):
    """Runs the CLI on the tiny files; records the block cache the sampler got, the block swap and the final latent."""
    import dataclasses

    from kandinsky_core import cli, offload, sampling, variants

    models, arch = tiny_models
    monkeypatch.setitem(
        variants.VARIANTS, "t2v-lite-sft-5s", dataclasses.replace(variants.VARIANTS["t2v-lite-sft-5s"], arch=arch)
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen: dict = {}
    real_sample, real_swap = sampling.sample, offload.enable_block_swap

    def sample_spy(*a, **k):
        seen["cache"] = k.get("block_cache")
        seen["latent"] = real_sample(*a, **k)
        return seen["latent"]

    def swap_spy(*a, **k):
        seen["swap"] = real_swap(*a, **k)
        return seen["swap"]

    real_layers = offload.swap_layers

    def layers_spy(model, layers, *a, **k):
        seen.setdefault("swapped_layers", []).append(type(layers[0]).__name__)
        return real_layers(model, layers, *a, **k)

    monkeypatch.setattr(sampling, "sample", sample_spy)
    monkeypatch.setattr(offload, "enable_block_swap", swap_spy)
    monkeypatch.setattr(offload, "swap_layers", layers_spy)

    def generate(out, *extra):
        seen.clear()
        args = ["generate", "--variant", "t2v-lite-sft-5s", "--prompt", "a fox", "--models-dir", str(models)]
        args += ["--width", "64", "--height", "64", "--frames", "5", "--steps", "8", "--quiet", "--output", str(out)]
        args += ["--no-expand-prompt"]  # the tiny Qwen's expansion would only add noise to these comparisons
        assert cli.main([*args, *extra]) == 0
        return dict(seen)

    return generate


def test_cli_calibration_block_swap_and_magcache_reach_the_sampler(spied, tmp_path):
    import json

    ratios_file = tmp_path / "ratios.json"
    swaps = ["--block-swap", "0", "--text-block-swap", "0"]
    calibrated = spied(tmp_path / "cal.mp4", "--calibrate-magcache", str(ratios_file), *swaps)
    calibration = calibrated["cache"]
    assert isinstance(calibration, MagCalibration)
    data = json.loads(ratios_file.read_text())
    assert data["variant"] == "t2v-lite-sft-5s" and data["steps"] == 8
    assert data["ratios"] == list(calibration.ratios()) and len(data["ratios"]) == 2 * 7
    assert all(r > 0 for r in data["ratios"])  # both CFG branches measured at every step from 1
    assert calibrated["swap"].swapped == [0, 1] and calibrated["swap"].loads == 8 * 2 * 2  # steps x branches x blocks
    assert calibrated["swapped_layers"] == ["Qwen2_5_VLDecoderLayer", "VisualBlock"]

    plain = spied(tmp_path / "plain.mp4")
    assert plain["cache"] is None and "swap" not in plain
    # neither measuring nor swapping (DiT blocks, Qwen layers) changes a number
    assert torch.equal(calibrated["latent"], plain["latent"])

    flags = ["--magcache", "--magcache-threshold", "0.5", "--magcache-k", "3", "--magcache-retention", "0.25"]
    cached = spied(tmp_path / "cached.mp4", *flags, "--magcache-ratios", str(ratios_file), "--block-swap", "1")
    cache = cached["cache"]
    assert isinstance(cache, MagCache)
    assert cache.params == MagCacheParams(tuple(data["ratios"]), threshold=0.5, K=3, retention=0.25)
    assert cache.skipped == official_rule(cache.params.ratios, 8, True, 0.5, 3, 0.25) and cache.skipped
    assert cached["swap"].loads == 8 * 2 - len(cache.skipped)  # one swapped block, run only by computed calls
    err = (cached["latent"] - plain["latent"]).norm() / plain["latent"].norm()
    assert 0 < err < 0.5


def test_cli_magcache_uses_the_official_ratios(tmp_path, capsys, monkeypatch):
    import torch as _torch

    from kandinsky_core import cli, pipeline

    seen = {}

    def fake_run(request, models, **kw):
        seen.update(kw)
        return _torch.zeros(request.frames, request.height, request.width, 3, dtype=_torch.uint8)

    monkeypatch.setattr(pipeline, "run", fake_run)
    for name in ("dit.safetensors", "qwen", "clip", "vae"):
        (tmp_path / name).mkdir()
    args = ["generate", "--variant", "t2v-pro-sft-5s-sd", "--prompt", "a fox", "--magcache", "--quiet"]
    args += ["--output", str(tmp_path / "o.mp4"), "--block-swap", "12"]
    args += ["--dit", str(tmp_path / "dit.safetensors"), "--text-encoder", str(tmp_path / "qwen")]
    args += ["--clip", str(tmp_path / "clip"), "--vae", str(tmp_path / "vae")]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert seen["magcache"] == MagCacheParams.for_variant("t2v-pro-sft-5s-sd") and seen["block_swap"] == 12
    assert seen["magcache"].threshold == 0.12 and seen["magcache"].K == 2 and seen["magcache"].retention == 0.2


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--variant", "t2v-lite-distilled16steps-5s", "--magcache"],
         "t2v-lite-distilled16steps-5s has no official MagCache ratios.*--calibrate-magcache ratios.json"),
        (["--variant", "t2v-lite-sft-5s", "--magcache-k", "3"], "--magcache-k given without --magcache"),
        (["--variant", "t2v-lite-sft-5s", "--magcache", "--magcache-ratios", "nope.json"],
         "--magcache-ratios nope.json does not exist.*--calibrate-magcache nope.json"),
        (["--variant", "t2v-lite-sft-5s", "--magcache", "--calibrate-magcache", "r.json"],
         "--calibrate-magcache measures ratios in a full run"),
        (["--variant", "t2v-lite-sft-5s", "--magcache", "--magcache-retention", "2"], "retention=2.0 is not allowed"),
        (["--variant", "t2v-lite-sft-5s", "--block-swap", "-1"], "--block-swap=-1: .* Use 0 .. 32"),
    ],
)  # fmt: skip
def test_cli_magcache_errors_come_before_any_model_is_touched(extra, expected, tmp_path, capsys, monkeypatch):
    import re

    from kandinsky_core import cli, download, pipeline

    def forbidden(*a, **k):
        raise AssertionError("a model file was looked up or loaded before the arguments were validated")

    for module, name in ((pipeline, "run"), (download, "ensure_files"), (download, "plan_downloads")):
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["generate", "--prompt", "a fox", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(expected, err), err


def test_ratio_files_are_checked():
    from kandinsky_core.magcache import read_mag_ratios

    assert read_mag_ratios("[1, 0.5]", "x") == (1.0, 0.5)
    assert read_mag_ratios('{"ratios": [1.02, 1.03]}', "x") == (1.02, 1.03)
    with pytest.raises(InputError, match="r.json is not valid JSON"):
        read_mag_ratios("[1,", "r.json")
    with pytest.raises(InputError, match='r.json holds no MagCache ratios.*"ratios" list'):
        read_mag_ratios('{"steps": 3}', "r.json")
    with pytest.raises(InputError, match="ratios must be a non-empty list of numbers >= 0"):
        read_mag_ratios("[1, -2]", "r.json")
