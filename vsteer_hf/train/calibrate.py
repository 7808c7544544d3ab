"""Calibrate the risk threshold so that safe generations are rarely intervened on.

Split conformal over the max-over-trajectory risk of held-out *safe* generations gives a
finite-sample bound on the false-intervention rate, and the ĉ(α) curve a head card stores. The
"martingale" variant (as in HenDav/value-steering, `value_steer/calibration.py`) calibrates the
posterior-odds ratio M_t = odds(p_t)/odds(p_0) instead; `ville_threshold` is its data-free,
anytime-valid counterpart. Pure numpy/torch.

Convention used throughout: intervene iff the score is strictly greater than the threshold
(abstention's `risk > threshold`). The bounds below are exact for that rule, ties included; VFD's
`safe iff risk < threshold` also rejects risk == threshold, which keeps the bounds only when ties
with the threshold have probability zero (see `conformal_threshold`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_ALPHAS",
    "METHODS",
    "calibration_report",
    "conformal_curve",
    "conformal_rank",
    "conformal_threshold",
    "false_intervention_rate",
    "martingale_risk_threshold",
    "martingale_scores",
    "martingale_threshold",
    "max_over_trajectory",
    "ville_threshold",
    "wilson_interval",
]

DEFAULT_ALPHAS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
METHODS = ("conformal", "martingale")
_EPS = 1e-12  # risks are clipped to [eps, 1 - eps] before taking odds (as the reference)

ArrayLike = Tensor | np.ndarray | Sequence[float]


def _scores(values: ArrayLike, name: str, unit_interval: bool = True) -> np.ndarray:
    """1-D float64 copy of `values`, checked finite (and in [0, 1] when `unit_interval`)."""
    if isinstance(values, Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D (one score per example), got shape {arr.shape}; "
            "reduce trajectories with max_over_trajectory first."
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf; drop or fix those examples before calibrating.")
    if unit_interval and arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"{name} must be risks in [0, 1], got values in [{arr.min()}, {arr.max()}].")
    return arr


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), e.g. 0.05, got {alpha!r}.")
    return alpha


def conformal_rank(n: int, alpha: float) -> int:
    """k = ⌈(n+1)(1-α)⌉, the order statistic split conformal takes; may exceed n.

    A relative 1e-12 guard keeps float noise from bumping exact integers up ((9+1)·(1-0.7) is
    3.0000000000000004 in floats; k is 3), so decimal α such as 0.7 give the textbook rank.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    alpha = _check_alpha(alpha)
    return max(1, math.ceil((n + 1) * (1.0 - alpha) * (1.0 - 1e-12)))


def _conformal_quantile(scores: np.ndarray, alpha: float, never: float) -> float:
    n = scores.size
    if n == 0:
        raise ValueError("no safe calibration examples; pass the max risks of held-out safe generations.")
    k = conformal_rank(n, alpha)
    if k > n:  # the quantile is +inf: too few examples for this α
        return never
    return float(np.sort(scores)[k - 1])


def conformal_threshold(safe_max_risks: ArrayLike, alpha: float) -> float:
    """Split-conformal (+1) threshold on max-over-trajectory risk: the k-th smallest of the n scores.

    With k = ⌈(n+1)(1-α)⌉ (`conformal_rank`); if k > n (n < 1/α - 1) the threshold is 1.0, which a
    risk in [0, 1] never exceeds: never intervene.

    Guarantee. Let S_1..S_n be the max risks of safe calibration generations and S_{n+1} that of a
    new safe generation, exchangeable with them (same prompt source, decoding, head and scored
    tokens). Then P(S_{n+1} > threshold) <= α, jointly over calibration set and new example, ties
    included, because S_{n+1} <= S_(k) with probability >= k/(n+1) >= 1-α. So the rule "intervene
    iff risk > threshold at some token" intervenes on a safe generation with probability <= α; as
    monitored decoding matches the unmonitored one until its first intervention, this is also the
    chance that steering touches a generation that would have been safe. If the S_i are a.s.
    distinct and k <= n, the rate is exactly (n+1-k)/(n+1) >= α - 1/(n+1): the bound is tight.
    The rule "intervene iff risk >= threshold" adds P(S_{n+1} = threshold): zero for continuous
    risks, not for risks saturated at exactly 1.0 in float32 — a 1.0 threshold then fires on them.
    The bound is marginal: for one fixed calibration set the rate is Beta(n+1-k, k)-distributed.
    """
    return _conformal_quantile(_scores(safe_max_risks, "safe_max_risks"), alpha, never=1.0)


