"""Node IDs other code registers in ComfyUI, read from its Python source with `ast` (never by importing it):
ComfyUI core (nodes.py and every module of comfy_extras/ and comfy_api_nodes/) and the official kandinsky-5
repository's `comfyui/` folder. tests/test_node_ids.py checks that our IDs collide with none of them.

    python scripts/node_ids.py --record    # rewrite tests/data/official_comfyui_node_ids.json from the official source
    python scripts/node_ids.py             # print where the official source was found and its IDs

The official source: KANDINSKY5_OFFICIAL, a checkout of kandinskylab/kandinsky-5 or a bare git directory of it (read
with `git show HEAD:...`). Without it the tests use the recorded file, which names the commit it was read from.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_RECORD = REPO / "tests" / "data" / "official_comfyui_node_ids.json"
OFFICIAL_FOLDER = "comfyui"
MAPPINGS = "NODE_CLASS_MAPPINGS"
ID_ATTRIBUTES = ("node_id", "NODE_ID", "NodeId")  # `node_id = "X"`, `schema.node_id = "X"`, `NODE_ID = "X"`, ...


def _constant_keys(node: ast.AST) -> set[str]:
    return {k.value for k in getattr(node, "keys", []) if isinstance(k, ast.Constant) and isinstance(k.value, str)}


def ids_in_python(source: str, filename: str = "<source>") -> set[str]:
    """The node IDs a module registers: keys of a NODE_CLASS_MAPPINGS dict literal (also through .update({...}) and
    NODE_CLASS_MAPPINGS["X"] = ...), `node_id="X"` of V3 schemas, and string assignments to `node_id` / `NodeId`
    / `NODE_ID` (class attributes a base class's schema reads, `schema.node_id = "X"` of a subclass, nodes_hooks.py's
    NodeId)."""
    tree = ast.parse(source, filename)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id == MAPPINGS and isinstance(node.value, ast.Dict):
                    found |= _constant_keys(node.value)
                name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", None)
                if name in ID_ATTRIBUTES and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    found.add(node.value.value)
                if (
                    isinstance(target, ast.Subscript)
                    and isinstance(target.value, ast.Name)
                    and target.value.id == MAPPINGS
                    and isinstance(target.slice, ast.Constant)
                ):
                    found.add(str(target.slice.value))
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "update" and getattr(func.value, "id", "") == MAPPINGS:
                for arg in node.args:
                    found |= _constant_keys(arg)
            for kw in node.keywords:
                if kw.arg == "node_id" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                    found.add(kw.value.value)
    return found


def core_ids(comfy_src: Path) -> set[str]:
    """Every node ID ComfyUI core registers, from a ComfyUI source tree."""
    files = [comfy_src / "nodes.py"]
    for folder in ("comfy_extras", "comfy_api_nodes"):
        files += sorted((comfy_src / folder).rglob("*.py"))
    ids: set[str] = set()
    for f in files:
        ids |= ids_in_python(f.read_text(encoding="utf-8"), str(f))
    return ids


def pack_ids(pack: Path = REPO) -> set[str]:
    """Our own node IDs, read the same way from nodes/."""
    ids: set[str] = set()
    for f in sorted((pack / "nodes").glob("*.py")):
        ids |= ids_in_python(f.read_text(encoding="utf-8"), str(f))
    return ids


@dataclass
class OfficialSource:
    where: str
    commit: str
    files: dict[str, str]  # path in the repository -> Python source

    def ids(self) -> set[str]:
        out: set[str] = set()
        for path, text in self.files.items():
            out |= ids_in_python(text, path)
        return out


def _git(git_dir: Path, *args: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def official_source() -> OfficialSource | None:
    """The official repository's comfyui/*.py and its commit, from KANDINSKY5_OFFICIAL (a checkout or a bare git
    directory); None when it is not set."""
    given = os.environ.get("KANDINSKY5_OFFICIAL")
    if not given:
        return None
    checkout = Path(given)
    folder = checkout / OFFICIAL_FOLDER
    if folder.is_dir():
        files = {f"{OFFICIAL_FOLDER}/{p.name}": p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.py"))}
        git_dir = checkout / ".git"
        commit = _git(git_dir, "rev-parse", "HEAD").strip() if git_dir.exists() else "unknown (not a git checkout)"
        return OfficialSource(str(checkout), commit, files)
    if (checkout / "HEAD").is_file():  # a bare git directory
        names = _git(checkout, "ls-tree", "-r", "--name-only", "HEAD", f"{OFFICIAL_FOLDER}/").split()
        files = {n: _git(checkout, "show", f"HEAD:{n}") for n in names if n.endswith(".py")}
        return OfficialSource(str(checkout), _git(checkout, "rev-parse", "HEAD").strip(), files)
    raise SystemExit(
        f"KANDINSKY5_OFFICIAL={given} is neither a checkout with {OFFICIAL_FOLDER}/ nor a bare git directory."
    )


def recorded_official() -> dict:
    return json.loads(OFFICIAL_RECORD.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", action="store_true", help=f"write {OFFICIAL_RECORD.relative_to(REPO)}")
    args = p.parse_args(argv)
    src = official_source()
    if src is None:
        print("no official kandinsky-5 source: set KANDINSKY5_OFFICIAL to a checkout or a bare git directory of it")
        return 1
    ids = sorted(src.ids())
    print(f"{src.where} @ {src.commit}: {', '.join(ids)}")
    if args.record:
        record = {
            "repository": "https://github.com/kandinskylab/kandinsky-5",
            "commit": src.commit,
            "files": sorted(src.files),
            "node_ids": ids,
        }
        OFFICIAL_RECORD.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {OFFICIAL_RECORD.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
