"""The lazy candidate step: forward the natural candidate for every row, the others only where it is unsafe.

Under `first_safe`, candidate 0 (the plain sample, or the argmax when greedy) wins exactly when its risk
is under the threshold. So a step forwards candidate 0 for every row as generate's own decode step does
(2D mask, one new cache slot) and scores its post-norm state. Only the live rows where it is not safe
("flagged") forward their other K-1 candidates: a sub-batch over a temporary copy of those rows' cache
without the newest slot, through whichever eager path is exact for the cache (tree, or expand for
sliding windows). The winner over all K risks, in the eager paths' column order and by the same
`policy.select_candidates`, replaces candidate 0's entry in the newest slot where it differs, and its
state feeds the next logits. The result equals the eager tree path; what it costs is one plain decode
step per token plus the flagged rows' alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vsteer_hf import policy
from vsteer_hf.hf.cache_ops import newest_slot, rows_before_newest
from vsteer_hf.hf.candidates import CandidateForward, StepResult, eager_path


@dataclass
class LazyCandidateStep:
    """One lazy VFD step per call on the cache generate prepared; `num_candidates` > 1."""

    decoder: torch.nn.Module
    cache: Any
    head: Any  # ValueHead placed where the features live
    thresholds: torch.Tensor  # (B,)
    num_candidates: int
    batch_size: int
    mask_dtype: torch.dtype
    attn_implementation: str | None
    feature_device: torch.device
    output_hidden_states: bool = False

    def __post_init__(self) -> None:
        self.natural = CandidateForward(
            self.decoder, self.cache, "expand", 1, self.batch_size, self.mask_dtype, self.output_hidden_states
        )
        self.others_path = "expand" if self.num_candidates == 2 else eager_path(self.cache, self.attn_implementation)

    def __call__(
        self, candidates: torch.Tensor, prefix_mask: torch.Tensor, live: torch.Tensor, step: int, probs: Any = None
    ) -> StepResult:
        """Forward, score and commit one step; `candidates` (B, K), `prefix_mask` (B, L), `live` (B,) bool.
        `probs` is unused (first_safe needs no probabilities); the eager step takes it for ARGS."""
        hidden, layer_states = self.natural.forward(candidates[:, :1], prefix_mask)  # (B, 1, H)
        hidden = hidden[:, 0].to(self.feature_device)  # (B, H)
        risk = self.head.p(hidden)  # (B,)
        live = live.to(risk.device)
        policy.refuse_non_finite(risk[live], f"generation step {step}")
        winner = torch.zeros(self.batch_size, dtype=torch.long, device=risk.device)
        flagged = (live & ~policy.is_safe(risk, self.thresholds)).nonzero().flatten()  # (F,)
        if flagged.numel():
            hidden, risk, layer_states = self._alternatives(
                candidates, prefix_mask, flagged, winner, hidden, risk, layer_states, step
            )
        self.natural.commit(winner, prefix_mask.shape[1])  # sliding windows: trim back to the window
        if layer_states is not None:
            layer_states = tuple(s[:, 0] for s in layer_states)
        return StepResult(winner=winner, hidden=hidden, risk=risk, layer_states=layer_states)

    def _alternatives(
        self,
        candidates: torch.Tensor,
        prefix_mask: torch.Tensor,
        flagged: torch.Tensor,
        winner: torch.Tensor,
        hidden: torch.Tensor,
        risk: torch.Tensor,
        layer_states: tuple[torch.Tensor, ...] | None,
        step: int,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Forward the flagged rows' other candidates, pick their winners, commit them into the main cache."""
        others = self.num_candidates - 1
        rows = flagged.to(candidates.device)
        temp = rows_before_newest(self.cache, rows)
        forward = CandidateForward(
            self.decoder, temp, self.others_path, others, int(rows.numel()), self.mask_dtype, self.output_hidden_states
        )
        if self.others_path == "expand" and others > 1:
            forward.expand_cache()
        alt_hidden, alt_layers = forward.forward(candidates[rows, 1:], prefix_mask[rows])  # (F, K-1, H)
        alt_hidden = alt_hidden.to(self.feature_device)
        alt_risk = self.head.p(alt_hidden)  # (F, K-1)
        policy.refuse_non_finite(alt_risk, f"generation step {step}")
        flagged = flagged.to(risk.device)
        all_risks = torch.cat([risk[flagged, None], alt_risk], dim=1)  # (F, K): the eager column order
        chosen = policy.select_candidates(all_risks, self.thresholds[flagged], "first_safe")  # (F,)
        winner[flagged] = chosen
        changed = (chosen > 0).nonzero().flatten()  # positions in the sub-batch whose winner is not candidate 0
        if not changed.numel():
            return hidden, risk, layer_states
        target = flagged[changed]  # main-batch rows
        column = chosen[changed] - 1  # among the other candidates
        hidden = hidden.clone()
        hidden[target] = alt_hidden[changed, column]
        risk = risk.clone()
        risk[target] = alt_risk[changed, column]
        if layer_states is not None and alt_layers is not None:
            layer_states = tuple(s.clone() for s in layer_states)
            for s, alt in zip(layer_states, alt_layers, strict=True):
                s[target.to(s.device), 0] = alt[changed.to(alt.device), column.to(alt.device)]
        self._write_winners(temp, target, changed, column)
        return hidden, risk, layer_states

    def _write_winners(self, temp: Any, target: torch.Tensor, changed: torch.Tensor, column: torch.Tensor) -> None:
        """Copy each replaced row's winning key/value from the temporary cache into the main cache's newest slot."""
        others = self.num_candidates - 1
        tree = self.others_path == "tree"
        for main, alt in zip(self.cache.layers, temp.layers, strict=True):
            if getattr(main, "keys", None) is None:
                continue
            device = main.keys.device
            slot = newest_slot(main)
            rows = target.to(device)
            if tree:  # candidate j of sub-batch row i sits at slot `slot + j` of row i
                src_rows, src_slots = changed.to(device), slot + column.to(device)
            else:  # expand: copy j of sub-batch row i is batch row i * (K-1) + j, at the same slot
                src_rows = changed.to(device) * others + column.to(device)
                src_slots = torch.full_like(src_rows, slot)
            for name in ("keys", "values"):
                getattr(main, name)[rows, :, slot] = getattr(alt, name)[src_rows, :, src_slots]
