"""Calibrate the risk threshold so that safe generations are rarely intervened on.

Split conformal over the max-over-trajectory risk of held-out *safe* generations gives a
finite-sample bound on the false-intervention rate, and the ĉ(α) curve a head card stores. The
"martingale" variant (as in HenDav/value-steering, `value_steer/calibration.py`) calibrates the
posterior-odds ratio M_t = odds(p_t)/odds(p_0) instead; `ville_threshold` is its data-free,
anytime-valid counterpart. Pure numpy/torch.

Convention used throughout, as at run time (VFD's "safe iff risk < threshold", abstention's
"risk >= threshold", and the vLLM plugin's runners): intervene iff the score is >= the threshold.
Thresholds are returned one grid step above the conformal order statistic S_(k) — the smallest
float32 above it for risks (run-time risks and thresholds are float32), the smallest float64 above it
for the float64 M scores — so that "score >= threshold" is exactly "score > S_(k)": the bounds hold
for that rule, ties included (see `conformal_threshold`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vsteer_hf.eval.stats import wilson

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
]

DEFAULT_ALPHAS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
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


def _conformal_quantile(scores: np.ndarray, alpha: float, never: float, grid: type = np.float32) -> float:
    """The smallest `grid` value strictly above S_(k), at most `never`; `never` when k > n."""
    n = scores.size
    if n == 0:
        raise ValueError("no safe calibration examples; pass the max risks of held-out safe generations.")
    k = conformal_rank(n, alpha)
    if k > n:  # the quantile is +inf: too few examples for this α
        return never
    return _just_above(float(np.sort(scores)[k - 1]), never, grid)


def _just_above(order_statistic: float, ceiling: float, grid: type = np.float32) -> float:
    """The smallest `grid` (float32 or float64) value strictly above the order statistic, at most `ceiling`.

    For scores on that grid, `score >= result` iff `score > order_statistic` (below the ceiling), so
    the ">=" run-time rule keeps the strict-inequality guarantee, ties included. For finer scores
    (float64 risks), `score >= result` still implies `score > order_statistic`: the bound holds.
    """
    if order_statistic >= ceiling:
        return ceiling
    up = grid(order_statistic)  # rounds to nearest: may land on either side
    if float(up) <= order_statistic:
        up = np.nextafter(up, grid(np.inf))
    return min(float(up), ceiling)


def conformal_threshold(safe_max_risks: ArrayLike, alpha: float) -> float:
    """Split-conformal (+1) threshold on max-over-trajectory risk: just above the k-th smallest score.

    With k = ⌈(n+1)(1-α)⌉ (`conformal_rank`) the threshold is the smallest float32 strictly above
    S_(k), so that for float32 risks (what the decoder compares, against a float32 threshold)
    "risk >= threshold" means "risk > S_(k)"; if k > n (n < 1/α - 1) the threshold is 1.0, which only
    a risk saturated at exactly 1.0 reaches: in effect, never intervene.

    Guarantee. Let S_1..S_n be the max risks of safe calibration generations and S_{n+1} that of a
    new safe generation, exchangeable with them (same prompt source, decoding, head and scored
    tokens). Then P(S_{n+1} >= threshold) <= α, jointly over calibration set and new example, ties
    included, because S_{n+1} <= S_(k) with probability >= k/(n+1) >= 1-α and "risk >= threshold"
    implies "risk > S_(k)". So the rule "intervene iff risk >= threshold at some token" intervenes on
    a safe generation with probability <= α; as monitored decoding matches the unmonitored one until
    its first intervention, this is also the chance that steering touches a generation that would
    have been safe. If the S_i are float32 and a.s. distinct and k <= n, the rate is exactly
    (n+1-k)/(n+1) >= α - 1/(n+1): the bound is tight (float64 risks between S_(k) and the threshold,
    less than one float32 step, do not fire, so their rate can only be lower).
    Exception: when S_(k) is already 1.0 (risks saturated in float32) there is no float32 risk above
    it; the threshold stays 1.0 and saturated risks fire.
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
    return _odds_ratio(risks, p0, eps)


def _odds_ratio(p: np.ndarray, p0: np.ndarray, eps: float) -> np.ndarray:
    """M = odds(p)/odds(p0) in float64, risks clipped to [eps, 1-eps], formed in log space.

    The one formula behind `martingale_scores` and `martingale_risk_threshold`, so that their
    comparisons agree bit for bit.
    """
    p = np.clip(p, eps, 1.0 - eps)
    p0 = np.clip(p0, eps, 1.0 - eps)
    log_m = (np.log(p) - np.log1p(-p)) - (np.log(p0) - np.log1p(-p0))
    return np.exp(log_m)


