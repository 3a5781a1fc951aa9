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
