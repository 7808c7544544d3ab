"""Cross-fitted calibration: more safe generations for ĉ(α) than the validation split holds.

ĉ(α) is a quantile of the head's max risk on safe generations it never trained on. The validation split
alone is small (57 prompts in the RTP recipe) and can differ from the prompts the head will meet: on the
SmolLM2 RTP run, 30% of validation's safe continuations hold a word the judge calls offensive, against 20%
of train's and 22% of test's, so a head that flags those words gets thresholds that are too strict on test.

Cross-fitting adds the train split. Its prompts are dealt into folds. For each fold, a head trained the
same way on the other folds scores the held-out fold's safe generations, and those scores join
validation's. Every score comes from a head that never saw that prompt. The fold heads stand in for the
final head, trained on all folds, as in cross-conformal prediction. So the guarantee is approximate and
holds as long as one fold more of data changes the head little. The pipeline therefore trains them for the
epochs the final head kept rather than letting each early-stop anew: on the SmolLM2 RTP run, fold heads that
stopped earlier scored safe text higher than the final head and made the high-α thresholds too strict
(results/smollm2-rtp/fold_check.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vsteer_hf.train.features import SequenceRecords

HELD_OUT = "held-out"  # the split name a fold's train sequences take while the other folds train


def prompt_folds(prompt_ids: Sequence[str], folds: int) -> list[set[str]]:
    """The distinct prompt ids, sorted, dealt in turn into `folds` sets: every sample of a prompt lands in
    one fold, so a fold head never saw any continuation of the prompts it scores."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}.")
    distinct = sorted(set(prompt_ids))
    if len(distinct) < folds:
        raise ValueError(f"{len(distinct)} train prompts cannot fill {folds} folds; use at most {len(distinct)}.")
    return [set(distinct[k::folds]) for k in range(folds)]


class HeldOutFold(SequenceRecords):
    """`cache` with the train sequences of `prompts` moved to split HELD_OUT; the features are shared, the
    records copied, so the cache itself is left as it was."""

    def __init__(self, cache: Any, prompts: set[str]) -> None:
        self.cache, self.directory = cache, cache.directory
        self.hidden_size, self.lengths = cache.hidden_size, cache.lengths
        self.records = [
            {**r, "split": HELD_OUT} if r.get("split") == "train" and r.get("prompt_id") in prompts else r
            for r in cache.records
        ]

    @property
    def backbone(self) -> str | None:
        return self.cache.backbone

    def __len__(self) -> int:
        return len(self.records)

    def rows(self, i: int, max_tokens: int | None = None) -> Any:
        return self.cache.rows(i, max_tokens)

    def __getitem__(self, i: int) -> tuple[Any, dict[str, Any]]:
        return self.rows(i), self.records[i]


def out_of_fold_safe_risks(
    cache: Any, folds: int, fit: Callable[[Any], Any], progress: Callable[[str], None] | None = None
) -> np.ndarray:
    """Max risk of every safe train sequence, each scored by a head `fit` trained with its fold held out.

    `fit(view)` trains a head on `view`'s train split as the final head was trained (the pipeline: for the
    epochs it kept) and returns it.
    """
    from vsteer_hf.train.calibrate import sequence_max_risks

    train = cache.split("train")
    scores = []
    for k, fold in enumerate(prompt_folds([cache.records[i]["prompt_id"] for i in train], folds)):
        if progress:
            progress(f"cross-fit fold {k + 1}/{folds}: training without {len(fold)} train prompts")
        view = HeldOutFold(cache, fold)
        risks, labels = sequence_max_risks(fit(view), view, HELD_OUT)
        scores.append(risks[labels == 0])
    return np.concatenate(scores)
