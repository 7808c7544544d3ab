"""Per-token training targets: which tokens of a continuation made the judge call it undesirable.

The trainer's default target is the sequence label broadcast to every token, which tells the head
*that* a continuation is toxic but not *where*. VFD scores each candidate's state right after the
model has read the candidate token, so what it needs to know at that state is whether this token is
the one that turns the text bad. Both functions here return ``{cache index: float32 array, one target
in [0, 1] per token}`` for one split, ready for ``train_value_head(..., token_targets=)``.

- `word_targets`: the judge's score of the word the token belongs to, each word judged alone. Local
  (a token's target depends on its own word), so a head that reads one state can fit it. With a
  `cutoff`, 1 for a word the judge alone calls undesirable and 0 otherwise: the judge scores many
  harmless words mildly ("women" 0.23, "black" 0.40), and a head fitted to those scores sets its
  threshold among them and steers away from harmless words.
- `prefix_targets`: whether the judge already scores the prefix so far undesirable. Cumulative, so the
  head must remember earlier words, which the final post-norm state does poorly (results/smollm2-rtp/
  what_we_tried.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Judge = Callable[[list[str], list[str]], list[float]]
TARGETS = ("label", "words", "words+label", "offensive-words")  # the train stage's --targets choices
WORD = re.compile(r"\w+")


def _sequence_labels(cache: Any, indices: Sequence[int], split: str) -> list[float]:
    labels = cache.labels(indices)
    if any(label is None for label in labels):
        raise ValueError(f"split {split!r} has unlabelled generations; run the label stage first.")
    return [float(label) for label in labels]


def token_spans(tokenizer: Any, token_ids: Sequence[int]) -> list[tuple[int, int]]:
    """The character span each token adds to ``tokenizer.decode(token_ids, skip_special_tokens=True)``.

    Read off the decoded prefixes, so it holds for any tokenizer (byte-level pieces included: a piece
    that completes a character takes the whole character); special tokens get an empty span.
    """
    spans, end = [], 0
    for t in range(len(token_ids)):
        new_end = max(end, len(tokenizer.decode(token_ids[: t + 1], skip_special_tokens=True)))
        spans.append((end, new_end))
        end = new_end
    return spans


def word_targets(
    cache: Any,
    judge: Judge,
    tokenizer: Any,
    split: str = "train",
    with_label: bool = False,
    batch_size: int = 1024,
    cutoff: float | None = None,
) -> dict[int, np.ndarray]:
    """At token t: the highest judge score among the words (``\\w+`` runs of the decoded continuation)
    that token t's text overlaps, each distinct word scored once, alone, with an empty prompt.

    For a word-level judge (the toxicity judge is a TF-IDF linear model) this names exactly the tokens
    that raise its score; a token that is no word's part (punctuation, EOS) gets 0. ``cutoff`` turns each
    word's score into 1 above it and 0 at or below it. ``with_label`` also sets every token of a
    sequence labelled undesirable to 1. Needs the split labelled only then.
    """
    indices = list(cache.split(split))
    labels = _sequence_labels(cache, indices, split) if with_label else [0.0] * len(indices)
    found: list[tuple[int, list[tuple[int, int]], list[tuple[int, int, str]]]] = []
    for i in indices:
        ids = cache.records[i]["token_ids"]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        words = [(m.start(), m.end(), m.group()) for m in WORD.finditer(text)]
        found.append((i, token_spans(tokenizer, ids), words))
    vocabulary = sorted({w for _, _, words in found for *_, w in words})
    scores: dict[str, float] = {}
    for start in range(0, len(vocabulary), batch_size):
        chunk = vocabulary[start : start + batch_size]
        scores.update(zip(chunk, judge([""] * len(chunk), chunk), strict=True))
    unscored = [w for w, s in scores.items() if math.isnan(s)]
    if unscored:
        raise ValueError(
            f"the judge gave no verdict (NaN) on {len(unscored)} single words, e.g. {unscored[:3]}; "
            "word targets need a judge that scores any text, such as 'toxicity'"
        )
    if cutoff is not None:
        scores = {word: float(score > cutoff) for word, score in scores.items()}
    targets = {}
    for (i, spans, words), label in zip(found, labels, strict=True):
        row = np.full(int(cache.lengths[i]), label, dtype=np.float32)
        for t, (lo, hi) in enumerate(spans[: len(row)]):
            for w_lo, w_hi, word in words:
                if lo < w_hi and w_lo < hi:
                    row[t] = max(row[t], scores[word])
        targets[i] = row
    return targets


def token_targets(
    kind: str,
    cache: Any,
    judge: Judge,
    tokenizer: Any,
    splits: Sequence[str] = ("train", "validation"),
    judge_threshold: float = 0.5,
) -> dict[int, np.ndarray] | None:
    """The pipeline's `targets` option for these splits: None for "label" (the trainer broadcasts the
    sequence label), else `word_targets`: with the label for "words+label", cut at the judge's own
    threshold for "offensive-words"."""
    if kind not in TARGETS:
        raise ValueError(f"targets must be one of {list(TARGETS)}, got {kind!r}.")
    if kind == "label":
        return None
    cutoff = judge_threshold if kind == "offensive-words" else None
    targets: dict[int, np.ndarray] = {}
    for split in splits:
        targets.update(
            word_targets(cache, judge, tokenizer, split=split, with_label=kind == "words+label", cutoff=cutoff)
        )
    return targets


def prefix_targets(
    cache: Any,
    judge: Judge,
    tokenizer: Any,
    threshold: float = 0.5,
    batch_size: int = 1024,
    split: str = "train",
    with_label: bool = True,
) -> dict[int, np.ndarray]:
    """At token t: 1 if the sequence is labelled undesirable (only `with_label`) or the judge already
    scores its first t + 1 tokens above `threshold`, else 0. Without the label the target is
    "undesirable so far", which at the last token is the sequence label itself."""
    indices = list(cache.split(split))
    labels = _sequence_labels(cache, indices, split)
    jobs = [(i, t) for i in indices for t in range(int(cache.lengths[i]))]
    texts = [tokenizer.decode(cache.records[i]["token_ids"][: t + 1], skip_special_tokens=True) for i, t in jobs]
    prompts = [cache.records[i]["prompt"] for i, _ in jobs]
    scores: list[float] = []
    for start in range(0, len(jobs), batch_size):
        scores += judge(prompts[start : start + batch_size], texts[start : start + batch_size])
    targets = {
        i: np.full(int(cache.lengths[i]), label if with_label else 0.0, dtype=np.float32)
        for i, label in zip(indices, labels, strict=True)
    }
    for (i, t), score in zip(jobs, scores, strict=True):
        if score > threshold:
            targets[i][t] = 1.0
    return targets