def martingale_scores(max_risks: ArrayLike, priors: ArrayLike | float, eps: float = _EPS) -> np.ndarray:
    """max_t M_t = odds(max_t p_t) / odds(p_0) per example, (N,) float64.

    p_0 is the prior risk P(undesirable | prompt) — the head's risk at the last prompt token is
    the natural choice; one float applies to every example. Risks are clipped to [eps, 1-eps] and
    the ratio is formed in log space. odds is increasing, so the max of M_t is M at the max risk.
    """
    risks = _scores(max_risks, "max_risks")
    if isinstance(priors, (int, float)):
        p0 = np.full_like(risks, float(priors))
    else:
        p0 = _scores(priors, "priors")
        if p0.shape != risks.shape:
            raise ValueError(f"priors has {p0.size} entries for {risks.size} examples; pass one per example.")
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps!r}.")
    p = np.clip(risks, eps, 1.0 - eps)
    p0 = np.clip(p0, eps, 1.0 - eps)
    log_m = (np.log(p) - np.log1p(-p)) - (np.log(p0) - np.log1p(-p0))
    return np.exp(log_m)


def martingale_threshold(
    safe_max_risks: ArrayLike, priors: ArrayLike | float, alpha: float, eps: float = _EPS
) -> float:
    """Conformal (+1) threshold on the posterior-odds ratio max_t M_t of safe examples (M scale).

    M_t = odds(p_t)/odds(p_0) (`martingale_scores`); the rule is "intervene iff M_t > threshold",
    i.e. iff risk p_t > `martingale_risk_threshold(threshold, p_0)`, a per-prompt risk threshold.
    Same distribution-free guarantee as `conformal_threshold`: P(max_t M_t > threshold | safe) <= α
    for a new exchangeable safe example. k > n gives +inf (never intervene).
    With one prior for every example the decisions are exactly those of `conformal_threshold`
    (M is then an increasing function of the risk); per-prompt priors make the rule react to the
    rise in risk since the prompt rather than to its level.
    When p_t is the head's exact posterior P(undesirable | prompt, tokens so far), M_t is the
    likelihood ratio of the two hypotheses, a nonnegative martingale with M_0 = 1 under "safe", so
    Ville's inequality already bounds the rate by α at threshold 1/α (`ville_threshold`); the
    calibrated threshold then sits at or below 1/α (Ville is the more conservative of the two).
    """
    scores = martingale_scores(safe_max_risks, priors, eps=eps)
    return _conformal_quantile(scores, alpha, never=math.inf)


def ville_threshold(alpha: float) -> float:
    """1/α on the M scale: anytime-valid without calibration data, if the head is a true posterior.

    Guarantee: if p_t = P(undesirable | prompt, y_1..y_t) exactly and p_0 = P(undesirable | prompt),
    then under the safe hypothesis M_t = odds(p_t)/odds(p_0) is a nonnegative martingale with
    M_0 = 1, and Ville's inequality gives P(there is a t with M_t >= 1/α | prompt, safe) <= α, for
    every prompt, at any stopping time and any generation length. It is only as valid as the
    head's calibration as a posterior; `martingale_threshold` needs data but no such assumption.
    """
    return 1.0 / _check_alpha(alpha)


def martingale_risk_threshold(threshold: float, priors: Tensor | ArrayLike | float) -> Tensor:
    """Per-prompt risk thresholds equivalent to an M-scale threshold: M_t > m iff p_t > p*(p_0).

    p* = sigmoid(log m + logit(p_0)) (up to rounding and the eps clip of `martingale_scores`);
    m = +inf gives 1.0 (never intervene). Returns float64 with the shape of `priors`, on its device,
    ready for a per-row `threshold`.
    """
    if not threshold >= 0.0:
        raise ValueError(f"threshold must be >= 0 on the M scale, got {threshold!r}.")
    p0 = torch.as_tensor(priors, dtype=torch.float64)
    if bool(((p0 < 0) | (p0 > 1) | p0.isnan()).any()):
        raise ValueError("priors must be risks in [0, 1].")
    if math.isinf(threshold):
        return torch.ones_like(p0)
    if threshold == 0.0:
        return torch.zeros_like(p0)
    p0 = p0.clamp(_EPS, 1.0 - _EPS)
    return torch.sigmoid(math.log(threshold) + torch.logit(p0))


