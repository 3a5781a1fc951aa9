"""The pack inside a real headless ComfyUI: /object_info, --quick-test-for-ci, T2V / I2V / T2I / I2I graphs through
POST /prompt compared frame by frame with kandinsky_core run directly, interrupt, and bad inputs."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import comfy_graphs as graphs
import numpy as np
import pytest
import torch
from comfy_server import CLIP, FLUX_VAE, FRAMES, HUNYUAN_VAE, PACK, QWEN, H, W
from node_ids_expected import EXPECTED_IDS
from PIL import Image

from kandinsky_core import pipeline
from kandinsky_core.download import ModelPaths

pytestmark = pytest.mark.integration

PROMPT = "a red fox running through fresh snow"


def dit_name(comfyui, variant: str) -> str:
    return comfyui.models["dit"][variant].name


def reference(comfyui, variant: str, vae: str, seed: int, frames: int, image: torch.Tensor | None = None):
    """kandinsky_core on the same tiny files, in this process: uint8 frames [F, H, W, 3]."""
    m = comfyui.models
    request = pipeline.resolve_request(
        variant, PROMPT, negative=graphs.NEGATIVE, width=W, height=H, frames=frames, seed=seed, steps=2, image=image
    )
    paths = ModelPaths(dit=m["dit"][variant], qwen=m["qwen"], clip=m["clip"], vae=m[vae])
    return pipeline.run(request, paths, device="cpu", dtype=torch.float32, progress=False)


def read_frames(files: list[Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(np.int16)


def assert_frames_match(got: np.ndarray, want: torch.Tensor) -> None:
    """SaveImage truncates 255 * x where kandinsky_core rounds: one step of 8-bit difference at most, plus float
    noise from comfy.ops casting (the same math); a different seed or model differs by tens on average."""
    want = want.numpy().astype(np.int16)
    assert got.shape == want.shape
    diff = np.abs(got - want)
    assert diff.max() <= 2 and diff.mean() < 0.75, f"max {diff.max()}, mean {diff.mean():.3f}"
    assert want.std() > 5  # not a blank output that would match anything


V3_ONLY_KEYS = ("api_node", "deprecated", "experimental")  # what ComfyUI lists for every V3 node (a V1 node: if set)


def test_every_node_is_a_v3_node_listed_with_its_id_and_tooltips(comfyui):
    status, info = comfyui.request("/object_info")
    assert status == 200
    ours = {name: node for name, node in info.items() if node["python_module"] == f"custom_nodes.{PACK}"}
    # exactly our IDs come from our pack: none is dropped for a core ID, none registered by another module
    assert {name: node["display_name"] for name, node in ours.items()} == EXPECTED_IDS
    for name, node in ours.items():
        assert node["name"] == name and node["category"].startswith("Kandinsky 5/") and node["description"]
        assert all(node.get(key) is False for key in V3_ONLY_KEYS), f"{name} is not listed as a V3 node"
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
                assert not isinstance(spec[0], list), f"{name}.{input_name} is a V1 combo"
        assert len(node["output_tooltips"]) == len(node["output"]) and all(node["output_tooltips"]), name
    # no other custom node pack claims one of our IDs, whichever of two claims ComfyUI kept (the test-only pack's
    # route lists every loaded pack's V1 mappings or V3 node list)
    status, claims = comfyui.request("/k5test/registrations")
    assert status == 200
    mine = {path: ids for path, ids in claims.items() if path.endswith(f"/{PACK}/__init__.py")}
    assert list(mine.values()) == [sorted(EXPECTED_IDS)], claims.keys()
    for path, ids in claims.items():
        assert path in mine or not set(ids) & set(EXPECTED_IDS), f"{path} also registers {set(ids) & set(EXPECTED_IDS)}"
    # no module but ours lists a node under one of our display names (a second pack with the old IDs would)
    others = {n: node["python_module"] for n, node in info.items() if n not in ours}
    assert not [n for n, node in info.items() if n not in ours and node["display_name"] in EXPECTED_IDS.values()]
    assert not set(EXPECTED_IDS) & set(others)
    # VAE Decode's tile sizes are advanced inputs where this release's comfy_api has them (v0.33.0), plain on v0.3.64
    import inspect

    from comfy_api.latest import io

    has_advanced = "advanced" in inspect.signature(io.Int.Input.__init__).parameters
    tile_px = info["K5VAEDecode"]["input"]["required"]["tile_px"][1]
    assert tile_px.get("advanced") is (True if has_advanced else None)
    dit_files = info["K5LoadDiT"]["input"]["required"]["dit_name"][1]["options"]
    assert dit_name(comfyui, "t2v-lite-sft-5s") in dit_files
    assert QWEN in info["K5LoadTextEncoders"]["input"]["required"]["qwen_name"][1]["options"]
    assert HUNYUAN_VAE in info["K5LoadVAE"]["input"]["required"]["vae_name"][1]["options"]


def test_core_node_ids_read_from_the_source_are_the_ones_the_server_registers(comfyui):
    """tests/test_node_ids.py reads core's IDs from ComfyUI's source with ast: every core node of the live server is
    among them, so the disjointness checked there covers all of core."""
    from test_node_ids import node_ids

    status, info = comfyui.request("/object_info")
    core = {n for n, node in info.items() if not node["python_module"].startswith("custom_nodes.")}
    assert len(core) > 300
    assert core <= node_ids.core_ids(Path(os.environ["COMFYUI_DIR"]))


def test_quick_test_for_ci_imports_the_pack_without_failure(comfyui):
    python = os.environ.get("COMFYUI_PYTHON") or "python"
    cmd = [python, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", str(comfyui.base)]
    cmd += ["--database-url", "sqlite:///:memory:"]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run(cmd, cwd=os.environ["COMFYUI_DIR"], env=env, capture_output=True, text=True, timeout=180)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "IMPORT FAILED" not in log, log[-3000:]
    assert f"custom_nodes/{PACK}" in log  # listed under "Import times for custom nodes"


def test_t2v_graph_matches_kandinsky_core(comfyui, tiny_variants):
    g = graphs.text2x(
        dit_name(comfyui, "t2v-lite-sft-5s"), HUNYUAN_VAE, QWEN, CLIP, PROMPT, W, H, FRAMES, seed=7, prefix="t2v"
    )
    since = time.monotonic()
    entry = comfyui.run(g)
    files = comfyui.output_files(entry, "7")
    assert len(files) == FRAMES and all(f.is_file() for f in files)
    got = read_frames(files)
    assert_frames_match(got, reference(comfyui, "t2v-lite-sft-5s", "hunyuan_vae", 7, FRAMES))
    other_seed = reference(comfyui, "t2v-lite-sft-5s", "hunyuan_vae", 8, FRAMES).numpy()
    assert np.abs(got - other_seed).mean() > 5  # the comparison above can fail
    # ComfyUI's progress bar advanced once per step, and latent previews (JPEG over the WebSocket) were sent
    deadline = time.monotonic() + 5
    while len(comfyui.progress("5", since)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [(v, m) for _, v, m in comfyui.progress("5", since)] == [(1, 2), (2, 2)]
    previews = comfyui.previews(since)
    assert len(previews) >= 2 and all(b"JFIF" in p[:64] for p in previews), [p[:16] for p in previews]


def test_i2v_graph_matches_kandinsky_core(comfyui, tiny_variants):
    pixels = np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(comfyui.base / "input" / "start.png")
    g = graphs.text2x(
        dit_name(comfyui, "i2v-lite-5s"), HUNYUAN_VAE, QWEN, CLIP, PROMPT, W, H, FRAMES, seed=9, prefix="i2v"
    )
    graphs.with_start_image(g, "start.png", W, H)
    files = comfyui.output_files(comfyui.run(g), "7")
    assert len(files) == FRAMES
    image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    assert_frames_match(read_frames(files), reference(comfyui, "i2v-lite-5s", "hunyuan_vae", 9, FRAMES, image))


def test_t2i_graph_matches_kandinsky_core(comfyui, tiny_variants):
    g = graphs.text2x(dit_name(comfyui, "t2i-lite"), FLUX_VAE, QWEN, CLIP, PROMPT, W, H, 1, seed=11, prefix="t2i")
    files = comfyui.output_files(comfyui.run(g), "7")
    assert len(files) == 1
    with Image.open(files[0]) as im:
        assert im.size == (W, H)
    assert_frames_match(read_frames(files), reference(comfyui, "t2i-lite", "flux_vae", 11, 1))


def test_i2i_graph_matches_kandinsky_core(comfyui, tiny_variants):
    """The Sampler node with an edit image (I2I): LoadImage -> VAE Encode (FLUX) -> edit_latent, and the image in
    Text Encode, gives kandinsky_core's edit for the same seed (the node scales the LATENT into the DiT's space)."""
    pixels = np.random.default_rng(4).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(comfyui.base / "input" / "edit.png")
    g = graphs.text2x(dit_name(comfyui, "i2i-lite"), FLUX_VAE, QWEN, CLIP, PROMPT, W, H, 1, seed=13, prefix="i2i")
    graphs.with_edit_image(g, "edit.png", W, H)
    files = comfyui.output_files(comfyui.run(g), "7")
    assert len(files) == 1
    image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    assert_frames_match(read_frames(files), reference(comfyui, "i2i-lite", "flux_vae", 13, 1, image))


@pytest.mark.parametrize(
    "variant, vae, image_size, size",
    [
        # i2v_pipeline.py resize_image: 300x500, k = sqrt(393216 / 150000) / 16 = 0.101193 -> 30.36 -> 480,
        # 50.60 -> 816; the whole image, no crop
        ("i2v-lite-5s", "hunyuan_vae", (300, 500), (480, 816)),
        # i2i_pipeline.py find_nearest: h/w 0.52 -> 640x1408 (h, w), then cover-crop
        ("i2i-lite", "flux_vae", (1250, 650), (1408, 640)),
    ],
)
def test_image_sets_the_size_in_vae_encode_and_the_sampler_follows(comfyui, tiny_variants, variant, vae, image_size,
                                                                   size):  # fmt: skip
    """VAE Encode at 0x0 with the DiT connected sizes the image by the official rule, the Sampler at 0x0 follows its
    latent, and the one-frame result is kandinsky_core's for the same image with no size given (I2V one frame: the
    "image" template, as the official pipelines use for one frame)."""
    w, h = image_size
    pixels = np.random.default_rng(5).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(comfyui.base / "input" / "sized.png")
    vae_name = HUNYUAN_VAE if vae == "hunyuan_vae" else FLUX_VAE
    g = graphs.text2x(
        dit_name(comfyui, variant), vae_name, QWEN, CLIP, PROMPT, 0, 0, 1, seed=21, steps=1, prefix=f"sized-{variant}"
    )
    attach = graphs.with_start_image if variant.startswith("i2v") else graphs.with_edit_image
    attach(g, "sized.png", 0, 0)
    g["9"]["inputs"]["model"] = ["1", 0]
    if variant.startswith("i2i"):  # Qwen sees the image as encoded, as the official generate_sample_ti2i shows it
        g["4"]["inputs"]["edit_image"] = ["9", 1]
    g["4"]["inputs"]["template"] = "image" if variant.startswith("i2v") else "auto"
    files = comfyui.output_files(comfyui.run(g), "7")
    with Image.open(files[0]) as im:
        assert im.size == size
    m = comfyui.models
    image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    request = pipeline.resolve_request(
        variant, PROMPT, negative=graphs.NEGATIVE, frames=1, seed=21, steps=1, image=image
    )
    assert (request.width, request.height) == size
    paths = ModelPaths(dit=m["dit"][variant], qwen=m["qwen"], clip=m["clip"], vae=m[vae])
    want = pipeline.run(request, paths, device="cpu", dtype=torch.float32, progress=False)
    assert_frames_match(read_frames(files), want)


def test_interrupt_stops_sampling_and_the_next_prompt_runs(comfyui):
    t2v = dit_name(comfyui, "t2v-lite-sft-5s")
    long = graphs.text2x(t2v, HUNYUAN_VAE, QWEN, CLIP, PROMPT, 512, 512, 41, seed=1, steps=200, prefix="long")
    started = time.monotonic()
    status, body = comfyui.queue(long)
    assert status == 200, body
    deadline = started + 60
    while len(comfyui.progress("5", started)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert comfyui.request("/interrupt", {})[0] == 200
    interrupted = time.monotonic()
    entry = comfyui.wait(body["prompt_id"], timeout=60)
    messages = dict(entry["status"]["messages"])
    assert "execution_interrupted" in messages, entry["status"]
    assert messages["execution_interrupted"]["node_id"] == "5"  # stopped inside the sampler
    steps_done = [v for _, v, _ in comfyui.progress("5", started)]
    assert 2 <= len(steps_done) and max(steps_done) < 200
    assert len(comfyui.progress("5", interrupted)) <= 1  # at most the step that was running
    assert "outputs" not in entry or "7" not in entry.get("outputs", {})
    assert not list((comfyui.base / "output").glob("long_*"))

    short = graphs.text2x(t2v, HUNYUAN_VAE, QWEN, CLIP, PROMPT, W, H, FRAMES, seed=2, prefix="after_interrupt")
    files = comfyui.output_files(comfyui.run(short), "7")
    assert len(files) == FRAMES


def validation_errors(comfyui, graph: dict) -> str:
    """The node_errors of a refused prompt (400), as one string to search."""
    status, body = comfyui.queue(graph)
    assert status == 400, body
    assert body["error"]["type"] == "prompt_outputs_failed_validation", body
    return " | ".join(
        f"{node}: {e['message']} {e.get('details', '')}"
        for node, errs in body["node_errors"].items()
        for e in errs["errors"]
    )


def execution_error(comfyui, graph: dict) -> dict:
    status, body = comfyui.queue(graph)
    assert status == 200, body
    entry = comfyui.wait(body["prompt_id"], timeout=120)
    assert entry["status"]["status_str"] == "error"
    return dict(entry["status"]["messages"])["execution_error"]


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(width=100), "width=100 must be a multiple of 16 px"),
        (dict(height=40), "height=40 must be a multiple of 16 px"),
        (dict(length=6), "length=6 frames must be 4k+1"),
    ],
)
def test_bad_sizes_are_refused_at_validation(comfyui, change, expected):
    g = graphs.text2x(dit_name(comfyui, "t2v-lite-sft-5s"), HUNYUAN_VAE, QWEN, CLIP, PROMPT, W, H, FRAMES, seed=0)
    g["5"]["inputs"].update(change)
    errors = validation_errors(comfyui, g)
    assert "5:" in errors and expected in errors, errors


def test_every_problem_of_the_sampler_is_reported_not_just_the_first(comfyui):
    g = graphs.text2x(dit_name(comfyui, "t2v-lite-sft-5s"), HUNYUAN_VAE, QWEN, CLIP, PROMPT, W, H, FRAMES, seed=0)
    g["5"]["inputs"].update(width=100, length=6, guidance=float("nan"))
    status, body = comfyui.queue(g)
    assert status == 400, body
    (details,) = {e["details"].split(" - ", 1)[1] for e in body["node_errors"]["5"]["errors"]}  # one message
    assert details.splitlines() == [
        "width=100 must be a multiple of 16 px between 16 and 4096. Nearest: 96 or 112.",
        "length=6 frames must be 4k+1 (1, 5, 9, ..., 121 = 5 s, 241 = 10 s at 24 fps): the VAE packs 4 frames per "
        "latent. Nearest: 5 or 9.",
        "guidance=nan is not allowed: give a finite number from -1 to 30 (-1 = the variant's, 1 = no CFG).",
    ], details


def test_nabla_on_at_a_size_its_tiles_cannot_cover_is_refused_when_queued(comfyui):
    """NABLA is an option of the model (Kandinsky 5 NABLA): the Sampler finds it on the way to the loader in the
    queued graph and refuses the size before anything runs, with the inputs to change."""
    g = graphs.text2x(dit_name(comfyui, "t2v-lite-sft-5s"), HUNYUAN_VAE, QWEN, CLIP, PROMPT, W, H, FRAMES, seed=0,
                      prefix="never_written")  # fmt: skip
    mode_type = comfyui.request("/object_info/K5Nabla")[1]["K5Nabla"]["input"]["required"]["mode"][0]
    dynamic = mode_type == "COMFY_DYNAMICCOMBO_V3"
    tuning = {f"{'mode.' if dynamic else ''}{k}": 0 for k in ("P", "wT", "wH", "wW")}
    g["n"] = {"class_type": "K5Nabla", "inputs": {"model": ["1", 0], "mode": "on", **tuning}}
    g["5"]["inputs"]["model"] = ["n", 0]
    message = validation_errors(comfyui, g)
    assert "5:" in message, message
    assert "width=96 must be a multiple of 128 px" in message and "height=64 must be a multiple of 128 px" in message
    assert "or set mode to off in Kandinsky 5 NABLA" in message
    g["n"]["inputs"]["mode"] = "off"  # the same graph with NABLA off is accepted
    status, body = comfyui.queue({**g, "7": {**g["7"], "inputs": {**g["7"]["inputs"], "filename_prefix": "nabla_off"}}})
    assert status == 200, body
    comfyui.wait(body["prompt_id"])


def test_vae_file_in_the_dit_loader_is_refused_at_validation(comfyui):
    g = graphs.text2x("flux_vae_by_mistake.safetensors", HUNYUAN_VAE, QWEN, CLIP, PROMPT, W, H, FRAMES, seed=0)
    errors = validation_errors(comfyui, g)
    assert "1:" in errors and "not a Kandinsky 5 DiT" in errors and "VAE" in errors, errors


def test_wrong_variant_override_is_refused_at_validation(comfyui):
    g = graphs.text2x(
        dit_name(comfyui, "t2i-lite"), FLUX_VAE, QWEN, CLIP, PROMPT, W, H, 1, seed=0, variant="t2v-pro-sft-5s-sd"
    )
    errors = validation_errors(comfyui, g)
    assert "does not fit" in errors and "t2i-lite" in errors, errors


def test_hd_size_on_a_lite_model_is_refused_when_queued(comfyui):
    g = graphs.text2x(dit_name(comfyui, "t2v-lite-sft-5s"), HUNYUAN_VAE, QWEN, CLIP, PROMPT, 1280, 768, 1, seed=0)
    errors = validation_errors(comfyui, g)
    assert "5:" in errors and "1280x768 is too large for t2v-lite-sft-5s" in errors and "Pro HD" in errors, errors


def test_missing_tokenizer_is_an_execution_error_naming_the_loader(comfyui):
    g = graphs.text2x(
        dit_name(comfyui, "t2v-lite-sft-5s"), HUNYUAN_VAE, "qwen_without_tokenizer/", CLIP, PROMPT, W, H, 1, seed=0
    )
    err = execution_error(comfyui, g)
    assert err["node_id"] == "2" and err["node_type"] == "K5LoadTextEncoders"
    assert "Load Kandinsky 5 Text Encoders" in err["exception_message"]
    assert "No Qwen2.5-VL tokenizer found" in err["exception_message"]


def test_prompt_expansion_matches_kandinsky_core(comfyui):
    from kandinsky_core.text_encoders import load_text_encoders

    g = graphs.loaders(dit_name(comfyui, "t2v-lite-sft-5s"), HUNYUAN_VAE, QWEN, CLIP)
    del g["3"]
    g["4"] = {
        "class_type": "K5PromptExpansion",
        "inputs": {"text_encoders": ["2", 0], "prompt": "a fox", "template": "auto", "seed": 5, "max_new_tokens": 16,
                   "model": ["1", 0]},
    }  # fmt: skip
    g["5"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}}
    got = comfyui.run(g)["outputs"]["5"]["text"][0]
    encoders = load_text_encoders(comfyui.models["qwen"], comfyui.models["clip"], dtype=torch.float32)
    assert got == encoders.expand_prompt("a fox", "video", seed=5, max_new_tokens=16)
    assert got.strip()


AIMDO_SCRIPT = """
import dataclasses, importlib.util, json, sys
sys.path.insert(0, sys.argv[1])  # ComfyUI; the pack is imported as a package, as ComfyUI does (no `nodes` clash)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.memory_management
comfy.memory_management.aimdo_enabled = True  # what main.py sets when dynamic VRAM is on (NVIDIA GPUs)
pack = sys.argv[4]
spec = importlib.util.spec_from_file_location("k5pack", pack + "/__init__.py", submodule_search_locations=[pack])
sys.modules["k5pack"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules["k5pack"])
import torch
from kandinsky_core import variants
from kandinsky_core.loading import load_dit
from tiny import make_inputs
from k5pack.nodes.comfy_glue import dit_operations
arch = variants.DiTArch(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(sys.argv[3]).items()})
v = dataclasses.replace(variants.VARIANTS["t2v-lite-sft-5s"], arch=arch)
ours, _ = load_dit(sys.argv[2], v, dtype=torch.float32)
comfy, _ = load_dit(sys.argv[2], v, dtype=torch.float32, operations=dit_operations())
assert all(getattr(m, "comfy_cast_weights", True) for m in comfy.modules() if isinstance(m, torch.nn.Linear))
x = make_inputs(arch, grid=(2, 4, 6))
assert torch.equal(ours(**x), comfy(**x))
print("AIMDO-OK")
"""


def test_dit_loads_from_comfy_ops_with_dynamic_vram_on(comfyui):
    """With ComfyUI's dynamic VRAM on, comfy.ops.Linear defers its weights; the DiT still loads strictly and gives
    exactly what it gives with our own layers."""
    import dataclasses
    import json

    if not (Path(os.environ["COMFYUI_DIR"]) / "comfy" / "memory_management.py").exists():
        pytest.skip("this ComfyUI has no dynamic VRAM (comfy/memory_management.py appeared after v0.3.64)")

    from comfy_server import REPO, tiny_archs

    arch = json.dumps(dataclasses.asdict(tiny_archs()["t2v-lite-sft-5s"]))
    python = os.environ.get("COMFYUI_PYTHON") or "python"
    path = str(comfyui.models["dit"]["t2v-lite-sft-5s"])
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests"), OMP_NUM_THREADS="2")
    cmd = [python, "-c", AIMDO_SCRIPT, os.environ["COMFYUI_DIR"], path, arch, str(REPO)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert "AIMDO-OK" in r.stdout, (r.stdout + r.stderr)[-3000:]
