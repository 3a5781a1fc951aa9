"""GET /kandinsky5/variants (nodes/web_api.py): the JSON js/kandinsky5.js fills the sampler from. The real route on a
real ComfyUI, and the extension in a browser, are tested in tests/integration/test_browser.py."""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import pytest
from prerequisites import require_comfy_api
from tiny import TINY_ARCHS, make_tiny_dit_file

require_comfy_api(module_level=True)  # before the node layer is imported

from kandinsky_core import variants  # noqa: E402
from kandinsky_core.settings import resolve  # noqa: E402
from kandinsky_core.variants import VARIANTS  # noqa: E402
from nodes import web_api  # noqa: E402
from nodes.sampler import Sampler  # noqa: E402


def _payload() -> dict:
    return json.loads(json.dumps(web_api.payload()))  # what the browser receives


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A fake ComfyUI `folder_paths` over tmp_path/diffusion_models (only what nodes/files.py calls)."""
    root = tmp_path / "diffusion_models"
    root.mkdir()
    fp = types.ModuleType("folder_paths")
    fp.get_folder_paths = lambda kind: [str(tmp_path / kind)]
    fp.get_filename_list = lambda kind: sorted(p.name for p in (tmp_path / kind).iterdir() if p.is_file())
    fp.get_full_path = lambda kind, name: str(tmp_path / kind / name) if (tmp_path / kind / name).is_file() else None
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.setattr(web_api, "_detected", {})
    return root


def test_every_variant_is_served_with_its_table_numbers(models):
    served = _payload()
    assert served["fps"] == 24 and served["nabla_tile_px"] == 128
    assert list(served["variants"]) == list(VARIANTS)
    for name, v in VARIANTS.items():
        s = served["variants"][name]
        assert (s["steps"], s["guidance"], s["scheduler_scale"]) == (v.steps, v.guidance, v.scheduler_scale)
        assert s["resolutions"] == [list(r) for r in v.resolutions]
        assert (s["max_frames"], s["is_video"], s["task"]) == (v.max_frames, v.is_video, v.task)
        assert s["nabla"] == (dataclasses.asdict(v.nabla) if v.nabla else None)
        assert s["i2v_max_area"] == v.i2v_max_area


@pytest.mark.parametrize(
    "name, expected",
    [
        # by hand from the official configs (configs/k5_*.yaml) and README, not from our table
        ("t2v-lite-sft-5s", (50, 5.0, 10.0, None, 768, 512, 121)),
        ("t2v-lite-sft-10s", (50, 5.0, 10.0, 0.9, 768, 512, 241)),
        ("t2v-lite-distilled16steps-5s", (16, 1.0, 5.0, None, 768, 512, 121)),
        ("t2v-lite-nocfg-5s", (50, 1.0, 10.0, None, 768, 512, 121)),
        ("t2v-pro-sft-10s-hd", (50, 5.0, 10.0, 0.7, 1280, 768, 241)),
        ("t2v-pro-sft-5s-hd", (50, 5.0, 10.0, 0.8, 1280, 768, 121)),
        ("i2v-pro-5s-hd", (50, 5.0, 5.0, 0.8, 0, 0, 121)),  # 0x0: the size of the start latent
        ("i2i-lite", (50, 3.5, 3.0, None, 0, 0, 1)),
        ("t2i-lite", (50, 3.5, 3.0, None, 1024, 1024, 1)),
    ],
)
def test_sampler_defaults_are_the_official_settings(models, name, expected):
    served = _payload()["variants"][name]
    d = served["defaults"]
    keys = ("steps", "guidance", "scheduler_scale", "width", "height", "length")
    steps, guidance, sched, nabla_p, *size = expected
    assert tuple(d[k] for k in keys) == (steps, guidance, sched, *size)
    # NABLA is no Sampler widget: the Sampler takes it from the model (auto = the variant's, shown to the front end)
    assert not any(k.startswith("nabla") for k in d)
    assert served["nabla"] == (None if nabla_p is None else {"P": nabla_p, "wT": 11, "wH": 3, "wW": 3})


@pytest.mark.parametrize("name", list(VARIANTS))
def test_filled_values_run_as_the_variants_own_settings(models, name):
    """The values the extension writes into the sampler make the node resolve exactly what its neutral values
    (0 / -1 / auto = the variant's) resolve, and pass the node's and the table's size checks."""
    v = VARIANTS[name]
    d = _payload()["variants"][name]["defaults"]
    has = {"has_start": v.task == "i2v", "has_edit": v.task == "i2i"}
    filled, problems = resolve(
        v, width=d["width"], height=d["height"], length=d["length"], steps=d["steps"], guidance=d["guidance"],
        scheduler_scale=d["scheduler_scale"], **has,
    )  # fmt: skip
    assert problems == []  # NABLA auto (no Kandinsky 5 NABLA node): the variant's, and the size fits its tiles
    assert filled == resolve(v, width=0, height=0, length=d["length"], steps=0, guidance=-1.0, scheduler_scale=0.0,
                             **has)[0]  # fmt: skip
    assert Sampler.validate_inputs(d["width"], d["height"], d["length"], d["guidance"], d["scheduler_scale"]) is True
    if v.task in ("i2v", "i2i"):  # 0x0: the sampler takes the input latent's size (sized from the image)
        assert (d["width"], d["height"]) == (0, 0)


def test_dit_files_are_served_with_their_detected_variant(models, monkeypatch):
    # a tiny DiT stands in for the released Lite architecture (as tests/test_pipeline.py does)
    tiny = dataclasses.replace(VARIANTS["t2v-lite-sft-5s"], arch=TINY_ARCHS["lite"])
    monkeypatch.setitem(variants.VARIANTS, "t2v-lite-sft-5s", tiny)
    make_tiny_dit_file(models / "kandinsky5lite_t2v_sft_5s.safetensors", TINY_ARCHS["lite"])
    (models / "notes.safetensors").write_bytes(b"not a safetensors file")
    files = _payload()["files"]
    assert files["kandinsky5lite_t2v_sft_5s.safetensors"] == {"variant": "t2v-lite-sft-5s", "fits": ["t2v-lite-sft-5s"]}
    bad = files["notes.safetensors"]
    assert bad["variant"] is None and "notes.safetensors" in bad["error"]


def test_detection_is_cached_until_the_file_changes(models, monkeypatch):
    from kandinsky_core import loading

    calls = []

    def fake_detect(header, filename):
        calls.append(filename)
        return loading.DetectionResult("t2i-lite", ("t2i-lite",), VARIANTS["t2i-lite"].arch)

    monkeypatch.setattr(loading, "read_safetensors_header", lambda path: {})
    monkeypatch.setattr(loading, "detect_variant", fake_detect)
    f = models / "a.safetensors"
    f.write_bytes(b"x")
    assert _payload()["files"]["a.safetensors"] == {"variant": "t2i-lite", "fits": ["t2i-lite"]}
    _payload()
    assert calls == ["a.safetensors"]
    f.write_bytes(b"xy")  # new size: read again
    _payload()
    assert calls == ["a.safetensors", "a.safetensors"]


def test_no_route_outside_comfyui(monkeypatch):
    monkeypatch.delitem(sys.modules, "server", raising=False)  # ComfyUI's main.py has not imported its server
    assert web_api.register_routes() is False
    assert "server" not in sys.modules  # not imported either (ComfyUI's source may be on sys.path, as in the tests)
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=None)))
    assert web_api.register_routes() is False
