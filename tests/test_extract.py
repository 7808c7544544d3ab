"""Decode-matched extraction writes exactly the states the decode loop scored."""

from __future__ import annotations

import torch
from tiny_models import make_head, tiny_model, tiny_tokenizer

from vsteer_hf import ValueSteerConfig, enable_value_steer
from vsteer_hf.eval.prompts import PromptRecord
from vsteer_hf.train.extract import extract_features, label_cache


def _prompts():
    return [PromptRecord(id=f"p{i}", text=f"w{10 + i} w{20 + i} w{30 + i}", source="test") for i in range(5)]


def test_extracted_features_equal_the_decode_loops_states(tmp_path):
    model = enable_value_steer(tiny_model("llama"))
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    head = make_head(32, scale=4.0)
    cache = extract_features(
        model,
        tok,
        _prompts(),
        tmp_path / "cache",
        samples_per_prompt=2,
        max_new_tokens=6,
        batch_size=4,
        head=head,
        num_candidates=1,
        progress=False,
    )
    assert len(cache) == 10
    # replay the first batch with the same seed and settings: the cache holds the very same tensors
    first_batch = [(p, s) for p in _prompts() for s in range(2)][:4]
    texts = [p.text for p, _ in first_batch]
    inputs = tok(texts, return_tensors="pt", padding=True)
    p0, s0 = first_batch[0]
    from vsteer_hf.train.extract import job_seed

    torch.manual_seed(job_seed(0, p0.id, s0))
    out = model.generate(
        **inputs,
        do_sample=True,
        top_p=0.9,
        top_k=0,
        max_new_tokens=6,
        pad_token_id=tok.pad_token_id,
        return_dict_in_generate=True,
        value_steer=ValueSteerConfig(head=head, threshold=0.5, num_candidates=1, trace_features=True),
    )
    for row, (prompt, sample) in enumerate(first_batch):
        feats, record = cache[cache.index_of((prompt.id, sample))]
        live = ~out.value_scores[row].isnan()
        assert torch.equal(feats, out.features[row][live])
        assert record["token_ids"] == out.sequences[row, inputs["input_ids"].shape[1] :][live].tolist()
        torch.testing.assert_close(head.p(feats), out.value_scores[row][live], atol=1e-6, rtol=1e-5)


def test_extraction_resumes_and_labels(tmp_path):
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    folder = tmp_path / "cache"
    extract_features(model, tok, _prompts()[:2], folder, samples_per_prompt=2, max_new_tokens=4, progress=False)
    cache = extract_features(model, tok, _prompts(), folder, samples_per_prompt=2, max_new_tokens=4, progress=False)
    assert len(cache) == 10
    assert len({(r["prompt_id"], r["sample"]) for r in cache.records}) == 10
    counts = label_cache(cache, lambda prompts, gens: [float("w1" in g) for g in gens])
    assert counts["labelled"] == 10
    reloaded = type(cache)(folder)
    assert all(r["label"] in (0.0, 1.0) for r in reloaded.records)


def _recording(model):
    """Wrap `model.generate` to record, per call, the torch seed in force and the arguments."""
    calls = []
    original = model.generate

    def generate(**kwargs):
        calls.append({"seed": torch.initial_seed(), **{k: v for k, v in kwargs.items() if k != "streamer"}})
        return original(**kwargs)

    model.generate = generate
    return calls


def test_extraction_seeds_and_generate_calls_are_pinned(tmp_path):
    """The recorded extraction run depends on these: one seed per batch from its first job, and the
    same generate arguments; the progress streamer changes no token."""
    from vsteer_hf.train.extract import job_seed

    runs = []
    for progress in (False, True):
        model = enable_value_steer(tiny_model("llama"))
        tok = tiny_tokenizer()
        tok.padding_side = "left"
        calls = _recording(model)
        cache = extract_features(
            model,
            tok,
            _prompts(),
            tmp_path / f"cache-{progress}",
            samples_per_prompt=2,
            max_new_tokens=5,
            batch_size=3,
            seed=7,
            progress=progress,
        )
        runs.append((calls, [r["token_ids"] for r in cache.records]))
    jobs = [(p, s) for p in _prompts() for s in range(2)]
    expected_seeds = [job_seed(7, jobs[i][0].id, jobs[i][1]) for i in range(0, len(jobs), 3)]
    for calls, _ in runs:
        assert [c["seed"] for c in calls] == expected_seeds
        for c in calls:
            settings = {k: v for k, v in c.items() if k not in ("seed", "input_ids", "attention_mask", "value_steer")}
            assert settings == {
                "do_sample": True,
                "top_p": 0.9,
                "temperature": 1.0,
                "top_k": 0,
                "max_new_tokens": 5,
                "pad_token_id": tok.pad_token_id,
                "return_dict_in_generate": True,
            }
            assert c["value_steer"].num_candidates == 1 and c["value_steer"].trace_features
    assert runs[0][1] == runs[1][1]
    assert [len(c["input_ids"]) for c in runs[0][0]] == [3, 3, 3, 1]


def test_batches_led_by_ids_with_a_shared_prefix_draw_different_streams(tmp_path):
    """RTP ids are `rtp-<digest>`: the seed must read the whole id (it once read its first 6 bytes)."""
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    same_text = "w10 w20 w30"
    prompts = [PromptRecord(id=f"rtp-00{i}{i}ff", text=same_text, source="test") for i in range(4)]
    cache = extract_features(
        model, tok, prompts, tmp_path / "cache", samples_per_prompt=1, max_new_tokens=12, batch_size=1, progress=False
    )
    drawn = [tuple(r["token_ids"]) for r in cache.records]
    assert len(set(drawn)) == len(drawn), "one prompt text, four ids: the four batches must draw four streams"


def test_job_seeds_differ_across_ids_samples_and_run_seeds():
    from vsteer_hf.eval.prompts import _text_id
    from vsteer_hf.train.extract import job_seed

    ids = [_text_id("rtp", f"prompt number {i}") for i in range(2000)]
    seeds = {job_seed(0, i, s) for i in ids for s in range(4)}
    assert len(seeds) == 8000
    assert job_seed(0, ids[0], 0) != job_seed(1, ids[0], 0)
    assert all(0 <= s < 2**63 for s in seeds)
