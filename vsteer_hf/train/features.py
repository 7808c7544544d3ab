"""On-disk cache of decode-matched features: one float32 row (H,) per generated token, grouped into
sequences, so the head trains from disk with no backbone in memory.

A cache folder holds ``meta.json`` (hidden size, dtype, feature spec, backbone, writer), ``features.f32``
(raw little-endian float32, row-major, all sequences back to back) and ``index.jsonl`` (one JSON line per
sequence: ``offset`` and ``length`` in rows, then its record). Rows are flushed before their index line,
so a crash leaves at most unindexed rows (cut off on reopen) and a partial last line (ignored, then cut
off). One writer at a time; labels are written later, atomically, with `FeatureCache.set_labels`.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vsteer_hf.head import FeatureSpec, _writer

__all__ = [
    "FEATURES_NAME",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "META_NAME",
    "FeatureCache",
    "FeatureCacheWriter",
    "record_key",
]

FEATURES_NAME = "features.f32"
INDEX_NAME = "index.jsonl"
META_NAME = "meta.json"
FORMAT_VERSION = 1
_DTYPE = np.dtype("<f4")
_RESERVED = ("offset", "length")
_REQUIRED = ("prompt_id", "sample", "split")

Key = tuple[Hashable, int]


def record_key(record: Mapping[str, Any]) -> Key:
    """The identity of a sequence: ``(prompt_id, sample)``."""
    return (record["prompt_id"], int(record["sample"]))


def _key(key: Any) -> Key:
    """A caller's key as the canonical tuple (JSON may hand back lists)."""
    prompt_id, sample = key
    return (prompt_id, int(sample))


# --------------------------------------------------------------------------- reading the folder
def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder}: not a feature cache (no {META_NAME}); write one with FeatureCacheWriter(directory, ...)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt feature-cache meta, not valid JSON ({e}); fix or delete the cache") from e
    hidden = meta.get("hidden_size") if isinstance(meta, dict) else None
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0:
        raise ValueError(f"{path}: corrupt feature-cache meta: 'hidden_size' must be a positive int, got {hidden!r}")
    if meta.get("dtype") != "float32":
        raise ValueError(f"{path}: unsupported feature dtype {meta.get('dtype')!r}; this reader knows 'float32'")
    if meta.get("format_version", 1) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: feature cache format {meta['format_version']} is newer than this reader ({FORMAT_VERSION}); "
            "upgrade vsteer_hf"
        )
    return meta


def _read_index(folder: Path) -> tuple[list[dict[str, Any]], int]:
    """Parse the complete lines of the index: (entries, byte length of the complete part).

    A last line without its newline is a write cut short and is ignored; anything else that does not
    parse, or offsets that do not follow each other, is corruption and raises.
    """
    path = folder / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: feature-cache index is missing; the cache is incomplete, delete it")
    raw = path.read_bytes()
    complete = raw.rfind(b"\n") + 1
    entries, expected = [], 0
    for lineno, line in enumerate(raw[:complete].splitlines(), start=1):
        try:
            entry = json.loads(line)
            offset, length = entry["offset"], entry["length"]
            record_key(entry)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path}:{lineno}: corrupt feature-cache index line ({e!r}); fix or delete the cache"
            ) from e
        if offset != expected or not isinstance(length, int) or length < 0:
            raise ValueError(
                f"{path}:{lineno}: corrupt feature-cache index: offset {offset}, length {length} where offset "
                f"{expected} and a length >= 0 were expected; fix or delete the cache"
            )
        expected += length
        entries.append(entry)
    return entries, complete


def _total_rows(entries: list[dict[str, Any]]) -> int:
    return entries[-1]["offset"] + entries[-1]["length"] if entries else 0


def _check_features_size(folder: Path, rows: int, hidden: int) -> int:
    path = folder / FEATURES_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: feature rows are missing; the cache is incomplete, delete it")
    size = path.stat().st_size
    if size < rows * hidden * _DTYPE.itemsize:
        raise ValueError(
            f"{path}: truncated, {size} bytes where the index needs {rows} rows x {hidden} x 4 bytes; "
            "the cache is corrupt, delete it"
        )
    return size


