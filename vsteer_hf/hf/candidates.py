"""One transformer forward for the K candidate tokens of every row, and the commit of the winner.

Two eager ways to forward K candidates against a shared prefix (the lazy path in `lazy.py` uses
them for its flagged rows only):
- *tree*: the K candidates are K query rows of the same sequence; a 4D mask lets each row see the
  prefix and itself only. The cache grows by K slots, then the winner's slot is moved into place
  and the other K-1 are dropped. Cheapest; needs full-attention cache layers and sdpa/eager.
- *expand*: the cache is repeated K times along the batch axis and each copy takes one candidate.
  Works with sliding-window layers (the cache library rolls the window itself); costs K times the
  KV memory. Committing copies the winner's newest slot into its K-1 siblings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import (
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)

from vsteer_hf.config import CANDIDATE_PATHS

PATHS = CANDIDATE_PATHS
_TREE_ATTENTION = ("sdpa", "eager")


def tree_attention_mask(
    prefix_mask: torch.Tensor, num_candidates: int, kv_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask (B, 1, K, kv_length): row k sees the valid prefix and its own slot, nothing else.

    `prefix_mask` (B, L) is the 2D attention mask of what the cache already holds (1 = real token,
    0 = padding). The K candidates occupy slots L..L+K-1; slots past L+K (unwritten static-cache
    slots) are masked. Additive (0 / finfo.min) rather than bool because eager attention silently
    misreads a bool mask.
    """
    batch, prefix_len = prefix_mask.shape
    k = num_candidates
    if kv_length < prefix_len + k:
        raise ValueError(f"kv_length {kv_length} cannot hold {prefix_len} prefix slots plus {k} candidates")
    allowed = torch.zeros(batch, k, kv_length, dtype=torch.bool, device=prefix_mask.device)  # (B, K, kv)
    allowed[:, :, :prefix_len] = prefix_mask.bool()[:, None, :]
    eye = torch.eye(k, dtype=torch.bool, device=prefix_mask.device)
    allowed[:, :, prefix_len : prefix_len + k] = eye
    mask = torch.zeros(batch, 1, k, kv_length, dtype=dtype, device=prefix_mask.device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def next_positions(prefix_mask: torch.Tensor) -> torch.Tensor:
    """Position id of the next token per row (B,): the count of real tokens so far, as generate does."""
    return prefix_mask.long().sum(-1)


def _layers(cache: Cache) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(
            f"{type(cache).__name__} exposes no `layers`; value steering needs a transformers Cache built from "
            "layers (DynamicCache or StaticCache)."
        )
    return list(layers)


def cache_supports(cache: Cache, path: str) -> str | None:
    """Return why `path` cannot run on this cache, or None when it can."""
    for layer in _layers(cache):
        if not isinstance(layer, (DynamicLayer, StaticLayer)):
            return f"cache layer {type(layer).__name__} is not a plain key/value layer"
        if path == "tree" and isinstance(layer, (DynamicSlidingWindowLayer, StaticSlidingWindowLayer)):
            return f"cache layer {type(layer).__name__} uses a sliding window"
    return None


def choose_path(
    requested: str,
    cache: Cache,
    attn_implementation: str | None,
    num_candidates: int = 2,
    *,
    rule: str = "first_safe",
    trace_candidates: bool = False,
    device_type: str = "cpu",
) -> str:
    """Resolve `auto` and refuse an explicit path that cannot work here.

    `auto`: `lazy` for VFD with K > 1 under `first_safe` without `trace_candidates` on a CPU (where every
    candidate row is real matrix work, so forwarding the alternatives only for flagged rows is cheaper; see
    the README's decode benchmark), else `tree` where it is exact, else `expand`. On other devices `auto`
    stays eager until a measurement says where lazy wins. With one candidate (abstention, K = 1) every path
    is generate's own decode step: `expand` without copies, 2D mask included, no 4D mask per token.
    `lazy` forwards its alternatives with whichever eager path is exact for the cache (see `lazy.py`).
    """
    if requested not in PATHS:
        raise ValueError(f"candidate_forward={requested!r} is not one of {PATHS}.")
    tree_problem = cache_supports(cache, "tree")
    if tree_problem is None and attn_implementation not in _TREE_ATTENTION:
        tree_problem = (
            f"attention implementation {attn_implementation!r} cannot take a custom 4D mask "
            f"(tree needs one of {_TREE_ATTENTION})"
        )
    if requested == "tree" and tree_problem:
        raise ValueError(f"candidate_forward='tree' cannot run here: {tree_problem}. Use 'expand' or 'auto'.")
    expand_problem = cache_supports(cache, "expand")
    if requested in ("expand", "lazy") and expand_problem:
        raise ValueError(f"candidate_forward={requested!r} cannot run here: {expand_problem}.")
    if requested == "lazy" and (rule != "first_safe" or trace_candidates):
        raise ValueError("candidate_forward='lazy' needs rule='first_safe' and no trace_candidates; use 'auto'.")
    if num_candidates == 1 and requested in ("auto", "lazy") and expand_problem is None:
        return "expand"  # one candidate: the lazy step is the plain decode step, which expand without copies is
    if requested != "auto":
        return requested
    if rule == "first_safe" and not trace_candidates and device_type == "cpu" and expand_problem is None:
        return "lazy"
    return eager_path(cache, attn_implementation)


def eager_path(cache: Cache, attn_implementation: str | None) -> str:
    """`tree` where it is exact, else `expand`: how `auto` forwards all K candidates of a row (the lazy
    path forwards its flagged rows' alternatives this way too)."""
    if cache_supports(cache, "tree") is None and attn_implementation in _TREE_ATTENTION:
        return "tree"
    problem = cache_supports(cache, "expand")
    if problem is None:
        return "expand"
    raise ValueError(f"value steering cannot forward candidates on this cache: {problem}.")


@dataclass
class StepResult:
    """What one candidate step committed: the winner's column (B,), post-norm state (B, H) and risk (B,),
    every candidate's risk (B, K) where the step computed them (eager), and, when asked, the winner's
    state after every layer (each (B, H))."""

    winner: torch.Tensor
    hidden: torch.Tensor
    risk: torch.Tensor
    risks: torch.Tensor | None = None
    layer_states: tuple[torch.Tensor, ...] | None = None


def _static_length(layer: Any) -> int:
    return int(layer.cumulative_length)


@dataclass
class CandidateForward:
    """Runs the K-candidate forward and commits winners, on the cache generate prepared.

    `decoder` is the model's base decoder (returns post-norm `last_hidden_state`); the caller applies
    the output embedding to the winner rows only.
    """

    decoder: torch.nn.Module
    cache: Cache
    path: str
    num_candidates: int
    batch_size: int
    mask_dtype: torch.dtype
    output_hidden_states: bool = False

    def __post_init__(self) -> None:
        self._expanded = False
        for layer in _layers(self.cache):
            if isinstance(layer, DynamicSlidingWindowLayer):
                # keep one token beyond the window so the final `drop_last` can restore the window
                layer.activate_past_recording()

    def expand_cache(self) -> None:
        """Repeat every layer's keys/values K times along the batch axis (expand path, once after prefill)."""
        k = self.num_candidates
        for layer in _layers(self.cache):
            if not getattr(layer, "is_initialized", True) or getattr(layer, "keys", None) is None:
                continue
            layer.keys = layer.keys.repeat_interleave(k, dim=0)
            layer.values = layer.values.repeat_interleave(k, dim=0)
            if hasattr(layer, "batch_size"):
                layer.batch_size = layer.keys.shape[0]
        self._expanded = True

    def collapse_cache(self) -> None:
        """Undo `expand_cache`: keep one copy per row (all copies are equal once the winner is committed)."""
        if not self._expanded:
            return
        k = self.num_candidates
        for layer in _layers(self.cache):
            if getattr(layer, "keys", None) is None:
                continue
            layer.keys = layer.keys[::k].contiguous()
            layer.values = layer.values[::k].contiguous()
            if hasattr(layer, "batch_size"):
                layer.batch_size = layer.keys.shape[0]
        self._expanded = False

    def forward(
        self, candidates: torch.Tensor, prefix_mask: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Forward candidates (B, K) after a prefix described by `prefix_mask` (B, L).

        Returns post-norm hidden states (B, K, H) and, when asked, every layer's states (B, K, H) each.
        """
        b, k = candidates.shape
        positions = next_positions(prefix_mask)  # (B,)
        if self.path == "tree":
            kv_length = self._tree_kv_length(prefix_mask.shape[1])
            mask = tree_attention_mask(prefix_mask, k, kv_length, self.mask_dtype)
            out = self.decoder(
                input_ids=candidates,
                attention_mask=mask,
                position_ids=positions[:, None].expand(b, k),
                past_key_values=self.cache,
                use_cache=True,
                output_hidden_states=self.output_hidden_states,
            )
            hidden = out.last_hidden_state  # (B, K, H)
            layers = out.hidden_states if self.output_hidden_states else None
        else:
            flat_mask = torch.cat([prefix_mask, prefix_mask.new_ones(b, 1)], dim=1).repeat_interleave(k, dim=0)
            out = self.decoder(
                input_ids=candidates.reshape(b * k, 1),
                attention_mask=flat_mask,
                position_ids=positions.repeat_interleave(k)[:, None],
                past_key_values=self.cache,
                use_cache=True,
                output_hidden_states=self.output_hidden_states,
            )
            hidden = out.last_hidden_state.reshape(b, k, -1)
            layers = tuple(h.reshape(b, k, -1) for h in out.hidden_states) if self.output_hidden_states else None
        return hidden, layers

    def _tree_kv_length(self, prefix_len: int) -> int:
        first = _layers(self.cache)[0]
        if isinstance(first, StaticLayer):
            needed = prefix_len + self.num_candidates
            if first.max_cache_len < needed:
                raise ValueError(
                    f"static cache holds {first.max_cache_len} slots but the candidate step needs {needed}; "
                    "pass max_new_tokens/max_length to generate so the cache is sized for K extra slots."
                )
            return first.max_cache_len
        return prefix_len + self.num_candidates

    def commit(self, winner: torch.Tensor, prefix_len: int) -> None:
        """Keep only the winner's entry (B,) in the cache, at slot `prefix_len` (tree) or in all K copies (expand)."""
        k = self.num_candidates
        for layer in _layers(self.cache):
            if getattr(layer, "keys", None) is None:
                continue
            if k == 1:
                pass  # the only candidate already sits in its final slot
            elif self.path == "tree":
                self._commit_tree(layer, winner, prefix_len, k)
            else:
                self._commit_expand(layer, winner, k)
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.keys = layer.keys[:, :, -layer.sliding_window :]
                layer.values = layer.values[:, :, -layer.sliding_window :]

    @staticmethod
    def _commit_tree(layer: Any, winner: torch.Tensor, prefix_len: int, k: int) -> None:
        slot = (prefix_len + winner).to(layer.keys.device)  # (B,)
        for name in ("keys", "values"):
            tensor = getattr(layer, name)  # (B, heads, S, d)
            idx = slot[:, None, None, None].expand(-1, tensor.shape[1], 1, tensor.shape[3])
            tensor[:, :, prefix_len : prefix_len + 1] = tensor.gather(2, idx)
        if isinstance(layer, StaticLayer):
            layer.cumulative_length.sub_(k - 1)
        else:
            layer.keys = layer.keys[:, :, : prefix_len + 1]
            layer.values = layer.values[:, :, : prefix_len + 1]

    @staticmethod
    def _commit_expand(layer: Any, winner: torch.Tensor, k: int) -> None:
        if isinstance(layer, StaticSlidingWindowLayer):
            slot = min(layer.cumulative_length_int, layer.max_cache_len) - 1
        elif isinstance(layer, StaticLayer):
            slot = _static_length(layer) - 1
        else:
            slot = layer.keys.shape[2] - 1
        for name in ("keys", "values"):
            tensor = getattr(layer, name)  # (B*K, heads, S, d)
            grouped = tensor.view(-1, k, *tensor.shape[1:])  # (B, K, heads, S, d)
            rows = torch.arange(grouped.shape[0], device=tensor.device)
            newest = grouped[rows, winner.to(tensor.device), :, slot]  # (B, heads, d)
            grouped[:, :, :, slot] = newest[:, None]

    def drop_last(self) -> None:
        """Remove the newest entry, so the returned cache holds len(sequences) - 1 tokens as generate's does."""
        for layer in _layers(self.cache):
            if getattr(layer, "keys", None) is None:
                continue
            if isinstance(layer, StaticSlidingWindowLayer):
                if layer.cumulative_length_int > layer.max_cache_len:  # refused up front (cache_ops)
                    raise RuntimeError("a static sliding-window cache rolled past its window during value steering")
                layer.cumulative_length_int -= 1
                layer.cumulative_length.sub_(1)
            elif isinstance(layer, StaticLayer):
                layer.cumulative_length.sub_(1)
            elif isinstance(layer, DynamicSlidingWindowLayer):
                layer.crop(-1)
                layer.record_past = False
            else:
                layer.keys = layer.keys[:, :, :-1]
                layer.values = layer.values[:, :, :-1]
