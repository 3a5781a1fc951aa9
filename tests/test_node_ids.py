"""Our node IDs collide with no ID that ComfyUI core or the official kandinsky-5 `comfyui/` nodes register: both lists
are read from their Python sources with `ast` (scripts/node_ids.py). With two packs registering one ID, whichever
ComfyUI loads last silently wins and saved workflows break; a custom node with a core ID is dropped by ComfyUI."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from node_ids_expected import EXPECTED_IDS
from prerequisites import comfyui_source, missing

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("node_ids_script", REPO / "scripts" / "node_ids.py")
node_ids = importlib.util.module_from_spec(_spec)
sys.modules["node_ids_script"] = node_ids
_spec.loader.exec_module(node_ids)


def comfyui_sources() -> list[Path]:
    """Every ComfyUI source tree at hand: COMFYUI_DIR (or the newest cached runtime) and the cached releases."""
    found = [comfyui_source()] + sorted((REPO / ".cache" / "comfyui").glob("*/src"))
    out: list[Path] = []
    for src in found:
        if src is not None and (src / "nodes.py").is_file() and src.resolve() not in [o.resolve() for o in out]:
            out.append(src)
    return out


def our_ids() -> set[str]:
    """What nodes/ registers (read from its source, as core's and the official ones are) and what it should."""
    return node_ids.pack_ids() | set(EXPECTED_IDS)


def test_our_ids_in_the_source_are_the_expected_ones():
    assert node_ids.pack_ids() == set(EXPECTED_IDS)


def test_the_parser_reads_every_way_a_module_registers_a_node():
    source = """
NODE_CLASS_MAPPINGS = {"A": a}
NODE_CLASS_MAPPINGS.update({"B": b})
NODE_CLASS_MAPPINGS["C"] = c
class D:
    NodeId = "D"
def define_schema(cls):
    return io.Schema(node_id="E", display_name="e")
class F(Base):
    node_id = "F"
class G(Base):
    def define_schema(cls):
        schema = super().define_schema()
        schema.node_id = "G"
"""
    assert node_ids.ids_in_python(source) == {"A", "B", "C", "D", "E", "F", "G"}


def test_our_ids_are_disjoint_from_comfyui_core():
    sources = comfyui_sources()
    if not sources:
        missing("no ComfyUI source tree to read core's node IDs from: set COMFYUI_DIR or run `make comfyui`")
    for src in sources:
        core = node_ids.core_ids(src)
        assert {"KSampler", "CheckpointLoaderSimple", "VAEDecode", "SaveImage"} <= core, src  # the parser reads it
        if (src / "comfy_extras" / "nodes_kandinsky5.py").is_file():  # v0.33.0 and later
            assert {"Kandinsky5ImageToVideo", "CLIPTextEncodeKandinsky5", "NormalizeVideoLatentStart"} <= core
        clash = our_ids() & core
        assert not clash, f"node IDs also registered by ComfyUI core ({src}): {sorted(clash)}"


def official_ids() -> tuple[set[str], str]:
    src = node_ids.official_source()
    recorded = node_ids.recorded_official()
    if src is None:
        return set(recorded["node_ids"]), f"tests/data/official_comfyui_node_ids.json @ {recorded['commit']}"
    ids = src.ids()
    if src.commit == recorded["commit"]:  # the recorded file is what that source says
        assert sorted(ids) == recorded["node_ids"], "run `python scripts/node_ids.py --record`"
    return ids, f"{src.where} @ {src.commit}"


def test_our_ids_are_disjoint_from_the_official_comfyui_nodes():
    ids, where = official_ids()
    assert {"Kandinsky5LoadDiT", "Kandinsky5LoadVAE", "Kandinsky5TextEncode", "Kandinsky5VAEDecode"} <= ids, where
    clash = our_ids() & ids
    assert not clash, f"node IDs also registered by the official kandinsky-5 comfyui/ nodes ({where}): {sorted(clash)}"


def test_the_recorded_official_ids_name_their_commit():
    recorded = node_ids.recorded_official()
    assert len(recorded["commit"]) == 40 and recorded["files"] == ["comfyui/nodes_kandinsky.py"]
    assert recorded["node_ids"] == sorted(recorded["node_ids"]) and "Kandinsky5Generate" in recorded["node_ids"]


def test_an_official_checkout_is_read_from_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "comfyui"
    folder.mkdir()
    (folder / "nodes_kandinsky.py").write_text('NODE_CLASS_MAPPINGS = {"Kandinsky5LoadDiT": A, "K5Sampler": B}\n')
    monkeypatch.setenv("KANDINSKY5_OFFICIAL", str(tmp_path))
    src = node_ids.official_source()
    assert src.ids() == {"Kandinsky5LoadDiT", "K5Sampler"} and src.where == str(tmp_path)


def test_without_an_official_checkout_the_recorded_ids_are_used(monkeypatch):
    monkeypatch.delenv("KANDINSKY5_OFFICIAL", raising=False)
    ids, where = official_ids()
    assert ids == set(node_ids.recorded_official()["node_ids"]) and "official_comfyui_node_ids.json" in where
