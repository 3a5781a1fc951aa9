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
