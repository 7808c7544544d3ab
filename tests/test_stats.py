from __future__ import annotations

import math

import numpy as np
import pytest

from vsteer_hf.eval.stats import bootstrap, paired_difference, wilson


def test_wilson_matches_formula_and_edges():
    est = wilson(10, 100)
    z = 1.96
    p, n = 0.1, 100
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert est.value == 0.1 and est.low == pytest.approx(centre - half) and est.high == pytest.approx(centre + half)
    zero = wilson(0, 20)
    assert zero.low == 0.0 and 0.1 < zero.high < 0.2
    with pytest.raises(ValueError, match="successes <= n"):
        wilson(5, 3)


def test_bootstrap_covers_the_mean_and_clusters_widen_it():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 1.0, 400)
    est = bootstrap(values)
    assert est.low < 1.0 < est.high and est.high - est.low < 0.3
    # four identical samples per cluster: the effective sample is 100, the interval must widen
    clustered = np.repeat(rng.normal(1.0, 1.0, 100), 4)
    groups = np.repeat(np.arange(100), 4)
    naive = bootstrap(clustered)
    by_cluster = bootstrap(clustered, groups=groups)
    assert (by_cluster.high - by_cluster.low) > 1.5 * (naive.high - naive.low)
    with pytest.raises(ValueError, match="groups has"):
        bootstrap([1.0, 2.0], groups=[1])


def test_paired_difference_sign():
    a = [0.0] * 50 + [1.0] * 50
    b = [0.0] * 90 + [1.0] * 10
    est = paired_difference(a, b)
    assert est.value == pytest.approx(-0.4) and est.high < 0
