"""kandinsky_core is ComfyUI-free: every module imports without comfy, touches no GPU and compiles nothing."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import kandinsky_core

ROOT = Path(__file__).resolve().parents[1]


def test_every_core_module_imports_without_comfy_cuda_or_compile():
    modules = sorted(
        f"kandinsky_core.{m.name}" for m in pkgutil.iter_modules(kandinsky_core.__path__) if m.name != "__main__"
    )
    assert {"kandinsky_core.model", "kandinsky_core.nabla", "kandinsky_core.pipeline"} <= set(modules)
    code = (
        "import importlib, sys, torch\n"
        "compiled = []\n"
        "torch.compile = lambda *a, **k: compiled.append(a) or (a[0] if a else (lambda f: f))\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "assert not [m for m in sys.modules if m == 'comfy' or m.startswith('comfy.') or m == 'folder_paths']\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert not compiled, compiled\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_tests_run_in_a_checkout_whose_folder_name_is_not_an_identifier(tmp_path):
    """A clone named comfyui-kandinsky5 (CI checks out into the repository's name): pytest then imports the root
    __init__.py as a plain module, with no package for its relative imports. That must not break every test."""
    clone = tmp_path / "comfyui-kandinsky5"
    clone.mkdir()
    (clone / "__init__.py").write_text((ROOT / "__init__.py").read_text())
    (clone / "tests").mkdir()
    (clone / "tests" / "test_one.py").write_text("def test_one():\n    pass\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_one.py"]
    result = subprocess.run(cmd, cwd=clone, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_test_files_have_unique_basenames():
    """tests/ and tests/integration/ are plain folders (no __init__.py), so pytest imports every test file by its
    basename: two files of one name stop the whole run at collection ("import file mismatch")."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py") if "node_modules" not in p.parts]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


# ---- what the Comfy Registry publishes ----


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_has_what_the_comfy_registry_expects():
    import re

    project, comfy = _pyproject()["project"], _pyproject()["tool"]["comfy"]
    # the node id: letters, digits, - _ . (no two special characters in a row, no special or digit first); the
    # Registry advises against "comfyui" in it
    name = project["name"]
    assert re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*", name) and len(name) < 100, name
    assert "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    repo = "https://github.com/kandinsky5-comfy/comfyui-kandinsky5"
    assert project["urls"]["Repository"] == repo
    assert project["urls"]["Documentation"].startswith(repo + "/blob/main/")
    assert (ROOT / project["urls"]["Documentation"].removeprefix(repo + "/blob/main/")).is_file()
    assert comfy["PublisherId"] and comfy["DisplayName"] == "Kandinsky 5"
    # the icon: a square image in this repository, served by GitHub
    raw = "https://raw.githubusercontent.com/kandinsky5-comfy/comfyui-kandinsky5/main/"
    assert comfy["Icon"].startswith(raw) and comfy["Icon"].endswith((".png", ".jpg", ".svg", ".webp"))
    from PIL import Image

    with Image.open(ROOT / comfy["Icon"].removeprefix(raw)) as icon:
        assert icon.size[0] == icon.size[1] >= 128


def test_requires_comfyui_is_the_tested_range():
    import importlib.util

    spec = importlib.util.spec_from_file_location("comfyui_runtime", ROOT / "scripts" / "comfyui_runtime.py")
    runtime = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtime)
    releases = sorted(tuple(int(x) for x in r.lstrip("v").split(".")) for r in runtime.RELEASES)
    low, high = (".".join(map(str, releases[i])) for i in (0, -1))
    assert _pyproject()["tool"]["comfy"]["requires-comfyui"] == f">={low},<={high}"
    readme = (ROOT / "README.md").read_text()
    assert f"v{low}" in readme and f"v{high}" in readme


def test_requirements_never_replace_comfyuis_torch():
    """ComfyUI Manager and `comfy node install` run `pip install -r requirements.txt` with ComfyUI's Python: nothing
    there may pin torch (or torchvision / torchaudio) to a version or an index that replaces ComfyUI's build."""
    import re

    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        assert not line.startswith(("-", "--")), f"requirements.txt option {line!r} changes where pip looks"
        m = re.match(r"(torch|torchvision|torchaudio)\b(.*)", line)
        if m:
            assert m.group(2).startswith(">=") and "," not in m.group(2) and "+" not in m.group(2), line
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.match(r"(torch|torchvision|torchaudio)\b(.*)", dep)
        assert not m or m.group(2).startswith(">="), dep


def _comfyignored(path: str, patterns: list[str]) -> bool:
    """gitignore matching, for the pattern forms .comfyignore uses: /dir/, /file, dir/ (any depth), *.ext."""
    import fnmatch

    parts = path.split("/")
    for p in patterns:
        if p.startswith("/") and p.endswith("/"):
            if path.startswith(p[1:]):
                return True
        elif p.startswith("/"):
            if path == p[1:]:
                return True
        elif p.endswith("/"):
            if p[:-1] in parts[:-1]:
                return True
        elif any(fnmatch.fnmatch(x, p) for x in parts):
            return True
    return False


def test_comfyignore_keeps_tests_and_fixtures_out_and_the_pack_in():
    patterns = [x.strip() for x in (ROOT / ".comfyignore").read_text().splitlines()]
    patterns = [x for x in patterns if x and not x.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [f for f in tracked.splitlines() if (ROOT / f).is_file()]
    published = [f for f in files if not _comfyignored(f, patterns)]
    left_out = set(files) - set(published)
    for f in files:
        if f.startswith(("tests/", "benchmarks/", ".ci/")):
            assert f in left_out, f"{f} would be published"
    assert "tests/data/object_info.json" in left_out
    for needed in ("__init__.py", "pyproject.toml", "requirements.txt", "README.md", "LICENSE", "docs/comfyui.md"):
        assert needed in published, needed
    for folder in ("nodes/", "kandinsky_core/", "comfy_client/", "js/", "workflows/"):
        mine = [f for f in files if f.startswith(folder)]
        assert mine and all(f in published for f in mine), folder
    size = sum((ROOT / f).stat().st_size for f in published)
    assert size < 5_000_000, f"the published package would hold {size} bytes"
    # nothing published imports what is left out
    for f in published:
        if f.endswith(".py"):
            text = (ROOT / f).read_text()
            for gone in ("tests", "benchmarks", "scripts"):
                assert f"from {gone}" not in text and f"import {gone}" not in text, (f, gone)


def test_a_foreign_kandinsky_core_already_imported_is_reported(tmp_path, monkeypatch, caplog):
    """The pack imports its engine by file under the name kandinsky_core; when another copy holds that name already
    (another install of the pack), the log says which one is used and what to do."""
    import logging
    import types

    root = types.ModuleType("k5_root_init")  # the pack's __init__.py run as a plain module: registers nothing
    root.__file__ = str(ROOT / "__init__.py")
    exec(compile((ROOT / "__init__.py").read_text(), root.__file__, "exec"), vars(root))

    with caplog.at_level(logging.WARNING):
        root._import_engine()  # our own engine, already imported by the tests: nothing to say
    assert not caplog.records and sys.modules["kandinsky_core"] is kandinsky_core
    other = types.ModuleType("kandinsky_core")
    other.__file__ = str(tmp_path / "kandinsky_core" / "__init__.py")
    monkeypatch.setitem(sys.modules, "kandinsky_core", other)
    with caplog.at_level(logging.WARNING):
        root._import_engine()
    assert sys.modules["kandinsky_core"] is other
    assert f"another kandinsky_core ({tmp_path / 'kandinsky_core'})" in caplog.text and "restart ComfyUI" in caplog.text
