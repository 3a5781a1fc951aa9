"""The whole test run behind `make test`, stage by stage, with the time of each.

Stages:
1. ComfyUI runtimes: the newest supported release (COMFYUI_DIR / COMFYUI_PYTHON when set, else built and cached by
   scripts/comfyui_runtime.py) and the oldest supported release (always built and cached).
2. Browser: Debian's chromium (installed with apt-get when missing and this is a root Linux machine) and
   `npm ci` in tests/browser for playwright-core.
3. pytest on everything (unit tests, the integration suite and the browser test) against the newest release,
   the opt-in CPU compile tests included (torch.compile with inductor, compiled flex_attention).
4. pytest on the node unit tests (V3 nodes on that release's comfy_api), the node and interop integration tests
   (and Cancel during sampling) against the oldest release.

With CI=true a stage that cannot provide its prerequisite fails the run, and so does every test that then lacks it
(tests/prerequisites.py); elsewhere such tests are skipped with a warning. The last line sums the pytest runs up as
'N passed, N failed, N skipped'. Extra arguments go to both pytest runs (e.g. `-k sampler`, `-x`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfyui_runtime  # noqa: E402

REPO = comfyui_runtime.REPO
RESULTS = REPO / ".cache" / "test-results"
ARTIFACTS = REPO / ".cache" / "test-artifacts"
BROWSER_DIR = REPO / "tests" / "browser"
OLDEST_TESTS = [
    "tests/test_nodes.py",  # the V3 nodes on the oldest release's comfy_api
    "tests/test_node_ids.py",
    "tests/integration/test_comfyui.py",
    "tests/integration/test_interop.py",
    # v0.3.64 checks for Cancel only between nodes: our own check between DiT blocks is what stops sampling there
    "tests/integration/test_bad_input.py::test_cancel_stops_sampling_within_a_dit_block",
]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


class Stages:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []
        venv_seconds = os.environ.get("K5_VENV_SECONDS")
        if venv_seconds:
            self.rows.append(("virtual environment (.venv)", float(venv_seconds), "ok"))

    def run(self, name: str, fn, *args):
        print(f"\n=== stage: {name}", flush=True)
        started = time.monotonic()
        try:
            result, status = fn(*args), "ok"
        except (subprocess.CalledProcessError, OSError, SystemExit) as exc:
            result, status = None, f"FAILED: {exc}"
            print(f"stage {name} failed: {exc}", flush=True)
        seconds = time.monotonic() - started
        self.rows.append((name, seconds, status if status != "ok" or result is not False else "not available"))
        print(f"=== stage: {name}: {seconds:.0f} s", flush=True)
        return result

    def table(self) -> str:
        lines = ["", "stage times:"]
        lines += [f"  {name:<60} {seconds:7.0f} s  {status}" for name, seconds, status in self.rows]
        lines.append(f"  {'total':<60} {sum(s for _, s, _ in self.rows):7.0f} s")
        return "\n".join(lines)


def newest_runtime() -> tuple[str, str]:
    given = os.environ.get("COMFYUI_DIR")
    if given:
        python = os.environ.get("COMFYUI_PYTHON") or sys.executable
        print(f"using COMFYUI_DIR={given} with COMFYUI_PYTHON={python}")
        return given, python
    src, python = comfyui_runtime.build(comfyui_runtime.NEWEST)
    return str(src), str(python)


def oldest_runtime() -> tuple[str, str]:
    src, python = comfyui_runtime.build(comfyui_runtime.OLDEST)
    return str(src), str(python)


def browser() -> bool:
    """Chromium and playwright-core for tests/integration/test_browser.py; False when they cannot be had here."""
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not chromium and sys.platform == "linux" and shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, env=env, stdout=subprocess.DEVNULL)
        chromium = shutil.which("chromium")
    if not chromium:
        print("WARNING: no chromium (install Debian's `chromium`, or set CHROMIUM): the browser test will not run")
        return False
    print(f"chromium: {chromium}")
    if not shutil.which("npm"):
        print("WARNING: no npm (install Node.js 18+): the browser test will not run")
        return False
    installed = BROWSER_DIR / "node_modules" / ".package-lock.json"
    lock = BROWSER_DIR / "package-lock.json"
    if not installed.is_file() or installed.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=BROWSER_DIR, check=True)
    return True


def pytest(name: str, paths: list[str], env: dict, extra: list[str]) -> dict:
    """One pytest run; prints its results per suite (the unit tests, each integration file) and returns its counts,
    both read from its JUnit XML."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    xml = RESULTS / f"{name}.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *paths, *extra]
    code = subprocess.run(cmd, cwd=REPO, env=env).returncode
    counts = {"passed": 0, "failed": 0, "skipped": 0, "code": code}
    suites: dict[str, dict[str, int]] = {}
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            module = case.get("classname", "")
            suite = module.rsplit(".", 1)[-1] if ".integration." in f".{module}" else "unit tests"
            outcome = "passed"
            if case.find("failure") is not None or case.find("error") is not None:
                outcome = "failed"
            elif case.find("skipped") is not None:
                outcome = "skipped"
            suites.setdefault(suite, {"passed": 0, "failed": 0, "skipped": 0})[outcome] += 1
            counts[outcome] += 1
    for suite, n in sorted(suites.items(), key=lambda item: (item[0] != "unit tests", item[0])):
        print(f"  {suite:<28} {n['passed']:4} passed, {n['failed']} failed, {n['skipped']} skipped")
    if code not in (0, 5) and counts["failed"] == 0:
        counts["failed"] = 1  # pytest itself failed (collection, usage): count it as a failure
    return counts


