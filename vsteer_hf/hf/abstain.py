"""Dynamic abstention as a stock-generate component: a logits processor fed by an lm_head hook.

A forward pre-hook on the output embedding keeps the last position of what it consumes (the
final post-norm state, the head's feature). At the next processor call that state's risk decides
whether the token being chosen is forced to EOS, so the state of token t decides token t+1,
exactly as `value_steer=ValueSteerConfig(mode="abstain")` does. Works with any decoding strategy
whose rows stay aligned with the batch (greedy, sampling); beam search reorders rows and is refused.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from transformers import LogitsProcessor

from vsteer_hf import policy
from vsteer_hf.head import ValueHead, check_head_matches


class ValueAbstentionProcessor(LogitsProcessor):
    """Forces EOS on rows whose value-head risk crossed `threshold`. Use as a context manager or call `remove()`.

    After generate, `abstained` (B,) and `abstain_step` (B,; -1 where none) say which rows ended
    and at which generated position; `risks` holds one (B,) tensor per step (the state that decided
    that step). A call whose `input_ids` is not one token longer than the last one starts a new generation.
    """

    def __init__(
        self,
        model: Any,
        head: ValueHead,
        threshold: float | list[float] | torch.Tensor,
        eos_token_id: int | None = None,
        direction: str = "above",
    ) -> None:
        if direction not in policy.DIRECTIONS:
            raise ValueError(f"direction={direction!r} is not one of {policy.DIRECTIONS}.")
        check_head_matches(head, model.config.get_text_config().hidden_size, where="the backbone (config.hidden_size)")
        if eos_token_id is None:
            eos = model.generation_config.eos_token_id
            eos_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        if eos_token_id is None:
            raise ValueError("abstention ends rows with EOS, but no eos_token_id is known; pass eos_token_id=.")
        self.head = head
        self.threshold = threshold
        self.eos_token_id = int(eos_token_id)
        self.direction = direction
        # per thread: the hook sits on the shared lm_head, which other threads' generate calls also run
        self._hidden: dict[int, torch.Tensor] = {}
        self._handle = model.get_output_embeddings().register_forward_pre_hook(self._capture)
        self._reset()

    def _capture(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self._hidden[threading.get_ident()] = args[0][:, -1].detach()  # (B, H) last consumed position

    def _reset(self) -> None:
        self._prompt_len: int | None = None
        self._last_len = -1
        self.abstained: torch.Tensor | None = None
        self.abstain_step: torch.Tensor | None = None
        self.risks: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length = input_ids.shape[1]
        if length != self._last_len + 1:  # not the next step of the same generate call
            self._reset()
        self._last_len = length
        hidden = self._hidden.get(threading.get_ident())
        if hidden is None:
            raise RuntimeError("no hidden state was captured; the processor's model must be the one generating.")
        if hidden.shape[0] != scores.shape[0]:
            raise ValueError(
                f"captured {hidden.shape[0]} rows but scores have {scores.shape[0]}: abstention supports greedy "
                "decoding and sampling (one row per sequence), not beam search."
            )
        if self._prompt_len is None:
            batch = scores.shape[0]
            self._prompt_len = length
            self.abstained = torch.zeros(batch, dtype=torch.bool, device=scores.device)
            self.abstain_step = torch.full((batch,), -1, dtype=torch.long, device=scores.device)
            self._thresholds = policy.resolve_thresholds(self.threshold, batch, hidden.device)
        risk = self.head.placed(hidden.device).p(hidden)  # (B,)
        policy.refuse_non_finite(risk, f"generation step {length - self._prompt_len}")
        self.risks.append(risk)
        force = policy.crossed(risk, self._thresholds, self.direction).to(scores.device) & ~self.abstained
        self.abstain_step = torch.where(force, length - self._prompt_len, self.abstain_step)
        self.abstained |= force
        return policy.force_eos(scores, force, self.eos_token_id)

    def remove(self) -> None:
        """Detach the hook from the model."""
        self._handle.remove()
        self._hidden.clear()

    def __enter__(self) -> ValueAbstentionProcessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
