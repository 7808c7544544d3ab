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
    # the recipe the README names for the shipped head (issue 16), as the card records it
    recipe = card.training["recipe"]
    made = (recipe["targets"], recipe["train_samples_per_prompt"], recipe["calibration_folds"])
    assert made == ("offensive-words", 32, 4)
    assert card.calibration["split"] == "validation + train cross-fitted over 4 folds"
    assert card.calibration["fold_head_epochs"] == card.training["best_epoch"] + 1  # fold heads as the final head
    sweep = card.training["threshold_sweep"]
    (chosen,) = [row for row in sweep["rows"] if row.get("alpha") == sweep["chosen_alpha"]]
    assert card.threshold == pytest.approx(chosen["threshold"])


@pytest.mark.slow
def test_demo_runs_on_a_few_held_out_prompts(tmp_path, capsys):
    assert main(["demo", "--limit", "3", "--max-new-tokens", "6", "--examples", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| base |" in out and "| VFD K=8" in out
    record = json.loads((tmp_path / "demo.json").read_text())
    names = [s["name"] for s in record["summaries"]]
    assert names[0] == "base" and names[1].startswith("VFD")
    assert all(s["n"] == 3 for s in record["summaries"])


def test_evaluation_seeds_one_batch_after_another():
    """`generate_method` seeds batch i with seed * 1_000_003 + i (paired methods draw the same stream)."""
    import torch
    from tiny_models import tiny_model, tiny_tokenizer

    from vsteer_hf.eval.prompts import PromptRecord
    from vsteer_hf.eval.runner import GenerationSettings, generate_method

    model = tiny_model("llama")
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    seeds = []
    original = model.generate

    def generate(**kwargs):
        seeds.append(torch.initial_seed())
        return original(**kwargs)

    model.generate = generate
    prompts = [PromptRecord(id=f"p{i}", text=f"w{10 + i} w{20 + i}", source="test") for i in range(5)]
    run = generate_method("base", model, tok, prompts, GenerationSettings(max_new_tokens=3, batch_size=2, seed=3))
    assert seeds == [3 * 1_000_003 + i for i in range(3)]
    assert run.prompt_ids == [p.id for p in prompts] and run.tokens > 0
