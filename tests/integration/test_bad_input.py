"""Bad input and faults in a real ComfyUI (issue 11): ComfyUI's single-file text encoders, sizes and values refused
at validation (a 400 with node_errors) instead of after sampling, files outside the model folders, and messages
that name the input and the fix instead of raw exceptions."""

from __future__ import annotations

import time

import comfy_graphs as graphs
import numpy as np
import pytest
from comfy_server import CLIP, CLIP_FILE, FLUX_VAE, FRAMES, HUNYUAN_VAE, QWEN, QWEN_FILE, QWEN_FP8_FILE, H, W
from PIL import Image
from test_comfyui import PROMPT, dit_name

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("qwen", [QWEN_FILE, QWEN_FP8_FILE])
def test_single_file_text_encoders_run_with_comfyuis_bundled_tokenizers(comfyui, qwen):
    """ComfyUI's comfy/ has no __init__.py (comfy.__file__ is None): the tokenizers are found all the same."""
    g = graphs.text2x(dit_name(comfyui, "t2i-lite"), FLUX_VAE, qwen, CLIP_FILE, PROMPT, W, H, 1, seed=3,
                      prefix=f"single_{qwen[:-12]}")  # fmt: skip
    files = comfyui.output_files(comfyui.run(g), "7")
    assert len(files) == 1
    image = np.asarray(Image.open(files[0]).convert("RGB"))
    assert image.shape == (H, W, 3) and image.std() > 5


def validation_errors(comfyui, graph: dict) -> str:
    """The node_errors of a refused prompt (400), as one string to search."""
    status, body = comfyui.queue(graph)
    assert status == 400, (status, str(body)[:2000])
    assert body["error"]["type"] == "prompt_outputs_failed_validation", body
    return " | ".join(
        f"{node}: {e['message']} {e.get('details', '')}"
        for node, errs in body["node_errors"].items()
        for e in errs["errors"]
    )


def t2v(comfyui, **sampler) -> dict:
    return graphs.text2x(dit_name(comfyui, "t2v-lite-sft-5s"), HUNYUAN_VAE, QWEN, CLIP, PROMPT, W, H, FRAMES, seed=0,
                         prefix="never_written", **sampler)  # fmt: skip


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(guidance=float("nan")), "guidance=nan is not allowed: give a finite number from -1 to 30"),
        (dict(scheduler_scale=float("nan")), "scheduler_scale=nan is not allowed: give a finite number from 0 to 50"),
        (dict(guidance=float("inf")), "guidance=inf is not allowed"),
    ],
)
def test_non_finite_guidance_or_scheduler_scale_is_refused_at_validation(comfyui, change, expected):
    errors = validation_errors(comfyui, t2v(comfyui, **change))
    assert "5:" in errors and expected in errors, errors
    assert not list((comfyui.base / "output").glob("never_written*"))


def execution_error(comfyui, graph: dict) -> dict:
    status, body = comfyui.queue(graph)
    assert status == 200, body
    entry = comfyui.wait(body["prompt_id"], timeout=120)
    assert entry["status"]["status_str"] == "error", entry["status"]
    return dict(entry["status"]["messages"])["execution_error"]


def i2v(comfyui, width: int = W, height: int = H) -> dict:
    image = comfyui.base / "input" / "start_800x600.png"
    if not image.exists():
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(image)
    g = graphs.text2x(dit_name(comfyui, "i2v-lite-5s"), HUNYUAN_VAE, QWEN, CLIP, PROMPT, width, height, FRAMES,
                      seed=0, prefix="never_written")  # fmt: skip
    return graphs.with_start_image(g, image.name, width, height)


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(tile_px=100), "tile_px=100, overlap_px=64, tile_frames=16, overlap_frames=8 is not usable"),
        (dict(overlap_px=192), "overlap_px=192"),
        (dict(overlap_frames=12), "overlap_frames=12 is not usable"),
        (dict(overlap_frames=12, tiling="off"), "overlap_frames=12 is not usable"),
        (dict(tile_px=4096), "tile_px=4096 is out of range. Allowed: 64 to 2048."),
    ],
)
def test_unusable_vae_tiling_is_refused_at_validation(comfyui, change, expected):
    g = t2v(comfyui)
    g["6"]["inputs"].update(change)
    errors = validation_errors(comfyui, g)
    assert "6:" in errors and expected in errors, errors


