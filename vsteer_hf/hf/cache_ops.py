"""Cache bookkeeping around the steered loop: what a caller's cache looked like, sub-batch copies, limits.

- `CacheSnapshot`: the loop only appends to a cache (new tensors for dynamic layers, slots past the
  current length for static ones), so keeping each layer's attributes is enough to hand a caller's
  `past_key_values` back unchanged when generation raises mid-way.
- `rows_before_newest`: a temporary cache holding some rows' keys/values without the newest slot, for
  the lazy path's alternatives (the main cache is never touched).
- `newest_slot`: where the newest entry of a layer sits along the sequence axis.
- `refuse_rolling_static_window`: a static sliding-window cache that would roll during generation
  cannot be handed back (its oldest entries are overwritten in place); refuse it before the first token.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer


def _layers(cache: Cache) -> list[Any]:
    return list(getattr(cache, "layers", []) or [])


class CacheSnapshot:
    """Each layer's attributes (and static lengths' values) as they were, to restore on failure."""

    def __init__(self, cache: Cache | None) -> None:
        self.cache = cache
        self.layers = _layers(cache) if cache is not None else []
        self.cache_state = dict(vars(cache)) if cache is not None else {}
        self.layer_states = [dict(vars(layer)) for layer in self.layers]
        # static layers count their length in a tensor changed in place: keep its value
        self.lengths = [
            layer.cumulative_length.clone()
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
            else None
            for layer in self.layers
        ]

    def restore(self) -> None:
        """Put the cache back as it was when the snapshot was taken (layers added since are dropped)."""
        if self.cache is None:
            return
        vars(self.cache).clear()
        vars(self.cache).update(self.cache_state)
        self.cache.layers = list(self.layers)  # the same list object may have grown: give a fresh copy
        for layer, state, length in zip(self.layers, self.layer_states, self.lengths, strict=True):
            vars(layer).clear()
            vars(layer).update(state)
            if length is not None:
                layer.cumulative_length.copy_(length)


def newest_slot(layer: Any) -> int:
    """Index along the sequence axis of the newest entry, right after a decode step wrote it."""
    if isinstance(layer, StaticSlidingWindowLayer):
        return layer.cumulative_length_int - 1
    if isinstance(layer, StaticLayer):
        return int(layer.cumulative_length) - 1
    return layer.keys.shape[2] - 1


def rows_before_newest(cache: Cache, rows: torch.Tensor) -> Cache:
    """A new cache with only batch `rows` (index tensor) and without the newest slot, as before that step.

    Keys/values are copied (index-selected), so forwarding on the result leaves `cache` as it is.
    Dynamic sliding-window layers must be recording their past (the candidate forward turns that on),
    and a static sliding window must not have rolled (`refuse_rolling_static_window`).
    """
    temp = copy.copy(cache)
    temp.layers = []
    for layer in _layers(cache):
        new = copy.copy(layer)
        if getattr(layer, "keys", None) is not None and getattr(layer, "is_initialized", True):
            if isinstance(layer, StaticLayer):
                if isinstance(layer, StaticSlidingWindowLayer):
                    if layer.cumulative_length_int > layer.max_cache_len:
                        raise RuntimeError("a static sliding-window cache rolled; its newest slot cannot be undone")
                    new.cumulative_length_int = layer.cumulative_length_int - 1
                new.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
                new.values = layer.values.index_select(0, rows.to(layer.values.device))
                new.cumulative_length = layer.cumulative_length - 1
                new.batch_size = new.keys.shape[0]
            else:
                rows_here = rows.to(layer.keys.device)
                new.keys = layer.keys[rows_here, :, :-1]
                new.values = layer.values[rows_here, :, :-1]
                if isinstance(layer, DynamicSlidingWindowLayer):
                    new.cumulative_length = layer.cumulative_length - 1
        temp.layers.append(new)
    return temp


def refuse_rolling_static_window(cache: Cache | None, total_length: int) -> None:
    """Refuse, before the first token, a static sliding-window cache that `total_length` entries would roll.

    The steered loop forwards every emitted token, so the cache reaches `generation_config.max_length`
    entries; past the window a static layer overwrites its oldest slots in place, and the cache could no
    longer be handed back with `len(sequences) - 1` entries (nor restored after an error).
    """
    for layer in _layers(cache) if cache is not None else []:
        if isinstance(layer, StaticSlidingWindowLayer) and total_length > layer.max_cache_len:
            raise ValueError(
                f"this static cache has sliding-window layers of {layer.max_cache_len} slots, but prompt plus "
                f"max_new_tokens needs {total_length}: value steering would roll the window and could not hand "
                "the cache back. Use the default dynamic cache (drop cache_implementation='static' / the "
                f"StaticCache), or keep prompt + max_new_tokens within {layer.max_cache_len} tokens."
            )
