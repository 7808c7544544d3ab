"""Value-head objective: per-token binary focal loss plus a TD-coherence penalty.

Every token's value logit is trained against its sequence's label (0 = safe, 1 = undesirable), so the
head learns P(undesirable | prefix); the coherence term keeps the per-token value trajectory smooth.
Pure torch. Defaults follow the reference recipe (HenDav/value-steering, `value_steer/train_probe.py`):
alpha_pos=0.7, gamma=1.0, coh_weight=0.1, per-sequence mean over valid tokens, then mean over the batch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["REDUCTIONS", "focal_loss", "td_coherence", "value_head_loss"]

REDUCTIONS = ("sequence", "token")


def _valid_mask(logits: Tensor, mask: Tensor | None) -> Tensor:
    """The mask as `logits.dtype` 0/1 weights, (B, T); all ones when `mask` is None."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, tokens), got shape {tuple(logits.shape)}.")
    if mask is None:
        return torch.ones_like(logits)
    if mask.shape != logits.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal logits shape {tuple(logits.shape)}; "
            "pass the attention mask of the scored tokens."
        )
    return (mask != 0).to(logits.dtype)


def _token_targets(logits: Tensor, labels: Tensor) -> Tensor:
    """Labels as per-token float targets (B, T): a (B,) sequence label is broadcast to every token."""
    labels = labels.to(device=logits.device, dtype=logits.dtype)
    if labels.dim() == 1 and labels.shape[0] == logits.shape[0]:
        return labels.unsqueeze(1).expand_as(logits)  # (B, T)
    if labels.shape == logits.shape:
        return labels
    raise ValueError(f"labels must be (batch,) or (batch, tokens) = {tuple(logits.shape)}, got {tuple(labels.shape)}.")


def focal_loss(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    alpha_pos: float = 0.7,
    gamma: float = 1.0,
    reduction: Literal["sequence", "token"] = "sequence",
) -> Tensor:
    """Binary focal loss (Lin et al. 2017) on value logits, averaged over valid tokens.

    Per token, with p = sigmoid(logit) and target y: p_t = y·p + (1-y)·(1-p),
    α_t = y·alpha_pos + (1-y)·(1-alpha_pos), loss = -α_t · (1-p_t)^γ · log p_t, where for soft
    targets -log p_t is the binary cross-entropy -(y·log p + (1-y)·log(1-p)).
    Everything is computed from `logsigmoid`, and (1-p_t)^γ as exp(γ·log(1-p_t)), so losses and
    gradients stay finite for any finite logit and any γ >= 0; γ = 0 is α-weighted BCE.

    logits: (B, T) value logits. labels: (B,) sequence labels broadcast to every token, or (B, T)
    per-token labels, in [0, 1]. mask: (B, T), nonzero = valid token; None = all valid.
    reduction: `sequence` (default, as the reference) = mean over each row's valid tokens, then mean
    over rows that have one; `token` = mean over all valid tokens of the batch.
    Returns a scalar; 0 (still attached to the graph) when no token is valid.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; allowed: {', '.join(REDUCTIONS)}.")
    if not 0.0 <= alpha_pos <= 1.0:
        raise ValueError(f"alpha_pos must be in [0, 1], got {alpha_pos!r}.")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}.")
    valid = _valid_mask(logits, mask)  # (B, T)
    y = _token_targets(logits, labels)  # (B, T)
    if bool(((y < 0) | (y > 1) | y.isnan()).any()):
        raise ValueError("labels must lie in [0, 1] (0 = safe, 1 = undesirable); got values outside it.")
    z = logits.masked_fill(valid == 0, 0.0)  # padding never reaches the math, not even as NaN
    log_p = F.logsigmoid(z)  # log p
    log_q = F.logsigmoid(-z)  # log (1 - p)
    bce = -(y * log_p + (1 - y) * log_q)  # (B, T), = -log p_t for hard labels
    # log(1 - p_t) = log(y·(1-p) + (1-y)·p); xlogy-style terms vanish where a weight is 0.
    log_one_minus_pt = torch.logaddexp(torch.log(y) + log_q, torch.log1p(-y) + log_p)  # (B, T)
    modulator = torch.exp(gamma * log_one_minus_pt) if gamma != 0 else torch.ones_like(bce)
    alpha_t = y * alpha_pos + (1 - y) * (1 - alpha_pos)
    per_token = torch.where(valid > 0, alpha_t * modulator * bce, torch.zeros_like(bce))  # (B, T)
    if reduction == "token":
        return per_token.sum() / valid.sum().clamp_min(1.0)
    counts = valid.sum(dim=1)  # (B,)
    per_row = per_token.sum(dim=1) / counts.clamp_min(1.0)  # (B,)
    rows = (counts > 0).to(per_row.dtype)
    return (per_row * rows).sum() / rows.sum().clamp_min(1.0)


def td_coherence(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of (z[t+1] - z[t])^2 over transitions t -> t+1 where both tokens are valid.

    The mean is over all such transitions in the batch (as the reference). A contiguous mask (left
    or right padding) gives exactly the adjacent valid pairs; a hole in the mask breaks the chain
    there rather than bridging it. Returns 0 (attached to the graph) when there is no transition.
    """
    valid = _valid_mask(logits, mask)  # (B, T)
    pair = valid[:, :-1] * valid[:, 1:]  # (B, T-1)
    z = logits.masked_fill(valid == 0, 0.0)
    diff = z[:, 1:] - z[:, :-1]  # (B, T-1)
    sq = torch.where(pair > 0, diff.square(), torch.zeros_like(diff))
    return sq.sum() / pair.sum().clamp_min(1.0)


def value_head_loss(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor | None,
    alpha_pos: float = 0.7,
    gamma: float = 1.0,
    coh_weight: float = 0.1,
    reduction: Literal["sequence", "token"] = "sequence",
) -> Tensor:
    """The training objective: `focal_loss(...) + coh_weight * td_coherence(...)`, a scalar."""
    loss = focal_loss(logits, labels, mask, alpha_pos=alpha_pos, gamma=gamma, reduction=reduction)
    if coh_weight == 0:
        return loss
    return loss + coh_weight * td_coherence(logits, mask)