@pytest.mark.parametrize(
    "size, expected",
    [
        ((4112, 4112), "width=4112 must be a multiple of 16 px between 16 and 4096. Nearest: 4096."),
        ((100000, 512), "width=100000 must be a multiple of 16 px between 16 and 4096. Nearest: 4096."),
    ],
)
def test_vae_encode_size_beyond_4096_is_refused_at_validation(comfyui, size, expected):
    g = i2v(comfyui)
    g["9"]["inputs"].update(width=size[0], height=size[1])
    errors = validation_errors(comfyui, g)
    assert "9:" in errors and expected in errors, errors


def test_sampler_width_that_is_not_a_number_is_refused_with_a_message(comfyui):
    g = t2v(comfyui)
    g["5"]["inputs"]["width"] = "abc"
    errors = validation_errors(comfyui, g)
    assert "5:" in errors and "width='abc' is not a whole number of pixels" in errors, errors
    assert "not supported" not in errors


def refusals(comfyui, graph: dict) -> dict[tuple[str, str], list[str]]:
    """A refused prompt's node errors as ComfyUI sends them: (node, input) -> the lines of its details."""
    status, body = comfyui.queue(graph)
    assert status == 400, (status, str(body)[:2000])
    out = {}
    for node, errs in body["node_errors"].items():
        for e in errs["errors"]:
            name = e["extra_info"].get("input_name", "")
            out[(node, name)] = e["details"].removeprefix(f"{name} - ").split("\n")
    return out


@pytest.mark.parametrize("size", [(1024, 1024), (4096, 4096)])
def test_i2v_size_far_above_the_trained_area_is_refused_when_queued(comfyui, size):
    errors = validation_errors(comfyui, i2v(comfyui, *size))
    assert f"5: Custom validation failed for node width - width x height = {size[0]}x{size[1]} is too large for " \
        "i2v-lite-5s" in errors, errors  # fmt: skip
    assert not list((comfyui.base / "output").glob("never_written*"))


# Mismatches between the files a graph loads and what it asks of them: refused when queued (a 400 naming the
# node and input), not after the models loaded or the sampling ran. The sampler, VAE Decode and VAE Encode follow
# their links in the queued graph back to the loaders (nodes/queued_graph.py).


def test_t2i_model_with_the_hunyuan_vae_is_refused_when_queued(comfyui):
    g = graphs.text2x(dit_name(comfyui, "t2i-lite"), HUNYUAN_VAE, QWEN, CLIP, PROMPT, W, H, 1, seed=0,
                      prefix="never_written")  # fmt: skip
    found = refusals(comfyui, g)
    assert found[("6", "vae")] == [
        f"vae: {HUNYUAN_VAE} is the HunyuanVideo VAE (hunyuan_video_vae_bf16.safetensors, video models), but the "
        "samples come from kandinsky5lite_t2i.safetensors, a t2i-lite model made for the FLUX VAE (ae.safetensors, "
        "image models). Pick that one in Load Kandinsky 5 VAE."
    ], found
    assert set(found) == {("6", "vae"), ("6", "tile_px"), ("6", "overlap_px"), ("6", "tile_frames"),
                          ("6", "overlap_frames"), ("6", "samples")}  # fmt: skip
    assert not list((comfyui.base / "output").glob("never_written*"))


def test_i2v_graph_with_a_video_model_and_an_image_vae_is_refused_at_vae_encode(comfyui):
    g = i2v(comfyui)
    g["3"]["inputs"]["vae_name"] = FLUX_VAE
    g["9"]["inputs"]["model"] = ["1", 0]
    found = refusals(comfyui, g)
    assert any(line.startswith(f"vae: {FLUX_VAE} is the FLUX VAE") and "i2v-lite-5s" in line
               for line in found[("9", "vae")]), found  # fmt: skip
    assert any(line.startswith(f"vae: {FLUX_VAE} is the FLUX VAE") for line in found[("6", "vae")]), found


def test_t2v_file_in_an_i2v_graph_is_refused_when_queued(comfyui):
    g = i2v(comfyui)
    g["1"]["inputs"]["dit_name"] = dit_name(comfyui, "t2v-lite-sft-5s")
    found = refusals(comfyui, g)
    expected = "start_latent is given but t2v-lite-sft-5s is a T2V model. Disconnect it, or load an I2V model."
    assert expected in found[("5", "start_latent")], found
    assert not list((comfyui.base / "output").glob("never_written*"))


