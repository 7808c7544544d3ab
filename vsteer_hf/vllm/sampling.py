"""A request's sampling distribution as vLLM's sampler shapes it (temperature, top-k, top-p). No vLLM import."""

from __future__ import annotations

import torch

GREEDY_EPS = 1e-5  # vLLM treats temperatures below this as greedy


def warped_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Sampling distribution (n, V) after temperature, top-k and top-p, as vLLM's sampler applies them."""
    scores = logits.float() / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]  # (n, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_scores.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # back to vocab order
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(dim=-1)
