"""Where the value head meets the engine: a hook on `compute_logits` and a per-engine mailbox.

vLLM passes the final post-norm hidden state of every sampled row to `model.compute_logits` (the
head's feature, no extra forward). The hook scores those rows and leaves the risks in the engine's
`RiskChannel`; the logits processors of the same step read them. One channel per `VllmConfig`
object (the model runner hands the same object to the model and to the logits processors).
Imports no vLLM.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from vsteer_hf.head import ValueHead, check_head_matches

_INSTALLED_MARK = "_vsteer_original_compute_logits"


class RiskChannel:
    """The head of one engine and the risks of the rows it scored last."""

    def __init__(self) -> None:
        self.head: ValueHead | None = None
        self.risk: torch.Tensor | None = None  # (N,) fp32, rows of the last compute_logits call

    def score(self, hidden_states: torch.Tensor) -> None:
        """Risk of every row `compute_logits` received (the head runs where the hidden states are)."""
        head = self.head
        if head is None:
            self.risk = None
            return
        with torch.no_grad():
            self.risk = head.placed(hidden_states.device).p(hidden_states)  # (N,); a copy, never a move


_lock = threading.Lock()
_channels: dict[int, tuple[weakref.ref, RiskChannel]] = {}


def channel_for(vllm_config: Any) -> RiskChannel:
    """The channel of the engine that owns `vllm_config`, created on first use."""
    with _lock:
        for key in [k for k, (ref, _) in _channels.items() if ref() is None]:
            del _channels[key]  # engines that are gone
        entry = _channels.get(id(vllm_config))
        if entry is not None and entry[0]() is vllm_config:
            return entry[1]
        channel = RiskChannel()
        _channels[id(vllm_config)] = (weakref.ref(vllm_config), channel)
        return channel


def install_hook(model: torch.nn.Module, channel: RiskChannel, head: ValueHead, hidden_size: int) -> None:
    """Score every `compute_logits` input of `model` with `head` into `channel`; calling again swaps the head.

    The head is kept in the channel, not registered as a submodule (vLLM's strict weight loader
    would report it as uninitialised weights).
    """
    check_head_matches(head, hidden_size, where="the vLLM model (hidden size)")
    channel.head = head
    channel.risk = None
    if getattr(model, _INSTALLED_MARK, None) is not None:
        return
    original: Callable[..., torch.Tensor] = model.compute_logits

    def compute_logits(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        logits = original(hidden_states, *args, **kwargs)
        channel.score(hidden_states)
        return logits

    object.__setattr__(model, _INSTALLED_MARK, original)
    object.__setattr__(model, "compute_logits", compute_logits)
