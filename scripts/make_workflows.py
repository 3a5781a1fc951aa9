"""Generate the bundled workflows from the variants table: one UI-format workflow per variant in workflows/ (what
ComfyUI's Load, drag-and-drop and template browser use) with its thumbnail card beside it, and its API-format twin in
workflows/api/<variant>.json (what POST /prompt and `python -m kandinsky_core queue` take), converted from the UI
file. Never edit any of them by hand.

    python scripts/make_workflows.py            # write workflows/*.json, *.jpg and workflows/api/*.json
    python scripts/make_workflows.py --check    # exit 1 when a file is missing, stale or extra

Template browser: ComfyUI lists a pack's workflows/*.json by file name, and its frontend shows that name as both the
title and the description of the template (spaces for - and _ in the description), with `<name>.jpg` beside the
workflow as its thumbnail. So the UI file names carry the description: "Kandinsky 5 - NN <model> <task> <length>
<size>", numbered in template_order() (Lite T2V distilled, the fast start, is 01). The server lists the files in
directory order (unsorted; a pack cannot order them) and the browser keeps it by default; its "A -> Z" sort follows
the numbers (tests/integration/test_browser.py checks both).
    python scripts/make_workflows.py --object-info http://127.0.0.1:8188   # refresh tests/data/object_info.json

The UI->API conversion (comfy_client.workflow.ui_to_api) needs each node's input list. It reads
tests/data/object_info.json, saved from a real ComfyUI's /object_info; tests/integration checks it against the
live server so that it cannot go stale unnoticed.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from comfy_client.workflow import ui_to_api  # noqa: E402
from kandinsky_core import download  # noqa: E402
from kandinsky_core.variants import FPS, VARIANTS, Variant  # noqa: E402

WORKFLOWS = REPO / "workflows"
API = WORKFLOWS / "api"
OBJECT_INFO = REPO / "tests" / "data" / "object_info.json"
NODE_TYPES = (
    "K5LoadDiT", "K5LoadTextEncoders", "K5LoadVAE", "K5TextEncode",
    "K5PromptExpansion", "K5Sampler", "K5VAEDecode", "K5VAEEncode",
    "LoadImage", "SaveImage", "CreateVideo", "SaveVideo",
    # the workflow for ComfyUI's own Kandinsky 5 model (native_workflow)
    "UNETLoader", "DualCLIPLoader", "CLIPTextEncodeKandinsky5", "VAELoader", "VAEDecode", "EmptyHunyuanLatentVideo",
    "KSampler", "K5Nabla", "K5MagCache",
)  # fmt: skip

SEED = 42
IMAGE = "example.png"  # ComfyUI ships input/example.png
PROMPTS = {
    "t2v": "A red fox trots through fresh snow in a birch forest at sunrise, soft golden light, camera tracking "
    "alongside, cinematic, highly detailed.",
    "i2v": "The scene comes to life: gentle camera push-in, leaves sway in the wind, natural motion.",
    "t2i": "A cozy reading nook by a rain-streaked window, warm lamp light, a cat asleep on a knitted blanket, "
    "photorealistic, 35 mm photo.",
    "i2i": "Make it a snowy winter evening, keep the composition.",
}
MP4 = ["mp4", "h264"]  # SaveVideo's format and codec (CreateVideo + SaveVideo: v0.3.64 and later)
EXPANSION_TOKENS = 256  # max_new_tokens of the official pipelines' expand_prompt (all four, and their ComfyUI node)


def video_negative() -> str:
    from kandinsky_core.pipeline import VIDEO_NEGATIVE

    return VIDEO_NEGATIVE


TASK_WORDS = {"t2v": "text to video", "i2v": "image to video", "t2i": "text to image", "i2i": "image editing"}


def template_order() -> list[Variant]:
    """The template browser's order: the fast start (Lite T2V distilled) first, then the other Lite video models,
    the image models, and Pro last; 5 s before 10 s, SD before HD, as the table lists them within a group."""
    family = {"lite": 0, "image": 2, "pro": 3}
    stage = {"distilled": 0, "sft": 1, "nocfg": 2, "pretrain": 3}
    task = {"t2v": 0, "i2v": 1, "t2i": 0, "i2i": 1}
    table = list(VARIANTS.values())

    def key(v: Variant) -> tuple:
        group = family[v.family] + (1 if v.family == "lite" and v.task == "i2v" else 0)
        return (group, task[v.task], stage[v.stage], v.max_frames, v.quality != "sd", table.index(v))

    return sorted(table, key=key)


def template_name(v: Variant) -> str:
    """The UI workflow's file name without .json, which the template browser shows as title and description."""
    number = template_order().index(v) + 1
    width, height = v.default_size
    fast = " (fast start)" if number == 1 else ""
    return f"Kandinsky 5 - {number:02d} {v.title} {width}x{height}{fast}"


