"""A pipeline stage is reused only for the options that made it (issue 17): stale stages are refused or recomputed."""

from __future__ import annotations

import json

import pytest

from vsteer_hf.cli import main


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"w{10 + i} w{40 + i}"}) + "\n" for i in range(12)))
    return path


@pytest.fixture
def extract_args(model_dir, prompt_file, tmp_path):
    return [
        "--workdir",
        str(tmp_path / "work"),
        "--backbone",
        str(model_dir),
        "--prompts",
        str(prompt_file),
        "--samples-per-prompt",
        "1",
        "--max-new-tokens",
        "2",
    ]


def _judge(prompts, generations):
    return [float(i % 2) for i in range(len(generations))]


def test_changed_data_option_refuses_the_stale_stage(extract_args, tmp_path, capsys):
    workdir = tmp_path / "work"
    assert main(["extract", *extract_args]) == 0
    sequences = json.loads((workdir / "extract.json").read_text())["sequences"]
    capsys.readouterr()
    assert main(["extract", *extract_args, "--samples-per-prompt", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1  # refused before the backbone loads
    assert "samples_per_prompt=1" in err and "2" in err and "--force" in err and "--workdir" in err
    # the refusal changed nothing: the stored recipe still describes what is on disk
    assert json.loads((workdir / "pipeline.json").read_text())["samples_per_prompt"] == 1
    assert json.loads((workdir / "extract.json").read_text())["sequences"] == sequences
    # --force recomputes it from scratch with the new option (not appended to the old features)
    assert main(["extract", *extract_args, "--samples-per-prompt", "2", "--force"]) == 0
    assert json.loads((workdir / "extract.json").read_text())["sequences"] == 2 * sequences
    assert main(["extract", *extract_args, "--max-new-tokens", "3", "--force"]) == 0
    assert json.loads((workdir / "extract.json").read_text())["sequences"] == sequences


def test_unchanged_options_resume_and_a_recomputed_stage_invalidates_the_later_ones(
    extract_args, tmp_path, monkeypatch
):
    monkeypatch.setattr("vsteer_hf.eval.judges.get_judge", lambda name, **kw: _judge)
    workdir = tmp_path / "work"
    assert main(["extract", *extract_args]) == 0
    assert main(["label", "--workdir", str(workdir)]) == 0
    stamps = {s: (workdir / f"{s}.json").read_text() for s in ("extract", "label")}
    assert main(["extract", *extract_args]) == 0  # same options: reused untouched
    assert main(["label", "--workdir", str(workdir)]) == 0
    assert all((workdir / f"{s}.json").read_text() == t for s, t in stamps.items())
    # a recomputed extract makes the old labels stale: label is recomputed, not reused
    assert main(["extract", "--workdir", str(workdir), "--force"]) == 0
    assert main(["label", "--workdir", str(workdir)]) == 0
    assert (workdir / "label.json").read_text() != stamps["label"]
    extract_id = json.loads((workdir / "extract.json").read_text())["run_id"]
    assert json.loads((workdir / "label.json").read_text())["fingerprint"]["inputs"] == {"extract": extract_id}


def test_a_later_stage_refuses_to_run_on_a_stale_earlier_one(extract_args, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("vsteer_hf.eval.judges.get_judge", lambda name, **kw: _judge)
    workdir = tmp_path / "work"
    assert main(["extract", *extract_args]) == 0
    assert main(["label", "--workdir", str(workdir), "--max-new-tokens", "5"]) == 2
    err = capsys.readouterr().err
    assert "'extract'" in err and "max_new_tokens=2" in err and "`vsteer extract" in err
    assert not (workdir / "label.json").exists()


def test_every_option_belongs_to_exactly_one_stage():
    import dataclasses

    from vsteer_hf.train.pipeline import STAGES, PipelineConfig
    from vsteer_hf.train.provenance import STAGE_OPTIONS

    owned = [name for stage in STAGES for name in STAGE_OPTIONS[stage]]
    assert sorted(owned) == sorted(f.name for f in dataclasses.fields(PipelineConfig))


def test_a_stage_made_before_an_option_existed_reads_it_at_its_neutral_value():
    from vsteer_hf.train.provenance import freshness

    report = {"fingerprint": {"options": {"alphas": [0.1]}, "inputs": {}}}
    state = freshness("calibrate", report, {"alphas": [0.1], "calibration_folds": 4}, {})
    assert state.status == "options" and "calibration_folds=0 (this run: 4)" in state.reason


def _strip_fingerprints(workdir):
    """Make `workdir` look as the code before fingerprints left it."""
    for path in workdir.glob("*.json"):
        if path.name != "pipeline.json":
            report = json.loads(path.read_text())
            report.pop("fingerprint"), report.pop("run_id")
            path.write_text(json.dumps(report))


def test_a_work_folder_from_before_fingerprints_is_adopted_with_a_warning(extract_args, tmp_path, capsys):
    workdir = tmp_path / "work"
    assert main(["extract", *extract_args]) == 0
    _strip_fingerprints(workdir)
    with pytest.warns(UserWarning, match=r"predate option fingerprints; adopting"):
        assert main(["extract", "--workdir", str(workdir)]) == 0
    report = json.loads((workdir / "extract.json").read_text())
    assert report["fingerprint"]["options"]["samples_per_prompt"] == 1  # adopted once, written back
    capsys.readouterr()
    assert main(["extract", "--workdir", str(workdir), "--samples-per-prompt", "3"]) == 2
    assert "samples_per_prompt=1" in capsys.readouterr().err
    # without the pipeline.json the old code wrote, nothing says what made it: refused
    _strip_fingerprints(workdir)
    (workdir / "pipeline.json").unlink()
    assert main(["extract", *extract_args]) == 2
    assert "predates option fingerprints" in capsys.readouterr().err


def test_an_unfinished_extraction_resumes_only_with_the_options_that_started_it(extract_args, tmp_path, capsys):
    from vsteer_hf.train.provenance import stage_options

    workdir = tmp_path / "work"
    assert main(["extract", *extract_args]) == 0
    options = stage_options(json.loads((workdir / "pipeline.json").read_text()), "extract")
    started = workdir / "extract.started.json"
    (workdir / "extract.json").unlink()  # as if it had stopped before its report
    started.write_text(json.dumps({"options": options}))
    assert main(["extract", *extract_args]) == 0  # same options: the cache resumes
    assert json.loads((workdir / "extract.json").read_text())["sequences"] == 12
    (workdir / "extract.json").unlink()
    started.write_text(json.dumps({"options": options | {"max_new_tokens": 9}}))
    capsys.readouterr()
    assert main(["extract", *extract_args]) == 2
    assert "unfinished extraction started with other options" in capsys.readouterr().err
    assert main(["extract", *extract_args, "--force"]) == 0
    assert json.loads((workdir / "extract.json").read_text())["sequences"] == 12


def test_an_old_pipeline_json_without_newer_options_adopts_their_defaults(extract_args, tmp_path):
    workdir = tmp_path / "work"
    assert main(["extract", *extract_args]) == 0
    _strip_fingerprints(workdir)
    stored = json.loads((workdir / "pipeline.json").read_text())
    del stored["dtype"]  # pipeline.json from before --dtype existed
    (workdir / "pipeline.json").write_text(json.dumps(stored))
    with pytest.warns(UserWarning, match="adopting"):
        assert main(["extract", "--workdir", str(workdir)]) == 0
    assert json.loads((workdir / "extract.json").read_text())["fingerprint"]["options"]["dtype"] == "float32"
