"""Bad input and faults through the CLI (issue 11): crops that must not collapse, size limits before anything
loads, outputs that cannot be written, EXIF / 16-bit images, non-finite numbers, and one-line messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fake_model_files import fake_model_args
from PIL import Image

from kandinsky_core import cli, download, pipeline

GEN = ["generate", "--prompt", "a fox", "--quiet"]


@pytest.fixture
def fake_run(monkeypatch, tmp_path):
    """pipeline.run replaced by one that records the request and returns grey frames; explicit model paths."""
    seen: dict = {}

    def run(request, models, **kw):
        seen.update(request=request, models=models, kw=kw, runs=seen.get("runs", 0) + 1)
        return torch.full((request.frames, request.height, request.width, 3), 128, dtype=torch.uint8)

    monkeypatch.setattr(pipeline, "run", run)
    seen["args"] = fake_model_args(tmp_path)
    return seen


@pytest.fixture
def no_models(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("a model file was looked up or loaded before the arguments were validated")

    monkeypatch.setattr(pipeline, "run", forbidden)
    monkeypatch.setattr(download, "ensure_files", forbidden)
    monkeypatch.setattr(download, "plan_downloads", forbidden)


def cli_error(args: list[str], capsys) -> str:
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def save_png(path, w: int, h: int, **kw) -> str:
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, **kw)
    return str(path)


# --- 2: the resize-and-crop of the input image never collapses -------------------------------------------------------


@pytest.mark.parametrize(
    "variant, image, size",
    [("i2i-lite", (800, 600), (1408, 640)), ("i2v-lite-5s", (116, 116), (112, 112)), ("i2i-lite", (800, 600), None)],
)
def test_cli_start_image_is_cropped_to_the_asked_size(tmp_path, capsys, fake_run, variant, image, size):
    png = save_png(tmp_path / "in.png", *image)
    out = tmp_path / ("o.png" if variant.startswith("i2i") else "o.mp4")
    extra = [] if size is None else ["--width", str(size[0]), "--height", str(size[1])]
    frames = [] if variant.startswith("i2i") else ["--frames", "1"]
    args = ["--variant", variant, "--image", png, "--output", str(out), *extra, *frames, *fake_run["args"]]
    rc = cli.main(GEN + args)
    assert rc == 0, capsys.readouterr().err
    r = fake_run["request"]
    assert r.image.shape == (3, r.height, r.width)
    if size is not None:
        assert (r.width, r.height) == size


# --- 4: finished runs are never lost at the end -----------------------------------------------------------------------


def test_refused_output_creates_no_folder(tmp_path, capsys, no_models):
    err = cli_error(GEN + ["--variant", "t2i-lite", "--output", str(tmp_path / "newdir" / "x.txt")], capsys)
    assert "must end in .png" in err
    assert not (tmp_path / "newdir").exists()


@pytest.mark.parametrize("where", ["file_as_folder", "file_as_parent", "sys"])
def test_unwritable_output_is_refused_before_anything_loads(tmp_path, capsys, no_models, where):
    (tmp_path / "a_file").write_text("keep")
    output = {
        "file_as_folder": tmp_path / "a_file" / "out.png",
        "file_as_parent": tmp_path / "a_file" / "sub" / "out.png",
        "sys": "/sys/kernel/kandinsky5-test/out.png",
    }[where]
    err = cli_error(GEN + ["--variant", "t2i-lite", "--output", str(output)], capsys)
    if where == "sys":
        assert "Output folder '/sys/kernel/kandinsky5-test' cannot be written" in err, err
        assert not Path("/sys/kernel/kandinsky5-test").exists()
    else:
        assert f"{str(tmp_path / 'a_file')!r} is not a folder (it is a file)" in err, err
    assert "Choose another --output" in err
    assert (tmp_path / "a_file").read_text() == "keep"


def test_result_is_kept_when_the_final_write_fails(tmp_path, capsys, monkeypatch, fake_run):
    """The output folder is replaced by a file while the model runs: the write fails, the frames are kept in the
    temporary folder, and the message says where."""
    import shutil

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    outdir = tmp_path / "out"
    run = pipeline.run

    def run_then_break_the_folder(request, models, **kw):
        frames = run(request, models, **kw)
        shutil.rmtree(outdir)
        outdir.write_text("now a file")
        return frames

    monkeypatch.setattr(pipeline, "run", run_then_break_the_folder)
    err = cli_error(GEN + ["--variant", "t2i-lite", "--output", str(outdir / "o.png"), *fake_run["args"]], capsys)
    assert f"The result could not be written to {str(outdir / 'o.png')!r}" in err, err
    kept = list((tmp_path / "tmp").glob("kandinsky5-rescued-o-*.png"))
    assert len(kept) == 1 and f"It was kept in {kept[0]} instead" in err
    assert np.asarray(Image.open(kept[0])).shape == (1024, 1024, 3)


def test_queue_output_dir_under_a_file_is_refused_before_queueing(tmp_path, capsys):
    (tmp_path / "a_file").write_text("keep")
    workflow = str(Path(__file__).resolve().parents[1] / "workflows" / "api" / "t2i-lite.json")
    err = cli_error(["queue", workflow, "--server", "http://127.0.0.1:9", "--output-dir",
                     str(tmp_path / "a_file" / "out")], capsys)  # fmt: skip
    assert "--output-dir" in err and "is not a folder (it is a file)" in err, err


# --- 3: the CLI refuses sizes by the nodes' rules, before anything loads ---------------------------------------------


@pytest.mark.parametrize(
    "variant, size, expected",
    [
        (
            "t2v-lite-sft-5s",
            (100000, 512),
            "width=100000 must be a multiple of 16 px between 16 and 4096. Nearest: 4096.",
        ),
        (
            "t2v-lite-sft-5s",
            (4096, 4096),
            "width x height = 4096x4096 is too large for t2v-lite-sft-5s (SD, trained at",
        ),
        ("t2i-lite", (4112, 1024), "width=4112 must be a multiple of 16 px between 16 and 4096. Nearest: 4096."),
        ("t2v-lite-sft-5s", (1280, 768), "or load a Pro HD model"),
    ],
)
def test_cli_sizes_are_refused_by_the_nodes_rules_before_loading(capsys, no_models, tmp_path, variant, size, expected):
    out = tmp_path / ("o.mp4" if "v" in variant.split("-")[0] else "o.png")
    args = ["--variant", variant, "--width", str(size[0]), "--height", str(size[1]), "--output", str(out)]
    err = cli_error(GEN + args + (["--frames", "1"] if out.suffix == ".mp4" else []), capsys)
    assert expected in err, err
    # the node refuses the same size with the same words (one validation layer)
    from kandinsky_core.settings import resolve

    _, problems = resolve(variant, width=size[0], height=size[1], length=1)
    assert [expected in p.message for p in problems] == [True], problems


# --- 5: no silent wrong results ---------------------------------------------------------------------------------------


def test_cli_start_image_honours_exif_orientation(tmp_path, capsys, fake_run):
    """A portrait photo stored sideways with EXIF orientation 6 (as phones save them) is read upright, as ComfyUI's
    LoadImage shows it: the automatic size is the portrait one and the red top stays on top."""
    shown = np.zeros((600, 400, 3), dtype=np.uint8)
    shown[:300, :, 0] = 255  # red top half
    shown[300:, :, 2] = 255  # blue bottom half
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)  # 600x400 landscape on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show"
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)
    rc = cli.main(GEN + ["--variant", "i2v-lite-5s", "--image", str(path), "--frames", "1",
                         "--output", str(tmp_path / "o.mp4"), *fake_run["args"]])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    r = fake_run["request"]
    assert (r.width, r.height) == (512, 768)
    top, bottom = r.image[:, :300].float().mean((1, 2)), r.image[:, -300:].float().mean((1, 2))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50, (top, bottom)


def test_cli_16_bit_png_is_scaled_not_clipped(tmp_path, capsys, fake_run):
    g = np.random.default_rng(0)
    grey = g.integers(0, 65536, (512, 768), dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")
    rc = cli.main(GEN + ["--variant", "i2v-lite-5s", "--image", str(path), "--frames", "1",
                         "--output", str(tmp_path / "o.mp4"), *fake_run["args"]])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    got = fake_run["request"].image.float()
    assert got.shape == (3, 512, 768)
    assert abs(got.mean().item() - grey.mean() / 257) < 0.6, got.mean()
    assert torch.equal(got[0], got[2])


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--guidance", "inf", "guidance=inf is not allowed: give a finite number from -1 to 30"),
        ("--guidance", "nan", "guidance=nan is not allowed: give a finite number from -1 to 30"),
        ("--scheduler-scale", "inf", "scheduler_scale=inf is not allowed: give a finite number from 0 to 50"),
        ("--scheduler-scale", "nan", "scheduler_scale=nan is not allowed"),
    ],
)
def test_cli_non_finite_guidance_and_scheduler_scale_are_refused(capsys, no_models, tmp_path, flag, value, expected):
    err = cli_error(GEN + ["--variant", "t2i-lite", flag, value, "--output", str(tmp_path / "o.png")], capsys)
    assert expected in err, err


# --- 7: validation gaps on the CLI side -------------------------------------------------------------------------------


def test_cli_block_swap_beyond_the_blocks_is_refused_before_loading(capsys, no_models, tmp_path):
    args = ["--variant", "t2v-lite-sft-5s", "--block-swap", "1000", "--output", str(tmp_path / "o.mp4")]
    err = cli_error(GEN + args, capsys)
    assert "--block-swap=1000: t2v-lite-sft-5s has 32 visual blocks. Use 0 .. 32" in err, err


def test_cli_i2v_size_far_above_the_trained_area_is_refused_before_loading(capsys, no_models, tmp_path):
    png = save_png(tmp_path / "in.png", 64, 64)
    args = ["--variant", "i2v-lite-5s", "--image", png, "--width", "1024", "--height", "1024"]
    err = cli_error(GEN + args + ["--output", str(tmp_path / "o.mp4")], capsys)
    assert "width x height = 1024x1024 is too large for i2v-lite-5s" in err, err


def test_download_does_not_call_a_truncated_dit_present(tmp_path, capsys, monkeypatch):
    from tiny import TINY_ARCHS, make_tiny_dit_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dit = tmp_path / "models" / "diffusion_models" / "kandinsky5lite_t2v_sft_5s.safetensors"
    make_tiny_dit_file(dit, TINY_ARCHS["lite"])
    dit.write_bytes(dit.read_bytes()[:1000])  # an interrupted download
    cli.main(["download", "--variant", "t2v-lite-sft-5s", "--models-dir", str(tmp_path / "models")])
    out = capsys.readouterr().out
    assert "dit   present" not in out, out
    assert f"dit   broken:  {dit} is truncated (an interrupted download); fetching it again" in out, out


# --- 9: one-line messages instead of raw exceptions -------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, expected",
    [("mps", "--device mps was asked for but this machine has no Apple MPS"), ("meta", "--device meta cannot run")],
)
def test_cli_absent_device_is_refused_before_loading(capsys, no_models, tmp_path, device, expected):
    err = cli_error(GEN + ["--variant", "t2i-lite", "--device", device, "--output", str(tmp_path / "o.png")], capsys)
    assert expected in err, err


def test_cli_decompression_bomb_image_is_refused_with_a_message(capsys, no_models, tmp_path, monkeypatch):
    """Pillow refuses images over twice MAX_IMAGE_PIXELS; the limit is lowered here so a small file is one."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    png = save_png(tmp_path / "bomb.png", 100, 100)
    err = cli_error(GEN + ["--variant", "i2v-lite-5s", "--image", png, "--output", str(tmp_path / "o.mp4")], capsys)
    assert "cannot be read as an image" in err and "decompression bomb" in err, err


@pytest.mark.parametrize("image", ["folder", "/dev/zero"])
def test_cli_image_that_is_not_a_file_is_named_as_such(capsys, no_models, tmp_path, image):
    path = str(tmp_path) if image == "folder" else image
    err = cli_error(GEN + ["--variant", "i2v-lite-5s", "--image", path, "--output", str(tmp_path / "o.mp4")], capsys)
    assert f"Input image {path!r} is not a regular file (a folder or device)" in err, err
    assert "does not exist" not in err


# --- 6: Ctrl-C ends the CLI with one line -----------------------------------------------------------------------------


def test_ctrl_c_during_generation_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, fake_run):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run", interrupted)
    out = tmp_path / "o.png"
    rc = cli.main(GEN + ["--variant", "t2i-lite", "--output", str(out), *fake_run["args"]])
    err = capsys.readouterr().err
    assert rc == 130
    assert err.strip() == "stopped (Ctrl-C): generate was interrupted; nothing was written.", err
    assert not out.exists() and list(tmp_path.glob(".o.*")) == []
