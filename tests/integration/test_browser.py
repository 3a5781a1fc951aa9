"""js/kandinsky5.js in headless Chromium on the real ComfyUI frontend (tests/browser/k5_browser_test.mjs), and the
GET /kandinsky5/variants route it reads. Needs COMFYUI_DIR (see docs/comfyui.md), Debian `chromium` and
`npm ci` in tests/browser; without them the browser test is skipped with a warning saying what is missing.
The template browser (the pack's templates found by "kandinsky", titled, with their thumbnails, A -> Z from 01), the
missing-models panel of a bundled workflow (a Download entry per missing file), each warning of the loader and the
sampler on the canvas and in Vue nodes, the refused prompts as the errors panel shows them, and the canvas are
screenshotted into $KANDINSKY_ARTIFACTS_DIR (or pytest's temporary folder)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from comfy_server import CLIP, HUNYUAN_VAE, QWEN, REPO
from prerequisites import missing

BROWSER_DIR = REPO / "tests" / "browser"
SCRIPT = BROWSER_DIR / "k5_browser_test.mjs"
TIMEOUT = 300


def _skip(reason: str) -> None:
    missing(f"the browser test: {reason}")


def _bundled_workflow() -> Path | None:
    """A bundled T2V Lite UI workflow (workflows/, from scripts/make_workflows.py), when there is one."""
    chosen = os.environ.get("K5_BROWSER_WORKFLOW")  # a path, or "none" for the small graph in the test script
    if chosen:
        return None if chosen == "none" else Path(chosen)
    for path in sorted((REPO / "workflows").glob("*.json")):  # "Kandinsky 5 - 01 T2V Lite distilled ..." first
        text = path.read_text()
        if "T2V Lite" in path.name and "K5Sampler" in text and '"nodes"' in text:
            return path
    return None


def test_variants_route_serves_the_table_and_detected_files(comfyui):
    status, body = comfyui.request("/api/kandinsky5/variants")
    assert status == 200, body
    assert body["fps"] == 24 and body["nabla_tile_px"] == 128
    distilled = body["variants"]["t2v-lite-distilled16steps-5s"]["defaults"]
    assert (distilled["steps"], distilled["guidance"], distilled["scheduler_scale"]) == (16, 1.0, 5.0)
    files = body["files"]
    # the tiny Lite architecture is swapped into t2v-lite-sft-5s and i2v-lite-5s (tiny_variants_pack): under its
    # released name the file fits only its own release
    t2v = files["kandinsky5lite_t2v_sft_5s.safetensors"]
    assert t2v["variant"] == "t2v-lite-sft-5s" and t2v["fits"] == ["t2v-lite-sft-5s"]
    assert t2v["guess"] is None  # the released file name says which
    assert files["kandinsky5lite_i2v_5s.safetensors"]["variant"] == "i2v-lite-5s"
    assert files["kandinsky5lite_t2i.safetensors"] == {"variant": "t2i-lite", "fits": ["t2i-lite"], "guess": None}
    assert files["flux_vae_by_mistake.safetensors"]["variant"] is None
    assert "flux_vae_by_mistake.safetensors" in files["flux_vae_by_mistake.safetensors"]["error"]


def test_extension_in_headless_chromium(request, tmp_path):
    if not os.environ.get("COMFYUI_DIR"):
        _skip("COMFYUI_DIR is not set (docs/comfyui.md)")
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not chromium:
        _skip("no chromium executable: `apt-get install -y chromium` (Debian) or set CHROMIUM")
    node = shutil.which("node")
    if not node:
        _skip("no node executable: install Node.js 18+")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        _skip(f"playwright-core is not installed: run `npm ci` in {BROWSER_DIR}")
    comfyui = request.getfixturevalue("comfyui")

    artifacts = Path(os.environ.get("KANDINSKY_ARTIFACTS_DIR") or tmp_path)
    workflow = _bundled_workflow()
    # the T2V file under a name that does not say its variant: detection guesses, and the loader says so
    renamed = comfyui.base / "models" / "diffusion_models" / "my_k5_video.safetensors"
    shutil.copyfile(comfyui.base / "models" / "diffusion_models" / "kandinsky5lite_t2v_sft_5s.safetensors", renamed)
    files = {
        "dit_renamed": renamed.name,
        "dit_t2v": "kandinsky5lite_t2v_sft_5s.safetensors",
        "dit_t2i": "kandinsky5lite_t2i.safetensors",
        "qwen": QWEN,
        "clip": CLIP,
        "vae": HUNYUAN_VAE,
    }
    env = dict(os.environ, COMFY_URL=comfyui.url, K5_ARTIFACTS=str(artifacts), K5_FILES=json.dumps(files))
    env.update(CHROMIUM=chromium, NO_PROXY="127.0.0.1,localhost")
    if workflow:
        env["K5_WORKFLOW"] = str(workflow)
    try:
        cmd = [node, str(SCRIPT)]
        run = subprocess.run(cmd, cwd=BROWSER_DIR, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        renamed.unlink()
    out = f"{run.stdout[-4000:]}\n{run.stderr[-6000:]}"
    assert run.returncode == 0, f"browser test failed:\n{out}\n{comfyui.log_tail()}"
    results = json.loads(run.stdout.strip().splitlines()[-1])
    # The template browser (pack folder, search "kandinsky"): every bundled workflow, titled by its file name, with
    # thumbnails loaded (the cards in view at least); the A-Z sort starts with 01, the fast start.
    names = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    shown = results["templates"]["titles"]
    assert sorted(shown) == names, shown
    responses = results["templates"]["responses"]  # the frontend fetches <pack>/<name>.jpg for each card in view
    served = {r["url"].rsplit("/", 1)[-1][: -len(".jpg")] for r in responses if r["status"] == 200}
    assert len(served) >= 8 and served <= set(names), responses
    assert all(r["status"] == 200 for r in responses), responses
    assert sum(t["loaded"] for t in results["templates"]["thumbnails"]) >= 8, results["templates"]["thumbnails"]
    assert results.get("templates_sorted"), f"no A-Z sort among {results.get('sort_options')}"
    assert results["templates_sorted"]["titles"] == names, results["templates_sorted"]["titles"]
    assert names[0].startswith("Kandinsky 5 - 01 T2V Lite distilled 16 steps 5s")
    if workflow is not None:
        # The loaders' properties.models: the frontend's missing-models panel lists each file this server lacks (the
        # released DiT, ComfyUI's VAE file) with a Download button; the tiny single-file text encoders are present.
        lines = results["missing_models"]
        dit = next(n for n in json.loads(workflow.read_text())["nodes"] if n["type"] == "K5LoadDiT")
        for name in (dit["widgets_values"][0], "hunyuan_video_vae_bf16.safetensors"):
            assert name in lines and lines[lines.index(name) + 1] == "Download", (name, lines)
        assert not any("qwen_2.5_vl_7b_fp8_scaled" in x or "clip_l.safetensors" in x for x in lines), lines
        assert results["missing_models_buttons"].count("Download") == 2, results["missing_models_buttons"]

    # The prompt the page queued runs to the end on the tiny model.
    entry = comfyui.wait(results["prompt_id"])
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]

    from PIL import Image

    # each warning in both modes (the script asserts them readable there), and the refusals
    names = {Path(p).stem for p in results["warning_screenshots"]}
    for warning in ("loader_variant_does_not_fit", "sampler_size_nabla_length", "loader_guess"):
        assert {f"kandinsky5_warning_{warning}_canvas", f"kandinsky5_warning_{warning}_vue"} <= names, names
    assert len(results["refusal_screenshots"]) == 4, results["refusal_screenshots"]
    for path in [results["screenshot"], *results["warning_screenshots"], *results["refusal_screenshots"]]:
        shot = Image.open(path).convert("L")
        lo, hi = shot.getextrema()
        assert shot.size[0] >= 200 and hi - lo > 100, f"screenshot {path} looks empty"
