"""Build a CPU ComfyUI runtime for the integration tests, once, and say where it is.

    python scripts/comfyui_runtime.py v0.33.0      # prints COMFYUI_DIR=... and COMFYUI_PYTHON=...

Where the ComfyUI source comes from, first match wins:
1. the release tarball in ../shared/comfyui/ (every developer machine and CI run has it; SHARED_COMFYUI overrides);
2. upstream ComfyUI git at the release's tag, for contributors with network (checked against the release's commit).

The runtime is cached in .cache/comfyui/<release>/ (git-ignored): the source tree in src/, its own virtual environment
in venv/ (Python 3.11, the CPU torch 2.13.0, ComfyUI's requirements, then this pack's requirements as a user installs
them), and a stamp naming what it was built from. A later run with the same inputs reuses it. Nothing here changes a
ComfyUI tree the user already has (COMFYUI_DIR is used as it is by scripts/run_tests.py, never rebuilt).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "comfyui"
UPSTREAM = "https://github.com/comfyanonymous/ComfyUI.git"
TORCH = "torch==2.13.0"  # the local CPU build; anything unpinned pulls GBs of CUDA wheels
# Newest tested release first; the oldest is the bottom of the supported range (README, pyproject).
RELEASES = {"v0.33.0": "783545f", "v0.3.64": "a125cd8"}
NEWEST, OLDEST = "v0.33.0", "v0.3.64"
# Packages ComfyUI lists that this runtime installs on its own terms (torch pinned, audio/vision as pure Python).
OWN_TERMS = {"torch", "torchvision", "torchaudio"}
TORCHAUDIO = "torchaudio==2.11.0"  # the newest on the registry; only its pure-Python part is ever imported here


def shared_dir() -> Path:
    return Path(os.environ.get("SHARED_COMFYUI") or REPO.parent / "shared" / "comfyui")


def python311() -> str:
    found = shutil.which("python3.11")
    if not found:
        sys.exit("comfyui_runtime: python3.11 is needed to build the ComfyUI runtime (the CPU torch wheel is cp311).")
    return found


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()[:16]


def _source_id(release: str) -> tuple[str, Path | None]:
    tarball = shared_dir() / f"ComfyUI-{release}.tar.gz"
    if tarball.is_file():
        st = tarball.stat()
        return f"tarball {tarball.name} {st.st_size}", tarball
    return f"git {UPSTREAM} {release} {RELEASES[release]}", None


def _unpack(release: str, tarball: Path | None, dest: Path) -> None:
    if tarball is not None:
        with tarfile.open(tarball) as tar:
            members = []
            for m in tar.getmembers():
                parts = Path(m.name).parts
                if len(parts) < 2:
                    continue  # the top folder itself
                m.name = str(Path(*parts[1:]))
                members.append(m)
            tar.extractall(dest, members=members, filter="data")
        return
    subprocess.run(["git", "clone", "-q", "--depth", "1", "--branch", release, UPSTREAM, str(dest)], check=True)
    head = subprocess.run(["git", "-C", str(dest), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    if not head.stdout.startswith(RELEASES[release]):
        sys.exit(f"comfyui_runtime: upstream tag {release} is {head.stdout.strip()}, expected {RELEASES[release]}.")
    shutil.rmtree(dest / ".git")


def _requirements(src: Path) -> list[str]:
    """ComfyUI's requirements less the packages installed on our own terms."""
    keep = []
    for line in (src / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        name = re.split(r"[<>=~!\[ ;]", line, maxsplit=1)[0].lower() if line else ""
        if name and name not in OWN_TERMS:
            keep.append(line)
    return keep


def _pip(venv: Path, *args: str) -> None:
    """pip install into `venv`, printing what pip says less the notes about absent local index folders."""
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    said = [line for line in done.stdout.splitlines() if not line.startswith("WARNING: Location 'file:")]
    if said:
        print("\n".join(said), flush=True)
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, cmd)


def _make_vision_and_audio_pure_python(venv: Path) -> None:
    """The registry's torchvision and torchaudio wheels are CUDA builds whose native kernels do not load beside the CPU
    torch. ComfyUI only imports their Python parts here, so their native libraries are set aside and torchvision's
    fake-kernel registrations for nms are made conditional like its other ops."""
    purelib = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    site = Path(purelib)
    for lib in [*site.glob("torchvision/*.so"), *site.glob("torchaudio/lib/*.so")]:
        lib.rename(lib.with_name(lib.name + ".cuda-disabled"))
    meta = site / "torchvision" / "_meta_registrations.py"
    if meta.is_file():
        text = re.sub(
            r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)',
            r'@register_meta("\1")',
            meta.read_text(),
            flags=re.M,
        )
        meta.write_text(text)


def build(release: str, force: bool = False) -> tuple[Path, Path]:
    """The cached runtime for `release` (built first when missing or stale): (ComfyUI tree, its python)."""
    if release not in RELEASES:
        sys.exit(f"comfyui_runtime: unknown release {release!r}; supported: {', '.join(RELEASES)}.")
    root = CACHE / release
    src, venv, stamp_file = root / "src", root / "venv", root / "stamp.json"
    source, tarball = _source_id(release)
    ours = [(REPO / f).read_bytes() for f in ("requirements.txt", "constraints.txt")]
    stamp = {"release": release, "source": source, "inputs": _digest(Path(__file__).read_bytes(), *ours)}
    python = venv / "bin" / "python"
    if not force and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp and python.is_file():
        return src, python

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    started = time.monotonic()
    print(f"comfyui_runtime: building ComfyUI {release} from {source} in {root}", flush=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        unpacked = Path(tmp) / "src"
        unpacked.mkdir()
        _unpack(release, tarball, unpacked)
        unpacked.rename(src)
    subprocess.run([python311(), "-m", "venv", str(venv)], check=True)
    constraints = root / "constraints.txt"
    constraints.write_text(TORCH + "\n")
    reqs = root / "requirements-without-torch.txt"
    reqs.write_text("\n".join(_requirements(src)) + "\n")
    _pip(venv, TORCH)
    # requests: imported by v0.3.64's frontend manager without being in its requirements
    _pip(venv, "-r", str(reqs), "-c", str(constraints), "torchvision", "requests")
    _pip(venv, "--no-deps", TORCHAUDIO)
    _make_vision_and_audio_pure_python(venv)
    # this pack's requirements, as a user installs them with ComfyUI's own Python (never touching its torch)
    _pip(venv, "-r", str(REPO / "requirements.txt"), "-c", str(REPO / "constraints.txt"))
    subprocess.run([str(python), "-c", "import torch, torchvision, torchaudio, einops, av"], check=True)
    stamp_file.write_text(json.dumps(stamp))
    print(f"comfyui_runtime: ComfyUI {release} ready in {time.monotonic() - started:.0f} s", flush=True)
    return src, python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("release", nargs="?", default=NEWEST, choices=sorted(RELEASES))
    parser.add_argument("--force", action="store_true", help="rebuild even when the cached runtime is current")
    args = parser.parse_args(argv)
    src, python = build(args.release, args.force)
    print(f"COMFYUI_DIR={src}\nCOMFYUI_PYTHON={python}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
