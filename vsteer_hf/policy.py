"""Pure tensor decisions for value-filtered decoding: draw candidates, pick a winner, force EOS.

Only torch and the standard library: the transformers decode loop and the vLLM adapter share it.
The hot functions stay on the input device and never synchronise with the host.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "DIRECTIONS",
    "RULES",
    "candidate_probs",
    "crossed",
    "force_eos",
    "gather_selected",
    "intervened",
    "is_safe",
    "refuse_non_finite",
    "resolve_thresholds",
    "sample_candidates",
    "select_candidates",
    "top_candidates",
]

RULES = ("first_safe", "args")
DIRECTIONS = ("above", "below")


def _check_num_candidates(num_candidates: int) -> None:
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
        raise ValueError(f"num_candidates must be a positive int, got {num_candidates!r}; pass e.g. 4.")


def _check_2d(name: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, vocab), got shape {tuple(x.shape)}.")


def _ranked(keys: Tensor, num_candidates: int) -> Tensor:
    """Top-K indices of `keys` (B, V) with column 0 forced to `argmax`.

    `topk` and `argmax` break ties differently; `generate` uses argmax (greedy, and inside
    `torch.multinomial`), so column 0 is taken from argmax and the topk column holding that token,
    if any, gets topk's own first choice instead. Columns past V are padded by the caller.
    """
    k = min(num_candidates, keys.shape[-1])
    top = keys.topk(k, dim=-1).indices  # (B, k)
    first = keys.argmax(dim=-1, keepdim=True)  # (B, 1)
    match = top == first  # (B, k)
    pos = torch.where(match.any(-1, keepdim=True), match.int().argmax(-1, keepdim=True), 0)  # (B, 1)
    top = top.scatter(1, pos, top[:, :1])  # move topk's first choice to where argmax's token was
    top[:, :1] = first
    return top


def _fill_invalid(candidates: Tensor, invalid: Tensor, num_candidates: int) -> Tensor:
    """Replace `invalid` columns by column 0 and pad to K columns with column 0."""
    candidates = torch.where(invalid, candidates[:, :1], candidates)  # (B, k)
    missing = num_candidates - candidates.shape[1]
    if missing > 0:
        candidates = torch.cat([candidates, candidates[:, :1].expand(-1, missing)], dim=1)
    return candidates  # (B, K)


def sample_candidates(probs: Tensor, num_candidates: int, generator: torch.Generator | None = None) -> torch.LongTensor:
    """K distinct tokens per row drawn without replacement by an exponential race.

    This is the algorithm `torch.multinomial(probs, 1)` runs, consuming the RNG identically, so
    candidate 0 is the token plain sampling would emit: a VFD that never intervenes reproduces
    `generate` token for token. Where fewer than K tokens have non-zero probability (after
    top-k/top-p), the extra columns repeat candidate 0. `probs` (B, V) must be valid (finite,
    non-negative); unlike `multinomial` this is not checked, to avoid a host sync.
    """
    _check_2d("probs", probs)
    _check_num_candidates(num_candidates)
    q = torch.empty_like(probs).exponential_(1, generator=generator)  # (B, V)
    race = probs / q  # (B, V)
    candidates = _ranked(race, num_candidates)  # (B, k)
    invalid = probs.gather(1, candidates) <= 0  # (B, k)
    return _fill_invalid(candidates, invalid, num_candidates)


def top_candidates(scores: Tensor, num_candidates: int) -> torch.LongTensor:
    """The K highest-scoring tokens, best first (column 0 == argmax, as greedy `generate` picks).

    Tokens masked to -inf by warpers are replaced by column 0, so they can never be committed.
    """
    _check_2d("scores", scores)
    _check_num_candidates(num_candidates)
    candidates = _ranked(scores, num_candidates)  # (B, k)
    invalid = scores.gather(1, candidates) == float("-inf")  # (B, k)
    return _fill_invalid(candidates, invalid, num_candidates)


def candidate_probs(probs: Tensor, candidates: torch.LongTensor) -> Tensor:
    """Probability of each candidate under the (warped) sampling distribution, (B, K)."""
    return probs.gather(1, candidates)


def resolve_thresholds(
    threshold: float | Sequence[float] | Tensor, batch_size: int, device: torch.device | str | None
) -> Tensor:
    """One risk threshold per row as float32 (B,) on `device`; one float applies to every row.

    Validated here, once per call to generate, so the decode loop can trust the values.
    """
    if isinstance(threshold, Tensor):
        values = threshold.detach().to("cpu", torch.float64)
        if values.dim() == 0:
            values = values.expand(batch_size)
        elif values.dim() != 1:
            raise ValueError(
                f"threshold tensor must be 0-D or 1-D (batch,), got shape {tuple(threshold.shape)}; "
                "pass one value per prompt row."
            )
        values = values.tolist()
    elif isinstance(threshold, numbers.Real) and not isinstance(threshold, bool):
        values = [float(threshold)] * batch_size
    elif isinstance(threshold, Sequence) and not isinstance(threshold, (str, bytes)):
        values = list(threshold)
    else:
        raise ValueError(
            f"threshold must be a float, a sequence of floats or a tensor, got {type(threshold).__name__}."
        )
    if len(values) != batch_size:
        raise ValueError(
            f"got {len(values)} thresholds for a batch of {batch_size} rows; pass one float for every "
            f"row or a sequence of exactly {batch_size} floats."
        )
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"threshold[{i}] must be a float in [0, 1], got {v!r}.")
        v = float(v)
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(
                f"threshold[{i}] = {v!r} is not a finite value in [0, 1]; thresholds are risk probabilities, e.g. 0.5."
            )
    return torch.tensor(values, dtype=torch.float32, device=device)  # (B,)


def select_candidates(
    risks: Tensor,
    thresholds: Tensor,
    rule: str = "first_safe",
    probs: Tensor | None = None,
    args_weight: float = 1.0,
) -> torch.LongTensor:
    """Column index of the winning candidate per row, (B,).

    `first_safe` keeps the model's own preference order: the first candidate whose risk is below
    the row's threshold, else the least risky one (ties -> lowest index). `args` trades risk
    against likelihood: argmin(risk - args_weight * prob); it ignores `thresholds`.
    A NaN risk counts as +inf, so it never beats a finite risk.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; allowed rules: {', '.join(RULES)}.")
    risks = torch.where(risks.isnan(), float("inf"), risks)  # (B, K)
    if rule == "args":
        if probs is None:
            raise ValueError("rule='args' needs the candidates' probabilities: pass probs=(B, K) tensor.")
        return (risks - args_weight * probs).argmin(dim=-1)  # (B,)
    safe = is_safe(risks, thresholds.unsqueeze(-1))  # (B, K)
    first_safe = safe.int().argmax(dim=-1)  # (B,) first True (argmax returns the first maximum)
    least_risky = risks.argmin(dim=-1)  # (B,) first minimum
    return torch.where(safe.any(dim=-1), first_safe, least_risky)


