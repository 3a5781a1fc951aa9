"""The bundled workflows (no ComfyUI needed): one per variant with its thumbnail, fresh (regenerating changes
nothing), their settings equal the variants table, every loader carries properties.models (the missing-models
panel's Download), the Markdown note links the files and shows where they go, and the UI->API conversion follows
the frontend's widget serialisation (control_after_generate values, links, Reroute, muted and bypassed nodes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from workflow_script import load_make_workflows

from comfy_client.workflow import ui_to_api, widget_names
from kandinsky_core.errors import InputError
from kandinsky_core.settings import resolve
from kandinsky_core.variants import VARIANTS

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
OBJECT_INFO = json.loads((REPO / "tests" / "data" / "object_info.json").read_text())


SCRIPT = load_make_workflows()


def ui(name: str) -> dict:
    return json.loads(SCRIPT.ui_path(name).read_text())


def api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def by_type(graph: dict, kind: str) -> list[tuple[str, dict]]:
    return [(i, n) for i, n in graph.items() if n["class_type"] == kind]


def one(graph: dict, kind: str) -> tuple[str, dict]:
    found = by_type(graph, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_every_variant_has_a_workflow_a_thumbnail_and_a_twin_and_nothing_else():
    names = {SCRIPT.template_name(v) for v in VARIANTS.values()}
    assert len(names) == len(VARIANTS)
    assert {p.stem for p in WORKFLOWS.glob("*.json")} == names
    assert {p.stem for p in WORKFLOWS.glob("*.jpg")} == names  # the template browser's <name>.jpg
    assert {p.stem for p in (WORKFLOWS / "api").glob("*.json")} == set(VARIANTS)


def test_template_names_are_titles_with_the_fast_start_first():
    """ComfyUI's frontend shows a pack template's file name as its title and description: "Kandinsky 5 - NN ...",
    searchable by "kandinsky", numbered so that the alphabetical sort puts Lite T2V distilled 5 s first."""
    names = sorted(SCRIPT.template_name(v) for v in VARIANTS.values())
    assert all(n.startswith("Kandinsky 5 - ") and "kandinsky" in n.lower() for n in names)
    assert names[0] == SCRIPT.template_name(VARIANTS["t2v-lite-distilled16steps-5s"])
    assert names[1] == SCRIPT.template_name(VARIANTS["t2v-lite-distilled16steps-10s"])
    assert [int(n.split(" - ")[1][:2]) for n in names] == list(range(1, len(VARIANTS) + 1))
    for v in VARIANTS.values():  # the name says model, task, length and size
        name = SCRIPT.template_name(v)
        width, height = v.default_size
        assert v.title in name and f"{width}x{height}" in name
        assert "/" not in name and "\\" not in name and ":" not in name  # a file name on every OS
    pro = [i for i, n in enumerate(names) if " Pro " in n]
    assert min(pro) > max(i for i, n in enumerate(names) if " Lite " in n)


def test_thumbnails_are_cards_of_the_variant():
    from PIL import Image

    for v in VARIANTS.values():
        path = WORKFLOWS / f"{SCRIPT.template_name(v)}.jpg"
        assert path.stat().st_size < 60_000, path
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.size == (400, 400)
            card = json.loads(img.info["comment"])
        width, height = v.default_size
        text = " ".join(card["lines"])
        assert f"{width}x{height}" in text and v.task.upper() in text and f"{v.steps} steps" in text
        assert (f"{v.max_frames // 24} s video" in text) if v.is_video else ("image" in text)


def test_generated_files_are_fresh(capsys):
    """Regenerating from the variants table and the UI files gives exactly the committed files (--check)."""
    script = load_make_workflows()
    assert script.main(["--check"]) == 0, capsys.readouterr().out
    for path, text in script.expected_files(OBJECT_INFO).items():
        assert path.read_text() == text, f"{path} is stale: run python scripts/make_workflows.py"


def copy_workflows(tmp_path):
    for sub in ("", "api"):
        (tmp_path / sub).mkdir(exist_ok=True)
        for f in (WORKFLOWS / sub).glob("*.json"):
            (tmp_path / sub / f.name).write_text(f.read_text())
        for f in (WORKFLOWS / sub).glob("*.jpg"):
            (tmp_path / sub / f.name).write_bytes(f.read_bytes())


def check_in(monkeypatch, tmp_path, capsys) -> tuple[int, str]:
    script = load_make_workflows()
    monkeypatch.setattr(script, "WORKFLOWS", tmp_path)
    monkeypatch.setattr(script, "API", tmp_path / "api")
    monkeypatch.setattr(script, "REPO", tmp_path)
    code = script.main(["--check"])
    return code, capsys.readouterr().out


def test_check_fails_on_a_stale_ui_file_and_thumbnail(monkeypatch, tmp_path, capsys):
    copy_workflows(tmp_path)
    name = SCRIPT.template_name(VARIANTS["t2v-lite-sft-5s"])
    ui_file = tmp_path / f"{name}.json"
    graph = json.loads(ui_file.read_text())
    for n in graph["nodes"]:
        n["properties"].pop("models", None)  # the Download entries lost in a hand edit
    ui_file.write_text(json.dumps(graph, indent=2, ensure_ascii=False) + "\n")
    other = SCRIPT.template_name(VARIANTS["t2i-lite"])
    (tmp_path / f"{other}.jpg").write_bytes((tmp_path / f"{name}.jpg").read_bytes())  # another variant's card
    (tmp_path / "old-variant.jpg").write_bytes(b"")
    code, out = check_in(monkeypatch, tmp_path, capsys)
    assert code == 1
    assert f"stale or missing: {name}.json" in out and f"stale or missing: {other}.jpg" in out
    assert "not generated" in out and "old-variant.jpg" in out and out.count("stale or missing") == 2
    (tmp_path / f"{name}.jpg").unlink()
    code, out = check_in(monkeypatch, tmp_path, capsys)
    assert code == 1 and f"stale or missing: {name}.jpg" in out


def test_check_fails_on_a_stale_twin(monkeypatch, tmp_path, capsys):
    script = load_make_workflows()
    copy_workflows(tmp_path)
    twin = tmp_path / "api" / "t2i-lite.json"
    graph = json.loads(twin.read_text())
    graph[one(graph, "K5Sampler")[0]]["inputs"]["steps"] = 49  # edited by hand
    twin.write_text(json.dumps(graph, indent=2) + "\n")
    (tmp_path / "api" / "old-variant.json").write_text("{}")
    monkeypatch.setattr(script, "WORKFLOWS", tmp_path)
    monkeypatch.setattr(script, "API", tmp_path / "api")
    monkeypatch.setattr(script, "REPO", tmp_path)
    assert script.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "stale or missing: api/t2i-lite.json" in out and "not generated" in out and "old-variant.json" in out
    assert out.count("stale or missing") == 1


def test_twins_are_the_conversion_of_the_ui_files():
    for name in VARIANTS:
        assert ui_to_api(ui(name), OBJECT_INFO) == api(name), name


@pytest.mark.parametrize("name", list(VARIANTS))
def test_defaults_equal_the_variants_table(name):
    v = VARIANTS[name]
    g = api(name)
    _, dit = one(g, "K5LoadDiT")
    # auto: the file's own variant (detected from the official file name without a guess), so another file brings
    # its own settings
    assert dit["inputs"]["variant"] == "auto"
    from test_loading import real_header

    from kandinsky_core.loading import detect_variant

    detected = detect_variant(real_header(name), filename=dit["inputs"]["dit_name"])
    assert detected.variant == name or (v.family == "pro" and set(detected.tied) >= {name})
    assert dit["inputs"]["dit_name"] == v.hf_filename.split("/")[-1]  # download.py puts it in diffusion_models/
    _, te = one(g, "K5LoadTextEncoders")  # ComfyUI's single files, what its users already hold
    assert te["inputs"]["qwen_name"] == "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    assert te["inputs"]["clip_name"] == "clip_l.safetensors"
    _, vae = one(g, "K5LoadVAE")
    expected_vae = {"hunyuan": "hunyuan_video_vae_bf16.safetensors", "flux": "ae.safetensors"}[v.vae]
    assert vae["inputs"]["vae_name"] == expected_vae
    _, enc = one(g, "K5TextEncode")
    assert enc["inputs"]["template"] == "auto"  # the model's variant's template at run time
    assert one(g, "K5PromptExpansion")[1]["inputs"]["prompt"].strip()  # the prompt, expanded into Text Encode
    negative = enc["inputs"]["negative_prompt"]
    assert negative.startswith("Static, 2D cartoon") if v.is_video else negative == ""
    sid, s = one(g, "K5Sampler")
    i = s["inputs"]
    if v.task in ("i2v", "i2i"):  # the size Kandinsky 5 VAE Encode chose from the image
        assert (i["width"], i["height"]) == (0, 0)
    else:
        assert (i["width"], i["height"]) == v.default_size and (i["width"], i["height"]) in v.resolutions
    assert i["length"] == (v.max_frames if v.is_video else 1)
    assert (i["steps"], i["guidance"], i["scheduler_scale"]) == (v.steps, v.guidance, v.scheduler_scale)
    # NABLA is the variant's (the Sampler's auto, no Kandinsky 5 NABLA node): the size fits its tiles
    assert not any(k.startswith("nabla") for k in i) and not by_type(g, "K5Nabla")
    assert resolve(v, width=i["width"] or v.default_size[0], height=i["height"] or v.default_size[1],
                   length=i["length"], has_start=v.task == "i2v",
                   has_edit=v.task == "i2i")[1] == []  # fmt: skip
    assert i["batch_size"] == 1 and isinstance(i["seed"], int)
    ui_sampler = next(n for n in ui(name)["nodes"] if n["type"] == "K5Sampler")
    assert ui_sampler["widgets_values"][5] == "randomize"  # a second Run makes a new video
    did = dit and one(g, "K5LoadDiT")[0]
    assert i["model"] == [did, 0] and enc["inputs"]["model"] == [did, 0]
    eid = one(g, "K5TextEncode")[0]
    assert i["positive"] == [eid, 0] and i["negative"] == [eid, 1]
    decid, dec = one(g, "K5VAEDecode")
    assert dec["inputs"]["samples"] == [sid, 0]
    if v.is_video:  # MP4 through ComfyUI's own video nodes
        vid, video = one(g, "CreateVideo")
        assert video["inputs"]["fps"] == 24.0 and video["inputs"]["images"] == [decid, 0]
        _, save = one(g, "SaveVideo")
        assert save["inputs"]["video"] == [vid, 0]
        assert (save["inputs"]["format"], save["inputs"]["format.codec"]) == ("mp4", "h264")
        assert not by_type(g, "SaveImage")
    else:
        _, save = one(g, "SaveImage")
        assert save["inputs"]["images"] == [decid, 0]
    assert save["inputs"]["filename_prefix"] == f"kandinsky5/{name}"


@pytest.mark.parametrize("name", [n for n, v in VARIANTS.items() if v.task in ("i2v", "i2i")])
def test_image_inputs_go_through_vae_encode(name):
    v = VARIANTS[name]
    g = api(name)
    lid, load = one(g, "LoadImage")
    assert load["inputs"]["image"] == "example.png"
    eid, encode = one(g, "K5VAEEncode")
    # 0 x 0 with the model connected: the official size rule for the image sets the size, the sampler follows
    assert encode["inputs"]["images"] == [lid, 0] and (encode["inputs"]["width"], encode["inputs"]["height"]) == (0, 0)
    assert encode["inputs"]["model"] == [one(g, "K5LoadDiT")[0], 0]
    sampler = one(g, "K5Sampler")[1]["inputs"]
    key, other = ("start_latent", "edit_latent") if v.task == "i2v" else ("edit_latent", "start_latent")
    assert sampler[key] == [eid, 0] and other not in sampler
    text = one(g, "K5TextEncode")[1]["inputs"]
    if v.task == "i2i":  # Qwen sees the image as encoded (resized to cover, centre-cropped): VAE Encode's image
        assert text["edit_image"] == [eid, 1]
    else:
        assert "edit_image" not in text


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_prompt_goes_through_prompt_expansion(name):
    """As in every official ComfyUI workflow and the four official pipelines (expand_prompts=True): the prompt is
    written in Kandinsky 5 Prompt Expansion, on, with the official 256 new tokens; its output is Text Encode's
    prompt (a widget taking a link, saved as the frontend saves one); I2V / I2I show Qwen the image as loaded (Load
    Image's output, not VAE Encode's resized one; the node quarters it for I2I). The API twin carries the same
    links, and the Note says how to turn it off and what it costs."""
    v = VARIANTS[name]
    g = api(name)
    xid, x = one(g, "K5PromptExpansion")
    i = x["inputs"]
    assert i["expand"] is True and i["template"] == "auto" and i["max_new_tokens"] == 256
    assert i["prompt"] == SCRIPT.PROMPTS[v.task]
    assert i["text_encoders"] == [one(g, "K5LoadTextEncoders")[0], 0] and i["model"] == [one(g, "K5LoadDiT")[0], 0]
    eid, enc = one(g, "K5TextEncode")
    assert enc["inputs"]["prompt"] == [xid, 0]
    assert one(g, "K5Sampler")[1]["inputs"]["positive"] == [eid, 0]
    if v.task in ("i2v", "i2i"):
        assert i["image"] == [one(g, "LoadImage")[0], 0]
    else:
        assert "image" not in i
    w = ui(name)
    nodes = {n["id"]: n for n in w["nodes"]}
    (te,) = [n for n in w["nodes"] if n["type"] == "K5TextEncode"]
    (slot,) = [s for s in te["inputs"] if s["name"] == "prompt"]
    assert slot == {"name": "prompt", "type": "STRING", "widget": {"name": "prompt"}, "link": slot["link"]}
    assert te["inputs"][-1] is slot  # after the node's sockets, as the frontend appends it
    (link,) = [x for x in w["links"] if x[0] == slot["link"]]
    assert nodes[link[1]]["type"] == "K5PromptExpansion" and link[2] == 0 and link[5] == "STRING"
    (note,) = [n["widgets_values"][0] for n in w["nodes"] if n["type"] == "MarkdownNote"]
    assert "**expand** to off" in note and "up to 256 new tokens" in note and "LM head" in note


def test_queue_prompt_reaches_the_expansion_in_a_bundled_workflow():
    """`queue --prompt` on a bundled workflow: Text Encode's prompt is a link, so the text goes to the Prompt
    Expansion feeding it; the link stays, and --negative still goes to Text Encode."""
    from comfy_client.workflow import apply_overrides

    g = api("i2v-lite-5s")
    apply_overrides(g, prompt="a cat", negative="blur")
    xid, x = one(g, "K5PromptExpansion")
    enc = one(g, "K5TextEncode")[1]["inputs"]
    assert x["inputs"]["prompt"] == "a cat" and enc["prompt"] == [xid, 0] and enc["negative_prompt"] == "blur"


def test_text_variants_have_no_image_inputs():
    for name, v in VARIANTS.items():
        if v.task in ("t2v", "t2i"):
            g = api(name)
            assert not by_type(g, "LoadImage") and not by_type(g, "K5VAEEncode")
            s = one(g, "K5Sampler")[1]["inputs"]
            assert "start_latent" not in s and "edit_latent" not in s


def test_known_official_numbers():
    """A few values checked by hand against the official configs (independent of the table's code)."""
    s = one(api("t2v-lite-distilled16steps-5s"), "K5Sampler")[1]["inputs"]
    assert (s["steps"], s["guidance"], s["scheduler_scale"], s["length"]) == (16, 1.0, 5.0, 121)
    s = one(api("t2v-pro-sft-10s-hd"), "K5Sampler")[1]["inputs"]
    assert (s["width"], s["height"], s["length"]) == (1280, 768, 241)
    s = one(api("i2v-pro-5s-hd"), "K5Sampler")[1]["inputs"]
    assert s["scheduler_scale"] == 5.0
    s = one(api("t2i-lite"), "K5Sampler")[1]["inputs"]
    assert (s["width"], s["height"], s["length"], s["guidance"], s["scheduler_scale"]) == (1024, 1024, 1, 3.5, 3.0)
    assert one(api("t2v-lite-nocfg-10s"), "K5Sampler")[1]["inputs"]["guidance"] == 1.0


HF = "https://huggingface.co/"
SINGLE_URLS = {  # as ComfyUI's own Kandinsky 5 templates (comfyui_workflow_templates) and Comfy-Org give them
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": HF + "Comfy-Org/HunyuanVideo_1.5_repackaged/resolve/main/split_files/"
    "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
    "clip_l.safetensors": HF + "comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
    "hunyuan_video_vae_bf16.safetensors": HF + "Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files/vae/"
    "hunyuan_video_vae_bf16.safetensors",
    "ae.safetensors": HF + "Comfy-Org/z_image_turbo/resolve/main/split_files/vae/ae.safetensors",
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_loader_carries_its_models_for_the_download_button(name):
    """The frontend's missing-models check reads properties.models (name, url, directory) of each node whose widget
    holds that name; every file a loader loads has its entry, with a Hugging Face URL ending in the file name."""
    v = VARIANTS[name]
    w = ui(name)
    loaders = {n["type"]: n for n in w["nodes"] if n["type"].startswith("K5Load")}
    assert set(loaders) == {"K5LoadDiT", "K5LoadTextEncoders", "K5LoadVAE"}
    for node in w["nodes"]:
        models = node["properties"].get("models")
        if node["type"] not in loaders:
            assert models is None, node["type"]
            continue
        assert models, f"{node['type']} has no properties.models"
        names = [x for x in node["widgets_values"] if isinstance(x, str) and x.endswith(".safetensors")]
        assert [m["name"] for m in models] == names, node["type"]
        for m in models:
            assert set(m) == {"name", "url", "directory"}
            assert m["url"].startswith(HF) and m["url"].split("?")[0].endswith("/" + m["name"])
    dit = loaders["K5LoadDiT"]["properties"]["models"]
    assert dit == [{"name": v.hf_filename.split("/")[-1], "url": f"{HF}{v.hf_repo}/resolve/main/{v.hf_filename}",
                    "directory": "diffusion_models"}]  # fmt: skip
    te = loaders["K5LoadTextEncoders"]["properties"]["models"]
    assert [(m["name"], m["directory"], m["url"]) for m in te] == [
        (n, "text_encoders", SINGLE_URLS[n]) for n in ("qwen_2.5_vl_7b_fp8_scaled.safetensors", "clip_l.safetensors")
    ]
    (vae,) = loaders["K5LoadVAE"]["properties"]["models"]
    vae_file = "ae.safetensors" if v.vae == "flux" else "hunyuan_video_vae_bf16.safetensors"
    assert (vae["name"], vae["directory"], vae["url"]) == (vae_file, "vae", SINGLE_URLS[vae_file])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_markdown_note_links_files_shows_the_tree_and_download_command(name):
    v = VARIANTS[name]
    notes = [n for n in ui(name)["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert [n["type"] for n in notes] == ["MarkdownNote"]
    text = notes[0]["widgets_values"][0]
    assert f"python -m kandinsky_core download --variant {name}" in text
    dit = v.hf_filename.split("/")[-1]
    files = [dit, "qwen_2.5_vl_7b_fp8_scaled.safetensors", "clip_l.safetensors"]
    files.append("ae.safetensors" if v.vae == "flux" else "hunyuan_video_vae_bf16.safetensors")
    for f in files:  # a clickable Markdown link each, and the file in the folder tree
        url = f"{HF}{v.hf_repo}/resolve/main/{v.hf_filename}" if f == dit else SINGLE_URLS[f]
        assert f"- [{f}]({url})" in text, f
        assert f"── {f}\n" in text, f
    tree = text[text.index("📂 ComfyUI/") :]
    assert tree.index("📂 text_encoders/") < tree.index("clip_l.safetensors") < tree.index("📂 diffusion_models/")
    assert tree.index("📂 diffusion_models/") < tree.index(dit) < tree.index("📂 vae/")
    # the Hugging Face folders stay an alternative
    assert "https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct" in text
    if v.vae == "flux":
        assert "black-forest-labs/FLUX.1-dev" in text and "gated" in text
    else:
        assert "hunyuanvideo-community/HunyuanVideo" in text


def test_ui_files_are_in_the_frontend_format():
    for name in VARIANTS:
        w = ui(name)
        assert {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"} <= set(w)
        ids = {n["id"] for n in w["nodes"]}
        assert w["last_node_id"] == max(ids) and w["last_link_id"] == max(link[0] for link in w["links"])
        for link_id, src, src_slot, dst, dst_slot, kind in w["links"]:
            s = next(n for n in w["nodes"] if n["id"] == src)
            d = next(n for n in w["nodes"] if n["id"] == dst)
            assert link_id in s["outputs"][src_slot]["links"] and s["outputs"][src_slot]["type"] == kind
            assert d["inputs"][dst_slot]["link"] == link_id and d["inputs"][dst_slot]["type"] == kind
        for n in w["nodes"]:
            assert {"id", "type", "pos", "size", "flags", "order", "mode", "properties", "widgets_values"} <= set(n)
            if n["type"] in OBJECT_INFO:
                assert n["properties"]["Node name for S&R"] == n["type"]
                if n["type"] == "SaveVideo":  # a dynamic combo: prefix, format, the chosen format's codec
                    assert n["widgets_values"][1:] == ["mp4", "h264"]
                else:
                    assert len(n["widgets_values"]) == len(widget_names(OBJECT_INFO[n["type"]])), n["type"]


# ---- the converter against the frontend's serialisation, on hand-written graphs ----

INT = ["INT", {"default": 0, "min": 0, "max": 100}]
CORE_INFO = {  # as ComfyUI 0.3.x's /object_info describes KSampler and friends (trimmed)
    "KSampler": {
        "input": {"required": {
            "model": ["MODEL"], "seed": ["INT", {"default": 0, "control_after_generate": True}], "steps": INT,
            "cfg": ["FLOAT", {"default": 8.0}], "sampler_name": [["euler", "ddim"]], "scheduler": [["normal"]],
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
            "denoise": ["FLOAT", {"default": 1.0}],
        }},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                     "negative", "latent_image", "denoise"]},
        "output": ["LATENT"], "output_name": ["LATENT"], "display_name": "KSampler",
    },
    "Noise": {"input": {"required": {"noise_seed": INT, "strength": ["FLOAT", {"control_after_generate": True}],
                                     "count": ["INT", {"control_after_generate": False}]},
                        "optional": {"seed": INT, "latent": ["LATENT", {}]}},
              "output": ["LATENT"], "display_name": "Noise"},
    "Source": {"input": {"required": {"value": INT}}, "output": ["MODEL", "CONDITIONING", "LATENT"]},
}  # fmt: skip


def node(nid, kind, widgets, inputs=(), mode=0, order=0, outputs=()):
    return {"id": nid, "type": kind, "mode": mode, "order": order, "widgets_values": widgets,
            "inputs": [dict(x) for x in inputs], "outputs": [dict(x) for x in outputs]}  # fmt: skip


def test_widget_order_follows_the_frontend():
    # KSampler: seed (control_after_generate) -> "randomize" after it; Noise: noise_seed by name (no option),
    # a FLOAT with the option, an INT whose option is False (no control), an optional seed by name
    assert widget_names(CORE_INFO["KSampler"]) == ["seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"]
    assert widget_names(CORE_INFO["Noise"]) == ["noise_seed", None, "strength", None, "count", "seed", None]
    # our sampler's seed declares control_after_generate; Prompt Expansion's seed gets one by its name
    assert widget_names(OBJECT_INFO["K5Sampler"])[3:6] == ["batch_size", "seed", None]
    assert widget_names(OBJECT_INFO["LoadImage"]) == ["image", None]  # the upload button serialises "image"
    expansion = ["prompt", "template", "seed", None, "max_new_tokens", "expand"]
    assert widget_names(OBJECT_INFO["K5PromptExpansion"]) == expansion


def test_ui_to_api_on_a_frontend_style_graph():
    src_out = [{"name": "MODEL", "type": "MODEL", "links": [1]}, {"name": "C", "type": "CONDITIONING", "links": [2, 3]},
               {"name": "L", "type": "LATENT", "links": [4]}]  # fmt: skip
    graph = {
        "nodes": [
            node(1, "Source", [5], outputs=src_out),
            node(2, "Reroute", [], inputs=[{"name": "", "type": "*", "link": 4}],
                 outputs=[{"name": "", "type": "LATENT", "links": [5]}]),
            node(3, "Noise", [7, "fixed", 0.5, "increment", 3, 9, "randomize"], mode=4,
                 inputs=[{"name": "latent", "type": "LATENT", "link": 5}],
                 outputs=[{"name": "LATENT", "type": "LATENT", "links": [6]}]),
            node(4, "KSampler", [123, "randomize", 20, 7.5, "ddim", "normal", 1.0], order=1, inputs=[
                {"name": "model", "type": "MODEL", "link": 1}, {"name": "positive", "type": "CONDITIONING", "link": 2},
                {"name": "negative", "type": "CONDITIONING", "link": 3},
                {"name": "latent_image", "type": "LATENT", "link": 6},
                {"name": "steps", "type": "INT", "link": None, "widget": {"name": "steps"}},
            ]),
            node(5, "Note", ["hello"]),
            node(6, "KSampler", [1, "fixed", 1, 1.0, "euler", "normal", 1.0], mode=2),
        ],
        "links": [[1, 1, 0, 4, 0, "MODEL"], [2, 1, 1, 4, 1, "CONDITIONING"], [3, 1, 1, 4, 2, "CONDITIONING"],
                  [4, 1, 2, 2, 0, "LATENT"], [5, 2, 0, 3, 0, "LATENT"], [6, 3, 0, 4, 3, "LATENT"]],
    }  # fmt: skip
    got = ui_to_api(graph, CORE_INFO)
    assert set(got) == {"1", "4"}  # Reroute, bypassed Noise, Note and the muted sampler are gone
    assert got["4"]["inputs"] == {
        "seed": 123, "steps": 20, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "normal", "denoise": 1.0,
        "model": ["1", 0], "positive": ["1", 1], "negative": ["1", 1], "latent_image": ["1", 2],
    }  # fmt: skip
    assert got["4"]["class_type"] == "KSampler" and got["4"]["_meta"]["title"] == "KSampler"
    assert got["1"]["inputs"] == {"value": 5}


def test_unknown_node_type_is_named():
    graph = {"nodes": [node(7, "SomePackNode", [])], "links": []}
    with pytest.raises(InputError, match="node 7 is a 'SomePackNode', which this ComfyUI does not have"):
        ui_to_api(graph, CORE_INFO)


def test_subgraphs_and_dynamic_inputs_are_refused_with_the_fix():
    sub = {"nodes": [node(3, "a1b2-uuid", [])], "links": [],
           "definitions": {"subgraphs": [{"id": "a1b2-uuid", "name": "Text to Image"}]}}  # fmt: skip
    with pytest.raises(InputError, match=r"node 3 is a subgraph \(Text to Image\).*Export \(API\)"):
        ui_to_api(sub, CORE_INFO)


def test_dynamic_combos_map_to_dotted_inputs_as_comfyui_expects():
    """V3 dynamic combos (SaveVideo's format -> codec on v0.33.0): the choice, then the chosen option's widgets,
    named by their dotted path; the hidden top-level codec has no widget."""
    codec = ["COMFY_DYNAMICCOMBO_V3", {"options": [{"key": "auto", "inputs": {"required": {}}},
                                                   {"key": "h264", "inputs": {"required": {}}}]}]  # fmt: skip
    info = {"SaveVideo": {
        "input": {"required": {"video": ["VIDEO", {}], "filename_prefix": ["STRING", {}],
                               "format": ["COMFY_DYNAMICCOMBO_V3", {"options": [
                                   {"key": "mp4", "inputs": {"required": {"codec": codec}}},
                                   {"key": "webm", "inputs": {"required": {}}}]}]},
                  "optional": {"codec": ["COMFY_DYNAMICCOMBO_V3", {"hidden": True}]}},
        "input_order": {"required": ["video", "filename_prefix", "format"], "optional": ["codec"]},
        "output": []}}  # fmt: skip
    got = ui_to_api({"nodes": [node(4, "SaveVideo", ["k5/v", "mp4", "h264"])], "links": []}, info)
    assert got["4"]["inputs"] == {"filename_prefix": "k5/v", "format": "mp4", "format.codec": "h264"}
    got = ui_to_api({"nodes": [node(4, "SaveVideo", ["k5/v", "webm"])], "links": []}, info)
    assert got["4"]["inputs"] == {"filename_prefix": "k5/v", "format": "webm"}


def test_native_workflow_runs_comfyuis_own_model_through_our_nabla_and_magcache_into_ksampler():
    """workflows/native/: ComfyUI's Load Diffusion Model -> Kandinsky 5 NABLA (auto) -> Kandinsky 5 MagCache ->
    KSampler with the Lite 10 s file and its official steps, guidance and length; ComfyUI's text encoder and VAE; the
    UI file's widgets are the twin's values (validated by a live v0.33.0 ComfyUI: only the model files were missing)."""
    v = VARIANTS[SCRIPT.NATIVE_VARIANT]
    ui = json.loads((WORKFLOWS / "native" / f"{SCRIPT.native_name()}.json").read_text())
    api = json.loads((WORKFLOWS / "native" / "api" / f"native-{v.name}.json").read_text())
    ((u, unet),) = by_type(api, "UNETLoader")
    ((n, nabla),) = by_type(api, "K5Nabla")
    ((c, cache),) = by_type(api, "K5MagCache")
    ((_, ks),) = by_type(api, "KSampler")
    assert unet["inputs"]["unet_name"] == Path(v.hf_filename).name
    assert nabla["inputs"] == {"model": [u, 0], "mode": "auto"} and cache["inputs"]["model"] == [n, 0]
    assert ks["inputs"]["model"] == [c, 0]
    assert (ks["inputs"]["steps"], ks["inputs"]["cfg"]) == (v.steps, v.guidance)
    ((_, empty),) = by_type(api, "EmptyHunyuanLatentVideo")
    assert (empty["inputs"]["width"], empty["inputs"]["height"], empty["inputs"]["length"]) == (
        *v.default_size,
        v.max_frames,
    )
    kinds = [node["type"] for node in ui["nodes"]]
    assert sorted(k for k in kinds if k != "MarkdownNote") == sorted(n["class_type"] for n in api.values())
    widgets = {node["type"]: node["widgets_values"] for node in ui["nodes"]}
    assert widgets["K5Nabla"] == ["auto"] and widgets["KSampler"][2:4] == [v.steps, v.guidance]
    # no expansion: ComfyUI's Qwen has no LM head, ours would be a second Qwen; the Note says so
    assert "K5PromptExpansion" not in kinds and "No prompt expansion here" in widgets["MarkdownNote"][0]