def test_i2v_file_without_a_start_image_is_refused_when_queued(comfyui):
    g = graphs.text2x(dit_name(comfyui, "i2v-lite-5s"), HUNYUAN_VAE, QWEN, CLIP, PROMPT, W, H, FRAMES, seed=0,
                      prefix="never_written")  # fmt: skip
    errors = validation_errors(comfyui, g)
    assert "start_latent: i2v-lite-5s is an image-to-video model and needs a start image. Encode one with " \
        "Kandinsky 5 VAE Encode and connect it to start_latent" in errors, errors  # fmt: skip


def test_released_file_run_as_another_variant_is_refused_when_queued(comfyui):
    """The T2V and I2V Lite files hold the same tensors: the released T2V file run with the I2V variant's settings
    (as a 10 s file with the 5 s variant's would be: tests/test_loading.py checks those at full size)."""
    g = t2v(comfyui)
    g["1"]["inputs"]["variant"] = "i2v-lite-5s"
    found = refusals(comfyui, g)
    (line,) = found[("1", "variant")]
    assert line.startswith(
        "variant: variant 'i2v-lite-5s' does not fit 'kandinsky5lite_t2v_sft_5s.safetensors': that is the released "
        "t2v-lite-sft-5s file"
    ), line
    assert "Set variant to auto (or t2v-lite-sft-5s)" in line


def test_nabla_size_of_the_variant_is_refused_when_queued_with_every_problem_under_its_input(comfyui):
    """The sampler knows the variant (and the NABLA node on the way) at validation: NABLA's 128-px tiles, the
    frame count and guidance are each refused once, under their own input, all in one answer."""
    g = t2v(comfyui, guidance=99.0)
    g["5"]["inputs"].update(width=1040, length=130)
    tuning = {"mode.P": 0.0, "mode.wT": 0, "mode.wH": 0, "mode.wW": 0}  # v0.33.0's DynamicCombo (0 = the variant's)
    g["10"] = {"class_type": "K5Nabla", "inputs": {"model": ["1", 0], "mode": "on", **tuning}}
    g["5"]["inputs"]["model"] = ["10", 0]
    found = refusals(comfyui, g)
    lines = found[("5", "width")]
    assert any(x.startswith("width=1040 must be a multiple of 128 px") for x in lines), lines
    assert any(x.startswith("length=130 frames must be 4k+1") for x in lines), lines
    assert any(x.startswith("guidance=99.0 is not allowed") for x in lines), lines
    # ComfyUI repeats the node's message under every input its validate_inputs takes; each line starts with the
    # input it concerns, so that the front end (js/kandinsky5.js) shows it once, there.
    inputs = {"width", "height", "length", "guidance", "scheduler_scale", "model", "positive", "negative"}
    for line in lines:
        assert line.split("=")[0].split(" ")[0].rstrip(":") in inputs, line


def test_qwen_of_the_wrong_width_is_named_with_the_fix(comfyui):
    from comfy_server import QWEN_WIDE

    g = graphs.text2x(dit_name(comfyui, "t2v-lite-sft-5s"), HUNYUAN_VAE, QWEN_WIDE, CLIP, PROMPT, W, H, FRAMES,
                      seed=0, prefix="never_written")  # fmt: skip
    err = execution_error(comfyui, g)
    assert err["node_id"] == "5", err
    msg = err["exception_message"]
    assert "positive was encoded by text encoders 64 (Qwen) / 32 (CLIP) wide, but t2v-lite-sft-5s takes" in msg, msg
    assert "qwen_2.5_vl_7b" in msg and "Connect the Kandinsky 5 text encoder output" not in msg


def test_magcache_calibrate_prefix_too_long_for_a_file_name_is_refused_at_validation(comfyui):
    g = t2v(comfyui)
    g["10"] = {"class_type": "K5MagCacheCalibrate", "inputs": {"model": ["1", 0], "filename_prefix": "p" * 300}}
    g["5"]["inputs"]["model"] = ["10", 0]
    errors = validation_errors(comfyui, g)
    assert "10:" in errors and "filename_prefix is 300 characters long: at most 160" in errors, errors


