"""Per-layer sentence embeddings of texts, the input of ProFS's preference matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vsteer_hf.profs.modules import _check_layer_ids, decoder_layers


@torch.inference_mode()
def layer_sentence_embeddings(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 8,
    layers: Sequence[int] | None = None,
    show_progress: bool = True,
    max_length: int | None = None,
) -> torch.Tensor:
    """Mean over real tokens of each decoder layer's output, as float32 (num_layers, N, H) on CPU.

    Outputs are read with forward hooks on the blocks: they equal `hidden_states[1:]` of
    `output_hidden_states=True`, except the last, which HF returns after the final norm (the ProFS
    reference recomputes that layer to get it pre-norm too). Texts are tokenized unpadded and
    right-padded here, so the tokenizer needs no pad token and is never modified, and each text gets
    the positions it would have alone; the attention mask excludes the padding from the mean.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    texts = list(texts)
    blocks = decoder_layers(model)
    layer_ids = list(range(len(blocks))) if layers is None else _check_layer_ids(layers, len(blocks))
    encoded = tokenizer(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]
    empty = [i for i, ids in enumerate(encoded) if len(ids) == 0]
    if empty:
        raise ValueError(f"Texts at positions {empty[:5]} tokenize to no tokens; drop or fill them.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model.get_input_embeddings().weight.device
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model

    pooled: dict[int, list[torch.Tensor]] = {i: [] for i in layer_ids}
    state: dict[str, torch.Tensor] = {}

    def make_hook(idx: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            hs = output[0] if isinstance(output, (tuple, list)) else output  # (B, T, H)
            mask = state["mask"].to(hs.device, torch.float32).unsqueeze(-1)  # (B, T, 1)
            pooled[idx].append(((hs.float() * mask).sum(1) / mask.sum(1)).cpu())  # (B, H)

        return hook

    handles = [blocks[i].register_forward_hook(make_hook(i)) for i in layer_ids]
    was_training = model.training
    model.eval()  # dropout would make the embeddings random
    try:
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="ProFS embeddings", disable=not show_progress):
            batch = encoded[start : start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.as_tensor(ids)
                mask[row, : len(ids)] = 1
            state["mask"] = mask
            decoder(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return torch.stack([torch.cat(pooled[i]) for i in layer_ids])  # (num_layers, N, H)
