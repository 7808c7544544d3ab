"""Value-filtered decoding through a vLLM engine: a K-candidate step loop on the public `LLM` API.

Each step submits, for every unfinished prompt, the sequences `prefix + [candidate]` with
`max_tokens=1` (prefix caching makes the shared prefix nearly free once it spans full KV blocks).
The probe processor (`probe.py`) returns each candidate's risk and the next K candidates from its
distribution; `policy.select_candidates` commits one per row, exactly as the transformers loop
does. One engine forward per step, but K prefill rows per prompt: slower than plain vLLM decoding.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vsteer_hf import policy
from vsteer_hf.vllm.probe import ProbeSpec
from vsteer_hf.vllm.settings import EngineSteering, request_threshold, steering_from_additional_config

_SEED_MOD = 2**63 - 1


@dataclass
class VFDOutput:
    """One prompt's VFD result, shaped like a row of the transformers `ValueSteerOutput`.

    token_ids: committed tokens, the stop token included (as vLLM's `CompletionOutput.token_ids`).
    value_scores: risk of each committed token; interventions: True where it is not candidate 0.
    candidate_tokens / candidate_risks: every step's K candidates and risks, when traced.
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    value_scores: list[float]
    interventions: list[bool]
    finish_reason: str
    threshold: float
    candidate_tokens: list[list[int]] | None = None
    candidate_risks: list[list[float]] | None = None


def stack_outputs(outputs: Sequence[VFDOutput]) -> dict[str, torch.Tensor]:
    """`value_scores` (B, T) NaN-padded and `interventions` (B, T) False-padded, as the transformers output."""
    width = max((len(o.token_ids) for o in outputs), default=0)
    scores = torch.full((len(outputs), width), float("nan"))
    flags = torch.zeros((len(outputs), width), dtype=torch.bool)
    for row, out in enumerate(outputs):
        scores[row, : len(out.value_scores)] = torch.tensor(out.value_scores)
        flags[row, : len(out.interventions)] = torch.tensor(out.interventions, dtype=torch.bool)
    return {"value_scores": scores, "interventions": flags}


def vfd_generate(
    llm: Any,
    prompts: Any,
    sampling_params: Any = None,
    *,
    trace_candidates: bool = False,
) -> list[VFDOutput]:
    """VFD for `prompts` (as `LLM.generate` takes them) with `additional_config["vfd"]` of `llm`.

    The LLM needs the worker extension and the head installed:
    `LLM(..., worker_extension_cls="vsteer_hf.vllm.worker.ValueSteerWorkerExtension",
    additional_config={"vfd": {...}})` then `llm.collective_rpc("vsteer_install_value_head")`
    (`steered_llm` does both). Per-request `extra_args={"vfd_threshold": t}` overrides the threshold.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    vllm_config = llm.llm_engine.vllm_config
    steering = steering_from_additional_config(vllm_config.additional_config, "vfd")
    if steering is None:
        raise ValueError(
            "vfd_generate needs the LLM created with additional_config={'vfd': {'value_head_path': ..., "
            "'threshold': 0.3, 'num_candidates': 8}} and the worker extension; see vsteer_hf.vllm.steered_llm."
        )
    if vllm_config.speculative_config is not None:
        raise ValueError(
            "VFD commits one of K candidates per step and cannot ride speculative decoding (drafts form a causal "
            "chain, not a tree); create the LLM without speculative_config."
        )
    if not vllm_config.cache_config.enable_prefix_caching:
        warnings.warn(
            "prefix caching is off: every VFD step recomputes each prompt's whole prefix K times; "
            "create the LLM with enable_prefix_caching=True.",
            stacklevel=2,
        )
    prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
    params = _per_prompt(sampling_params, len(prompt_list), SamplingParams)
    for i, sp in enumerate(params):
        _check_supported(sp, i)
    config = steering.config
    num_candidates = config.candidates_per_step
    config.risk_direction(config.load_head())  # VFD refuses a head that scores a value
    default = steering.default_threshold()
    thresholds = [request_threshold(steering, sp.extra_args, default) for sp in params]
    base_seeds = [sp.seed if sp.seed is not None else int(torch.randint(_SEED_MOD, (1,))) for sp in params]
    stop_ids = [_stop_token_ids(llm, sp) for sp in params]

    def probe(tag: str, row: int, step: int) -> Any:
        sp = params[row]
        spec = ProbeSpec(
            tag=tag,
            num_candidates=num_candidates,
            temperature=float(sp.temperature),
            top_k=max(int(sp.top_k or 0), 0),  # vLLM: 0 or -1 = off
            top_p=float(sp.top_p),
            seed=(base_seeds[row] * 1_000_003 + step) % _SEED_MOD,
            want_probs=config.rule == "args",
        )
        return SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, extra_args=spec.to_extra_args())

    def run(requests: list[Any], probe_params: list[Any]) -> tuple[list[Any], dict[str, dict[str, Any]]]:
        outputs = llm.generate(requests, probe_params, use_tqdm=False)
        return outputs, llm.collective_rpc("vsteer_take_vfd_probes")[0]

    # Step 0: the prompts themselves; their last state gives the first K candidates.
    roots, found = run(prompt_list, [probe(f"root:{b}", b, 0) for b in range(len(prompt_list))])
    prompt_ids = [list(out.prompt_token_ids) for out in roots]
    candidates = [_probe_result(found, f"root:{b}")["candidates"] for b in range(len(prompt_list))]
    cand_probs = [_probe_result(found, f"root:{b}")["probs"] for b in range(len(prompt_list))]
    limits = [_max_new_tokens(llm, sp, len(ids)) for sp, ids in zip(params, prompt_ids, strict=True)]
    generated: list[list[int]] = [[] for _ in prompt_list]
    risks_out: list[list[float]] = [[] for _ in prompt_list]
    flags_out: list[list[bool]] = [[] for _ in prompt_list]
    traces: list[list[tuple[list[int], list[float]]]] = [[] for _ in prompt_list]
    finish = ["length"] * len(prompt_list)
    active = [b for b in range(len(prompt_list)) if limits[b] > 0]

    step = 0
    while active:
        step += 1
        requests, probe_params = [], []
        for b in active:
            for token in dict.fromkeys(candidates[b]):  # K may repeat candidate 0 when few tokens are possible
                requests.append(TokensPrompt(prompt_token_ids=prompt_ids[b] + generated[b] + [token]))
                probe_params.append(probe(f"{step}:{b}:{token}", b, step))
        _, found = run(requests, probe_params)

        tags = [[f"{step}:{b}:{token}" for token in candidates[b]] for b in active]
        risks = torch.tensor([[_probe_result(found, t)["risk"] for t in row] for row in tags])  # (A, K)
        cand = torch.tensor([candidates[b] for b in active])  # (A, K)
        policy.refuse_non_finite(risks, f"VFD step {step}")
        if num_candidates > 1:
            probs = torch.tensor([cand_probs[b] for b in active]) if config.rule == "args" else None
            row_thresholds = torch.tensor([thresholds[b] for b in active], dtype=torch.float32)
            winner = policy.select_candidates(risks, row_thresholds, config.rule, probs, config.args_weight)
        else:
            winner = torch.zeros(len(active), dtype=torch.long)
        tokens = policy.gather_selected(cand, winner)  # (A,)
        winner_risk = policy.gather_selected(risks, winner)  # (A,)
        changed = policy.intervened(cand, tokens)  # (A,)

        still_active = []
        for i, b in enumerate(active):
            token = int(tokens[i])
            generated[b].append(token)
            risks_out[b].append(float(winner_risk[i]))
            flags_out[b].append(bool(changed[i]))
            if trace_candidates:
                traces[b].append((candidates[b], risks[i].tolist()))
            result = _probe_result(found, tags[i][int(winner[i])])
            candidates[b], cand_probs[b] = result["candidates"], result["probs"]
            if token in stop_ids[b]:
                finish[b] = "stop"
            elif len(generated[b]) < limits[b]:
                still_active.append(b)
        active = still_active

    tokenizer = llm.get_tokenizer()
    outputs = []
    for b, sp in enumerate(params):
        shown = generated[b][:-1] if finish[b] == "stop" else generated[b]
        outputs.append(
            VFDOutput(
                prompt_token_ids=prompt_ids[b],
                token_ids=generated[b],
                text=_continuation_text(tokenizer, prompt_ids[b], shown, sp.skip_special_tokens),
                value_scores=risks_out[b],
                interventions=flags_out[b],
                finish_reason=finish[b],
                threshold=thresholds[b],
                candidate_tokens=[c for c, _ in traces[b]] if trace_candidates else None,
                candidate_risks=[r for _, r in traces[b]] if trace_candidates else None,
            )
        )
    return outputs


def _continuation_text(tokenizer: Any, prompt: list[int], tokens: list[int], skip_special: bool) -> str:
    """The continuation as vLLM's detokenizer shows it: decoded in the prompt's context (leading spaces kept)."""
    before = tokenizer.decode(prompt, skip_special_tokens=skip_special)
    full = tokenizer.decode(prompt + tokens, skip_special_tokens=skip_special)
    if full.startswith(before):
        return full[len(before) :]
    return tokenizer.decode(tokens, skip_special_tokens=skip_special)


def _per_prompt(sampling_params: Any, count: int, sampling_cls: type) -> list[Any]:
    if sampling_params is None:
        return [sampling_cls() for _ in range(count)]
    if isinstance(sampling_params, sampling_cls):
        return [sampling_params] * count
    params = list(sampling_params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} SamplingParams for {count} prompts; pass one, or one per prompt.")
    return params


# Settings the step loop cannot honour, with their neutral value and the fix.
_UNSUPPORTED = (
    ("n", 1, "VFD returns one continuation per prompt; repeat the prompt instead of n > 1"),
    ("logprobs", None, "VFD does not return logprobs; drop logprobs="),
    ("prompt_logprobs", None, "VFD does not return prompt logprobs; drop prompt_logprobs="),
    ("min_tokens", 0, "min_tokens is not supported by the VFD loop; drop it"),
    ("presence_penalty", 0.0, "penalties are not applied to VFD candidates; drop presence_penalty="),
    ("frequency_penalty", 0.0, "penalties are not applied to VFD candidates; drop frequency_penalty="),
    ("repetition_penalty", 1.0, "penalties are not applied to VFD candidates; drop repetition_penalty="),
    ("min_p", 0.0, "min_p is not applied to VFD candidates; use top_p / top_k"),
    ("logit_bias", None, "logit_bias is not applied to VFD candidates; drop it"),
    ("allowed_token_ids", None, "allowed_token_ids is not applied to VFD candidates; drop it"),
    ("bad_words", None, "bad_words is not applied to VFD candidates; drop it"),
    ("structured_outputs", None, "structured outputs cannot steer VFD candidates; drop structured_outputs="),
)


def _check_supported(sp: Any, index: int) -> None:
    for name, neutral, fix in _UNSUPPORTED:
        value = getattr(sp, name, neutral)
        if value not in (neutral, None) and value != [] and value != {}:
            raise ValueError(f"sampling_params[{index}].{name}={value!r}: {fix}.")
    if sp.stop:
        raise ValueError(
            f"sampling_params[{index}].stop={sp.stop!r}: stop strings are not supported by the VFD loop; "
            "use stop_token_ids, or cut the returned text yourself."
        )


def _stop_token_ids(llm: Any, sp: Any) -> set[int]:
    """Token ids that end a row: EOS (tokenizer and generation config) unless ignore_eos, plus stop_token_ids."""
    stop = set(sp.stop_token_ids or [])
    if not sp.ignore_eos:
        eos = llm.get_tokenizer().eos_token_id
        if eos is not None:
            stop.add(int(eos))
        generation = llm.llm_engine.model_config.try_get_generation_config() or {}
        extra = generation.get("eos_token_id")
        stop.update([extra] if isinstance(extra, int) else (extra or []))
    return stop


def _max_new_tokens(llm: Any, sp: Any, prompt_len: int) -> int:
    room = llm.llm_engine.model_config.max_model_len - prompt_len - 1  # the last probe adds one token
    return room if sp.max_tokens is None else min(int(sp.max_tokens), room)


def _probe_result(found: dict[str, dict[str, Any]], tag: str) -> dict[str, Any]:
    if tag not in found:
        raise RuntimeError(
            f"the engine returned no VFD probe result for {tag!r}: is the head installed "
            "(llm.collective_rpc('vsteer_install_value_head')) and the worker extension "
            "'vsteer_hf.vllm.worker.ValueSteerWorkerExtension' set?"
        )
    return found[tag]


__all__ = ["EngineSteering", "VFDOutput", "stack_outputs", "vfd_generate"]