@pytest.mark.parametrize("folder", ["qwen_escape_relative/", "qwen_escape_absolute/"])
def test_index_naming_a_shard_outside_the_folder_is_refused_at_validation(comfyui, folder):
    g = t2v(comfyui)
    g["2"]["inputs"]["qwen_name"] = folder
    errors = validation_errors(comfyui, g)
    assert "2:" in errors and "names shards outside its folder" in errors, errors
    assert "only files inside" in errors


def rewrite_header(src, dst, change) -> None:
    """A copy of the safetensors file `src` whose JSON header went through `change(header)`."""
    import json
    import struct

    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    new = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def first_tensor(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


@pytest.mark.parametrize(
    "fault, change, expected",
    [
        (
            "dtype",
            lambda h: first_tensor(h).update(dtype="Z9"),
            "has the dtype 'Z9', which safetensors does not define",
        ),
        ("offsets", lambda h: first_tensor(h).update(data_offsets=[0, 3]), "has data offsets [0, 3] that do not fit"),
    ],
)
def test_corrupt_dit_header_is_refused_at_validation(comfyui, fault, change, expected):
    src = comfyui.models["dit"]["t2v-lite-sft-5s"]
    name = f"corrupt_{fault}.safetensors"
    rewrite_header(src, src.parent / name, change)
    try:
        g = t2v(comfyui)
        g["1"]["inputs"]["dit_name"] = name
        errors = validation_errors(comfyui, g)
        assert "1:" in errors and expected in errors and "re-download" in errors, errors
        assert "SafetensorError" not in errors
    finally:
        (src.parent / name).unlink()


def test_broken_tokenizer_is_named_with_the_fix(comfyui):
    import shutil

    from comfy_server import QWEN as QWEN_DIR

    folder = comfyui.base / "models" / "text_encoders" / "qwen_broken_tokenizer"
    shutil.copytree(comfyui.base / "models" / "text_encoders" / QWEN_DIR.rstrip("/"), folder)
    (folder / "vocab.json").write_text('{"broken": ')
    try:
        g = t2v(comfyui)
        g["2"]["inputs"]["qwen_name"] = "qwen_broken_tokenizer/"
        err = execution_error(comfyui, g)
        assert err["node_id"] == "2" and err["exception_type"].endswith("WeightsError"), err
        assert "The Qwen2.5-VL tokenizer in" in err["exception_message"]
        assert "are broken or incomplete: download them again" in err["exception_message"]
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("fifo", "is not a regular file (a FIFO, device, socket or a link to one)"),
        ("dev_zero_link", "is not a regular file (a FIFO, device, socket or a link to one)"),
        ("dangling_link", "is a broken link in ComfyUI's diffusion_models folder: it points to"),
    ],
)
def test_odd_entries_in_the_models_folder_are_named_for_what_they_are(comfyui, kind, expected):
    import os

    entry = comfyui.base / "models" / "diffusion_models" / f"{kind}.safetensors"
    if kind == "fifo":
        os.mkfifo(entry)
    else:
        entry.symlink_to("/dev/zero" if kind == "dev_zero_link" else comfyui.base / "nowhere.safetensors")
    try:
        g = t2v(comfyui)
        g["1"]["inputs"]["dit_name"] = entry.name
        errors = validation_errors(comfyui, g)
        assert "1:" in errors and expected in errors, errors
        assert "is not in ComfyUI's" not in errors
    finally:
        entry.unlink()


def test_negative_magcache_ratio_is_refused_at_validation_with_its_own_message(comfyui):
    g = t2v(comfyui)
    inputs = {"model": ["1", 0], "threshold": 0.12, "K": 2, "retention": 0.2, "ratios": "1.0, -0.5, 1.0"}
    g["10"] = {"class_type": "K5MagCache", "inputs": inputs}
    g["5"]["inputs"]["model"] = ["10", 0]
    errors = validation_errors(comfyui, g)
    assert "10:" in errors and "MagCache ratios must be a non-empty list of numbers >= 0" in errors, errors
    assert "not a list of numbers" not in errors


# --- 6: Cancel stops every stage within one block; the next prompt runs ---------------------------------------------

SLOW = 1.0  # s each slowed block sleeps (after it ran)


