"""Admission check for in-engine VFD: refuse, per request, settings the VFD candidates cannot honour.

VFD draws its K candidates from the step's raw logits warped by temperature, top-k and top-p only, and
the winner replaces vLLM's own draw. Penalties, `min_p`, logit bias, allowed/bad words, `min_tokens`
and structured outputs would shape vLLM's draw but not the candidates, and logprobs would describe
the replaced draw: so such requests are refused at admission (a 400 for a server) instead of being
answered as if the settings had applied. The check rides vLLM's logits-processor hook
`validate_params`, the one place vLLM validates a request before it is scheduled; `apply` is a no-op.
`ValueSteerWorker` refuses to start without it (see `runner.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from vsteer_hf.vllm.settings import check_request_args

if TYPE_CHECKING:
    from vllm.config import VllmConfig

ADMISSION_PROCESSOR = "vsteer_hf.vllm.admission:VFDAdmissionCheck"


def unsupported_vfd_settings(params: Any) -> list[str]:
    """The request's settings that in-engine VFD would not honour, as `name=value` strings (empty: fine)."""
    defaults = {
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "min_p": 0.0,
        "min_tokens": 0,
    }
    problems = [
        f"{name}={getattr(params, name)!r}"
        for name, default in defaults.items()
        if getattr(params, name, default) != default
    ]
    for name in ("logit_bias", "allowed_token_ids", "bad_words", "structured_outputs", "logprobs"):
        if getattr(params, name, None):
            problems.append(f"{name}={getattr(params, name)!r}")
    return problems


class VFDAdmissionCheck(LogitsProcessor):
    """Refuses requests whose settings VFD cannot honour, and bad per-request thresholds; changes no logits."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        pass

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        problems = unsupported_vfd_settings(sampling_params)
        if problems:
            raise VLLMValidationError(
                f"value-filtered decoding cannot honour {', '.join(problems)}: its candidates come from the "
                "logits warped by temperature/top-k/top-p only. Drop these settings for steered requests."
            )
        try:
            check_request_args(sampling_params.extra_args, "vfd")
        except ValueError as err:
            raise VLLMValidationError(str(err)) from None

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def has_admission_check(processors: Any) -> bool:
    """Whether an engine's configured logits processors (names or classes) include the VFD admission check."""
    dotted = ADMISSION_PROCESSOR.replace(":", ".")
    return any(
        proc is VFDAdmissionCheck or (isinstance(proc, str) and proc.replace(":", ".") == dotted)
        for proc in processors or ()
    )