def ui_path(name: str) -> Path:
    """The bundled UI workflow of a variant (by variant name)."""
    return WORKFLOWS / f"{template_name(VARIANTS[name])}.json"


def model_names(v: Variant) -> dict[str, str]:
    """The loader choices: the files `download --variant` places (ComfyUI's single files for all but the DiT)."""
    plan = {p.role: p for p in download.plan_downloads(v, Path("models"))}
    return {role: plan[role].dest.name for role in ("dit", "qwen", "clip", "vae")}


def model_entries(v: Variant) -> dict[str, list[dict]]:
    """properties.models of each loader, as ComfyUI's templates carry them: the missing-models panel offers a
    Download of each entry (url) into its models folder (directory)."""
    dit = {"name": model_names(v)["dit"], "url": f"https://huggingface.co/{v.hf_repo}/resolve/main/{v.hf_filename}",
           "directory": "diffusion_models"}  # fmt: skip
    entry = {role: {"name": f.name, "url": f.url, "directory": f.folder} for role, f in download.SINGLE_FILES.items()}
    return {
        "K5LoadDiT": [dit],
        "K5LoadTextEncoders": [entry["qwen"], entry["clip"]],
        "K5LoadVAE": [entry[v.vae]],
    }


def describe(v: Variant) -> str:
    """One line: model, task, length, size."""
    width, height = v.default_size
    length = f"{v.max_frames // FPS} s ({v.max_frames} frames at {FPS} fps), " if v.is_video else ""
    return f"Kandinsky 5.0 {v.title}: {TASK_WORDS[v.task]}, {length}{width}x{height}"


def note_text(v: Variant) -> str:
    """The Markdown note: what the workflow does, the files with clickable links, where they go, the settings."""
    files = [e for entries in model_entries(v).values() for e in entries]
    lines = [f"## {describe(v)}", "", f"Variant `{v.name}`, weights from [{v.hf_repo}](https://huggingface.co/{v.hf_repo}).",
             "", "## Model links", ""]  # fmt: skip
    for directory in ("text_encoders", "diffusion_models", "vae"):
        lines.append(f"**{directory}**")
        lines.append("")
        lines += [f"- [{e['name']}]({e['url']})" for e in files if e["directory"] == directory]
        lines.append("")
    lines += ["Model Storage Location", "", "```", "📂 ComfyUI/", "├── 📂 models/"]
    dirs = ("text_encoders", "diffusion_models", "vae")
    for i, directory in enumerate(dirs):
        last_dir = i == len(dirs) - 1
        lines.append(("│   └── " if last_dir else "│   ├── ") + f"📂 {directory}/")
        names = [e["name"] for e in files if e["directory"] == directory]
        for j, name in enumerate(names):
            lines.append(("│          " if last_dir else "│   │      ") + ("└── " if j == len(names) - 1 else "├── ")
                         + name)  # fmt: skip
    lines += ["```", ""]
    lines += [
        "Missing files: the Download buttons of ComfyUI's missing-models dialog fetch them into these folders. "
        "Or from a terminal, in this pack's folder under ComfyUI/custom_nodes, with ComfyUI's Python:",
        "",
        f"`python -m kandinsky_core download --variant {v.name}`",
        "",
        "(it fetches the files above that are missing, the same ones. With `--folders` it fetches the Hugging Face "
        f"folders instead: [{download.QWEN_REPO}](https://huggingface.co/{download.QWEN_REPO}), "
        f"[{download.CLIP_REPO}](https://huggingface.co/{download.CLIP_REPO}) and "
        + (f"[{download.FLUX_VAE_REPO}](https://huggingface.co/{download.FLUX_VAE_REPO}) vae/ (gated: accept the "
           "licence and log in first)" if v.vae == "flux" else
           f"[{download.HUNYUAN_VAE_REPO}](https://huggingface.co/{download.HUNYUAN_VAE_REPO}) vae/")
        + "; the loaders take those folders too).",
        "",
        "## Official settings",
        "",
        f"{v.steps} steps, guidance {v.guidance:g}, scheduler scale {v.scheduler_scale:g}, "
        + (f"NABLA P={v.nabla.P:g}" if v.nabla else "dense attention")
        + (f", {v.max_frames} frames ({v.max_frames // FPS} s at {FPS} fps)" if v.is_video else "")
        + f"; sizes (WxH): {', '.join(f'{w}x{h}' for w, h in v.resolutions)}.",
    ]  # fmt: skip
    if v.task in ("i2v", "i2i"):
        what = "start image" if v.task == "i2v" else "image to edit"
        lines += ["", f"Load your {what} in the Load Image node."]
    lines += ["", *expansion_note(v)]
    return "\n".join(lines) + "\n"


