"""Preference pairs for ProFS: from the pipeline's labelled generations or a pairs file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PreferencePair = tuple[str, str, str]  # (prompt, preferred text, non-preferred text)


def preference_pairs_from_cache(
    workdir_or_cache: str | Path | Any, split: str = "train", max_pairs: int | None = None
) -> list[PreferencePair]:
    """(prompt, prompt + non-toxic continuation, prompt + toxic continuation) from a labelled pipeline cache.

    `workdir_or_cache`: a pipeline work folder (uses its `features/`), a feature-cache folder, or a
    `FeatureCache`. Only sequences of `split` (default the training split: never pair held-out prompts)
    with a label are used; label >= 0.5 is toxic. Each prompt with both kinds of samples gives one pair
    per toxic sample, paired with its safe samples in turn, all in sample order. `max_pairs` keeps the
    first pairs round-robin across prompts (every prompt's first pair, then every second pair, ...).
    Prompt and generation text come from the cache index, else from its `generations.jsonl`.
    """
    from vsteer_hf.train.features import FeatureCache

    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs={max_pairs} must be >= 1 (or None for all pairs).")
    if isinstance(workdir_or_cache, FeatureCache):
        cache = workdir_or_cache
    else:
        folder = Path(workdir_or_cache)
        if (folder / "features").is_dir():
            folder = folder / "features"
        if not folder.is_dir():
            raise FileNotFoundError(f"{workdir_or_cache}: no such pipeline work folder or feature cache.")
        cache = FeatureCache(folder)
    texts: dict[tuple[Any, int], tuple[str, str]] = {}
    generations_file = cache.directory / "generations.jsonl"
    if generations_file.is_file():
        for line in generations_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                item = json.loads(line)
                texts[(item["prompt_id"], int(item["sample"]))] = (item["prompt"], item["generation"])
    by_prompt: dict[Any, dict[str, list[tuple[int, str]]]] = {}
    prompt_of: dict[Any, str] = {}
    labelled = 0
    for record in cache.records:
        if record.get("split") != split or record.get("label") is None:
            continue
        labelled += 1
        key = (record["prompt_id"], int(record["sample"]))
        if "prompt" in record and "generation" in record:
            prompt, generation = record["prompt"], record["generation"]
        elif key in texts:
            prompt, generation = texts[key]
        else:
            raise ValueError(
                f"{cache.directory}: sequence {key} has no prompt/generation text in the index or in "
                "generations.jsonl; re-run `vsteer extract`."
            )
        prompt_of.setdefault(key[0], prompt)
        kind = "toxic" if float(record["label"]) >= 0.5 else "safe"
        by_prompt.setdefault(key[0], {"safe": [], "toxic": []})[kind].append((key[1], generation))
    if labelled == 0:
        raise ValueError(
            f"{cache.directory}: no labelled sequences in split {split!r} (splits: {cache.splits}); "
            "run `vsteer label` first."
        )
    rounds: list[list[PreferencePair]] = []
    for prompt_id, groups in by_prompt.items():
        safe, toxic = sorted(groups["safe"]), sorted(groups["toxic"])
        if not safe or not toxic:
            continue
        prompt = prompt_of[prompt_id]
        for i, (_, bad) in enumerate(toxic):
            good = safe[i % len(safe)][1]
            if len(rounds) <= i:
                rounds.append([])
            rounds[i].append((prompt, prompt + good, prompt + bad))
    pairs = [pair for round_pairs in rounds for pair in round_pairs]
    return pairs if max_pairs is None else pairs[:max_pairs]


# The pair layouts read as is: (preferred key, non-preferred key, how a prompt joins them).
# Ours: {"prompt", "preferred", "non_preferred"}, continuations appended to the prompt. The authors'
# toxicity pairs (Uppaal/detox-edit `utils/dataset_utils.py`, `toxicity_pairwise/split_0.jsonl`):
# {"unpert_gen_text", "pert_gen_text"}, whole texts. HH-Golden rows as their loader joins them:
# {"prompt", "chosen", "rejected"} -> prompt + " " + response.
PAIR_LAYOUTS = (
    ("preferred", "non_preferred", ""),
    ("unpert_gen_text", "pert_gen_text", None),
    ("chosen", "rejected", " "),
)


def _pair(item: Any) -> PreferencePair | None:
    if not isinstance(item, dict):
        return None
    for good_key, bad_key, joiner in PAIR_LAYOUTS:
        if good_key in item and bad_key in item:
            prompt = item.get("prompt", "") if joiner is not None else ""
            good, bad = item[good_key], item[bad_key]
            if not all(isinstance(x, str) for x in (prompt, good, bad)):
                return None
            glue = joiner if prompt and joiner else ""
            return prompt, prompt + glue + good, prompt + glue + bad
    return None


def read_pairs_jsonl(path: str | Path) -> list[PreferencePair]:
    """Preference pairs from a JSON-lines file, one object a line, in any of `PAIR_LAYOUTS`.

    ``{"prompt", "preferred", "non_preferred"}``: continuations of ``prompt`` (which may be empty or
    absent, for pairs of whole texts); the authors' ``{"unpert_gen_text", "pert_gen_text"}`` pair files
    (preferred = unperturbed); HH-Golden ``{"prompt", "chosen", "rejected"}`` rows, joined with a space
    as the authors do. Returns (prompt, preferred text, non-preferred text) like
    `preference_pairs_from_cache`.
    """
    from vsteer_hf.eval.prompts import iter_jsonl

    path = Path(path)
    pairs = []
    for lineno, item in iter_jsonl(path):
        pair = _pair(item)
        if pair is None:
            raise ValueError(
                f"{path}:{lineno}: expected an object with string 'preferred' and 'non_preferred' (and an "
                "optional string 'prompt'), or the authors' 'unpert_gen_text' and 'pert_gen_text', or "
                f"'prompt', 'chosen' and 'rejected'; got {json.dumps(item)[:200]}"
            )
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{path}: no preference pairs in the file.")
    return pairs


def load_pairs(source: str | Path, max_pairs: int | None = None) -> tuple[list[PreferencePair], str]:
    """Pairs from a pipeline work folder (its training split) or a pairs file, and where they came from."""
    source = Path(source)
    if source.is_dir():
        pairs = preference_pairs_from_cache(source, split="train", max_pairs=max_pairs)
        origin = f"the training split of {source}"
    else:
        pairs = read_pairs_jsonl(source)[:max_pairs]
        origin = str(source)
    if not pairs:
        raise ValueError(f"{source}: no preference pairs (no training prompt has both a safe and a toxic sample)")
    return pairs, origin
