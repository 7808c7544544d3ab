"""Dynamic abstention inside vLLM: a V1 logits processor that forces EOS on rows whose risk crossed.

The risks come from the `compute_logits` hook (see `channel.py`) of the same step: the state of the
token fed back decides the next token, and the last prompt state decides the first one, exactly as
the transformers path. The processor is inert unless `additional_config` has an enabled `abstain`
section, so the `vllm.logits_processors` entry point may load it into every engine. V1 runner only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from vsteer_hf import policy
from vsteer_hf.vllm.channel import channel_for
from vsteer_hf.vllm.settings import check_request_args, steering_from_additional_config

if TYPE_CHECKING:
    from vllm.config import VllmConfig

@dataclass
class _Row:
    threshold: float


class ValueAbstentionLogitsProcessor(LogitsProcessor):
    """Force EOS on every row whose value-head risk crossed its threshold (`additional_config["abstain"]`).

    Per request: `SamplingParams.extra_args={"abstain_threshold": 0.4}` (or `"abstain_alpha"`).
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.steering = steering_from_additional_config(vllm_config.additional_config, "abstain")
        self.rows: dict[int, _Row] = {}
        if self.steering is None:
            return
        if vllm_config.speculative_config is not None:
            raise ValueError(
                "value-head abstention needs one logits row per request; speculative decoding gives several. "
                "Drop speculative_config, or drop the 'abstain' section of additional_config."
            )
        self.channel = channel_for(vllm_config)
        self.default_threshold = self.steering.default_threshold()
        self.direction = self.steering.config.direction or self.steering.config.load_head().card.risk_direction
        self.eos_token_id = self.steering.eos_token_id
        if self.eos_token_id is None:
            self.eos_token_id = _model_eos_token_id(vllm_config)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject bad per-request thresholds at admission (a 400 for `vllm serve`)."""
        try:
            check_request_args(sampling_params.extra_args, "abstain")
        except ValueError as err:
            raise VLLMValidationError(str(err)) from None

    def is_argmax_invariant(self) -> bool:
        return False  # forcing EOS changes greedy picks too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self.steering is None:
            return
        update_rows(self.rows, batch_update, self._row_for)

    def _row_for(self, params: SamplingParams) -> _Row | None:
        args = params.extra_args or {}
        if params.ignore_eos:
            return None  # ignore_eos rows could never end
        return _Row(self.steering.request_threshold(args, self.default_threshold))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.steering is None or not self.rows:
            return logits
        risk = self.channel.risk
        if risk is None:
            raise RuntimeError(
                "abstention is configured but no value head scored this step: install it with "
                "llm.collective_rpc('vsteer_install_value_head') (worker_extension_cls="
                "'vsteer_hf.vllm.worker.ValueSteerWorkerExtension'), or load the model through the plugin "
                "(hf_overrides={'architectures': ['ValueSteer<Architecture>']})."
            )
        if risk.shape[0] != logits.shape[0]:
            raise RuntimeError(
                f"the value head scored {risk.shape[0]} rows but the sampler has {logits.shape[0]}: abstention "
                "needs one logits row per request (no speculative decoding)."
            )
        thresholds = torch.full((logits.shape[0],), float("nan"), dtype=torch.float32)
        tracked = torch.zeros(logits.shape[0], dtype=torch.bool)
        for index, row in self.rows.items():
            if index < logits.shape[0]:
                thresholds[index] = row.threshold
                tracked[index] = True
        tracked = tracked.to(risk.device)
        policy.refuse_non_finite(risk[tracked], "this engine step")
        force = policy.crossed(risk, thresholds.to(risk.device), self.direction) & tracked  # (B,)
        return policy.force_eos(logits, force.to(logits.device), int(self.eos_token_id))


def update_rows(
    rows: dict[int, Any], batch_update: BatchUpdate | None, row_for: Callable[[SamplingParams], Any | None]
) -> None:
    """Keep a processor's per-row state aligned with the persistent batch: drop removed rows, add the
    state `row_for` gives a new request (None: not tracked), and follow moves and swaps."""
    if batch_update is None:
        return
    for index in batch_update.removed:
        rows.pop(index, None)
    for index, params, _prompt, _output in batch_update.added:
        rows.pop(index, None)
        row = row_for(params)
        if row is not None:
            rows[index] = row
    for first, second, direction in batch_update.moved:
        a, b = rows.pop(first, None), rows.pop(second, None)
        if a is not None:
            rows[second] = a
        if b is not None and direction == MoveDirectionality.SWAP:
            rows[first] = b


def _model_eos_token_id(vllm_config: Any) -> int:
    """The first EOS id of the generation config, else of the model config (as transformers' generate uses)."""
    model_config = vllm_config.model_config
    eos = None
    try:
        eos = model_config.try_get_generation_config().get("eos_token_id")
    except Exception:  # no generation_config.json: fall back to the model config
        eos = None
    if eos is None:
        eos = getattr(model_config.hf_text_config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise ValueError(
            "abstention ends rows with EOS but the model names no eos_token_id; add "
            "'eos_token_id': <id> to additional_config['abstain']."
        )
    return int(eos)