# Qwen2.5-VL-7B-Instruct's released config (kandinsky_core.text_encoders.QWEN25_VL_7B_CONFIG), counted on the meta
# device: language model 7.07 B parameters, LM head 0.545 B, vision tower 0.677 B
QWEN_GENERATE_PARAMS, QWEN_HEAD_PARAMS, QWEN_VISION_PARAMS = 7.07e9 + 0.545e9, 0.545e9, 0.677e9
H100_BANDWIDTH = 3.35e12  # bytes/s, NVIDIA's H100 SXM figure (the GPU of the official latency tables)
CPU_BANDWIDTH = 30e9  # bytes/s, a desktop's dual-channel DDR5


def expansion_note(v: Variant) -> list[str]:
    """What Prompt Expansion does in this workflow, how to turn it off, and what it costs."""
    sees = {
        "i2v": " It sees the start image as loaded, as the official I2V pipeline shows it to Qwen.",
        "i2i": " It sees the image to edit at a quarter of its size, as the official I2I pipeline shows it to Qwen.",
    }.get(v.task, "")
    per_token = QWEN_GENERATE_PARAMS * 2  # bf16 bytes read for every generated token
    floor = EXPANSION_TOKENS * per_token / H100_BANDWIDTH
    vision = (f" and, for the image, the vision tower ({QWEN_VISION_PARAMS / 1e9:.2f} B, "
              f"{QWEN_VISION_PARAMS * 2 / 1e9:.2f} GB)") if v.task == "i2v" else ""  # fmt: skip
    return [
        "## Prompt expansion (on, as in the official pipelines)",
        "",
        "Write your prompt in **Kandinsky 5 Prompt Expansion**: Qwen2.5-VL rewrites it into a detailed one, which "
        f"goes to Kandinsky 5 Text Encode.{sees} The expanded prompt is printed in ComfyUI's log. To encode your "
        "prompt as written, set the node's **expand** to off (Qwen then generates nothing).",
        "",
        f"Cost: Qwen generates up to {EXPANSION_TOKENS} new tokens (the official `max_new_tokens`) before the "
        f"encode, each a pass through {QWEN_GENERATE_PARAMS / 1e9:.1f} B parameters ({per_token / 1e9:.1f} GB in "
        f"bf16). Not measured on a GPU here; reading those weights once per token takes at least {floor:.1f} s "
        f"for {EXPANSION_TOKENS} tokens at an H100's {H100_BANDWIDTH / 1e12:.2f} TB/s (about "
        f"{EXPANSION_TOKENS * per_token / CPU_BANDWIDTH / 60:.0f} min at a CPU's {CPU_BANDWIDTH / 1e9:.0f} GB/s). "
        f"Memory: Qwen's LM head ({QWEN_HEAD_PARAMS / 1e9:.3f} B parameters, {QWEN_HEAD_PARAMS * 2 / 1e9:.2f} GB in "
        f"bf16){vision} {'are' if vision else 'is'} loaded at the first expansion and kept with the text encoders. "
        "The expansion's seed is "
        "fixed, so ComfyUI reuses it on the next Run until the prompt, image or model change. It needs Qwen's "
        "LM head (lm_head.weight): a Qwen file without it is refused with that message; turn expand off or load "
        f"the [{download.QWEN_REPO}](https://huggingface.co/{download.QWEN_REPO}) folder.",
    ]