# --------------------------------------------------------------------------- writer
class FeatureCacheWriter:
    """Append sequences of per-token features to a cache folder, creating it or resuming it.

    ``meta`` is stored under ``meta.json["meta"]``; its ``backbone`` key (if any) also goes top level.
    Reopening checks that hidden size and backbone agree, drops a partial last index line and cuts
    ``features.f32`` back to the end of the last indexed sequence. ``fsync`` makes each sequence
    durable across power loss, not only process crashes, before the next is written.
    """

    def __init__(self, directory: str | os.PathLike, hidden_size: int, meta: dict | None = None, fsync: bool = True):
        if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.directory = Path(directory)
        self.hidden_size = hidden_size
        self.fsync = fsync
        meta = dict(meta or {})
        backbone = meta.get("backbone")
        if (self.directory / META_NAME).exists():
            self.meta = _read_meta(self.directory)
            if self.meta["hidden_size"] != hidden_size:
                raise ValueError(
                    f"{self.directory}: cache holds hidden size {self.meta['hidden_size']}, not {hidden_size}; "
                    "write to a new directory"
                )
            if backbone is not None and self.meta.get("backbone") not in (None, backbone):
                raise ValueError(
                    f"{self.directory}: cache holds features of backbone {self.meta['backbone']!r}, not "
                    f"{backbone!r}; write to a new directory"
                )
            entries, complete = _read_index(self.directory)
            rows = _total_rows(entries)
            _check_features_size(self.directory, rows, hidden_size)
            os.truncate(self.directory / INDEX_NAME, complete)
            os.truncate(self.directory / FEATURES_NAME, rows * hidden_size * _DTYPE.itemsize)
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            stray = [n for n in (FEATURES_NAME, INDEX_NAME) if (self.directory / n).exists()]
            if stray:
                raise ValueError(f"{self.directory}: has {stray} but no {META_NAME}; not a cache, delete or move it")
            self.meta = {
                "format_version": FORMAT_VERSION,
                "hidden_size": hidden_size,
                "dtype": "float32",
                "byteorder": "little",
                "feature_spec": {k: v for k, v in asdict(FeatureSpec()).items() if k != "extra"},
                "backbone": backbone,
                "writer": _writer(),
                "meta": meta,
            }
            _atomic_write(self.directory / META_NAME, json.dumps(self.meta, indent=2) + "\n")
            entries, rows = [], 0
        self._keys = {record_key(e) for e in entries}
        self._rows = rows
        self._features = open(self.directory / FEATURES_NAME, "ab")  # noqa: SIM115 - closed in close()
        self._index = open(self.directory / INDEX_NAME, "ab")  # noqa: SIM115

    def has(self, key: Any) -> bool:
        """Whether sequence ``(prompt_id, sample)`` is already in the cache (so an extractor can skip it)."""
        return _key(key) in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, features: Tensor, record: Mapping[str, Any]) -> None:
        """Append one sequence: ``features`` (T, H), one row per generated token, any float dtype/device.

        ``record`` must hold ``prompt_id``, ``sample`` and ``split``; conventionally also ``prompt``,
        ``generation``, ``token_ids`` (T of them) and ``label`` (0 = safe, 1 = undesirable, or missing).
        Everything in it must be JSON-serialisable.
        """
        if self._features.closed:
            raise ValueError(f"{self.directory}: this FeatureCacheWriter is closed")
        missing = [k for k in _REQUIRED if k not in record]
        if missing:
            raise ValueError(f"record is missing {missing}; a record needs {list(_REQUIRED)}")
        reserved = [k for k in _RESERVED if k in record]
        if reserved:
            raise ValueError(f"record keys {reserved} are reserved for the index; rename them")
        key = record_key(record)
        if key in self._keys:
            raise ValueError(f"{self.directory}: sequence {key} is already cached; skip it (check writer.has(key))")
        if features.dim() != 2 or features.shape[1] != self.hidden_size:
            raise ValueError(f"features must be (tokens, {self.hidden_size}), got shape {tuple(features.shape)}")
        length = features.shape[0]
        if "token_ids" in record and len(record["token_ids"]) != length:
            raise ValueError(f"record has {len(record['token_ids'])} token_ids for {length} feature rows")
        if record.get("label") is not None and not _is_prob(record["label"]):
            raise ValueError(f"label must be a number in [0, 1] (0 = safe, 1 = undesirable), got {record['label']!r}")
        rows = features.detach().to("cpu", torch.float32).numpy().astype(_DTYPE, copy=False)  # (T, H)
        if not np.isfinite(rows).all():
            raise ValueError(f"features of sequence {key} contain NaN or inf; not caching them")
        line = json.dumps({"offset": self._rows, "length": length, **record}, allow_nan=False) + "\n"
        self._features.write(np.ascontiguousarray(rows).tobytes())
        self._sync(self._features)  # the rows are on disk before the line that points at them
        self._index.write(line.encode("utf-8"))
        self._sync(self._index)
        self._rows += length
        self._keys.add(key)

    def _sync(self, f) -> None:
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())

    def close(self) -> None:
        for f in (self._features, self._index):
            if not f.closed:
                f.close()

    def __enter__(self) -> FeatureCacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- reader
