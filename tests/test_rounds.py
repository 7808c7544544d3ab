"""On-policy rounds (issue 16): round r > 1 resamples the train prompts under VFD with round r-1's head,
is labelled and joins the training data; one round is the pipeline as it was."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_head

from vsteer_hf.cli import main
from vsteer_hf.head import ValueHead
from vsteer_hf.train.features import FeatureCache
from vsteer_hf.train.pipeline import Pipeline, PipelineConfig
from vsteer_hf.train.trainer import TrainConfig

ROUND_FILES = ("extract.json", "label.json", "train.json")


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"w{10 + i} w{40 + i % 30} w{70 - i % 20}"}) for i in range(60)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _judge_by_token(prompts, generations):
    """A stand-in judge: a generation is 'undesirable' when it contains a low-numbered word."""
    bad = {f"w{i}" for i in range(6, 20)}
    return [float(any(w in bad for w in g.split())) for g in generations]


@pytest.fixture(autouse=True)
def word_judge(monkeypatch):
    monkeypatch.setattr("vsteer_hf.eval.judges.get_judge", lambda name, **kw: _judge_by_token)


PLANTED = make_head(32, scale=4.0)  # a head whose risk varies a lot between states: VFD has work to do


@pytest.fixture
def planted_round_one(monkeypatch):
    """Round 1 trains as usual, then its saved head is replaced by PLANTED (the steering policy of round 2)."""
    original = Pipeline.train_head

    def train_head(self, cache, folder):
        report = original(self, cache, folder)
        if folder.parent.name == "round-1":
            PLANTED.save_pretrained(folder)
        return report

    monkeypatch.setattr(Pipeline, "train_head", train_head)


def _config(model_dir, prompt_file, **overrides):
    small = dict(samples_per_prompt=2, max_new_tokens=8, batch_size=16, train=TrainConfig(epochs=2, device="cpu"))
    return PipelineConfig(backbone=str(model_dir), prompts=str(prompt_file), **(small | overrides))


STAGES = ("extract", "label", "train", "calibrate")


def test_one_round_is_the_pipeline_as_it_was(model_dir, prompt_file, tmp_path):
    from vsteer_hf.train.trainer import train_value_head

    workdir = tmp_path / "work"
    config = _config(model_dir, prompt_file)
    reports = Pipeline(workdir, config, progress=False).run(STAGES)
    assert not list(workdir.glob("round-*"))
    # the fingerprint has no round settings: reports made before rounds existed stay fresh
    assert set(reports["train"]["fingerprint"]["options"]) == {"train"}
    assert "rounds" not in reports["train"]
    assert "first_sample" not in FeatureCache(workdir / "features").meta["meta"]
    # the head is the one train_value_head makes from the cache alone
    direct = train_value_head(FeatureCache(workdir / "features"), config.train, progress=False).head
    shipped = ValueHead.from_pretrained(workdir / "head")
    for (name, a), (_, b) in zip(direct.state_dict().items(), shipped.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_second_round_samples_the_train_prompts_under_vfd_and_trains_on_the_union(
    model_dir, prompt_file, tmp_path, planted_round_one
):
    from vsteer_hf.backbones import load_backbone
    from vsteer_hf.eval.prompts import load_prompts
    from vsteer_hf.train.extract import extract_features

    workdir = tmp_path / "work"
    config = _config(model_dir, prompt_file, rounds=2, round_alpha=0.3, round_num_candidates=8)
    reports = Pipeline(workdir, config, progress=False).run(STAGES)
    for name in ROUND_FILES:
        assert (workdir / "round-2" / name).is_file()
    assert (workdir / "round-1" / "train.json").is_file()
    first, second = FeatureCache(workdir / "features"), FeatureCache(workdir / "round-2" / "features")
    train_prompts = {r["prompt_id"] for r in first.records if r["split"] == "train"}
    # round 2: the train prompts only, new sample indices (2, 3), labelled
    assert second.splits == {"train": 2 * len(train_prompts)}
    assert {r["prompt_id"] for r in second.records} == train_prompts
    assert {r["sample"] for r in second.records} == {2, 3}
    assert all(r["label"] in (0.0, 1.0) for r in second.records)
    extract = json.loads((workdir / "round-2" / "extract.json").read_text())
    assert extract["interventions"] > 0 and extract["steered_sequences"] > 0
    assert extract["threshold"] == pytest.approx(second.meta["meta"]["threshold"])
    # the states are VFD's, not plain sampling's: the same jobs and seeds sampled plainly reach the
    # planted head's threshold far more often
    model, tokenizer = load_backbone(str(model_dir), dtype="float32")
    plain = extract_features(
        model,
        tokenizer,
        load_prompts(str(prompt_file), split="train"),
        tmp_path / "plain",
        samples_per_prompt=2,
        first_sample=2,
        max_new_tokens=8,
        batch_size=16,
        progress=False,
    )

    def share_over(cache):
        risks = torch.cat([PLANTED.p(cache[i][0]) for i in range(len(cache))])
        return float((risks >= extract["threshold"]).float().mean())

    assert share_over(second) < 0.5 * share_over(plain)
    # the round-2 head trained on both rounds' train sequences; it is the pipeline's head
    balance = json.loads((workdir / "round-2" / "train.json").read_text())["class_balance"]
    assert balance["n_train"] == first.splits["train"] + len(second)
    assert reports["train"]["class_balance"] == balance
    assert [r["round"] for r in reports["train"]["rounds"]] == [1, 2]
    final, round_two = (
        ValueHead.from_pretrained(workdir / "head"),
        ValueHead.from_pretrained(workdir / "round-2" / "head"),
    )
    assert all(
        torch.equal(a, b) for a, b in zip(final.state_dict().values(), round_two.state_dict().values(), strict=True)
    )
    assert [r["round"] for r in final.card.training["rounds"]] == [1, 2]
    assert final.card.curve  # calibrate ran on the final head, on round 1's validation and test
    assert reports["calibrate"]["n_heldout_safe"] == sum(
        1 for r in first.records if r["split"] == "test" and r["label"] == 0
    )


def test_rounds_resume_and_changed_round_settings_are_refused(model_dir, prompt_file, tmp_path, capsys, monkeypatch):
    import vsteer_hf.train.rounds as rounds

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
        "6",
        "--epochs",
        "2",
        "--rounds",
        "2",
    ]
    # interrupted while labelling round 2: round 1's head and round 2's extraction are kept
    original_label = rounds._label_round

    def interrupted(pipe, folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(rounds, "_label_round", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert not (workdir / "train.json").exists()
    kept = {p: (workdir / p).stat().st_mtime_ns for p in ("round-1/train.json", "round-2/extract.json")}
    monkeypatch.setattr(rounds, "_label_round", original_label)
    # resumed with other round settings: refused, nothing discarded
    capsys.readouterr()
    assert main([*args, "--round-alpha", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unfinished on-policy rounds" in err and "--force" in err
    assert all((workdir / p).stat().st_mtime_ns == t for p, t in kept.items())
    # resumed with the settings that started it: the finished round stages are reused
    assert main([*args, "--round-alpha", "0.3"]) == 0
    assert all((workdir / p).stat().st_mtime_ns == t for p, t in kept.items())
    assert "rounds: 1:" in capsys.readouterr().out
    assert (workdir / "round-2" / "label.json").is_file() and (workdir / "sweep.json").is_file()
    # finished: a run with one round sees a train stage made with rounds=2 and refuses it
    assert main([*args[:-2], "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "'train'" in err and "rounds=2" in err and "--force" in err
    assert main(["train", "--workdir", str(workdir), "--rounds", "1", "--force"]) == 0
    assert not list(workdir.glob("round-*"))  # the rounds' data went with the recomputed stage
    assert "rounds" not in json.loads((workdir / "train.json").read_text())
    assert "rounds" not in json.loads((workdir / "train.json").read_text())["fingerprint"]["options"]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("rounds", 0, "rounds must be an integer >= 1"),
        ("round_alpha", 1.5, "round_alpha must lie in (0, 1)"),
        ("round_num_candidates", 1, "round_num_candidates must be an integer >= 2"),
    ],
)
def test_bad_round_settings_are_refused_in_one_line(option, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PipelineConfig(**{option: value})


def test_round_folders_are_in_numeric_order(tmp_path):
    from vsteer_hf.train.rounds import round_dirs

    for name in ("round-10", "round-2", "round-1", "round-notes"):
        (tmp_path / name).mkdir()
    assert [p.name for p in round_dirs(tmp_path)] == ["round-1", "round-2", "round-10"]
