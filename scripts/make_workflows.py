"""Generate the bundled workflows from the variants table: one UI-format workflow per variant in workflows/ (what
ComfyUI's Load, drag-and-drop and template browser use) and its API-format twin in workflows/api/ (what POST /prompt
and `python -m kandinsky_core queue` take), converted from the UI file. Never edit either by hand.

    python scripts/make_workflows.py            # write workflows/*.json and workflows/api/*.json
    python scripts/make_workflows.py --check    # exit 1 when a file is missing, stale or extra
    python scripts/make_workflows.py --object-info http://127.0.0.1:8188   # refresh tests/data/object_info.json

The UI->API conversion (kandinsky_core.queue.ui_to_api) needs each node's input list. It reads
tests/data/object_info.json, saved from a real ComfyUI's /object_info; tests/integration checks it against the
live server so that it cannot go stale unnoticed.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kandinsky_core import download  # noqa: E402
from kandinsky_core.queue import ui_to_api  # noqa: E402
from kandinsky_core.variants import FPS, VARIANTS, Variant  # noqa: E402

WORKFLOWS = REPO / "workflows"
API = WORKFLOWS / "api"
OBJECT_INFO = REPO / "tests" / "data" / "object_info.json"
NODE_TYPES = (
    "Kandinsky5LoadDiT", "Kandinsky5LoadTextEncoders", "Kandinsky5LoadVAE", "Kandinsky5TextEncode",
    "Kandinsky5PromptExpansion", "Kandinsky5Sampler", "Kandinsky5VAEDecode", "Kandinsky5VAEEncode",
    "LoadImage", "ImageScale", "SaveImage", "SaveAnimatedWEBP",
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
WEBP = {"lossless": False, "quality": 90, "method": "default"}  # SaveAnimatedWEBP exists on ComfyUI 0.3.x and later


def video_negative() -> str:
    from kandinsky_core.pipeline import VIDEO_NEGATIVE

    return VIDEO_NEGATIVE


def model_names(v: Variant) -> dict[str, str]:
    """The loader choices for the files `download --variant` places (names relative to ComfyUI's model folders)."""
    models = Path("models")
    plan = {p.role: p for p in download.plan_downloads(v, models)}
    vae_dir = Path(download.VAE_FILES[0]).parent.name  # diffusers repos keep the VAE in vae/
    return {
        "dit": plan["dit"].dest.name,
        "qwen": plan["qwen"].dest.name + "/",
        "clip": plan["clip"].dest.name + "/",
        "vae": f"{plan['vae'].dest.relative_to(models / 'vae').as_posix()}/{vae_dir}/",
    }


def note_text(v: Variant) -> str:
    models = Path("models")
    lines = [f"Kandinsky 5.0 {v.title} ({v.name})", "", "Files this workflow needs (in ComfyUI's models folder):"]
    for p in download.plan_downloads(v, models):
        folders = {Path(x).parent.as_posix() for x in p.allow_patterns}
        what = p.filename if p.filename != "*" else f"its {folders.pop()}/ folder" if folders - {"."} else ""
        src = f"https://huggingface.co/{p.repo}" + (f" ({what})" if what else "")
        gated = " - gated: accept the licence on Hugging Face and log in first" if p.gated else ""
        lines.append(
            f"- {p.dest.as_posix()}/  <-  {src}{gated}" if p.filename == "*" else f"- {p.dest.as_posix()}  <-  {src}"
        )
    lines += [
        "",
        "Download them all (from custom_nodes/comfyui-kandinsky5, with ComfyUI's Python):",
        f"  python -m kandinsky_core download --variant {v.name}",
        "",
        f"Official settings: {v.steps} steps, guidance {v.guidance:g}, scheduler scale {v.scheduler_scale:g}, "
        + (f"NABLA P={v.nabla.P:g}" if v.nabla else "dense attention")
        + (f", {v.max_frames} frames ({v.max_frames // FPS} s at {FPS} fps)" if v.is_video else "")
        + f"; sizes (WxH): {', '.join(f'{w}x{h}' for w, h in v.resolutions)}.",
    ]
    if v.task in ("i2v", "i2i"):
        lines.append(
            "Load your " + ("start image" if v.task == "i2v" else "image to edit") + " in the Load Image node."
        )
    return "\n".join(lines)


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
    width, height = v.default_size
    nabla = v.nabla
    return [
        width, height, v.max_frames if v.is_video else 1, 1, SEED, "fixed", v.steps, v.guidance, v.scheduler_scale,
        "on" if nabla else "off", nabla.P if nabla else 0.0, nabla.wT if nabla else 0, nabla.wH if nabla else 0,
        nabla.wW if nabla else 0,
    ]  # fmt: skip


def build_ui(v: Variant, object_info: dict) -> dict:
    """The UI workflow of one variant, with its official settings."""
    g = Graph(object_info)
    names = model_names(v)
    note = g.add("Note", (-420, 0), (380, 420), [note_text(v)], title="Files and download")
    note.update({"color": "#432", "bgcolor": "#653"})
    note["properties"] = {"text": ""}
    dit = g.add("Kandinsky5LoadDiT", (0, 0), (340, 130), [names["dit"], v.name, "default", "auto"])
    te = g.add("Kandinsky5LoadTextEncoders", (0, 180), (340, 110), [names["qwen"], names["clip"], "default"])
    vae = g.add("Kandinsky5LoadVAE", (0, 340), (340, 90), [names["vae"], "default"])
    negative = video_negative() if v.is_video else ""
    enc = g.add("Kandinsky5TextEncode", (380, 0), (420, 300), [PROMPTS[v.task], negative, v.text_template])
    sampler = g.add("Kandinsky5Sampler", (840, 0), (320, 470), sampler_widgets(v))
    g.link(te, 0, enc, "text_encoders")
    g.link(dit, 0, enc, "model")
    g.link(dit, 0, sampler, "model")
    g.link(enc, 0, sampler, "positive")
    g.link(enc, 1, sampler, "negative")
    if v.task in ("i2v", "i2i"):
        image = g.add("LoadImage", (0, 480), (340, 320), [IMAGE, "image"])
        encode = g.add("Kandinsky5VAEEncode", (380, 480), (320, 130), list(v.default_size))
        g.link(vae, 0, encode, "vae")
        g.link(image, 0, encode, "images")
        g.link(encode, 0, sampler, "start_latent" if v.task == "i2v" else "edit_latent")
        if v.task == "i2i":  # Qwen reads the image at the output size, as the official I2I pipeline gives it
            scale = g.add("ImageScale", (380, 660), (320, 130), ["bilinear", *v.default_size, "center"])
            g.link(image, 0, scale, "image")
            g.link(scale, 0, enc, "edit_image")
    decode = g.add("Kandinsky5VAEDecode", (1200, 0), (320, 180), ["auto", 256, 64, 16, 8])
    g.link(vae, 0, decode, "vae")
    g.link(sampler, 0, decode, "samples")
    prefix = f"kandinsky5/{v.name}"
    if v.is_video:
        save = g.add("SaveAnimatedWEBP", (1560, 0), (420, 460), [prefix, float(FPS), *WEBP.values()])
    else:
        save = g.add("SaveImage", (1560, 0), (420, 460), [prefix])
    g.link(decode, 0, save, "images")
    return g.workflow()


def dump(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def expected_files(object_info: dict) -> dict[Path, str]:
    """Every generated file and its exact content: UI workflows from the table, API twins from the UI files."""
    files = {}
    for v in VARIANTS.values():
        ui = build_ui(v, object_info)
        files[WORKFLOWS / f"{v.name}.json"] = dump(ui)
        files[API / f"{v.name}.json"] = dump(ui_to_api(ui, object_info))
    return files


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
    present = set(WORKFLOWS.glob("*.json")) | set(API.glob("*.json"))
    stale = sorted(str(f.relative_to(REPO)) for f, text in files.items() if not f.is_file() or f.read_text() != text)
    extra = sorted(str(f.relative_to(REPO)) for f in present - set(files))
    if args.check:
        for f in stale:
            print(f"stale or missing: {f}")
        for f in extra:
            print(f"not generated (remove it, or add its variant to kandinsky_core/variants.py): {f}")
        if stale or extra:
            print("Run `python scripts/make_workflows.py` to regenerate the workflows.")
            return 1
        print(f"{len(files)} workflow files are up to date.")
        return 0
    API.mkdir(parents=True, exist_ok=True)
    for f, text in files.items():
        f.write_text(text)
    for f in extra:
        (REPO / f).unlink()
    print(f"wrote {len(files)} files ({len(stale)} changed, {len(extra)} removed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
