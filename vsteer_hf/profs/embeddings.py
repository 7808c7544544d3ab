"""Per-layer sentence embeddings of texts, the input of ProFS's preference matrix.

Two poolings. ``"reference"`` is what the authors' code (Uppaal/detox-edit, ``detox.py``) does: all
texts of one side are tokenized together, truncated to 128 tokens and padded to the longest of them
on the tokenizer's own padding side (pad = EOS when it has no pad token), and each text's embedding
is the mean over EVERY position of that padded matrix, padding included. ``"masked"`` averages the
real tokens only. The difference matters for models with a massive first-token activation
(SmolLM2: a few dimensions of norm ~100x the median at position 0): the masked mean weights that
token by 1/length, so it enters every pair's difference as a length artefact and dominates the
"toxic" subspace, while the padded mean gives it the same weight in every text of a side.
``drop_first`` leaves each text's first real token out of either mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from vsteer_hf.profs.modules import _check_layer_ids, decoder_layers

Pooling = Literal["reference", "masked"]
POOLINGS = ("reference", "masked")


def authors_padding_side(tokenizer: Any) -> str:
    """The padding side the tokenizer has as published (its config, else its class default), not a
    side set later on this instance (`load_backbone` sets "left" for batched generation)."""
    side = (getattr(tokenizer, "init_kwargs", None) or {}).get("padding_side")
    return str(side or getattr(type(tokenizer), "padding_side", "right"))


def _pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (the authors set pad = EOS), else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id[0] if isinstance(token_id, (list, tuple)) else token_id)
    return 0


def _padded(encoded: list[list[int]], width: int, side: str, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (N, width), with each row padded on `side`."""
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # (N, T)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)  # (N, T)
    for row, ids in enumerate(encoded):
        cols = slice(width - len(ids), width) if side == "left" else slice(0, len(ids))
        input_ids[row, cols] = torch.as_tensor(ids)
        mask[row, cols] = 1
    return input_ids, mask


def _pooling_weights(mask: torch.Tensor, pooling: str, drop_first: bool) -> torch.Tensor:
    """(N, T) float weights summing to 1 per row: over all positions ("reference") or real tokens."""
    weights = torch.ones_like(mask, dtype=torch.float32) if pooling == "reference" else mask.float()
    if drop_first:
        first = mask.float().cumsum(1).eq(1) & mask.bool()  # each row's first real token
        weights = weights.masked_fill(first, 0.0)
    return weights / weights.sum(1, keepdim=True)


@torch.inference_mode()
def layer_sentence_embeddings(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 8,
    layers: Sequence[int] | None = None,
    show_progress: bool = True,
    max_length: int | None = None,
    pooling: Pooling = "masked",
    drop_first: bool = False,
) -> torch.Tensor:
    """Each decoder layer's output pooled per text (see the module docstring), float32 (layers, N, H) on CPU.

    Outputs are read with forward hooks on the blocks: they equal `hidden_states[1:]` of
    `output_hidden_states=True`, except the last, which HF returns after the final norm (the ProFS
    reference recomputes that layer to get it pre-norm too). Texts are tokenized unpadded and padded
    here, so the tokenizer needs no pad token and is never modified. ``"masked"`` pads each batch on
    the right (each text keeps the positions it would have alone); ``"reference"`` pads all texts to
    the longest one on `authors_padding_side(tokenizer)`. Rows are independent, so `batch_size`
    changes speed only.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is invalid: use one of {POOLINGS}.")
    texts = list(texts)
    blocks = decoder_layers(model)
    layer_ids = list(range(len(blocks))) if layers is None else _check_layer_ids(layers, len(blocks))
    encoded = tokenizer(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]
    too_short = [i for i, ids in enumerate(encoded) if len(ids) < 1 + int(drop_first)]
    if too_short:
        what = "fewer than 2 tokens (drop_first leaves none)" if drop_first else "no tokens"
        raise ValueError(f"Texts at positions {too_short[:5]} tokenize to {what}; drop or fill them.")
    pad_id = _pad_id(tokenizer)
    device = model.get_input_embeddings().weight.device
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if pooling == "reference":
        side, longest = authors_padding_side(tokenizer), max(len(ids) for ids in encoded)
    else:
        side, longest = "right", 0

    pooled: dict[int, list[torch.Tensor]] = {i: [] for i in layer_ids}
    state: dict[str, torch.Tensor] = {}

    def make_hook(idx: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            hs = output[0] if isinstance(output, (tuple, list)) else output  # (B, T, H)
            weights = state["weights"].to(hs.device).unsqueeze(-1)  # (B, T, 1)
            pooled[idx].append((hs.float() * weights).sum(1).cpu())  # (B, H)

        return hook

    handles = [blocks[i].register_forward_hook(make_hook(i)) for i in layer_ids]
    was_training = model.training
    model.eval()  # dropout would make the embeddings random
    try:
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="ProFS embeddings", disable=not show_progress):
            batch = encoded[start : start + batch_size]
            input_ids, mask = _padded(batch, longest or max(len(ids) for ids in batch), side, pad_id)
            state["weights"] = _pooling_weights(mask, pooling, drop_first)
            decoder(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    out = torch.stack([torch.cat(pooled[i]) for i in layer_ids])  # (num_layers, N, H)
    if not torch.isfinite(out).all():
        raise ValueError(
            f"Non-finite sentence embeddings with pooling={pooling!r} (padding side {side!r}): the model gives "
            "NaN/inf at fully padded positions; use pooling='masked'."
        )
    return out
