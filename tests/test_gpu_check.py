"""benchmarks/gpu_check.py --small --device cpu: every section runs on the CPU (the official one reports that it
has no checkout), the JSON is written and the table goes to the file given, never to the committed RESULTS.md."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_small_runs_every_section_on_the_cpu(tmp_path):
    results = REPO / "benchmarks" / "RESULTS.md"
    before = results.read_bytes()
    out_json, out_md = tmp_path / "gpu_check.json", tmp_path / "RESULTS.md"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--small", "--device", "cpu"]
    cmd += ["--json", str(out_json), "--results", str(out_md)]
    env = {k: v for k, v in os.environ.items() if k != "KANDINSKY5_OFFICIAL"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(env, OMP_NUM_THREADS="2"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out_json.read_text())
    sections = report["sections"]
    assert set(sections) == {"environment", "attention_backends", "nabla_attention", "dit_vs_official",
                             "nabla_in_dit", "lite_5s_12gb", "block_swap", "fp8", "compile"}  # fmt: skip
    assert sections["dit_vs_official"]["status"].startswith("skipped: no official checkout")
    for name, result in sections.items():
        if name != "dit_vs_official":
            assert result["status"] == "ok", (name, result)
    nabla = sections["nabla_attention"]
    assert nabla["auto_executor"] == "sdpa gather path" and nabla["block_density"] < 0.9
    assert nabla["gather_vs_auto_max_diff"] == 0 and nabla["gather_vs_masked_dense_max_diff"] < 1e-5
    assert sections["block_swap"]["exact"] is True
    assert sections["lite_5s_12gb"]["decode_frames"] == 9
    assert sections["fp8"]["fp8_weight_gib"] < sections["fp8"]["full_weight_gib"]
    assert "| nabla_attention | ok |" in out_md.read_text()
    assert results.read_bytes() == before