class Graph:
    """A UI-format workflow under construction: nodes with positions, link bookkeeping, widgets in frontend order."""

    def __init__(self, object_info: dict):
        self.info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(
        self, kind: str, pos: tuple[int, int], size: tuple[int, int], widgets: list, title: str | None = None
    ) -> dict:
        node = {
            "id": len(self.nodes) + 1, "type": kind, "pos": list(pos), "size": list(size), "flags": {},
            "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [],
            "properties": {"Node name for S&R": kind}, "widgets_values": widgets,
        }  # fmt: skip
        if title:
            node["title"] = title
        info = self.info.get(kind)
        if info is not None:
            for section in ("required", "optional"):
                for name in (info.get("input_order") or {}).get(section, []):
                    spec = info["input"][section][name]
                    if not isinstance(spec[0], list) and spec[0] not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                        node["inputs"].append({"name": name, "type": spec[0], "link": None})
            names = info.get("output_name") or info["output"]
            node["outputs"] = [
                {"name": n, "type": t, "links": [], "slot_index": i}
                for i, (n, t) in enumerate(zip(names, info["output"], strict=True))
            ]
        self.nodes.append(node)
        return node

    def widget_input(self, node: dict, name: str) -> None:
        """A widget that takes a link, as the frontend saves it: an input named after the widget, with
        `widget: {name}`, after the node's other inputs; the widget keeps its place (and value) in widgets_values."""
        spec = {**self.info[node["type"]]["input"].get("required", {}), **self.info[node["type"]]["input"].get(
            "optional", {})}[name]  # fmt: skip
        node["inputs"].append({"name": name, "type": spec[0], "widget": {"name": name}, "link": None})

    def link(self, src: dict, slot: int, dst: dict, input_name: str) -> None:
        link_id = len(self.links) + 1
        dst_slot = next(i for i, x in enumerate(dst["inputs"]) if x["name"] == input_name)
        kind = src["outputs"][slot]["type"]
        dst["inputs"][dst_slot]["link"] = link_id
        src["outputs"][slot]["links"].append(link_id)
        self.links.append([link_id, src["id"], slot, dst["id"], dst_slot, kind])

    def workflow(self) -> dict:
        return {
            "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
            "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4,
        }  # fmt: skip


def sampler_widgets(v: Variant) -> list:
    """NABLA is not a sampler widget: the sampler takes the variant's (auto) unless a Kandinsky 5 NABLA node says
    otherwise. I2V / I2I: 0 x 0, the size Kandinsky 5 VAE Encode chose from the image. The seed changes after each
    run, so a second Run makes a new video."""
    width, height = (0, 0) if v.task in ("i2v", "i2i") else v.default_size
    return [
        width, height, v.max_frames if v.is_video else 1, 1, SEED, "randomize", v.steps, v.guidance,
        v.scheduler_scale,
    ]  # fmt: skip


