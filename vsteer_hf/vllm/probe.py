"""The worker half of VFD through vLLM: a logits processor that answers the step loop's probes.

A probe is a request `prefix + [candidate]` with `max_tokens=1`, tagged in `extra_args`. Its last
prompt position is the candidate's own state: the `compute_logits` hook scores it, and this
processor records that risk plus the next K candidates drawn from the same row's distribution
(`policy.top_candidates` when greedy, `policy.sample_candidates` on the warped probabilities
otherwise). Untagged requests pass through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from vsteer_hf import policy
from vsteer_hf.vllm.abstain import PROBE_KEY, update_rows
from vsteer_hf.vllm.channel import channel_for

if TYPE_CHECKING:
    from vllm.config import VllmConfig

GREEDY_EPS = 1e-5  # vLLM treats temperatures below this as greedy


@dataclass(frozen=True)
class ProbeSpec:
    """What the step loop asks about one probe request; travels as a plain dict in `extra_args`."""

    tag: str
    num_candidates: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    want_probs: bool = False

    def to_extra_args(self) -> dict[str, Any]:
        return {PROBE_KEY: dict(self.__dict__)}

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, Any] | None) -> ProbeSpec | None:
        raw = (extra_args or {}).get(PROBE_KEY)
        return None if raw is None else cls(**raw)


def warped_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Sampling distribution (n, V) after temperature, top-k and top-p, as vLLM's sampler applies them."""
    scores = logits.float() / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]  # (n, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_scores.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # back to vocab order
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(dim=-1)


def probe_candidates(logits: torch.Tensor, spec: ProbeSpec) -> tuple[list[int], list[float] | None]:
    """The next K candidates (and their probabilities, for the `args` rule) of one row's logits (1, V)."""
    greedy = spec.temperature < GREEDY_EPS
    if greedy:
        candidates = policy.top_candidates(logits.float(), spec.num_candidates)  # (1, K)
        probs = logits.float().softmax(dim=-1) if spec.want_probs else None
    else:
        probs = warped_probs(logits, spec.temperature, spec.top_k, spec.top_p)
        generator = torch.Generator(device=logits.device).manual_seed(spec.seed)
        candidates = policy.sample_candidates(probs, spec.num_candidates, generator)
    cand_probs = policy.candidate_probs(probs, candidates)[0].tolist() if spec.want_probs else None
    return candidates[0].tolist(), cand_probs


class VFDProbeProcessor(LogitsProcessor):
    """Record risk and next candidates for the VFD loop's tagged probe requests; inert otherwise."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.channel = channel_for(vllm_config)
        self.rows: dict[int, ProbeSpec] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        spec = ProbeSpec.from_extra_args(sampling_params.extra_args)
        if spec is not None and sampling_params.max_tokens != 1:
            raise ValueError("a VFD probe request must have max_tokens=1; use vsteer_hf.vllm.vfd_generate.")

    def is_argmax_invariant(self) -> bool:
        return False  # it must see the logits of greedy probe requests too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        update_rows(self.rows, batch_update, lambda params: ProbeSpec.from_extra_args(params.extra_args))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        risk = self.channel.risk
        if risk is None or risk.shape[0] != logits.shape[0]:
            raise RuntimeError(
                "VFD probes need the value head on compute_logits: install it with "
                "llm.collective_rpc('vsteer_install_value_head') and run without speculative decoding."
            )
        for index, spec in self.rows.items():
            candidates, probs = probe_candidates(logits[index : index + 1], spec)
            # A chunked prompt is probed at every chunk; the last write (the full prompt) is the one kept.
            self.channel.probes[spec.tag] = {
                "risk": float(risk[index]),
                "candidates": candidates,
                "probs": probs,
            }
        return logits
