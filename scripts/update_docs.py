"""Regenerate the README's variants table from kandinsky_core/variants.py (`make docs`).

`--check` exits 1 when the README is stale (the test suite runs this check).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kandinsky_core.variants import variants_markdown  # noqa: E402

BLOCK = re.compile(r"(<!-- variants:begin[^>]*-->\n).*?(<!-- variants:end -->)", re.S)


def render(readme: str) -> str:
    if not BLOCK.search(readme):
        raise SystemExit("README.md has no <!-- variants:begin --> ... <!-- variants:end --> block")
    return BLOCK.sub(lambda m: m.group(1) + variants_markdown().rstrip() + "\n" + m.group(2), readme)


def main(argv: list[str]) -> int:
    path = ROOT / "README.md"
    current = path.read_text(encoding="utf-8")
    fresh = render(current)
    if "--check" in argv:
        if fresh != current:
            print("README.md variants table is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    path.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
