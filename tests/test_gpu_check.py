"""benchmarks/gpu_check.sh --dry-run on the CPU: every stage of the GPU check runs and says what it should."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_every_result(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").is_file() else ""
    assert run.returncode == 0, run.stdout + run.stderr + log[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench_decode.json", "exactness.json", "gpu_check.log", "planted.json", "summary.md"]

    summary = (out / "summary.md").read_text()
    assert "(dry run)" in summary and "device: cpu" in summary
    for stage in ("exactness", "head_devices", "bench_decode", "planted"):
        assert f"| {stage} | 0 |" in summary, summary

    from vsteer_hf.config import CANDIDATE_PATHS

    exact = json.loads((out / "exactness.json").read_text())
    rows = exact["rows"]
    assert rows and all(r["ok"] for r in rows)
    paths = {p for p in CANDIDATE_PATHS if p != "auto"}
    assert {r["path"] for r in rows if r["check"].startswith("never-intervening")} == paths
    assert {r["family"] for r in rows} == {"llama", "mistral"}
    assert any(r["check"].startswith("static cache") for r in rows)
    assert any(r["check"].startswith("device_map=auto") for r in rows)

    bench = json.loads((out / "bench_decode.json").read_text())
    methods = {r["method"] for r in bench["rows"]}
    assert {"plain generate", "abstain"} <= methods and any(m.startswith("VFD") for m in methods)

    planted = json.loads((out / "planted.json").read_text())["rows"]
    assert {r["method"] for r in planted} == {"plain generate", *(f"VFD {p} K=8" for p in paths)}
    assert {r["batch"] for r in planted} == {1, 2}
    for r in planted:
        assert r["ms_per_step"] > 0 and 0.0 <= r["held_out_flag_rate"] <= 1.0
        if r["method"] != "plain generate":
            assert 0.0 <= r["interventions_per_token"] <= 1.0


def test_gpu_check_refuses_a_missing_output_folder_and_unknown_options(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    script = str(ROOT / "benchmarks" / "gpu_check.sh")
    run = subprocess.run(["bash", script, "--dry-run"], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "no output folder" in run.stderr
    run = subprocess.run(["bash", script, "--fast", str(tmp_path)], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "unknown option --fast" in run.stderr
