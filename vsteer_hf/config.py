"""`ValueSteerConfig`: what `model.generate(..., value_steer=cfg)` should do.

One frozen dataclass shared by the transformers and vLLM paths; it holds settings only. Turning
a head source into a loaded `ValueHead` and a threshold into a per-row tensor happens in
`resolve`, once per generate call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import torch

from vsteer_hf.policy import DIRECTIONS, RULES, resolve_thresholds

if TYPE_CHECKING:
    from vsteer_hf.head import ValueHead

MODES = ("vfd", "abstain")
CANDIDATE_PATHS = ("auto", "tree", "expand", "lazy")
DEFAULT_NUM_CANDIDATES = 8


@dataclass(frozen=True)
class ValueSteerConfig:
    """Settings for value-filtered decoding (VFD) or dynamic abstention.

    Decision:
        head: a `ValueHead`, or anything `load_value_head` takes (file, folder, hub id).
        threshold: risk threshold in [0, 1], one float or one per batch row. A candidate is safe when
            its risk is below it; abstention ends a row when the risk crosses it.
        alpha: instead of `threshold`, a target false-intervention rate looked up on the head's
            calibrated ĉ(α) curve (see `HeadCard.threshold_for_alpha`).
        mode: `vfd` (pick among K candidates) or `abstain` (sample normally, end with EOS on crossing).
        rule: `first_safe` (first candidate under the threshold, else lowest risk) or `args`
            (argmin risk - args_weight * probability).
        direction: for abstention, `above` ends rows whose risk reaches the threshold (heads that
            score P(undesirable), like the published ones) and `below` rows whose value falls under it.
            Default: the head card's `risk_direction`. VFD refuses a `below` head.
    Mechanics:
        num_candidates: K candidate tokens per step (VFD; default 8). Sampled from the warped distribution when
            `do_sample`, else the K most probable tokens.
        candidate_forward: `auto`, `tree`, `expand` or `lazy` (forward candidate 0 only, the others
            only for rows where it is not safe; `first_safe` without `trace_candidates`). `auto` takes
            lazy on CPU for VFD with K > 1 under `first_safe`, else tree where exact, else expand.
        trace_candidates: also return every candidate's token and risk per step.
        trace_features: also return the committed tokens' post-norm hidden states (B, T, H), fp32:
            exactly the tensor the head scored (decode-matched training features).
    """

    head: ValueHead | str | os.PathLike = field(metadata={"help": "value head or its source"})
    num_candidates: int | None = None
    threshold: float | Sequence[float] | None = None
    alpha: float | None = None
    mode: Literal["vfd", "abstain"] = "vfd"
    rule: Literal["first_safe", "args"] = "first_safe"
    args_weight: float = 1.0
    direction: Literal["above", "below"] | None = None
    candidate_forward: Literal["auto", "tree", "expand", "lazy"] = "auto"
    trace_candidates: bool = False
    trace_features: bool = False
    head_filename: str | None = None
    head_revision: str | None = None

    def __post_init__(self) -> None:
        k = self.num_candidates
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"num_candidates must be an integer >= 1, got {k!r}.")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}.")
        if self.rule not in RULES:
            raise ValueError(f"rule={self.rule!r} is not one of {RULES}.")
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise ValueError(f"direction={self.direction!r} is not one of {DIRECTIONS}.")
        if self.candidate_forward not in CANDIDATE_PATHS:
            raise ValueError(f"candidate_forward={self.candidate_forward!r} is not one of {CANDIDATE_PATHS}.")
        if self.candidate_forward == "lazy" and self.rule != "first_safe":
            raise ValueError(
                f"candidate_forward='lazy' needs rule='first_safe' (rule={self.rule!r} weighs every candidate's "
                "risk); use candidate_forward='auto' or 'tree'."
            )
        if self.candidate_forward == "lazy" and self.trace_candidates:
            raise ValueError(
                "candidate_forward='lazy' scores the other candidates only where candidate 0 is unsafe, so it "
                "cannot trace every candidate's risk; drop trace_candidates or use candidate_forward='auto'."
            )
        if self.threshold is not None and self.alpha is not None:
            raise ValueError("Pass either threshold= or alpha=, not both.")
        if self.threshold is None and self.alpha is None:
            raise ValueError(
                "ValueSteerConfig needs a decision point: pass threshold= (a risk in [0, 1], e.g. 0.3) "
                "or alpha= (a false-intervention rate on the head's calibrated curve)."
            )
        if self.threshold is not None:
            values = _threshold_values(self.threshold)
            resolve_thresholds(values, len(values), "cpu")  # range check now, length check per batch
        if self.alpha is not None and not 0.0 < float(self.alpha) < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha!r}.")
        if self.mode == "abstain" and k not in (None, 1):
            raise ValueError(
                f"mode='abstain' forwards only the sampled token; num_candidates={k} would be ignored. "
                "Leave num_candidates unset, or use mode='vfd'."
            )

    @property
    def candidates_per_step(self) -> int:
        """K actually forwarded per step: abstention forwards only the sampled token."""
        if self.mode == "abstain":
            return 1
        return DEFAULT_NUM_CANDIDATES if self.num_candidates is None else self.num_candidates

    def load_head(self, hidden_size: int | None = None) -> ValueHead:
        """The `ValueHead` this config names, loaded once per source and checked against `hidden_size`."""
        from vsteer_hf.head import ValueHead, check_head_matches

        head = self.head
        if not isinstance(head, ValueHead):
            source = os.fspath(head)
            stamp = os.stat(source).st_mtime_ns if os.path.exists(source) else None  # a retrained head reloads
            head = _load_cached(source, self.head_filename, self.head_revision, stamp)
        if hidden_size is not None:
            check_head_matches(head, hidden_size, where="the backbone (config.hidden_size)")
        return head

    def risk_direction(self, head: ValueHead) -> str:
        """`direction` if given, else the head card's; VFD needs a head that scores P(undesirable)."""
        direction = self.direction or head.card.risk_direction
        if self.mode == "vfd" and direction != "above":
            raise ValueError(
                "VFD keeps candidates whose risk is below the threshold, so it needs a head that scores "
                f"P(undesirable) (direction 'above'); this one is {direction!r}. Use mode='abstain', or a head "
                "trained with undesirable = 1."
            )
        return direction

    def thresholds(self, head: ValueHead, batch_size: int, device: torch.device | str) -> torch.Tensor:
        """Per-row thresholds (B,), from `threshold` or from `alpha` on the head's ĉ(α) curve."""
        if self.threshold is not None:
            return resolve_thresholds(self.threshold, batch_size, device)
        assert self.alpha is not None
        return resolve_thresholds(head.card.threshold_for_alpha(float(self.alpha)), batch_size, device)


def _threshold_values(threshold: object) -> list[float]:
    """A float, a sequence, a numpy value or a tensor, as a flat list (bad types: a clear error)."""
    try:
        flat = torch.as_tensor(threshold, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"threshold must be a number in [0, 1] or one per batch row, got {threshold!r}.") from err
    return flat.tolist()


@lru_cache(maxsize=4)
def _load_cached(source: str, filename: str | None, revision: str | None, stamp: int | None) -> ValueHead:
    """One load per (source, file, revision, modification time): reused across generate calls."""
    from vsteer_hf.head import load_value_head

    return load_value_head(source, filename=filename, revision=revision)
