"""cli.py: `variants` lists the table; bad `generate` arguments fail with clear messages before any model loads."""

import time

import numpy as np
import pytest
from fake_model_files import fake_model_args
from PIL import Image

from kandinsky_core import cli, download, pipeline
from kandinsky_core.variants import VARIANTS


@pytest.fixture
def no_models(monkeypatch):
    """Any attempt to locate, download or load weights fails the test."""

    def forbidden(*a, **k):
        raise AssertionError("a model file was looked up or loaded before the arguments were validated")

    monkeypatch.setattr(pipeline, "run", forbidden)
    monkeypatch.setattr(download, "ensure_files", forbidden)
    monkeypatch.setattr(download, "plan_downloads", forbidden)


def run_cli(args, capsys):
    start = time.perf_counter()
    rc = cli.main(args)
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert elapsed < 5.0  # no model is touched (see forbid_models); generous for a loaded CI machine
    return rc, out, err


def test_variants_lists_every_variant(capsys):
    rc, out, _ = run_cli(["variants"], capsys)
    assert rc == 0
    for name, v in VARIANTS.items():
        assert f"\n{name} " in "\n" + out
        assert v.hf_repo in out


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "start.png"
    Image.fromarray(np.zeros((300, 500, 3), dtype=np.uint8)).save(path)
    return path


GEN = ["generate", "--prompt", "a fox"]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--variant", "t2v-lite-sft5s"], ["Unknown Kandinsky 5 variant", "Did you mean 't2v-lite-sft-5s'"]),
        (["--variant", "t2v-lite-sft-5s", "--width", "100", "--height", "512"], ["width=100", "multiple of 16", "96"]),
        (["--variant", "t2v-lite-sft-10s", "--width", "528", "--height", "512"], ["multiple of 128", "NABLA"]),
        (["--variant", "t2v-lite-sft-5s", "--frames", "10"], ["frames=10", "4k+1", "9 or 13"]),
        (["--variant", "t2v-lite-sft-5s", "--frames", "125"], ["frames=125", "121"]),
        (["--variant", "t2v-lite-sft-5s", "--seconds", "10"], ["--seconds 10", "5"]),
        (["--variant", "t2v-lite-sft-5s", "--width", "512"], ["give both, or neither --width nor --height"]),
        (["--variant", "i2v-lite-5s"], ["needs a start image", "Pass --image FILE"]),
        (["--variant", "i2i-lite"], ["needs the image to edit", "Pass --image FILE"]),
        (["--variant", "t2i-lite", "--frames", "5"], ["frames=5", "1 frame"]),
        (["--variant", "t2i-lite", "--steps", "500"], ["steps=500", "0 to 200"]),
        (["--variant", "t2i-lite", "--scheduler-scale", "-1"], ["scheduler_scale=-1.0", "0 to 50"]),
        (["--variant", "t2i-lite", "--output", "x.mp4"], [".png"]),
        (["--variant", "t2v-lite-sft-5s", "--output", "x.png"], [".mp4"]),
    ],
)
def test_bad_arguments_fail_before_loading(extra, expected, capsys, no_models):
    rc, out, err = run_cli(GEN + extra, capsys)
    assert rc == 2
    assert err.startswith("error: ") and "Traceback" not in err
    for text in expected:
        assert text in err, err


def test_image_for_text_variant_refused(png, capsys, no_models):
    rc, _, err = run_cli(GEN + ["--variant", "t2v-lite-sft-5s", "--image", str(png)], capsys)
    assert rc == 2 and "--image is given but t2v-lite-sft-5s is a T2V model. Remove --image" in err


def test_missing_image_file(tmp_path, capsys, no_models):
    rc, _, err = run_cli(GEN + ["--variant", "i2v-lite-5s", "--image", str(tmp_path / "nope.png")], capsys)
    assert rc == 2 and "nope.png" in err and "does not exist" in err


def test_existing_output_refused_before_loading(tmp_path, capsys, no_models):
    out = tmp_path / "x.mp4"
    out.write_bytes(b"keep")
    rc, _, err = run_cli(GEN + ["--variant", "t2v-lite-sft-5s", "--output", str(out)], capsys)
    assert rc == 2 and "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"keep"


def test_explicit_path_missing(tmp_path, capsys, no_models):
    rc, _, err = run_cli(
        GEN + ["--variant", "t2i-lite", "--dit", str(tmp_path / "d.safetensors"), "--output", str(tmp_path / "o.png")],
        capsys,
    )
    assert rc == 2 and "--dit" in err and "d.safetensors" in err


def test_offline_generate_names_missing_files_and_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("run() called with files missing"))
    models = tmp_path / "models"
    rc, _, err = run_cli(
        GEN + ["--variant", "t2v-lite-sft-5s", "--models-dir", str(models), "--output", str(tmp_path / "o.mp4")],
        capsys,
    )
    assert rc == 2
    assert "6 file(s)" in err and f"download --variant t2v-lite-sft-5s --models-dir {models}" in err
    assert str(models / "diffusion_models" / "kandinsky5lite_t2v_sft_5s.safetensors") in err


def test_resolved_request_reaches_run(tmp_path, capsys, monkeypatch, png):
    """Defaults come from the table; the i2v size is the official resize_image rule (i2v_pipeline.py):
    500x300, k = sqrt(393216 / 150000) / 16 = 0.101193 -> 50.60 -> 51*16 = 816, 30.36 -> 30*16 = 480."""
    seen = {}

    def fake_run(request, models, **kw):
        import torch

        seen.update(request=request, models=models, kw=kw)
        return torch.zeros(request.frames, request.height, request.width, 3, dtype=torch.uint8)

    monkeypatch.setattr(pipeline, "run", fake_run)
    out = tmp_path / "o.mp4"
    rc, stdout, err = run_cli(
        GEN
        + ["--variant", "i2v-lite-5s", "--image", str(png), "--frames", "9", "--output", str(out), "--quiet"]
        + fake_model_args(tmp_path),
        capsys,
    )
    assert rc == 0, err
    r = seen["request"]
    assert (r.width, r.height, r.frames, r.steps, r.guidance, r.scheduler_scale) == (816, 480, 9, 50, 5.0, 10.0)
    assert r.image.shape == (3, 480, 816)
    assert r.negative == pipeline.VIDEO_NEGATIVE
    assert seen["models"].dit == tmp_path / "dit.safetensors"
    assert out.is_file() and "wrote" in stdout


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr(pipeline, "resolve_request", boom)
    with pytest.raises(RuntimeError, match="bug"):
        cli.main(GEN + ["--variant", "t2i-lite", "--output", str(tmp_path / "o.png")])