def build_ui(v: Variant, object_info: dict) -> dict:
    """The UI workflow of one variant, with its official settings."""
    g = Graph(object_info)
    names = model_names(v)
    note = g.add("MarkdownNote", (-520, 0), (480, 640), [note_text(v)], title="Model links")
    note.update({"color": "#222", "bgcolor": "#000", "properties": {}})
    # variant and template auto: another DiT file brings its own settings (the front end fills the sampler)
    dit = g.add("K5LoadDiT", (0, 0), (340, 130), [names["dit"], "auto", "default", "auto"])
    te = g.add("K5LoadTextEncoders", (0, 180), (340, 110), [names["qwen"], names["clip"], "default"])
    vae = g.add("K5LoadVAE", (0, 340), (340, 90), [names["vae"], "default"])
    for loader in (dit, te, vae):
        loader["properties"]["models"] = model_entries(v)[loader["type"]]
    negative = video_negative() if v.is_video else ""
    enc = g.add("K5TextEncode", (380, 400), (420, 260), ["", negative, "auto"])
    g.widget_input(enc, "prompt")  # from Prompt Expansion (added last, so that the other nodes keep their ids)
    sampler = g.add("K5Sampler", (840, 0), (320, 470), sampler_widgets(v))
    g.link(te, 0, enc, "text_encoders")
    g.link(dit, 0, enc, "model")
    g.link(dit, 0, sampler, "model")
    g.link(enc, 0, sampler, "positive")
    g.link(enc, 1, sampler, "negative")
    if v.task in ("i2v", "i2i"):
        image = g.add("LoadImage", (0, 480), (340, 320), [IMAGE, "image"])
        # 0 x 0: the size from the image by the official rule for the connected model (I2V keeps the whole image,
        # I2I takes the nearest trained aspect and cover-crops); the sampler follows the latent
        encode = g.add("K5VAEEncode", (380, 710), (320, 130), [0, 0])
        g.link(vae, 0, encode, "vae")
        g.link(image, 0, encode, "images")
        g.link(dit, 0, encode, "model")
        g.link(encode, 0, sampler, "start_latent" if v.task == "i2v" else "edit_latent")
        if v.task == "i2i":  # Qwen reads the image as encoded, as the official I2I pipeline gives it
            g.link(encode, 1, enc, "edit_image")
    decode = g.add("K5VAEDecode", (1200, 0), (320, 180), ["auto", 256, 64, 16, 8])
    g.link(vae, 0, decode, "vae")
    g.link(sampler, 0, decode, "samples")
    prefix = f"kandinsky5/{v.name}"
    if v.is_video:  # MP4 through ComfyUI's own video nodes
        video = g.add("CreateVideo", (1560, 0), (270, 100), [float(FPS), 8])  # 8-bit (v0.3.64 has no bit_depth)
        g.link(decode, 0, video, "images")
        save = g.add("SaveVideo", (1870, 0), (420, 460), [prefix, *MP4])
        g.link(video, 0, save, "video")
    else:
        save = g.add("SaveImage", (1560, 0), (420, 460), [prefix])
        g.link(decode, 0, save, "images")
    # the prompt goes through Prompt Expansion, on as in the official pipelines; its seed stays fixed, so ComfyUI
    # reuses the expansion on the next Run until the prompt, image or model change
    expand = g.add("K5PromptExpansion", (380, 0), (420, 350),
                   [PROMPTS[v.task], "auto", SEED, "fixed", EXPANSION_TOKENS, True])  # fmt: skip
    g.link(te, 0, expand, "text_encoders")
    g.link(dit, 0, expand, "model")
    if v.task in ("i2v", "i2i"):  # Qwen sees the image as loaded, as the official pipelines show it (I2I: quartered)
        g.link(image, 0, expand, "image")
    g.link(expand, 0, enc, "prompt")
    return g.workflow()


NATIVE = WORKFLOWS / "native"  # not in the template browser's list (it numbers one workflow per variant)
NATIVE_VARIANT = "t2v-lite-sft-10s"


def native_name() -> str:
    v = VARIANTS[NATIVE_VARIANT]
    width, height = v.default_size
    return f"Kandinsky 5 - {v.title} {width}x{height} - ComfyUI loaders and KSampler with NABLA and MagCache"


