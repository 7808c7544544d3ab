"""The PNG plots the notebooks show: per-token risk, training curves, the ĉ(α) calibration curve."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vsteer_hf.eval.plots import calibration_plot, risk_plot, training_plot
from vsteer_hf.train.calibrate import calibration_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_risk_plot_draws_each_trace_and_skips_finished_steps(tmp_path):
    traces = [
        {"name": "base", "risks": [0.1, 0.7, 0.2], "tokens": [" a", "\n", " bad"]},
        {
            "name": "VFD",
            "risks": [0.1, 0.3, math.nan],  # the row finished after two tokens
            "tokens": [" a", " fine", "</s>"],
            "interventions": [False, True, False],
        },
        {"name": "no tokens", "risks": [0.5]},
    ]
    path = risk_plot(traces, threshold=0.4, path=tmp_path / "sub" / "risk.png", title="prompt")
    assert path == tmp_path / "sub" / "risk.png" and _is_png(path)


def test_risk_plot_names_the_bad_trace():
    with pytest.raises(ValueError, match="at least one trace"):
        risk_plot([], threshold=0.5, path="unused.png")
    with pytest.raises(ValueError, match=r"'VFD': 1 interventions for 2 risks"):
        risk_plot([{"name": "VFD", "risks": [0.1, 0.2], "interventions": [True]}], 0.5, "unused.png")


def test_training_plot_with_and_without_validation(tmp_path):
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 0.9 / (e + 1) + 0.05 * e} for e in range(4)]
    assert _is_png(training_plot(history, tmp_path / "train.png", best_epoch=1))
    no_val = [{"epoch": e, "train_loss": 1.0 - 0.1 * e, "val_loss": math.nan} for e in range(3)]
    assert _is_png(training_plot(no_val, tmp_path / "train-noval.png"))
    with pytest.raises(ValueError, match="non-empty history"):
        training_plot([], tmp_path / "empty.png")


def test_calibration_plot_reads_calibration_report_rows(tmp_path):
    rng = np.random.default_rng(0)
    rows = calibration_report(rng.uniform(size=200), rng.uniform(size=300), alphas=(0.05, 0.1, 0.3, 0.5))
    assert _is_png(calibration_plot(rows, tmp_path / "calibration.png"))
    with pytest.raises(ValueError, match="calibration rows"):
        calibration_plot([], tmp_path / "empty.png")