def is_safe(risks: Tensor, thresholds: Tensor) -> torch.BoolTensor:
    """Whether a risk is under its row's threshold: the test `first_safe` applies to each candidate.

    Under `first_safe` candidate 0 wins exactly when it is safe, which lets the lazy candidate path
    forward the other candidates only for the rows where it is not. NaN is never safe; type promotion
    compares at the wider dtype.
    """
    return risks < thresholds


def gather_selected(values: Tensor, index: torch.LongTensor) -> Tensor:
    """Pick column `index[b]` of row b: (B, K, ...) -> (B, ...)."""
    idx = index.view(-1, 1, *([1] * (values.dim() - 2))).expand(-1, 1, *values.shape[2:])  # (B, 1, ...)
    return values.gather(1, idx).squeeze(1)


def intervened(candidates: torch.LongTensor, winner_tokens: torch.LongTensor) -> torch.BoolTensor:
    """True where the committed token differs from candidate 0, the natural sample, (B,)."""
    return winner_tokens != candidates[:, 0]


def crossed(risk: Tensor, thresholds: Tensor, direction: str = "above") -> torch.BoolTensor:
    """Whether each row's risk crossed its threshold, for abstention, (B,).

    `above`: risk >= threshold, the complement of VFD's "safe iff risk < threshold" (heads scoring
    P(undesirable)); `below`: risk < threshold (heads scoring a value, quit when it is low), as the
    vLLM plugin's runners do. A NaN risk gives False: call `refuse_non_finite` first.
    """
    if direction == "above":
        return risk >= thresholds
    if direction == "below":
        return risk < thresholds
    raise ValueError(f"unknown direction {direction!r}; allowed directions: {', '.join(DIRECTIONS)}.")


def refuse_non_finite(risk: Tensor, where: str) -> None:
    """Raise where any risk is NaN or infinite: NaN compares False with every threshold, so a decision
    taken on it would pass silently. `where` names the step in the message. Synchronises with the host."""
    if not bool(torch.isfinite(risk).all()):
        raise FloatingPointError(
            f"the value head returned a NaN or infinite risk at {where}; refusing to commit a token. Check the "
            "head's weights and the backbone's hidden states (an fp16 overflow? try bfloat16 or float32)."
        )


def force_eos(scores: Tensor, rows: torch.BoolTensor, eos_token_id: int) -> Tensor:
    """New scores (B, V) in which the selected rows can only emit EOS; other rows unchanged."""
    _check_2d("scores", scores)
    vocab = scores.shape[-1]
    if not 0 <= eos_token_id < vocab:
        raise ValueError(f"eos_token_id {eos_token_id} is outside the vocabulary [0, {vocab}).")
    rows = rows.view(-1, 1)  # (B, 1)
    eos_only = torch.full_like(scores[:1], float("-inf"))  # (1, V)
    eos_only[:, eos_token_id] = 0.0
    return torch.where(rows, eos_only, scores)  # (B, V)
