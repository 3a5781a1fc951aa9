"""The README is generated from the variants table and its quick start matches CI and the Makefile."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_variants_table_is_current():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "update_docs.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_readme_lists_every_variant():
    from kandinsky_core.variants import VARIANTS

    readme = (ROOT / "README.md").read_text()
    for name in VARIANTS:
        assert f"`{name}`" in readme


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quick_start = re.search(r"## Quick start\n+```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in quick_start.strip().splitlines()]
    assert commands[1] == "make test"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^generate:", makefile, re.M) and "kandinsky_core generate" in makefile
    assert commands[0].startswith("make generate")


def _pack_node_ids() -> set[str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("node_ids_script", ROOT / "scripts" / "node_ids.py")
    module = sys.modules.get("node_ids_script") or importlib.util.module_from_spec(spec)
    sys.modules["node_ids_script"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module.pack_ids()


def test_comfyui_doc_has_a_row_for_every_registered_node_and_no_other():
    """docs/comfyui.md's node table names every node ID the pack registers (read from nodes/ as
    tests/test_node_ids.py reads them), and the document names no K5 node that is not registered (a removed node
    such as Block Swap)."""
    ids = _pack_node_ids()
    assert len(ids) == 13, ids
    doc = (ROOT / "docs" / "comfyui.md").read_text()
    section = doc.split("## The nodes", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| ") and "`K5" in line]
    in_table = {i for row in rows for i in re.findall(r"`(K5\w+)`", row[2])}
    assert in_table == ids
    assert set(re.findall(r"\bK5[A-Z]\w*", doc)) <= ids
    assert "Block Swap |" not in section and "`K5BlockSwap`" not in doc


MACHINE_PATH = re.compile(r"(?<![\w.$}])(?:/work|/tmp|/home|/Users|/root|/mnt)/|[A-Za-z]:\\\\(?:Users|home)\\\\")


def test_docs_contain_no_machine_paths():
    """README.md and docs/*.md: paths relative to the repository or ComfyUI, never a machine's own folders."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not MACHINE_PATH.search(line), f"{path.name}:{n}: {line}"
