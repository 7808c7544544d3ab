"""Per-token targets name the tokens that made the judge call a continuation undesirable."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from vsteer_hf.eval.prompts import PromptRecord
from vsteer_hf.train.extract import extract_features, label_cache
from vsteer_hf.train.features import FeatureCache, FeatureCacheWriter
from vsteer_hf.train.targets import prefix_targets, token_spans, token_targets, word_targets


def _prompts():
    return [PromptRecord(id=f"p{i}", text=f"w{10 + i} w{20 + i} w{30 + i}", source="test") for i in range(5)]


def _bpe_tokenizer():
    """A byte-level BPE trained here on a few lines, small enough that words split into pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    lines = ["you are a nice person", "what a lovely day", "you idiot, go away!", "a day away"] * 5
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], initial_alphabet=alphabet)
    backend.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>")


def _cache_of(tmp_path, tokenizer, generations):
    """A one-split cache whose records hold these generations' token ids (features are zeros)."""
    with FeatureCacheWriter(tmp_path / "cache", 4) as writer:
        for n, text in enumerate(generations):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            record = {"prompt_id": f"p{n}", "sample": 0, "split": "train", "prompt": "", "generation": text,
                      "token_ids": ids}
            writer.add(torch.zeros(len(ids), 4), record)
    return FeatureCache(tmp_path / "cache")


def test_token_spans_cover_the_decoded_text_with_multi_piece_words():
    tok = _bpe_tokenizer()
    text = "you idiot, ok? ünïcode day"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    spans = token_spans(tok, ids)
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded == text
    assert spans[0][0] == 0 and spans[-1] == (len(text), len(text))  # EOS adds no text
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # contiguous, in order
    assert "".join(decoded[lo:hi] for lo, hi in spans) == text
    assert sum(1 for lo, hi in spans if lo < text.index("ok") + 2 and text.index("ok") < hi) >= 1


def test_word_targets_give_each_token_its_words_score(tmp_path):
    tok = _bpe_tokenizer()
    generations = ["you idiot, go away!", "a lovely day", "idiotic? no."]
    cache = _cache_of(tmp_path, tok, generations)
    scored = {"idiot": 0.9, "idiotic": 0.7, "away": 0.2}
    calls = []

    def judge(prompts, texts):
        calls.append(list(texts))
        return [scored.get(t, 0.05) for t in texts]

    targets = word_targets(cache, judge, tok, batch_size=3)
    assert sorted(w for call in calls for w in call) == sorted(
        {"you", "idiot", "go", "away", "a", "lovely", "day", "idiotic", "no"})  # each word once, alone
    for i, text in enumerate(generations):
        ids = cache.records[i]["token_ids"]
        row = targets[i]
        assert row.dtype == np.float32 and len(row) == len(ids) == int(cache.lengths[i])
        for t, (lo, hi) in enumerate(token_spans(tok, ids)):
            expected = max([scored.get(w, 0.05) for w in _words_overlapping(text, lo, hi)] or [0.0])
            assert row[t] == pytest.approx(expected), (text, t, text[lo:hi])
    spans = token_spans(tok, cache.records[2]["token_ids"])
    pieces = [t for t, (lo, hi) in enumerate(spans) if lo < len("idiotic")]  # "idiotic" is text[0:7]
    assert len(pieces) >= 2  # the word is split into pieces, and every piece is marked
    assert targets[2][pieces].tolist() == pytest.approx([0.7] * len(pieces))
    assert targets[2][len(pieces)] == 0.0  # "?" is no word's part
    assert targets[0][-1] == 0.0  # EOS is no word's part
    label_cache(cache, lambda p, g: [float("lovely" in x) for x in g])
    with_label = word_targets(cache, judge, tok, with_label=True)
    assert with_label[1].tolist() == [1.0] * len(with_label[1]) and np.array_equal(with_label[0], targets[0])


