"""Feature cache: exact round trip through the memory map, crash recovery, labels, splits, errors."""

import json
import re

import numpy as np
import pytest
import torch

from vsteer_hf.train.features import (
    FEATURES_NAME,
    INDEX_NAME,
    META_NAME,
    FeatureCache,
    FeatureCacheWriter,
)

H = 8


def _record(prompt_id, sample, split="train", length=3, **extra):
    return {
        "prompt_id": prompt_id,
        "sample": sample,
        "split": split,
        "prompt": f"prompt {prompt_id}",
        "generation": "x " * length,
        "token_ids": list(range(length)),
        **extra,
    }


def _sequences(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 1, 5, 0, 2, 4][:n]
    return [torch.randn(t, H, generator=g) for t in lengths]


def _write(folder, feats, splits=None, **meta):
    splits = splits or ["train"] * len(feats)
    with FeatureCacheWriter(folder, H, {"backbone": "tiny/llama", **meta}) as w:
        for i, (f, split) in enumerate(zip(feats, splits, strict=True)):
            w.add(f, _record(f"p{i}", 0, split, len(f)))
    return feats


def test_round_trip_exact_through_memmap(tmp_path):
    feats = _write(tmp_path / "c", _sequences(), splits=["train", "train", "validation", "test"], note="n")
    cache = FeatureCache(tmp_path / "c")
    assert len(cache) == 4
    assert isinstance(cache.features, np.memmap)
    assert cache.features.shape == (sum(len(f) for f in feats), H)
    for i, f in enumerate(feats):
        got, record = cache[i]
        assert got.dtype == torch.float32 and got.shape == f.shape
        assert torch.equal(got, f)
        assert record == _record(f"p{i}", 0, record["split"], len(f))
    assert torch.equal(cache[-2][0], feats[2])
    with pytest.raises(IndexError, match="out of range"):
        cache[4]
    assert torch.equal(cache.rows(2, max_tokens=2), feats[2][:2])
    meta = json.loads((tmp_path / "c" / META_NAME).read_text())
    assert meta["hidden_size"] == H and meta["dtype"] == "float32" and meta["backbone"] == "tiny/llama"
    assert meta["feature_spec"] == {"layer": "final", "norm": "post", "pooling": "none", "dtype": "fp32"}
    assert meta["writer"].startswith("vsteer_hf") and meta["meta"]["note"] == "n"
    raw = np.fromfile(tmp_path / "c" / FEATURES_NAME, dtype="<f4").reshape(-1, H)
    assert np.array_equal(raw, torch.cat(feats).numpy())  # raw float32, row-major, back to back
    lines = [json.loads(x) for x in (tmp_path / "c" / INDEX_NAME).read_text().splitlines()]
    assert [(x["offset"], x["length"]) for x in lines] == [(0, 3), (3, 1), (4, 5), (9, 0)]


def test_reduced_precision_input_is_stored_as_float32(tmp_path):
    f = torch.randn(2, H).to(torch.bfloat16)
    with FeatureCacheWriter(tmp_path, H, {}) as w:
        w.add(f, _record("a", 0, length=2))
    assert torch.equal(FeatureCache(tmp_path)[0][0], f.float())


def test_resume_truncates_after_crash_and_appends(tmp_path):
    feats = _write(tmp_path, _sequences(2))
    # A crash: rows of a third sequence written, its index line only half written.
    with open(tmp_path / FEATURES_NAME, "ab") as f:
        f.write(b"\x01garbage" * 7)
    with open(tmp_path / INDEX_NAME, "ab") as f:
        f.write(b'{"offset": 4, "length": 3, "prompt_')
    cache = FeatureCache(tmp_path)  # a reader ignores both
    assert len(cache) == 2 and torch.equal(cache[1][0], feats[1])

    extra = torch.randn(4, H)
    with FeatureCacheWriter(tmp_path, H, {"backbone": "tiny/llama"}) as w:
        assert (tmp_path / FEATURES_NAME).stat().st_size == 4 * H * 4
        assert (tmp_path / INDEX_NAME).read_bytes().endswith(b"\n")
        assert w.has(("p0", 0)) and w.has(["p1", 0]) and not w.has(("p2", 0))
        assert len(w) == 2
        with pytest.raises(ValueError, match="already cached"):
            w.add(extra, _record("p0", 0, length=4))
        w.add(extra, _record("p2", 0, length=4))
    cache = FeatureCache(tmp_path)
    assert len(cache) == 3 and cache.has(("p2", 0))
    assert all(torch.equal(cache[i][0], f) for i, f in enumerate([*feats, extra]))