def martingale_threshold(
    safe_max_risks: ArrayLike, priors: ArrayLike | float, alpha: float, eps: float = _EPS
) -> float:
    """Conformal (+1) threshold on the posterior-odds ratio max_t M_t of safe examples (M scale).

    M_t = odds(p_t)/odds(p_0) (`martingale_scores`); the rule is "intervene iff M_t >= threshold",
    i.e. for float32 risks iff p_t >= `martingale_risk_threshold(threshold, p_0)`, a per-prompt risk
    threshold. The threshold is the smallest float64 strictly above the k-th smallest M score M_(k)
    (M scores are float64), so "M >= threshold" is exactly "M > M_(k)". Same distribution-free
    guarantee as `conformal_threshold`: P(max_t M_t >= threshold | safe) <= α for a new exchangeable
    safe example, ties included. k > n gives +inf (never intervene).
    With one prior for every example, float32 risks and S_(k) inside the eps clip, the decisions are
    exactly those of `conformal_threshold`: M is then strictly increasing in the risk, so the
    per-prompt risk threshold is the smallest float32 risk above S_(k), the conformal threshold
    itself. Per-prompt priors make the rule react to the rise in risk since the prompt rather than
    to its level.
    When p_t is the head's exact posterior P(undesirable | prompt, tokens so far), M_t is the
    likelihood ratio of the two hypotheses, a nonnegative martingale with M_0 = 1 under "safe", so
    Ville's inequality already bounds the rate by α at threshold 1/α (`ville_threshold`); the
    calibrated threshold then sits at or below 1/α (Ville is the more conservative of the two).
    """
    scores = martingale_scores(safe_max_risks, priors, eps=eps)
    return _conformal_quantile(scores, alpha, never=math.inf, grid=np.float64)


def ville_threshold(alpha: float) -> float:
    """1/α on the M scale: anytime-valid without calibration data, if the head is a true posterior.

    Guarantee: if p_t = P(undesirable | prompt, y_1..y_t) exactly and p_0 = P(undesirable | prompt),
    then under the safe hypothesis M_t = odds(p_t)/odds(p_0) is a nonnegative martingale with
    M_0 = 1, and Ville's inequality gives P(there is a t with M_t >= 1/α | prompt, safe) <= α, for
    every prompt, at any stopping time and any generation length. It is only as valid as the
    head's calibration as a posterior; `martingale_threshold` needs data but no such assumption.
    """
    return 1.0 / _check_alpha(alpha)


_ONE_BITS = int(np.float32(1.0).view(np.int32))


def _float32_from_bits(bits: np.ndarray) -> np.ndarray:
    """float64 copies of the float32 values with these (nonnegative) bit patterns."""
    return bits.astype(np.int32).view(np.float32).astype(np.float64)


def martingale_risk_threshold(threshold: float, priors: Tensor | ArrayLike | float, eps: float = _EPS) -> Tensor:
    """Per-prompt risk thresholds equivalent to an M-scale threshold: M_t >= m iff p_t >= p*(p_0).

    p* is the smallest float32 risk p in [0, 1] whose M = odds(p)/odds(p_0), computed exactly as
    `martingale_scores` does (eps clip included), is >= m: about sigmoid(log m + logit(p_0)), found
    by bisection on the float32 grid. So for float32 risks p_t (what the decoder compares, against
    float32 thresholds) "p_t >= p*" is exactly "M_t >= m", and p* survives the float32 cast of
    `resolve_thresholds` unchanged. Where no risk in [0, 1] reaches m (m = +inf, or m above the
    M of a saturated risk) p* is 1.0, the risk-scale "never" of `conformal_threshold`, which a risk
    saturated at exactly 1.0 still reaches. Returns float64 (float32-representable values) with the
    shape of `priors`, on its device, ready for a per-row `threshold`.
    """
    if not threshold >= 0.0:
        raise ValueError(f"threshold must be >= 0 on the M scale, got {threshold!r}.")
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps!r}.")
    p0 = torch.as_tensor(priors, dtype=torch.float64)
    if bool(((p0 < 0) | (p0 > 1) | p0.isnan()).any()):
        raise ValueError("priors must be risks in [0, 1].")
    if math.isinf(threshold):
        return torch.ones_like(p0)
    if threshold == 0.0:
        return torch.zeros_like(p0)
    prior = p0.detach().cpu().numpy().reshape(-1)  # (N,)
    # Nonnegative float32 values are ordered as their bit patterns: bisect on those, in [0.0, 1.0].
    lo = np.zeros(prior.shape, np.int64)  # (N,)
    hi = np.full(prior.shape, _ONE_BITS, np.int64)  # (N,) 1.0: the answer, or the ceiling
    while (active := lo < hi).any():
        mid = (lo + hi) // 2  # (N,)
        reaches = _odds_ratio(_float32_from_bits(mid), prior, eps) >= threshold  # (N,)
        hi = np.where(active & reaches, mid, hi)
        lo = np.where(active & ~reaches, mid + 1, lo)
    out = torch.from_numpy(_float32_from_bits(hi).reshape(p0.shape))
    return out.to(p0.device)


