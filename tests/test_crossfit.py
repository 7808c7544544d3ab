"""Cross-fitted calibration scores every safe train generation with a head that never saw its prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vsteer_hf.train.crossfit import HELD_OUT, HeldOutFold, out_of_fold_safe_risks, prompt_folds
from vsteer_hf.train.features import FeatureCache, FeatureCacheWriter


def _cache(tmp_path):
    """6 train prompts x 2 samples, 2 validation prompts; feature column 0 holds a known risk per token."""
    rng = np.random.default_rng(0)
    with FeatureCacheWriter(tmp_path / "cache", 3) as writer:
        for split, prompts in (("train", range(6)), ("validation", range(6, 8))):
            for p in prompts:
                for sample in range(2):
                    n = 2 + (p + sample) % 3
                    features = torch.from_numpy(rng.random((n, 3), dtype=np.float32))
                    record = {"prompt_id": f"p{p}", "sample": sample, "split": split, "prompt": "", "generation": "",
                              "token_ids": list(range(n)), "label": float((p + sample) % 4 == 0)}
                    writer.add(features, record)
    return FeatureCache(tmp_path / "cache")


def test_prompt_folds_deal_each_prompt_into_one_fold():
    folds = prompt_folds(["b", "a", "c", "a", "d", "e", "b"], 2)
    assert folds == [{"a", "c", "e"}, {"b", "d"}]
    with pytest.raises(ValueError, match="folds must be an integer >= 2"):
        prompt_folds(["a", "b"], 1)
    with pytest.raises(ValueError, match="2 train prompts cannot fill 3 folds"):
        prompt_folds(["a", "b", "a"], 3)


def test_held_out_fold_moves_only_that_folds_train_sequences(tmp_path):
    cache = _cache(tmp_path)
    view = HeldOutFold(cache, {"p1", "p4", "p7"})  # p7 is a validation prompt: it stays in validation
    moved = [r["prompt_id"] for r in view.records if r["split"] == HELD_OUT]
    assert moved == ["p1", "p1", "p4", "p4"]
    assert view.splits == {"train": 8, HELD_OUT: 4, "validation": 4}
    assert {r["split"] for r in cache.records} == {"train", "validation"}  # the cache is left as it was
    assert len(view) == len(cache) and torch.equal(view[3][0], cache[3][0]) and view.backbone == cache.backbone


class _ColumnHead:
    """A stand-in head whose risk is feature column 0."""

    def p(self, features):
        return features[:, 0]


def test_out_of_fold_risks_come_from_heads_that_never_saw_the_prompt(tmp_path):
    cache = _cache(tmp_path)
    trained_on = []

    def fit(view):
        trained_on.append({view.records[i]["prompt_id"] for i in view.split("train")})
        assert view.split("validation") == cache.split("validation")  # early stopping sees validation as usual
        return _ColumnHead()

    risks = out_of_fold_safe_risks(cache, 3, fit)
    folds = prompt_folds([f"p{p}" for p in range(6)], 3)
    assert [seen.isdisjoint(fold) and seen | fold == {f"p{p}" for p in range(6)}
            for seen, fold in zip(trained_on, folds, strict=True)] == [True] * 3
    expected = [float(cache[i][0][:, 0].max()) for fold in folds for i in cache.split("train")
                if cache.records[i]["prompt_id"] in fold and cache.records[i]["label"] == 0]
    assert risks.tolist() == pytest.approx(expected)  # every safe train sequence once, none unsafe
    assert len(risks) == sum(1 for i in cache.split("train") if cache.records[i]["label"] == 0)