def test_labels_set_atomically_and_reloaded(tmp_path):
    _write(tmp_path, _sequences(3))
    cache = FeatureCache(tmp_path)
    assert cache.labels() == [None, None, None]
    assert cache.set_labels({("p0", 0): 1.0, ("p2", 0): 0}) == 2
    assert cache.labels() == [1.0, None, 0.0]
    assert not list(tmp_path.glob("*.tmp"))
    again = FeatureCache(tmp_path)
    assert again.labels() == [1.0, None, 0.0] and again[0][1]["label"] == 1.0
    assert torch.equal(again[2][0], cache[2][0])
    with pytest.raises(KeyError, match="not in the cache"):
        again.set_labels({("p0", 0): 0.0, ("nope", 3): 1.0})
    assert FeatureCache(tmp_path).labels() == [1.0, None, 0.0]  # nothing written on error
    for bad in (1.5, float("nan"), True, "1"):
        with pytest.raises(ValueError, match=r"number in \[0, 1\]"):
            again.set_labels({("p1", 0): bad})


def test_set_labels_refuses_a_stale_snapshot(tmp_path):
    _write(tmp_path, _sequences(1))
    cache = FeatureCache(tmp_path)
    with FeatureCacheWriter(tmp_path, H, {}) as w:
        w.add(torch.zeros(1, H), _record("late", 0, length=1))
    with pytest.raises(ValueError, match="reopen"):
        cache.set_labels({("p0", 0): 1.0})


def test_split_selection(tmp_path):
    _write(tmp_path, _sequences(4), splits=["train", "validation", "train", "test"])
    cache = FeatureCache(tmp_path)
    assert cache.split("train") == [0, 2]
    assert cache.split("validation") == [1]
    assert cache.splits == {"train": 2, "validation": 1, "test": 1}
    with pytest.raises(ValueError, match=r"no sequences in split 'calib'.*'train': 2"):
        cache.split("calib")


def test_reader_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureCache(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path))}.*no meta\.json"):
        FeatureCache(tmp_path)

    _write(tmp_path / "c", _sequences(3))
    meta = tmp_path / "c" / META_NAME
    good_meta = meta.read_text()
    meta.write_text("{not json")
    with pytest.raises(ValueError, match=r"meta.json: corrupt"):
        FeatureCache(tmp_path / "c")
    meta.write_text(good_meta)

    index = tmp_path / "c" / INDEX_NAME
    lines = index.read_text().splitlines(keepends=True)
    index.write_text(lines[0] + "oops\n" + lines[2])
    with pytest.raises(ValueError, match=rf"{INDEX_NAME}:2: corrupt"):
        FeatureCache(tmp_path / "c")
    index.write_text(lines[0] + lines[2])  # offsets no longer follow each other
    with pytest.raises(ValueError, match=rf"{INDEX_NAME}:2: corrupt.*offset 4"):
        FeatureCache(tmp_path / "c")
    index.write_text("".join(lines))

    features = tmp_path / "c" / FEATURES_NAME
    data = features.read_bytes()
    features.write_bytes(data[:-4])  # the index points past the end of the rows
    with pytest.raises(ValueError, match=rf"{FEATURES_NAME}: truncated"):
        FeatureCache(tmp_path / "c")
    with pytest.raises(ValueError, match="truncated"):
        FeatureCacheWriter(tmp_path / "c", H, {})
    features.unlink()
    with pytest.raises(FileNotFoundError, match="feature rows are missing"):
        FeatureCache(tmp_path / "c")


def test_writer_errors(tmp_path):
    _write(tmp_path / "c", _sequences(1))
    with pytest.raises(ValueError, match="hidden size 8, not 16"):
        FeatureCacheWriter(tmp_path / "c", 16, {})
    with pytest.raises(ValueError, match="backbone 'tiny/llama', not 'other'"):
        FeatureCacheWriter(tmp_path / "c", H, {"backbone": "other"})
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / FEATURES_NAME).write_bytes(b"")
    with pytest.raises(ValueError, match=r"no meta\.json"):
        FeatureCacheWriter(tmp_path / "stray", H, {})
    with pytest.raises(ValueError, match="positive int"):
        FeatureCacheWriter(tmp_path / "d", 0, {})

    w = FeatureCacheWriter(tmp_path / "d", H, {})
    ok = torch.zeros(2, H)
    with pytest.raises(ValueError, match=r"missing \['split'\]"):
        w.add(ok, {"prompt_id": 1, "sample": 0})
    with pytest.raises(ValueError, match="reserved"):
        w.add(ok, _record(1, 0, length=2, offset=5))
    with pytest.raises(ValueError, match=r"\(tokens, 8\)"):
        w.add(torch.zeros(2, H + 1), _record(1, 0, length=2))
    with pytest.raises(ValueError, match="3 token_ids for 2"):
        w.add(ok, _record(1, 0, length=3))
    with pytest.raises(ValueError, match="NaN"):
        w.add(torch.full((2, H), float("nan")), _record(1, 0, length=2))
    with pytest.raises(ValueError, match=r"label must be a number in \[0, 1\]"):
        w.add(ok, _record(1, 0, length=2, label=2))
    with pytest.raises(TypeError, match="JSON serializable"):
        w.add(ok, _record(1, 0, length=2, extra=torch.zeros(1)))
    w.add(ok, _record(1, 0, length=2, label=None))
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.add(ok, _record(2, 0, length=2))
    assert len(FeatureCache(tmp_path / "d")) == 1  # failed adds left nothing behind