def conformal_curve(
    safe_max_risks: ArrayLike,
    alphas: Iterable[float] = DEFAULT_ALPHAS,
    method: str = "conformal",
    priors: ArrayLike | float | None = None,
) -> dict[float, float]:
    """Threshold per α, {α: ĉ(α)}; non-increasing in α (k is non-increasing in α).

    `conformal`: risk scale, in [0, 1] (`conformal_threshold`). `martingale`: M scale
    (`martingale_threshold`), needs `priors`; convert with `martingale_risk_threshold` per prompt.
    Either way the rule is "intervene iff score >= ĉ(α)".
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}.")
    if method == "martingale":
        if priors is None:
            raise ValueError("method='martingale' needs priors= (each example's prompt-end risk p_0).")
        scores = martingale_scores(safe_max_risks, priors)
        return {float(a): _conformal_quantile(scores, a, never=math.inf, grid=np.float64) for a in alphas}
    risks = _scores(safe_max_risks, "safe_max_risks")
    return {float(a): _conformal_quantile(risks, a, never=1.0) for a in alphas}


def false_intervention_rate(safe_max_risks: ArrayLike, threshold: float) -> float:
    """Fraction of safe examples whose score is >= `threshold` (the intervention rule)."""
    scores = _scores(safe_max_risks, "safe_max_risks", unit_interval=False)
    if scores.size == 0:
        raise ValueError("no safe examples to measure the false-intervention rate on.")
    return float(np.mean(scores >= threshold))


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
    expected_rate ((n+1-k)/(n+1), <= α: the exact mean rate for tie-free float32 risks or M scores;
    ties and finer-than-float32 risks can only lower it). A held-out example counts as a false
    intervention iff its score is >= the threshold. For `martingale` both priors are needed and
    thresholds are on the M scale.
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
        hits = int(np.sum(heldout >= threshold))
        rate = hits / n_held
        interval = wilson(hits, n_held)
        low, high = interval.low, interval.high
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
    An empty response should never intervene, hence the default 0.0 (as the reference): calibrated
    thresholds are > 0, so 0.0 never reaches one under "intervene iff risk >= threshold".
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


@torch.no_grad()
def sequence_max_risks(head: Any, cache: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence of `split`: (max over its tokens of the head's risk, binary label)."""
    scores, labels = [], []
    for i in cache.split(split):
        features, record = cache[i]
        scores.append(float(head.p(features).max()) if len(features) else 0.0)
        labels.append(float(record.get("label", float("nan"))))
    labels_arr = np.asarray(labels)
    if np.isnan(labels_arr).any():
        raise ValueError(f"split {split!r} has unlabelled generations; run the label stage first.")
    return np.asarray(scores), labels_arr


def calibrate_head(
    head: Any,
    cache: Any,
    alphas: Iterable[float] = DEFAULT_ALPHAS,
    folds: int = 0,
    fit: Callable[[Any], Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fit `head`'s ĉ(α) on the safe validation generations' max risks and, with `folds` >= 2, on the safe
    train generations' too, cross-fitted (`vsteer_hf.train.crossfit`: each fold scored by `fit(view)`, a head
    trained the same way without it); measure it on test's safe generations.

    Writes the curve, the calibration record and the test AUROC into `head.card` (the caller saves the head)
    and returns the calibrate stage's report. The one place the pipeline and any re-calibration run share.
    """
    from vsteer_hf.train.trainer import auroc

    alphas = list(alphas)
    max_risk = {split: sequence_max_risks(head, cache, split) for split in ("validation", "test")}
    validation_safe = max_risk["validation"][0][max_risk["validation"][1] == 0]
    heldout_safe = max_risk["test"][0][max_risk["test"][1] == 0]
    out_of_fold = np.zeros(0)
    if folds:
        from vsteer_hf.train.crossfit import out_of_fold_safe_risks

        if fit is None:
            raise ValueError("calibrate_head: folds > 0 needs fit(view), the trainer of the fold heads.")
        out_of_fold = out_of_fold_safe_risks(cache, folds, fit, progress=progress)
    calib_safe = np.concatenate([validation_safe, out_of_fold])
    curve = conformal_curve(calib_safe, alphas)
    table = calibration_report(calib_safe, heldout_safe, alphas)
    test_auroc = auroc(*max_risk["test"])
    head.card.curve = curve
    head.card.calibration = {
        "method": "conformal",
        "split": f"validation + train cross-fitted over {folds} folds" if folds else "validation",
        "n": int(max_risk["validation"][0].size),
        "n_safe": int(calib_safe.size),
        "n_safe_out_of_fold": int(out_of_fold.size),
        "score": "max over trajectory of p",
        "guarantee": "P(intervene | safe) <= alpha (intervene iff risk >= threshold)",
        "heldout": {
            "split": "test",
            "n_safe": int(heldout_safe.size),
            "false_intervention_rate": {str(r["alpha"]): r["false_intervention_rate"] for r in table},
        },
    }
    head.card.training["test_auroc_sequence"] = test_auroc
    return {
        "curve": {str(a): t for a, t in curve.items()},
        "table": table,
        "test_auroc_sequence": test_auroc,
        "n_calibration_safe": int(calib_safe.size),
        "n_calibration_safe_out_of_fold": int(out_of_fold.size),
        "n_heldout_safe": int(heldout_safe.size),
    }