def test_offensive_word_targets_mark_only_words_over_the_judges_threshold(tmp_path):
    """A mildly scored word gets 0, not its score, so the head learns nothing from harmless words."""
    tok = _bpe_tokenizer()
    cache = _cache_of(tmp_path, tok, ["you idiot, go away!", "idiotic day"])
    scored = {"idiot": 0.9, "idiotic": 0.6, "away": 0.4}

    def judge(prompts, texts):
        return [scored.get(t, 0.05) for t in texts]

    soft = word_targets(cache, judge, tok)
    hard = word_targets(cache, judge, tok, cutoff=0.5)
    for i in soft:
        assert hard[i].tolist() == (soft[i] > 0.5).astype(np.float32).tolist()
    assert {float(v) for row in hard.values() for v in row} == {0.0, 1.0}
    assert max(soft[0][-4:]) == pytest.approx(0.4) and hard[0][-4:].max() == 0.0  # "away" is not offensive
    # the pipeline's kind cuts at the judge's threshold it is given
    strict = token_targets("offensive-words", cache, judge, tok, splits=("train",), judge_threshold=0.7)
    assert strict[1].max() == 0.0 and strict[0].max() == 1.0  # "idiotic" (0.6) is under 0.7, "idiot" over


def _words_overlapping(text, lo, hi):
    import re

    return [m.group() for m in re.finditer(r"[a-z]+", text) if m.start() < hi and lo < m.end()]


def test_word_targets_refuse_a_judge_without_verdicts(tmp_path):
    tok = _bpe_tokenizer()
    cache = _cache_of(tmp_path, tok, ["you idiot"])
    with pytest.raises(ValueError, match=r"no verdict.*such as 'toxicity'"):
        word_targets(cache, lambda p, g: [float("nan")] * len(g), tok)
    with pytest.raises(ValueError, match="run the label stage first"):
        word_targets(cache, lambda p, g: [0.0] * len(g), tok, with_label=True)


def test_prefix_targets_mark_the_token_where_the_judge_first_fires(tmp_path):
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    cache = extract_features(model, tok, _prompts(), tmp_path / "cache", samples_per_prompt=2, max_new_tokens=6,
                             progress=False)
    marker = tok.decode(cache.records[0]["token_ids"][2:3])  # a word some continuation holds
    judge = lambda prompts, gens: [float(marker in g.split()) for g in gens]  # noqa: E731
    label_cache(cache, lambda prompts, gens: [0.0] * len(gens))  # every sequence labelled safe

    def every_split(judge, with_label=True):
        by_split = [prefix_targets(cache, judge, tok, batch_size=7, split=split, with_label=with_label)
                    for split in cache.splits]
        return {i: t for targets in by_split for i, t in targets.items()}

    targets = every_split(judge)
    assert sorted(targets) == list(range(len(cache)))
    for i, record in enumerate(cache.records):
        words = [tok.decode([t]) for t in record["token_ids"]]
        expected = [float(any(w == marker for w in words[: t + 1])) for t in range(len(words))]
        assert targets[i].tolist() == expected
    assert targets[0][2] == 1.0 and targets[0][:2].tolist() == [0.0, 0.0]
    label_cache(cache, lambda prompts, gens: [1.0] * len(gens))  # a toxic sequence: 1 everywhere
    assert all(t.tolist() == [1.0] * len(t) for t in every_split(judge).values())
    without = every_split(judge, with_label=False)  # "toxic so far" only: the label is not used
    assert all(without[i].tolist() == targets[i].tolist() for i in targets)


def test_prefix_targets_need_labels(tmp_path):
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    cache = extract_features(model, tok, _prompts()[:1], tmp_path / "cache", max_new_tokens=3, progress=False)
    split = cache.records[0]["split"]
    with pytest.raises(ValueError, match="run the label stage first"):
        prefix_targets(cache, lambda p, g: [0.0] * len(g), tok, split=split)