def native_note() -> str:
    v = VARIANTS[NATIVE_VARIANT]
    names = model_names(v)
    return "\n".join([
        f"# {describe(v)}, with ComfyUI's own nodes",
        "",
        "ComfyUI's **Load Diffusion Model**, **DualCLIPLoader** (type kandinsky5), **CLIPTextEncodeKandinsky5**, "
        "**KSampler** and **VAE Decode**, with two patches of this pack on the model:",
        "",
        "- **Kandinsky 5 NABLA** (auto: the Lite 10 s model's official sparse attention, P 0.9, windows 11 / 3 / 3; "
        "exact, and several times faster than dense attention at this length). Width and height: multiples of 128.",
        "- **Kandinsky 5 MagCache** (the official ratios of the model: about half of the DiT calls reuse a cached "
        "residual).",
        "",
        f"Files: `diffusion_models/{names['dit']}`, `text_encoders/{names['qwen']}`, `text_encoders/{names['clip']}`, "
        f"`vae/{names['vae']}` (`python -m kandinsky_core download --variant {v.name}` fetches them).",
        "",
        "Differences from the Kandinsky 5 Sampler workflow: ComfyUI's text encoder spells the official video "
        "template's 'promt engineer' as 'prompt engineer' (the model was trained with the former; Kandinsky 5 Text "
        "Encode keeps it), and ComfyUI's VAE Decode is not the official decoder on moving video (Kandinsky 5 VAE "
        "Decode is).",
        "",
        "No prompt expansion here, unlike the official pipelines and this pack's Kandinsky 5 workflows: ComfyUI's "
        "own Qwen2.5-VL (DualCLIPLoader, type kandinsky5) is built without Qwen's LM head (its Qwen2.5-VL config has "
        "lm_head off), so ComfyUI's Generate Text would take its logits from the input embeddings (Qwen2.5-VL-7B "
        "does not tie them) and not give Qwen's text; and Kandinsky 5 Prompt Expansion needs this pack's Load "
        "Kandinsky 5 Text Encoders, a second Qwen beside ComfyUI's. To expand a prompt, run it through a Kandinsky 5 "
        "workflow, or `python -m kandinsky_core generate`, which prints the expanded prompt.",
    ]) + "\n"  # fmt: skip


def native_workflow(object_info: dict) -> tuple[dict, dict]:
    """The UI workflow for users of ComfyUI's own Kandinsky 5 model, and its API twin."""
    v = VARIANTS[NATIVE_VARIANT]
    names = model_names(v)
    width, height = v.default_size
    negative = video_negative()
    g = Graph(object_info)
    note = g.add("MarkdownNote", (-520, 0), (480, 640), [native_note()], title="Model links")
    note.update({"color": "#222", "bgcolor": "#000", "properties": {}})
    unet = g.add("UNETLoader", (0, 0), (340, 90), [names["dit"], "default"])
    clip = g.add("DualCLIPLoader", (0, 140), (340, 130), [names["qwen"], names["clip"], "kandinsky5", "default"])
    vae = g.add("VAELoader", (0, 320), (340, 60), [names["vae"]])
    nabla = g.add("K5Nabla", (380, 0), (320, 60), ["auto"])
    cache = g.add("K5MagCache", (380, 110), (320, 160), [0.12, 2, 0.2, ""])
    pos = g.add("CLIPTextEncodeKandinsky5", (380, 320), (400, 200), [PROMPTS["t2v"], PROMPTS["t2v"]], title="Positive")
    neg = g.add("CLIPTextEncodeKandinsky5", (380, 560), (400, 200), [negative, negative], title="Negative")
    empty = g.add("EmptyHunyuanLatentVideo", (820, 320), (320, 130), [width, height, v.max_frames, 1])
    sampler = g.add("KSampler", (820, 0), (320, 270),
                    [SEED, "randomize", v.steps, v.guidance, "euler", "simple", 1.0])  # fmt: skip
    decode = g.add("VAEDecode", (1180, 0), (220, 50), [])
    video = g.add("CreateVideo", (1440, 0), (270, 100), [float(FPS), 8])
    save = g.add("SaveVideo", (1750, 0), (420, 460), [f"kandinsky5/native-{v.name}", *MP4])
    g.link(unet, 0, nabla, "model")
    g.link(nabla, 0, cache, "model")
    g.link(cache, 0, sampler, "model")
    g.link(clip, 0, pos, "clip")
    g.link(clip, 0, neg, "clip")
    g.link(pos, 0, sampler, "positive")
    g.link(neg, 0, sampler, "negative")
    g.link(empty, 0, sampler, "latent_image")
    g.link(sampler, 0, decode, "samples")
    g.link(vae, 0, decode, "vae")
    g.link(decode, 0, video, "images")
    g.link(video, 0, save, "video")
    unet["properties"]["models"] = [model_entries(v)["K5LoadDiT"][0]]
    clip["properties"]["models"] = model_entries(v)["K5LoadTextEncoders"]
    vae["properties"]["models"] = model_entries(v)["K5LoadVAE"]
    workflow = g.workflow()
    return workflow, ui_to_api(workflow, object_info)


