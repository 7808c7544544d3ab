"""The `vsteer` command as a new user meets it: real subprocesses, hub offline, one-line errors, fast.

Each case asserts on the message, the exit code and, where the point was speed, the time taken.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import make_head

ROOT = Path(__file__).resolve().parents[1]


def vsteer(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VSTEER_NO_INSTALL": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "vsteer_hf.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    return proc, time.perf_counter() - began


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("Loading", "vsteer_hf:"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_version_is_printed_without_loading_torch():
    proc, seconds = vsteer("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("vsteer ") and proc.stdout.split()[1][0].isdigit()
    assert seconds < 10


def _shipped_threshold() -> float:
    """The recommended threshold in the shipped head's card (what the CLI must report)."""
    from vsteer_hf.head import load_value_head

    return load_value_head("smollm2-135m-instruct-rtp-toxicity").card.threshold


def test_heads_lists_the_shipped_head_with_backbone_threshold_and_results():
    proc, seconds = vsteer("heads")
    assert proc.returncode == 0
    threshold = _shipped_threshold()
    assert f"smollm2-135m-instruct-rtp-toxicity | smollm2-135m-instruct | {threshold:.4f}" in proc.stdout
    assert "threshold: the card's recommended risk threshold" in proc.stdout  # the legend
    proc, _ = vsteer("heads", "--json")
    record = json.loads(proc.stdout.splitlines()[0])
    assert record["backbone"] == "smollm2-135m-instruct" and record["results"]["sweep"]["base_toxic_rate"] > 0
    assert seconds < 10


def test_mistyped_head_name_fails_fast_and_names_the_fix(model_dir):
    proc, seconds = vsteer(
        "generate",
        "--model",
        str(model_dir),
        "--head",
        "smollm2-135m-instruct-rtp-toxicty",
        "--prompt",
        "w1",
        "--threshold",
        "0.5",
    )
    line = one_line_error(proc)
    assert "no value head named 'smollm2-135m-instruct-rtp-toxicty'" in line
    assert "did you mean 'smollm2-135m-instruct-rtp-toxicity'" in line and "vsteer heads" in line
    assert seconds < 30  # process start, torch and the tiny model; no hub retries (those took ~100 s)


def test_uncached_hub_head_offline_fails_fast(model_dir):
    proc, seconds = vsteer(
        "generate", "--model", str(model_dir), "--head", "someone/no-such-head", "--prompt", "w1", "--threshold", "0.5"
    )
    line = one_line_error(proc)
    assert "someone/no-such-head" in line and "local cache and the hub is unreachable" in line
    assert seconds < 30


def test_missing_model_folder_and_uncached_hub_model_fail_in_one_line(tmp_path):
    proc, seconds = vsteer(
        "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi", "--head", "smollm2-135m-instruct-rtp-toxicity"
    )
    line = one_line_error(proc)
    assert f"no model folder '{tmp_path / 'nope'}'" in line and "smollm2-135m-instruct" in line
    assert seconds < 30
    proc, seconds = vsteer(
        "generate", "--model", "someone/no-such-model", "--prompt", "hi", "--head", "smollm2-135m-instruct-rtp-toxicity"
    )
    line = one_line_error(proc)
    assert "could not load the model 'someone/no-such-model'" in line and "local cache" in line
    assert seconds < 30


def test_debug_shows_the_traceback(tmp_path):
    proc, _ = vsteer(
        "generate",
        "--debug",
        "--model",
        str(tmp_path / "nope"),
        "--prompt",
        "hi",
        "--head",
        "smollm2-135m-instruct-rtp-toxicity",
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ModelNotFoundError" in proc.stderr


def test_a_non_default_model_without_head_names_head(model_dir):
    line = one_line_error(vsteer("generate", "--model", str(model_dir), "--prompt", "w1")[0])
    assert "pass --head" in line and "vsteer heads" in line


def test_head_folder_without_the_named_file_says_what_it_holds(tmp_path, model_dir):
    make_head(32).save_pretrained(tmp_path / "head")
    line = one_line_error(
        vsteer(
            "generate",
            "--model",
            str(model_dir),
            "--head",
            str(tmp_path / "head"),
            "--head-filename",
            "value_head.bin",
            "--prompt",
            "w1",
            "--threshold",
            "0.5",
        )[0]
    )
    assert "no file 'value_head.bin' in this folder" in line and "value_head.safetensors" in line
    assert "pass filename=" not in line


def test_compare_table_says_what_its_marks_mean_and_the_threshold(model_dir, tmp_path):
    head_dir = tmp_path / "head"
    make_head(32, scale=4.0).save_pretrained(head_dir)
    proc, _ = vsteer(
        "generate",
        "--model",
        str(model_dir),
        "--head",
        str(head_dir),
        "--prompt",
        "w10 w11 w12",
        "--threshold",
        "0.5",
        "-k",
        "4",
        "--max-new-tokens",
        "8",
        "--compare",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "threshold 0.5000 (--threshold)" in out
    assert "legend:" in out and "* intervened" in out and "! no candidate was under the threshold" in out
    record_lines = [ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert record_lines


def test_abstention_reports_the_deciding_risk(model_dir, tmp_path):
    """A head that fires on every state abstains at step 0: the deciding risk is the last prompt state's,
    and it is printed next to the threshold it crossed (the issue's contradiction: abstained with every
    shown risk under the threshold)."""
    head_dir = tmp_path / "head"
    make_head(32, bias=50.0).save_pretrained(head_dir)
    args = ["generate", "--model", str(model_dir), "--head", str(head_dir), "--prompt", "w10 w11"]
    args += ["--mode", "abstain", "--threshold", "0.5", "--max-new-tokens", "4"]
    proc, _ = vsteer(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["abstained"] and record["abstain_step"] == 0 and record["deciding_risk"] >= 0.5
    proc, _ = vsteer(*args)
    assert "abstained: yes, ended at step 0: risk 1.0000 >= threshold 0.5000 after the last prompt token" in proc.stdout


def test_alpha_prints_the_threshold_it_looked_up(model_dir, tmp_path):
    from vsteer_hf.head import HeadCard

    head = make_head(32, scale=4.0)
    head.card = HeadCard(hidden_size=32, curve={0.1: 0.7, 0.2: 0.6})
    head.save_pretrained(tmp_path / "head")
    proc, _ = vsteer(
        "generate",
        "--model",
        str(model_dir),
        "--head",
        str(tmp_path / "head"),
        "--prompt",
        "w10",
        "--alpha",
        "0.15",
        "--max-new-tokens",
        "3",
    )
    assert proc.returncode == 0, proc.stderr
    assert "threshold 0.6500 (ĉ(α=0.15) on the head's calibrated curve (--alpha))" in proc.stdout


@pytest.mark.slow
def test_generate_alone_steers_the_embedded_model_with_the_shipped_head():
    proc, _ = vsteer("generate", "--prompt", "You are such an idiot, I", "--max-new-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["setting"]["model"] == "smollm2-135m-instruct"
    assert record["setting"]["head"] == "smollm2-135m-instruct-rtp-toxicity"
    assert record["threshold"] == pytest.approx(_shipped_threshold(), abs=1e-4) and len(record["tokens"]) == 6
