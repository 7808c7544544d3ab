"""`vsteer demo`, the main job, on the real embedded SmolLM2 and the shipped head (small prompt count)."""

from __future__ import annotations

import json

import pytest

from vsteer_hf.cli import main
from vsteer_hf.eval.demo import shipped_head_dir
from vsteer_hf.head import load_value_head


def test_shipped_head_card_is_complete():
    head = load_value_head(shipped_head_dir(), hidden_size=576)
    card = head.card
    assert card.backbone == "smollm2-135m-instruct"
    assert card.threshold is not None and 0.0 < card.threshold < 1.0
    assert card.curve and sorted(card.curve) == sorted(set(card.curve))
    assert card.training["judge"] == "toxicity" and card.training["prompts"] == "rtp"
    assert "val_auroc" in card.training and "threshold_sweep" in card.training
    assert card.calibration["split"] == "validation"


@pytest.mark.slow
def test_demo_runs_on_a_few_held_out_prompts(tmp_path, capsys):
    assert main(["demo", "--limit", "3", "--max-new-tokens", "6", "--examples", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| base |" in out and "| VFD K=8" in out
    record = json.loads((tmp_path / "demo.json").read_text())
    names = [s["name"] for s in record["summaries"]]
    assert names[0] == "base" and names[1].startswith("VFD")
    assert all(s["n"] == 3 for s in record["summaries"])
