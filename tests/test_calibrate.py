"""Conformal and martingale thresholds: hand examples, exact definitions, coverage on synthetic data."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vsteer_hf.train.calibrate import (
    DEFAULT_ALPHAS,
    calibration_report,
    conformal_curve,
    conformal_rank,
    conformal_threshold,
    false_intervention_rate,
    martingale_risk_threshold,
    martingale_scores,
    martingale_threshold,
    max_over_trajectory,
    ville_threshold,
)

NINE = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6]  # n = 9, shuffled 0.1 .. 0.9


def f32_above(x: float) -> float:
    """The smallest float32 strictly above x (x in [0, 1)), by a search independent of the module."""
    nearest = np.float32(x)
    candidates = (nearest, np.nextafter(nearest, np.float32(2)))
    return float(min(c for c in candidates if float(c) > x))


def assert_smallest_float32_above(thr: float, x: float) -> None:
    """thr is a float32 value > x and the float32 just below it is <= x."""
    assert float(np.float32(thr)) == thr
    assert thr > x
    assert float(np.nextafter(np.float32(thr), np.float32(-1))) <= x


@pytest.mark.parametrize(
    ("alpha", "k", "expected"),
    [
        (0.1, 9, 0.9),  # ⌈10 * 0.9⌉ = 9 -> 9th smallest = the max
        (0.2, 8, 0.8),  # ⌈10 * 0.8⌉ = 8
        (0.3, 7, 0.7),  # ⌈10 * 0.7⌉ = 7
        (0.7, 3, 0.3),  # ⌈10 * 0.3⌉ = 3 (10 * (1 - 0.7) is 3.0000000000000004 in floats)
        (0.5, 5, 0.5),  # ⌈10 * 0.5⌉ = 5
        (0.15, 9, 0.9),  # ⌈8.5⌉ = 9
        (0.05, 10, 1.0),  # ⌈9.5⌉ = 10 > n: never intervene
    ],
)
def test_conformal_threshold_n9_hand(alpha, k, expected):
    assert conformal_rank(9, alpha) == k
    thr = conformal_threshold(NINE, alpha)
    assert thr == pytest.approx(expected)
    if k <= 9:
        assert_smallest_float32_above(thr, expected)
        assert false_intervention_rate(NINE, thr) == pytest.approx((9 - k) / 9)  # the ones above S_(k)
    else:
        assert thr == 1.0


def test_tiny_n_edge_cases():
    # ⌈2 * 0.5⌉ = 1: just above 0.42. float32(0.42) lies below the float64 0.42, so one step up from it;
    # float32(0.6) lies above the float64 0.6, so it is float32(0.6) itself (no float32 is skipped)
    assert float(np.float32(0.42)) < 0.42 < 0.42000001668930054 == float(np.nextafter(np.float32(0.42), np.float32(1)))
    assert conformal_threshold([0.42], 0.5) == 0.42000001668930054
    assert float(np.float32(0.6)) > 0.6
    assert conformal_threshold([0.6], 0.5) == float(np.float32(0.6))
    assert conformal_threshold([0.42], 0.4) == 1.0  # ⌈1.2⌉ = 2 > 1
    assert conformal_threshold([0.2, 0.4, 0.6], 0.1) == 1.0  # ⌈3.6⌉ = 4 > 3
    # ⌈3⌉ = 3: a float32 tensor's 0.6 is on the grid, so the threshold is the next float32 up
    six = np.float32(0.6)
    assert conformal_threshold(torch.tensor([0.2, 0.4, 0.6]), 0.25) == float(np.nextafter(six, np.float32(1)))
    assert conformal_threshold([0.0], 0.5) == float(np.nextafter(np.float32(0), np.float32(1)))  # > 0
    with pytest.raises(ValueError, match="no safe calibration examples"):
        conformal_threshold([], 0.1)
    with pytest.raises(ValueError, match="alpha"):
        conformal_threshold([0.1], 0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        conformal_threshold([1.5], 0.1)
    with pytest.raises(ValueError, match="NaN"):
        conformal_threshold([float("nan")], 0.1)


def test_rank_has_no_float_off_by_one():
    for n in range(1, 400):
        for a in (*DEFAULT_ALPHAS, 0.3, 0.7, 0.85, 0.95, 0.001):
            exact = math.ceil((n + 1) * (1 - Fraction(str(a))))
            assert conformal_rank(n, a) == exact, (n, a)


risk_lists = st.lists(st.sampled_from([0.0, 0.05, 0.1, 0.3, 0.5, 0.5, 0.8, 0.99, 1.0]), min_size=1, max_size=40)
alphas = st.sampled_from([0.01, 0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 0.9])


@settings(max_examples=200, deadline=None)
@given(risks=risk_lists, alpha=alphas)
def test_threshold_is_the_smallest_score_with_enough_mass_below(risks, alpha):
    """ĉ = the smallest float32 strictly above s* = min{s in scores : #{S_i <= s} / (n+1) >= 1 - α}
    (1.0 if s* is 1.0 or there is no such s); ties included."""
    n, a = len(risks), Fraction(str(alpha))
    ok = [s for s in risks if Fraction(sum(r <= s for r in risks), n + 1) >= 1 - a]
    thr = conformal_threshold(risks, alpha)
    if not ok or min(ok) == 1.0:
        assert thr == 1.0
        return
    s_star = min(ok)
    assert_smallest_float32_above(thr, s_star)
    assert thr == f32_above(s_star)
    # ">= threshold" is "> s*" on the scores: ties at s* never count
    assert [r >= thr for r in risks] == [r > s_star for r in risks]
    # in-sample: at most (n+1)α - 1 calibration scores reach the threshold
    assert sum(r >= thr for r in risks) <= (n + 1) * a - 1


@settings(max_examples=100, deadline=None)
@given(risks=risk_lists)
def test_curve_is_non_increasing_in_alpha(risks):
    curve = conformal_curve(risks)
    values = [curve[a] for a in sorted(curve)]
    assert list(curve) == list(DEFAULT_ALPHAS)
    assert all(x >= y for x, y in itertools.pairwise(values))
    priors = [0.3] * len(risks)
    mcurve = conformal_curve(risks, method="martingale", priors=priors)
    mvalues = [mcurve[a] for a in sorted(mcurve)]
    assert all(x >= y for x, y in itertools.pairwise(mvalues))


def _synthetic_pool(n_examples: int, seed: int) -> torch.Tensor:
    """Max risks of safe generations: random-walk logit trajectories of random length, right-padded."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(n_examples, 32, generator=g, dtype=torch.float64) * 0.4
    logits = -2.0 + steps.cumsum(dim=1)  # (N, T)
    lengths = torch.randint(1, 33, (n_examples,), generator=g)
    mask = torch.arange(32)[None, :] < lengths[:, None]  # (N, T)
    return max_over_trajectory(torch.sigmoid(logits), mask)  # (N,)


@pytest.mark.parametrize(("n", "alpha"), [(19, 0.1), (49, 0.05), (30, 0.2), (99, 0.1)])
def test_coverage_over_random_splits_is_valid_and_tight(n, alpha):
    pool = _synthetic_pool(600, seed=n).numpy()
    assert np.unique(pool).size == pool.size  # tie-free, so the exact rate is (n+1-k)/(n+1)
    rng = np.random.default_rng(n)
    rates = []
    for _ in range(600):
        perm = rng.permutation(pool.size)
        calib, held = pool[perm[:n]], pool[perm[n:]]
        rates.append(false_intervention_rate(held, conformal_threshold(calib, alpha)))
    mean = float(np.mean(rates))
    k = conformal_rank(n, alpha)
    exact = (n + 1 - k) / (n + 1)
    assert alpha - 1 / (n + 1) <= exact <= alpha
    assert mean == pytest.approx(exact, abs=0.01)  # Monte Carlo s.e. here is < 0.003
    assert alpha - 1 / (n + 1) - 0.01 <= mean <= alpha + 0.01


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("step", [0.05, 0.25])
def test_coverage_holds_with_ties(step, dtype):
    """Risks rounded to a coarse grid have many ties; the rule `risk >= threshold` keeps the bound
    because the threshold sits just above S_(k). Without that shift (`risk >= S_(k)`) ties break it."""
    pool = (np.round(_synthetic_pool(600, seed=7).numpy() / step) * step).astype(dtype)
    assert np.unique(pool).size <= round(1 / step) + 1
    rng = np.random.default_rng(7)
    for alpha in (0.05, 0.1, 0.3):
        rates, unshifted = [], []
        for _ in range(400):
            perm = rng.permutation(pool.size)
            calib, held = pool[perm[:40]], pool[perm[40:]]
            rates.append(false_intervention_rate(held, conformal_threshold(calib, alpha)))
            unshifted.append(float(np.mean(held >= np.sort(calib)[conformal_rank(40, alpha) - 1])))
        assert np.mean(rates) <= alpha + 0.01
        assert np.mean(unshifted) > alpha + (0.03 if step == 0.25 else 0.0)  # the ties matter here


def test_ties_at_the_order_statistic_do_not_intervene():
    calib = [0.2, 0.5, 0.5, 0.5, 0.9]  # n = 5, α = 0.5: k = ⌈3⌉ = 3, S_(3) = 0.5, tied three times
    thr = conformal_threshold(calib, 0.5)
    assert thr == 0.5 + 2**-24  # the next float32 above 0.5
    assert false_intervention_rate(calib, thr) == 0.2  # only 0.9; the tied 0.5s do not count
    assert false_intervention_rate([0.5, 0.5], thr) == 0.0  # nor do new safe risks equal to S_(k)
    # as the decoder sees it: float32 risks against a float32 threshold (exact, thr is on the grid)
    risks = torch.tensor([0.5, 0.5 + 2**-24, 0.9], dtype=torch.float32)
    assert (risks >= torch.tensor(thr, dtype=torch.float32)).tolist() == [False, True, True]
    assert false_intervention_rate(calib, 0.5) == 0.8  # what `>= S_(k)` would have counted


def test_saturated_order_statistic_gives_threshold_one():
    # n = 3, α = 0.5: k = 2, S_(2) = 1.0; no float32 risk lies above it, so the threshold is 1.0
    assert conformal_threshold([1.0, 0.3, 1.0], 0.5) == 1.0
    assert conformal_threshold([1.0] * 5, 0.2) == 1.0
    # just below 1.0, the next float32 up is 1.0 itself
    below = float(np.nextafter(np.float32(1), np.float32(0)))
    assert conformal_threshold([below, 0.3, below], 0.5) == 1.0
    # the documented exception: saturated risks do reach a 1.0 threshold
    assert false_intervention_rate([1.0, 0.3, 1.0], 1.0) == pytest.approx(2 / 3)


def test_false_intervention_rate_counts_reaching_the_threshold():
    assert false_intervention_rate([0.2, 0.5, 0.5, 0.9], 0.5) == 0.75  # >=: the two 0.5s count
    assert false_intervention_rate([0.2, 0.5, 0.5, 0.9], 0.5 + 2**-24) == 0.25
    assert false_intervention_rate([0.99, 0.999999], 1.0) == 0.0  # the k > n answer fires on no risk < 1
    assert false_intervention_rate([1.0, 1.0], 1.0) == 1.0  # ... but on risks saturated at exactly 1.0
    assert false_intervention_rate([3.0, 9.0], math.inf) == 0.0  # M scale: +inf never fires


def test_max_over_trajectory_masks_and_empty_rows():
    risks = torch.tensor([[0.1, 0.9, 0.3], [0.2, 0.4, 0.99], [0.7, 0.8, 0.9]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    assert torch.allclose(max_over_trajectory(risks, mask), torch.tensor([0.9, 0.4, 0.0]))
    assert torch.allclose(max_over_trajectory(risks), torch.tensor([0.9, 0.99, 0.9]))
    assert max_over_trajectory(risks, mask, empty=-1.0)[2] == -1.0


def test_martingale_hand_computed():
    # prior 1/2 -> M = p / (1 - p): 0.9 -> 9, 0.6 -> 1.5, 0.75 -> 3
    risks = [0.9, 0.6, 0.75]
    assert np.allclose(martingale_scores(risks, 0.5), [9.0, 1.5, 3.0])
    assert martingale_threshold(risks, 0.5, 0.25) == pytest.approx(9.0)  # ⌈4 * 0.75⌉ = 3
    assert martingale_threshold(risks, 0.5, 0.5) == pytest.approx(3.0)  # ⌈2⌉ = 2
    assert martingale_threshold(risks, 0.5, 0.1) == math.inf  # ⌈3.6⌉ = 4 > 3
    # prior 0.2 (odds 1/4) on a risk of 0.5 (odds 1): M = 4; saturated risks stay finite
    assert martingale_scores([0.5], [0.2])[0] == pytest.approx(4.0)
    assert np.isfinite(martingale_scores([1.0], [1e-30])).all()
    priors = torch.tensor([0.2, 0.5])  # float32: 0.2 is 0.20000000298...
    thr = martingale_risk_threshold(4.0, priors)
    assert thr.dtype == torch.float64 and thr.shape == (2,)
    assert torch.allclose(thr, torch.tensor([0.5, 0.8], dtype=torch.float64))
    # each is the smallest float32 risk whose M reaches 4
    for p_star, p0 in zip(thr.tolist(), priors.tolist(), strict=True):
        assert float(np.float32(p_star)) == p_star
        below = float(np.nextafter(np.float32(p_star), np.float32(0)))
        assert martingale_scores([p_star], p0)[0] >= 4.0 > martingale_scores([below], p0)[0]
    assert martingale_risk_threshold(math.inf, [0.3]).item() == 1.0
    assert martingale_risk_threshold(0.0, [0.3]).item() == 0.0
    assert martingale_risk_threshold(1e30, [0.3]).item() == 1.0  # no risk reaches it: the 1.0 ceiling


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_martingale_with_one_prior_makes_the_same_decisions_as_conformal(seed):
    """Float32 risks, as the decoder produces them: identical thresholds and identical decisions."""
    pool = _synthetic_pool(500, seed=seed).float().numpy()
    calib, held = pool[:200], pool[200:]
    k_order = np.sort(calib.astype(np.float64))
    for alpha in DEFAULT_ALPHAS:
        m = martingale_threshold(calib, 0.1, alpha)
        risk_thr = conformal_threshold(calib, alpha)
        m_k = martingale_scores([k_order[conformal_rank(200, alpha) - 1]], 0.1)[0]
        assert m == np.nextafter(m_k, np.inf)  # the smallest float64 above M_(k)
        assert martingale_risk_threshold(m, 0.1).item() == risk_thr  # exactly, not approximately
        fires = held >= risk_thr
        assert np.array_equal(martingale_scores(held, 0.1) >= m, fires)  # on the M scale
        assert np.array_equal(held >= martingale_risk_threshold(m, [0.1] * held.size).numpy(), fires)
        # including at the order statistic and the float32 neighbours around the threshold
        edge = np.array([risk_thr, np.nextafter(np.float32(risk_thr), np.float32(0))], dtype=np.float32)
        assert np.array_equal(martingale_scores(edge, 0.1) >= m, edge >= risk_thr)


def _exact_posterior_safe_runs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Safe generations scored by an exact posterior: prior p0 per prompt, tokens i.i.d.
    Bernoulli(0.4) if safe / 0.6 if unsafe, p_t = P(unsafe | tokens so far). Returns (max risk, p0)."""
    rng = np.random.default_rng(seed)
    p0 = rng.uniform(0.05, 0.6, size=n)
    tokens = rng.random((n, 64)) < 0.4  # drawn under the safe hypothesis
    llr = np.where(tokens, math.log(0.6 / 0.4), math.log(0.4 / 0.6))  # per-token log likelihood ratio
    logit_p = np.log(p0 / (1 - p0))[:, None] + llr.cumsum(axis=1)
    return (1 / (1 + np.exp(-logit_p))).max(axis=1), p0


def test_ville_is_anytime_valid_and_more_conservative_than_calibration_for_an_exact_posterior():
    max_risk, p0 = _exact_posterior_safe_runs(6000, seed=0)
    calib, held = slice(0, 3000), slice(3000, None)
    held_scores = martingale_scores(max_risk[held], p0[held])
    for alpha in (0.05, 0.1, 0.2):
        assert false_intervention_rate(held_scores, ville_threshold(alpha)) <= alpha
        calibrated = martingale_threshold(max_risk[calib], p0[calib], alpha)
        assert calibrated <= ville_threshold(alpha)
        assert false_intervention_rate(held_scores, calibrated) <= alpha + 0.015


def test_report_rows():
    pool = _synthetic_pool(700, seed=11).numpy()
    rows = calibration_report(pool[:200], pool[200:], alphas=(0.05, 0.1))
    assert [r["alpha"] for r in rows] == [0.05, 0.1]
    for r in rows:
        assert r["threshold"] == conformal_threshold(pool[:200], r["alpha"])
        assert r["n_calib"] == 200 and r["n_heldout"] == 500
        assert r["false_intervention_rate"] == r["false_interventions"] / 500
        assert r["wilson_low"] <= r["false_intervention_rate"] <= r["wilson_high"]
        assert r["stderr"] == pytest.approx(
            math.sqrt(r["false_intervention_rate"] * (1 - r["false_intervention_rate"]) / 500)
        )
        assert r["expected_rate"] <= r["alpha"]
    rows = calibration_report(pool[:200], pool[200:], (0.1,), "martingale", 0.2, 0.2)
    assert (
        rows[0]["false_interventions"] == calibration_report(pool[:200], pool[200:], (0.1,))[0]["false_interventions"]
    )
    with pytest.raises(ValueError, match="priors"):
        calibration_report(pool[:200], pool[200:], method="martingale")


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(10, 120),
    alphas=st.lists(st.floats(0.02, 0.6), min_size=2, max_size=4, unique=True),
    seed=st.integers(0, 2**16),
    shape=st.floats(0.3, 3.0),
)
def test_coverage_on_exchangeable_data_and_monotone_threshold(n, alphas, seed, shape):
    """Any n, α and score distribution (Beta(shape, 2) draws): the threshold falls as α grows, and the
    false-intervention rate on fresh exchangeable data averages at most α (exact rate (n+1-k)/(n+1))."""
    rng = np.random.default_rng(seed)
    trials = 300
    calib = rng.beta(shape, 2.0, size=(trials, n))
    fresh = rng.beta(shape, 2.0, size=(trials, 200))
    # s.e. of the mean rate: the threshold's coverage F(S_(k)) ~ Beta(k, n+1-k) has variance <= 1/(4(n+2)),
    # plus the binomial noise of 200 fresh draws per trial
    tolerance = 4 * (0.5 / math.sqrt((n + 2) * trials) + 0.5 / math.sqrt(200 * trials))
    previous = np.full(trials, np.inf)
    for alpha in sorted(alphas):
        thresholds = np.array([conformal_threshold(row, alpha) for row in calib])  # (trials,)
        assert (thresholds <= previous).all()
        previous = thresholds
        rate = float((fresh >= thresholds[:, None]).mean())
        k = conformal_rank(n, alpha)
        exact = 0.0 if k > n else (n + 1 - k) / (n + 1)
        assert exact <= alpha + 1e-12
        assert rate <= alpha + tolerance
        assert rate == pytest.approx(exact, abs=tolerance)
