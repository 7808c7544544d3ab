"""Fluency as perplexity: of generated continuations under a (base) model, and of reference text.

Continuations are scored token by token given their own prompt, so steering that picks unlikely
tokens shows up as higher perplexity under the unsteered model. Reference-text perplexity uses
non-overlapping windows; both report total NLL and token counts so callers can pool or bootstrap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def continuation_nll(
    model: Any,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    batch_size: int = 16,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """Per pair, (summed negative log-likelihood of the continuation given the prompt, token count)."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations.")
    device = next(model.parameters()).device
    results: list[tuple[float, int]] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="perplexity", disable=not progress):
        pairs = list(zip(prompts[start : start + batch_size], continuations[start : start + batch_size], strict=True))
        length = max(len(p) + len(c) for p, c in pairs)
        ids = torch.zeros(len(pairs), length, dtype=torch.long)
        mask = torch.zeros(len(pairs), length, dtype=torch.long)
        labels = torch.full((len(pairs), length), -100, dtype=torch.long)
        for row, (p, c) in enumerate(pairs):
            seq = list(p) + list(c)
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            labels[row, len(p) : len(seq)] = torch.tensor(list(c), dtype=torch.long)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, L-1, V) predicts tokens 1..L-1
        target = labels[:, 1:].to(device)
        valid = target != -100
        picked = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)  # (B, L-1)
        nll = -(picked * valid).sum(-1)
        for row in range(len(pairs)):
            results.append((float(nll[row]), int(valid[row].sum())))
    return results


def pooled_perplexity(nll_counts: Sequence[tuple[float, int]]) -> float:
    """exp(total NLL / total tokens); NaN when there are no tokens."""
    total = sum(n for n, _ in nll_counts)
    count = sum(c for _, c in nll_counts)
    return float(torch.tensor(total / count).exp()) if count else float("nan")


@torch.no_grad()
def text_perplexity(model: Any, token_ids: Sequence[int], window: int = 512, max_windows: int | None = None) -> float:
    """Perplexity of a long reference text in non-overlapping windows (each window's first token unscored)."""
    device = next(model.parameters()).device
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    chunks = [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]
    if max_windows is not None:
        chunks = chunks[:max_windows]
    if not chunks:
        raise ValueError("the reference text is shorter than two tokens.")
    pairs = [(float(_window_nll(model, c.to(device))), len(c) - 1) for c in chunks]
    return pooled_perplexity(pairs)


def _window_nll(model: Any, chunk: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=chunk[None]).logits.float()[0, :-1]
    return torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum")
