"""ProFS selection: the budget rule, layer-range parsing, and `vsteer profs-sweep` end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from vsteer_hf.cli import main
from vsteer_hf.eval.stats import Estimate
from vsteer_hf.eval.tradeoff import TradeoffPoint
from vsteer_hf.profs import PROFS_RECORD_NAME, default_layer_ranges, load_profs_record, parse_layer_ranges
from vsteer_hf.profs.select import choose


def point(toxic: float, reference: float) -> TradeoffPoint:
    rate = Estimate(toxic, toxic, toxic, 10)
    return TradeoffPoint("p", {}, 10, rate, rate, reference_perplexity=reference)


def test_choose_takes_the_least_toxic_setting_within_the_budget():
    points = [point(0.05, 30.0), point(0.08, 21.0), point(0.08, 20.5), point(0.12, 20.0)]
    assert choose(points, base_reference=20.0, budget=0.10) == 2  # 0.05 is over budget; tie -> lower ppl
    assert choose(points, base_reference=20.0, budget=0.60) == 0
    assert choose(points, base_reference=10.0, budget=0.10) is None


def test_layer_ranges():
    assert parse_layer_ranges("14-28, 29") == [list(range(14, 29)), [29]]
    for bad in ("28-14", "a-b", ""):
        with pytest.raises(ValueError, match=r"layer range|no layer ranges"):
            parse_layer_ranges(bad)
    assert default_layer_ranges(30, "llama") == [
        list(range(14, 29)),
        list(range(14, 30)),
        list(range(21, 29)),
        list(range(25, 29)),
    ]
    # the authors' GPT-2 medium range already ends at the last layer
    assert default_layer_ranges(24, "gpt2") == [list(range(10, 24)), list(range(17, 24)), list(range(20, 24))]


def test_cli_profs_sweep_saves_the_chosen_edit_with_its_sweep(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "inputs"
    folder.mkdir()
    pairs = [(f"w{10 + i}", f" w{20 + i} w{30 + i}", f" w7 w{40 + i}") for i in range(6)]
    (folder / "pairs.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "preferred": a, "non_preferred": b}) + "\n" for p, a, b in pairs)
    )
    prompts = [f"w{a} w{b}" for a in range(10, 40) for b in (50, 60)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (folder / "reference.txt").write_text(" ".join(f"w{3 + (i * 7) % 90}" for i in range(300)))
    out = tmp_path / "edited"
    args = ["profs-sweep", "--model", str(model_dir), "--pairs", str(folder / "pairs.jsonl"), "--out", str(out)]
    args += ["--ks", "1,2", "--layers", "0-1,1", "--budget", "100", "--prompts", str(folder / "prompts.jsonl")]
    args += ["--samples-per-prompt", "1", "--max-new-tokens", "4", "--judge", "refusal"]
    args += ["--reference-text", str(folder / "reference.txt"), "--reference-offset", "32", "--reference-tokens", "48"]
    assert main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| base |" in printed and "**(chosen)**" in printed and "edited model and profs_edit.json" in printed
    record = load_profs_record(out)
    assert record.pooling == "reference" and record.selection is not None
    sweep = record.selection["sweep"]
    assert len(sweep) == 4 and record.selection["chosen"] == {"k": record.k, "layers": record.layers}
    assert record.selection["validation"]["reference_tokens"].startswith("32..80")
    assert all(p["within_budget"] for p in sweep) and record.selection["budget"] == 100.0
    saved = json.loads((out / PROFS_RECORD_NAME).read_text())
    assert saved["selection"]["sweep"][0]["setting"] == sweep[0]["setting"]
    edited, original = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(model_dir)
    layer = record.layers[0]
    assert not torch.equal(
        edited.model.layers[layer].mlp.down_proj.weight, original.model.layers[layer].mlp.down_proj.weight
    )