def executing_since(comfyui, node: str, since: float) -> float | None:
    for t, kind, m in comfyui.ws.snapshot():
        if kind == "json" and t > since and m.get("type") == "executing" and m["data"].get("node") == node:
            return t
    return None


def interrupted_since(comfyui, since: float) -> float | None:
    for t, kind, m in comfyui.ws.snapshot():
        if kind == "json" and t > since and m.get("type") == "execution_interrupted":
            return t
    return None


def cancel_in_the_middle(comfyui, graph: dict, node: str, classes: str, blocks_in_stage: int) -> None:
    """Queue `graph` with the blocks of `classes` slowed, press Cancel while `node` runs, and check it stopped in
    that node within about one block, long before the stage could have ended; then a short prompt succeeds."""
    slow = comfyui.base / "slow_blocks"
    slow.write_text(f"{SLOW} {classes}")
    try:
        started = time.monotonic()
        status, body = comfyui.queue(graph)
        assert status == 200, body
        deadline = started + 120
        while (began := executing_since(comfyui, node, started)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert began is not None, comfyui.log_tail()
        time.sleep(0.5 * SLOW)  # inside the stage: in its first block (or, for the sampler, its first step)
        assert comfyui.request("/interrupt", {})[0] == 200
        pressed = time.monotonic()
        entry = comfyui.wait(body["prompt_id"], timeout=120)
        # the WebSocket event may trail the history entry a little
        deadline = time.monotonic() + 10
        while (stopped := interrupted_since(comfyui, started)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        slow.unlink()
    messages = dict(entry["status"]["messages"])
    assert "execution_interrupted" in messages, entry["status"]
    assert messages["execution_interrupted"]["node_id"] == node, messages["execution_interrupted"]
    assert stopped is not None, "no execution_interrupted event on the WebSocket"
    # within the block that was running (its sleep), where the stage had many more to go
    assert stopped - pressed < SLOW + 0.6, stopped - pressed
    assert (blocks_in_stage * SLOW) - (pressed - began) > 3 * SLOW
    short = t2v(comfyui)
    short["4"]["inputs"]["prompt"] = f"after a cancel {time.monotonic()}"
    short["7"]["inputs"]["filename_prefix"] = "after_cancel"
    assert len(comfyui.output_files(comfyui.run(short), "7")) == FRAMES


def fresh(comfyui, **sampler) -> dict:
    g = t2v(comfyui, **sampler)
    g["4"]["inputs"]["prompt"] = f"{PROMPT} {time.monotonic()}"  # not cached from an earlier prompt
    return g


def test_cancel_stops_text_encode_within_a_layer(comfyui):
    # 2 prompts x (2 Qwen + 2 CLIP layers)
    cancel_in_the_middle(comfyui, fresh(comfyui), "4", "Qwen2_5_VLDecoderLayer CLIPEncoderLayer", 8)


def test_cancel_stops_prompt_expansion_within_a_token(comfyui):
    g = graphs.loaders(dit_name(comfyui, "t2v-lite-sft-5s"), HUNYUAN_VAE, QWEN, CLIP)
    del g["3"]
    g["4"] = {"class_type": "K5PromptExpansion",
              "inputs": {"text_encoders": ["2", 0], "prompt": f"a fox {time.monotonic()}", "template": "video",
                         "seed": 1, "max_new_tokens": 64}}  # fmt: skip
    g["7"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}}
    # the prompt's prefill, then 2 Qwen layers per token: at least a few tokens
    cancel_in_the_middle(comfyui, g, "4", "Qwen2_5_VLDecoderLayer", 10)


def test_cancel_stops_sampling_within_a_dit_block(comfyui):
    from comfy_server import tiny_archs

    arch = tiny_archs()["t2v-lite-sft-5s"]
    per_step = 2 * (arch.num_text_blocks + arch.num_visual_blocks)  # with CFG
    cancel_in_the_middle(comfyui, fresh(comfyui, steps=8), "5", "TextBlock VisualBlock", 4 * per_step)


def test_cancel_stops_vae_decode_within_a_block(comfyui):
    from kandinsky_core.cancel import blocks  # noqa: F401 - the rule the server applies

    g = fresh(comfyui)
    g["6"]["inputs"].update(tiling="on", tile_px=64, overlap_px=16)  # several tiles, every one with its blocks
    cancel_in_the_middle(comfyui, g, "6", "ResnetBlock", 10)