class SequenceRecords:
    """Split and label lookups over `records` (one dict per sequence), shared by every cache reader."""

    directory: Path  # named in error messages
    records: list[dict[str, Any]]

    @property
    def splits(self) -> dict[str, int]:
        """Number of sequences per split name."""
        return dict(Counter(r.get("split") for r in self.records))

    def split(self, name: str) -> list[int]:
        """Indices of the sequences of split ``name``, in cache order; an unknown split raises."""
        out = [i for i, r in enumerate(self.records) if r.get("split") == name]
        if not out:
            raise ValueError(f"{self.directory}: no sequences in split {name!r}; splits present: {self.splits}")
        return out

    def labels(self, indices: Sequence[int] | None = None) -> list[float | None]:
        """The ``label`` of each sequence (None where not set yet)."""
        indices = range(len(self)) if indices is None else indices
        return [self.records[i].get("label") for i in indices]


class FeatureCache(SequenceRecords):
    """Read a cache folder: ``cache[i] -> (features (T, H) float32 tensor, record)``, rows memory-mapped.

    A snapshot of the index at open time; a trailing unindexed write of a live writer is not seen.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: feature cache directory does not exist")
        self.meta = _read_meta(self.directory)
        self.hidden_size: int = self.meta["hidden_size"]
        entries, _ = _read_index(self.directory)
        rows = _total_rows(entries)
        _check_features_size(self.directory, rows, self.hidden_size)
        self.offsets = np.array([e["offset"] for e in entries], dtype=np.int64)  # (N,)
        self.lengths = np.array([e["length"] for e in entries], dtype=np.int64)  # (N,)
        self._records = [{k: v for k, v in e.items() if k not in _RESERVED} for e in entries]
        self._where = {record_key(r): i for i, r in enumerate(self._records)}
        if rows:
            self.features = np.memmap(
                self.directory / FEATURES_NAME, dtype=_DTYPE, mode="r", shape=(rows, self.hidden_size)
            )  # (rows, H)
        else:  # np.memmap refuses an empty map
            self.features = np.zeros((0, self.hidden_size), dtype=_DTYPE)

    @property
    def backbone(self) -> str | None:
        return self.meta.get("backbone")

    @property
    def records(self) -> list[dict[str, Any]]:
        """One dict per sequence, in cache order (the records as written, plus labels set since)."""
        return self._records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for a cache of {n} sequences")
        i %= n
        return self.rows(i), self._records[i]

    def rows(self, i: int, max_tokens: int | None = None) -> Tensor:
        """Features of sequence ``i`` (its first ``max_tokens`` tokens), copied out of the map: (T, H)."""
        start, length = int(self.offsets[i]), int(self.lengths[i])
        if max_tokens is not None:
            length = min(length, max_tokens)
        return torch.from_numpy(np.array(self.features[start : start + length], dtype=np.float32))

    def has(self, key: Any) -> bool:
        """Whether sequence ``(prompt_id, sample)`` is in the cache."""
        return _key(key) in self._where

    def index_of(self, key: Any) -> int:
        try:
            return self._where[_key(key)]
        except KeyError:
            raise KeyError(f"{self.directory}: no sequence {key!r} in the cache") from None

    def set_labels(self, labels: Mapping[Any, float]) -> int:
        """Set labels by ``(prompt_id, sample)`` and rewrite the index atomically; returns how many were set.

        Labels are numbers in [0, 1] (0 = safe, 1 = undesirable). Unknown keys raise before anything is
        written. Do not run this while a writer has the cache open.
        """
        updates: dict[int, float] = {}
        unknown = []
        for key, value in labels.items():
            i = self._where.get(_key(key))
            if i is None:
                unknown.append(key)
                continue
            if not _is_prob(value):
                raise ValueError(f"label for {key!r} must be a number in [0, 1], got {value!r}")
            updates[i] = float(value)
        if unknown:
            raise KeyError(f"{self.directory}: {len(unknown)} label keys not in the cache, e.g. {unknown[:3]}")
        entries, _ = _read_index(self.directory)
        same = len(entries) == len(self) and all(
            record_key(e) == record_key(r) for e, r in zip(entries, self._records, strict=True)
        )
        if not same:
            raise ValueError(f"{self.directory}: the index changed since this cache was opened; reopen it")
        for i, value in updates.items():
            entries[i]["label"] = value
            self._records[i]["label"] = value
        text = "".join(json.dumps(e, allow_nan=False) + "\n" for e in entries)
        _atomic_write(self.directory / INDEX_NAME, text)
        return len(updates)

    def __repr__(self) -> str:
        return (
            f"FeatureCache({str(self.directory)!r}, sequences={len(self)}, tokens={int(self.lengths.sum())}, "
            f"hidden_size={self.hidden_size}, splits={self.splits})"
        )


def _is_prob(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0 <= x <= 1