def dump(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


THUMB_SIZE = 400  # px, square, as ComfyUI's own template thumbnails
THUMB_VERSION = 1  # bump when the drawing changes: --check compares the card's spec stored in the JPEG comment
FAMILY_COLOURS = {"lite": ((38, 70, 140), (92, 160, 230)), "pro": ((90, 30, 110), (210, 90, 150)),
                  "image": ((20, 100, 90), (90, 200, 150))}  # fmt: skip


def thumbnail_lines(v: Variant) -> list[str]:
    """What the card says, all from the variants table: model, task, length, size, steps."""
    width, height = v.default_size
    family = {"lite": "Video Lite 2B", "pro": "Video Pro 19B", "image": "Image Lite 6B"}[v.family]
    stage = {"distilled": "distilled 16 steps", "nocfg": "no-CFG", "sft": "SFT", "pretrain": "pretrain"}[v.stage]
    length = f"{v.max_frames // FPS} s video" if v.is_video else "image"
    lines = [f"Kandinsky 5 - {template_order().index(v) + 1:02d}", family, f"{v.task.upper()}  {stage}",
             TASK_WORDS[v.task], f"{length}  {width}x{height}",
             f"{v.steps} steps  guidance {v.guidance:g}"]  # fmt: skip
    if template_order().index(v) == 0:
        lines.append("fast start")
    return lines


def thumbnail_spec(v: Variant) -> str:
    return json.dumps({"version": THUMB_VERSION, "size": THUMB_SIZE, "lines": thumbnail_lines(v)}, ensure_ascii=True)


def thumbnail(v: Variant) -> bytes:
    """A designed card (not a generated picture): a gradient in the family's colours, the frame's aspect as an
    outline, and the card's lines. JPEG, its spec in the comment so that --check sees a stale card on any Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    n = THUMB_SIZE
    top, bottom = FAMILY_COLOURS[v.family]
    img = Image.new("RGB", (n, n))
    draw = ImageDraw.Draw(img)
    for y in range(n):
        t = y / (n - 1)
        draw.line([(0, y), (n, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    width, height = v.default_size
    scale = 0.42 * n / max(width, height)
    fw, fh = round(width * scale), round(height * scale)
    x0, y0 = n - 24 - fw, 24
    draw.rectangle([x0, y0, x0 + fw, y0 + fh], outline=(255, 255, 255), width=3)
    if v.is_video:  # a play mark inside the frame
        cx, cy, r = x0 + fw // 2, y0 + fh // 2, max(8, fh // 6)
        draw.polygon([(cx - r // 2, cy - r), (cx - r // 2, cy + r), (cx + r, cy)], fill=(255, 255, 255))
    lines = thumbnail_lines(v)
    big, small = ImageFont.load_default(size=34), ImageFont.load_default(size=24)
    y = y0 + fh + 28
    draw.text((24, 24), lines[0], font=ImageFont.load_default(size=22), fill=(255, 255, 255))
    for i, line in enumerate(lines[1:]):
        font = big if i == 0 else small
        draw.text((24, y), line, font=font, fill=(255, 255, 255) if i < 2 else (235, 240, 250))
        y += 44 if i == 0 else 34
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85, optimize=True, comment=thumbnail_spec(v).encode())
    return out.getvalue()


def thumbnail_is_current(path: Path, v: Variant) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            comment = img.info.get("comment", b"")
            square = img.size == (THUMB_SIZE, THUMB_SIZE)
            return img.format == "JPEG" and square and comment == thumbnail_spec(v).encode()
    except OSError:
        return False


def expected_files(object_info: dict) -> dict[Path, str]:
    """Every generated JSON file and its exact content: UI workflows from the table, API twins from the UI files."""
    files = {}
    for v in VARIANTS.values():
        ui = build_ui(v, object_info)
        files[WORKFLOWS / f"{template_name(v)}.json"] = dump(ui)
        files[API / f"{v.name}.json"] = dump(ui_to_api(ui, object_info))
    ui, api = native_workflow(object_info)
    files[NATIVE / f"{native_name()}.json"] = dump(ui)
    files[NATIVE / "api" / f"native-{NATIVE_VARIANT}.json"] = dump(api)
    return files


def expected_thumbnails() -> dict[Path, Variant]:
    return {WORKFLOWS / f"{template_name(v)}.jpg": v for v in VARIANTS.values()}


def load_object_info(source: str | None = None) -> dict:
    if source and source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source.rstrip("/") + "/object_info", timeout=60) as r:
            full = json.loads(r.read())
        missing = [k for k in NODE_TYPES if k not in full]
        if missing:
            raise SystemExit(f"{source} lacks node types {missing}: is the Kandinsky 5 pack installed there?")
        return {k: full[k] for k in NODE_TYPES}
    return json.loads(Path(source or OBJECT_INFO).read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 when anything differs")
    p.add_argument("--object-info", help="a ComfyUI server URL (saved to tests/data/object_info.json) or a JSON file")
    args = p.parse_args(argv)
    object_info = load_object_info(args.object_info)
    if args.object_info and args.object_info.startswith("http") and not args.check:
        OBJECT_INFO.parent.mkdir(parents=True, exist_ok=True)
        OBJECT_INFO.write_text(json.dumps(object_info, indent=1, sort_keys=True) + "\n")
    files = expected_files(object_info)
    thumbs = expected_thumbnails()
    present = set(WORKFLOWS.glob("*.json")) | set(API.glob("*.json")) | set(WORKFLOWS.glob("*.jpg"))
    present |= set(WORKFLOWS.glob("*.webp")) | set(WORKFLOWS.glob("*.png"))
    present |= set(NATIVE.glob("*.json")) | set(NATIVE.glob("api/*.json"))
    stale = sorted(str(f.relative_to(REPO)) for f, text in files.items() if not f.is_file() or f.read_text() != text)
    stale_thumbs = sorted(str(f.relative_to(REPO)) for f, v in thumbs.items() if not thumbnail_is_current(f, v))
    stale = sorted(stale + stale_thumbs)
    extra = sorted(str(f.relative_to(REPO)) for f in present - set(files) - set(thumbs))
    if args.check:
        for f in stale:
            print(f"stale or missing: {f}")
        for f in extra:
            print(f"not generated (remove it, or add its variant to kandinsky_core/variants.py): {f}")
        if stale or extra:
            print("Run `python scripts/make_workflows.py` to regenerate the workflows.")
            return 1
        print(f"{len(files) + len(thumbs)} workflow files are up to date.")
        return 0
    API.mkdir(parents=True, exist_ok=True)
    (NATIVE / "api").mkdir(parents=True, exist_ok=True)
    for f, text in files.items():
        f.write_text(text)
    for f, v in thumbs.items():
        if not thumbnail_is_current(f, v):
            f.write_bytes(thumbnail(v))
    for f in extra:
        (REPO / f).unlink()
    print(f"wrote {len(files) + len(thumbs)} files ({len(stale)} changed, {len(extra)} removed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
