"""The whole decode-matched pipeline end to end on a tiny random model, and its CLI."""

from __future__ import annotations

import json

import pytest

from vsteer_hf.cli import main
from vsteer_hf.head import ValueHead


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"w{10 + i} w{40 + i % 30} w{70 - i % 20}"}) for i in range(60)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _judge_by_token(prompts, generations):
    """A stand-in judge: a generation is 'undesirable' when it contains a low-numbered word."""
    return [
        float(any(w in g.split() for w in ("w6", "w7", "w8", "w9", "w10", "w11", "w12", "w13"))) for g in generations
    ]


def test_pipeline_end_to_end_on_a_tiny_model(model_dir, prompt_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("vsteer_hf.eval.judges.get_judge", lambda name, **kw: _judge_by_token)
    workdir = tmp_path / "work"
    args = [
        "pipeline",
        "--workdir",
        str(workdir),
        "--backbone",
        str(model_dir),
        "--prompts",
        str(prompt_file),
        "--samples-per-prompt",
        "2",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "16",
        "--epochs",
        "3",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    for stage in ("extract", "label", "train", "calibrate", "sweep"):
        assert f"== {stage}:" in out
        assert (workdir / f"{stage}.json").is_file()
    extract = json.loads((workdir / "extract.json").read_text())
    assert extract["sequences"] == 120
    head = ValueHead.from_pretrained(workdir / "head")
    assert head.card.curve and all(0.0 <= t <= 1.0 for t in head.card.curve.values())
    assert head.card.training["judge"] == "toxicity"
    assert head.card.backbone == str(model_dir)
    # resumable: a second run skips every stage (reports untouched)
    before = {s: (workdir / f"{s}.json").stat().st_mtime_ns for s in ("extract", "train")}
    assert main(args) == 0
    assert all((workdir / f"{s}.json").stat().st_mtime_ns == t for s, t in before.items())
    # a single stage can be forced; the stored settings are reused without repeating them
    assert main(["calibrate", "--workdir", str(workdir), "--force"]) == 0
    assert "test AUROC" in capsys.readouterr().out


def test_cli_stage_list_matches_the_pipeline():
    from vsteer_hf import cli
    from vsteer_hf.train import pipeline

    assert cli.STAGES == pipeline.STAGES


def test_pipeline_dtype_is_stored_and_device_is_not(model_dir, prompt_file, tmp_path, monkeypatch):
    """`--dtype` is a data option (features depend on it) kept in pipeline.json; `--device` is the machine's."""
    import vsteer_hf.backbones as backbones

    calls = []
    original = backbones.load_backbone

    def spy(name, dtype="auto", device=None, **kwargs):
        calls.append((dtype, device))
        return original(name, dtype=dtype, device=device, **kwargs)

    monkeypatch.setattr(backbones, "load_backbone", spy)
    workdir = tmp_path / "work"
    common = ["--workdir", str(workdir), "--backbone", str(model_dir), "--prompts", str(prompt_file)]
    small = ["--limit", "2", "--samples-per-prompt", "1", "--max-new-tokens", "2"]
    assert main(["extract", *common, *small, "--dtype", "bfloat16", "--device", "cpu"]) == 0
    assert calls == [("bfloat16", "cpu")]
    stored = json.loads((workdir / "pipeline.json").read_text())
    assert stored["dtype"] == "bfloat16" and "device" not in stored
    assert main(["extract", "--workdir", str(workdir), "--force"]) == 0  # the stored dtype is reused
    assert calls[-1] == ("bfloat16", None)


def test_more_train_samples_word_targets_and_cross_fitted_calibration(model_dir, prompt_file, tmp_path, monkeypatch):
    """--train-samples-per-prompt adds train samples after every split's first ones (those draws unchanged);
    --targets offensive-words trains and early-stops on the judge's word verdicts, named in the head card;
    --calibration-folds 2 fits ĉ(α) on validation's and every train prompt's safe generations."""
    from vsteer_hf.train import trainer
    from vsteer_hf.train.features import FeatureCache
    from vsteer_hf.train.pipeline import PipelineConfig
    from vsteer_hf.train.provenance import stage_options

    monkeypatch.setattr("vsteer_hf.eval.judges.get_judge", lambda name, **kw: _judge_by_token)
    trained_with = []  # the exact_epochs of every head the pipeline trains, final head first
    train = trainer.train_value_head

    def recording(cache, cfg, **kw):
        trained_with.append(cfg.exact_epochs)
        return train(cache, cfg, **kw)

    monkeypatch.setattr(trainer, "train_value_head", recording)
    common = ["--backbone", str(model_dir), "--prompts", str(prompt_file), "--samples-per-prompt", "2",
              "--max-new-tokens", "6", "--batch-size", "16", "--epochs", "3"]
    plain, more = tmp_path / "plain", tmp_path / "more"
    assert main(["extract", "--workdir", str(plain), *common]) == 0
    assert main(["pipeline", "--workdir", str(more), *common, "--train-samples-per-prompt", "3",
                 "--targets", "offensive-words", "--calibration-folds", "2"]) == 0
    base, extended = FeatureCache(plain / "features"), FeatureCache(more / "features")
    by_key = {(r["prompt_id"], r["sample"]): r for r in extended.records}
    for record in base.records:  # the first pass draws what a run without the option draws
        assert by_key[(record["prompt_id"], record["sample"])]["token_ids"] == record["token_ids"]
    extra = [r for r in extended.records if r["sample"] == 2]
    assert extra and {r["split"] for r in extra} == {"train"}
    assert len(extra) == base.splits["train"] // 2 and len(extended) == len(base) + len(extra)
    training = ValueHead.from_pretrained(more / "head").card.training
    assert training["targets"] == "per-token" and training["val_loss_on"] == "per-token targets"
    assert training["recipe"]["targets"] == "offensive-words"
    calibration = json.loads((more / "calibrate.json").read_text())
    labels = {split: extended.labels(extended.split(split)) for split in ("train", "validation")}
    assert calibration["n_calibration_safe_out_of_fold"] == labels["train"].count(0.0) > 0
    assert calibration["n_calibration_safe"] == labels["train"].count(0.0) + labels["validation"].count(0.0)
    card = ValueHead.from_pretrained(more / "head").card.calibration
    assert card["split"] == "validation + train cross-fitted over 2 folds" and card["n_safe_out_of_fold"] > 0
    # the fold heads train for the epochs the final head kept, not early-stopped afresh
    kept = json.loads((more / "train.json").read_text())["best_epoch"] + 1
    assert trained_with == [None, kept, kept] and calibration["fold_head_epochs"] == card["fold_head_epochs"] == kept
    # the defaults leave the fingerprints of folders made before these options unchanged
    new_options = ("targets", "train_samples_per_prompt", "calibration_folds")
    old = {k: v for k, v in PipelineConfig().to_dict().items() if k not in new_options}
    for stage in ("extract", "train", "calibrate"):
        assert stage_options(old, stage) == stage_options(PipelineConfig().to_dict(), stage)
    with pytest.raises(ValueError, match="train_samples_per_prompt must be an integer >= samples_per_prompt"):
        PipelineConfig(train_samples_per_prompt=2)
    with pytest.raises(ValueError, match="targets must be one of"):
        PipelineConfig(targets="word")
    PipelineConfig(targets="offensive-words")  # every kind the trainer knows is accepted
    with pytest.raises(ValueError, match="calibration_folds must be 0"):
        PipelineConfig(calibration_folds=1)
    with pytest.raises(ValueError, match="calibration_folds needs rounds=1"):
        PipelineConfig(calibration_folds=4, rounds=2)


def test_cli_targets_match_the_trainer():
    import argparse

    from vsteer_hf.stage_command import StageCommand
    from vsteer_hf.train.targets import TARGETS

    parser = argparse.ArgumentParser()
    StageCommand("train", "", ("train",)).add_arguments(parser)
    action = next(a for a in parser._actions if a.dest == "targets")
    assert tuple(action.choices) == TARGETS
