"""Uncertainty for evaluation numbers: Wilson intervals for rates, percentile bootstrap for means.

Every figure the demo, the pipeline report and `vsteer compare` print comes with one of these, so
that a difference between methods can be read against its sampling error. Bootstrap resamples
*prompts* (clusters) when several samples share a prompt, since samples of one prompt are not
independent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a 95% interval and the sample size behind it."""

    value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def as_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


def wilson(successes: int, n: int, z: float = 1.96) -> Estimate:
    """Wilson score interval for a binomial rate: sane at 0, 1 and small n, unlike the normal one."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got successes={successes}, n={n}.")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)


def bootstrap(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    groups: Sequence[object] | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap 95% interval of `statistic(values)`, resampling `groups` (e.g. prompt ids) whole."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("cannot bootstrap an empty sample.")
    rng = np.random.default_rng(seed)
    if groups is None:
        clusters = [np.array([i]) for i in range(arr.size)]
    else:
        if len(groups) != arr.size:
            raise ValueError(f"groups has {len(groups)} entries but values has {arr.size}.")
        index: dict[object, list[int]] = {}
        for i, g in enumerate(groups):
            index.setdefault(g, []).append(i)
        clusters = [np.array(ix) for ix in index.values()]
    stats = np.empty(resamples)
    for r in range(resamples):
        pick = rng.integers(0, len(clusters), len(clusters))
        stats[r] = statistic(arr[np.concatenate([clusters[i] for i in pick])])
    low, high = np.percentile(stats, [2.5, 97.5])
    return Estimate(float(statistic(arr)), float(low), float(high), int(arr.size))


def paired_difference(
    a: Sequence[float], b: Sequence[float], groups: Sequence[object] | None = None, resamples: int = 2000, seed: int = 0
) -> Estimate:
    """Bootstrap interval of mean(b - a) for paired samples (same prompt and seed under two methods)."""
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired samples need equal shapes, got {a_arr.shape} and {b_arr.shape}.")
    return bootstrap(b_arr - a_arr, groups=groups, resamples=resamples, seed=seed)