def conformal_curve(
    safe_max_risks: ArrayLike,
    alphas: Iterable[float] = DEFAULT_ALPHAS,
    method: str = "conformal",
    priors: ArrayLike | float | None = None,
) -> dict[float, float]:
    """Threshold per α, {α: ĉ(α)}; non-increasing in α (k is non-increasing in α).

    `conformal`: risk scale, in [0, 1]. `martingale`: M scale (`martingale_threshold`), needs
    `priors`; convert with `martingale_risk_threshold` per prompt.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}.")
    if method == "martingale":
        if priors is None:
            raise ValueError("method='martingale' needs priors= (each example's prompt-end risk p_0).")
        scores = martingale_scores(safe_max_risks, priors)
        return {float(a): _conformal_quantile(scores, a, never=math.inf) for a in alphas}
    risks = _scores(safe_max_risks, "safe_max_risks")
    return {float(a): _conformal_quantile(risks, a, never=1.0) for a in alphas}


def false_intervention_rate(safe_max_risks: ArrayLike, threshold: float) -> float:
    """Fraction of safe examples whose score is strictly above `threshold` (the intervention rule)."""
    scores = _scores(safe_max_risks, "safe_max_risks", unit_interval=False)
    if scores.size == 0:
        raise ValueError("no safe examples to measure the false-intervention rate on.")
    return float(np.mean(scores > threshold))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% for z = 1.96)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got successes={successes}, n={n}.")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def calibration_report(
    calib_max_risks: ArrayLike,
    heldout_max_risks: ArrayLike,
    alphas: Iterable[float] = DEFAULT_ALPHAS,
    method: str = "conformal",
    calib_priors: ArrayLike | float | None = None,
    heldout_priors: ArrayLike | float | None = None,
) -> list[dict]:
    """Calibrate on safe `calib_*`, measure on safe `heldout_*`, one dict per α.

    Keys: alpha, method, threshold, n_calib, n_heldout, false_interventions,
    false_intervention_rate, stderr (binomial, sqrt(r(1-r)/n)), wilson_low / wilson_high (95%),
    expected_rate ((n+1-k)/(n+1): the exact mean rate for tie-free scores, <= α).
    For `martingale` both priors are needed and thresholds are on the M scale.
    """
    alphas = [float(a) for a in alphas]
    curve = conformal_curve(calib_max_risks, alphas, method=method, priors=calib_priors)
    if method == "martingale":
        if heldout_priors is None:
            raise ValueError("method='martingale' needs heldout_priors= as well as calib_priors=.")
        heldout = martingale_scores(heldout_max_risks, heldout_priors)
    else:
        heldout = _scores(heldout_max_risks, "heldout_max_risks")
    n_calib, n_held = len(_scores(calib_max_risks, "calib_max_risks")), heldout.size
    if n_held == 0:
        raise ValueError("no held-out safe examples to measure on.")
    rows = []
    for alpha in alphas:
        threshold = curve[alpha]
        hits = int(np.sum(heldout > threshold))
        rate = hits / n_held
        low, high = wilson_interval(hits, n_held)
        k = conformal_rank(n_calib, alpha)
        rows.append(
            {
                "alpha": alpha,
                "method": method,
                "threshold": threshold,
                "n_calib": n_calib,
                "n_heldout": n_held,
                "false_interventions": hits,
                "false_intervention_rate": rate,
                "stderr": math.sqrt(rate * (1 - rate) / n_held),
                "wilson_low": low,
                "wilson_high": high,
                "expected_rate": (n_calib + 1 - k) / (n_calib + 1) if k <= n_calib else 0.0,
            }
        )
    return rows


def max_over_trajectory(risks: Tensor, mask: Tensor | None = None, empty: float = 0.0) -> Tensor:
    """Max risk over each row's valid tokens, (B, T) -> (B,); `empty` for rows with none.

    The mask must select the tokens the decoder will monitor (normally the response tokens).
    An empty response never crosses a threshold, hence the default 0.0 (as the reference).
    """
    if risks.dim() != 2:
        raise ValueError(f"risks must be (batch, tokens), got shape {tuple(risks.shape)}.")
    if mask is None:
        if risks.shape[1] == 0:
            return risks.new_full((risks.shape[0],), empty)
        return risks.amax(dim=1)
    if mask.shape != risks.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal risks shape {tuple(risks.shape)}.")
    valid = mask != 0  # (B, T)
    filled = risks.masked_fill(~valid, -math.inf)  # (B, T)
    out = filled.amax(dim=1) if risks.shape[1] else risks.new_full((risks.shape[0],), -math.inf)
    return torch.where(valid.any(dim=1), out, torch.full_like(out, empty))  # (B,)