def main(argv: list[str]) -> int:
    stages = Stages()
    newest = stages.run(f"ComfyUI {comfyui_runtime.NEWEST} runtime", newest_runtime)
    oldest = stages.run(f"ComfyUI {comfyui_runtime.OLDEST} runtime", oldest_runtime)
    stages.run("browser (chromium, playwright-core)", browser)

    base = dict(
        os.environ,
        KANDINSKY_ARTIFACTS_DIR=str(ARTIFACTS),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
        K5_TEST_INDUCTOR="1",  # the tests that compile on the CPU (about 30 s together) run here too
        KANDINSKY_TEST_CPU_FLEX="1",
    )
    for var in ("COMFYUI_DIR", "COMFYUI_PYTHON"):
        base.pop(var, None)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    runs = []
    env = dict(base, **({"COMFYUI_DIR": newest[0], "COMFYUI_PYTHON": newest[1]} if newest else {}))
    runs.append(
        stages.run(f"pytest: everything on ComfyUI {comfyui_runtime.NEWEST}", pytest, "all", ["tests"], env, argv)
    )
    env = dict(base, **({"COMFYUI_DIR": oldest[0], "COMFYUI_PYTHON": oldest[1]} if oldest else {}))
    name = f"pytest: nodes, interop, sampling cancel on ComfyUI {comfyui_runtime.OLDEST}"
    runs.append(stages.run(name, pytest, "oldest", OLDEST_TESTS, env, argv))

    print(stages.table())
    print(f"test artifacts (screenshots): {ARTIFACTS}")
    totals = {k: sum(r[k] for r in runs if r) for k in ("passed", "failed", "skipped")}
    stage_failed = any(status.startswith("FAILED") for _, _, status in stages.rows)
    missing = [name for name, _, status in stages.rows if status == "not available"]
    if missing and in_ci():
        print(f"CI=true: prerequisites missing: {', '.join(missing)}")
        stage_failed = True
    failed = totals["failed"] + (1 if stage_failed and totals["failed"] == 0 else 0)
    print(f"tests: {totals['passed']} passed, {failed} failed, {totals['skipped']} skipped")
    return 1 if failed or any(r is None or r["code"] not in (0,) for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
