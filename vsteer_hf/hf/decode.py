"""The value-steered decode loop that replaces generate's `_sample` when `value_steer=` is given.

Each step draws K candidates per row, forwards them (eagerly, all K in one pass, see `candidates.py`;
or lazily, candidate 0 for every row and the others only where it is unsafe, see `lazy.py`), scores
the post-norm hidden states with the value head, commits one per row, and applies the output
embedding to the winners only: their logits seed the next step. A token reaches the streamer and the
stopping criteria only once it is committed, so a replaced EOS or stop string never ends a row.
Generate's own logits processors, stopping criteria and streamer are used unchanged. A caller's
`past_key_values` is restored if generation raises (`cache_ops.CacheSnapshot`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation import GenerateDecoderOnlyOutput

from vsteer_hf import policy
from vsteer_hf.config import ValueSteerConfig
from vsteer_hf.hf.cache_ops import CacheSnapshot, refuse_rolling_static_window
from vsteer_hf.hf.candidates import CandidateForward, StepResult, choose_path
from vsteer_hf.hf.lazy import LazyCandidateStep


@dataclass
class ValueSteerOutput(GenerateDecoderOnlyOutput):
    """Generate's decoder-only output plus what the value head saw.

    value_scores: (B, T) risk of each committed token (NaN after a row finished).
    interventions: (B, T) True where the committed token differs from the natural choice
        (candidate 0: the plain sample, or the argmax when greedy).
    candidate_tokens / candidate_risks: (B, T, K) every candidate per step, when traced.
    features: (B, T, H) fp32 post-norm state of each committed token, the tensor the head scored,
        when traced (NaN after a row finished).
    abstained: (B,) True for rows ended by abstention; abstain_step: (B,) index of the forced
        EOS among the generated tokens, -1 where none.
    thresholds: (B,) the thresholds used.
    prompt_risk: (B,) risk of the last prompt state, which decides abstention at step 0 (abstain mode).
    """

    value_scores: torch.Tensor | None = None
    interventions: torch.Tensor | None = None
    candidate_tokens: torch.Tensor | None = None
    candidate_risks: torch.Tensor | None = None
    features: torch.Tensor | None = None
    abstained: torch.Tensor | None = None
    abstain_step: torch.Tensor | None = None
    thresholds: torch.Tensor | None = None
    prompt_risk: torch.Tensor | None = None


def output_embedding_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head on post-norm states, with the final-logit softcapping some models apply after it."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class _CaptureLmHeadInput:
    """Forward pre-hook that keeps the last position of what lm_head consumes (the head's feature).

    Hooks belong to the shared module, so a call from another thread steering the same model must not
    overwrite this thread's capture: only the registering thread's calls are recorded.
    """

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None
        self._thread = threading.get_ident()

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if threading.get_ident() == self._thread:
            self.hidden = args[0][:, -1]  # (B, H)


def _check_logits_path(model: Any, hidden: torch.Tensor, logits: torch.Tensor) -> None:
    """Refuse models whose forward post-processes logits in a way `output_embedding_logits` misses."""
    ours = output_embedding_logits(model, hidden).float()
    theirs = logits.float()
    if not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * max(1.0, float(theirs.abs().max()))):
        raise ValueError(
            f"{type(model).__name__}.forward changes the logits after lm_head in a way value steering "
            "cannot reproduce (it applies lm_head to the winning candidates directly). This model is not "
            "supported; please open an issue naming the model."
        )


def _check_prompt_lengths(
    input_ids: torch.Tensor, prefix_mask: torch.Tensor | None, generation_config: Any, text_config: Any
) -> None:
    """Refuse prompts the loop cannot steer meaningfully: empty rows, or positions past the model's range.

    Plain generate only warns past `max_position_embeddings`; steered text there would be silently
    wrong (and the head was never trained on it), so this is an error.
    """
    if input_ids.shape[1] == 0:
        raise ValueError(
            "the prompt is empty: value steering needs at least one token to start from. Start from a token: "
            "the BOS token where the model has one (not every tokenizer adds it to an empty string: SmolLM2's "
            "does not), or a chat template."
        )
    if prefix_mask is not None:
        real = prefix_mask.long().sum(-1)  # (B,) real tokens per row, cache included
        empty = (real == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"prompt row(s) {empty} of the batch are all padding (attention_mask is 0 everywhere); "
                "drop them or give each prompt at least one token."
            )
        longest = int(real.max())
    else:
        longest = input_ids.shape[1]  # generate's input_ids hold the whole sequence, cached part included
    limit = getattr(text_config, "max_position_embeddings", None)
    if limit is None:
        return
    new_tokens = generation_config.max_length - input_ids.shape[1]
    if longest > limit:
        raise ValueError(
            f"a prompt has {longest} tokens but the model handles at most {limit} positions "
            "(config.max_position_embeddings); truncate it, e.g. "
            f"tokenizer(..., truncation=True, max_length={max(limit - new_tokens, 1)})."
        )
    if longest + new_tokens > limit:
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={new_tokens} runs past the model's "
            f"{limit} positions (config.max_position_embeddings); lower max_new_tokens to {limit - longest} "
            "or truncate the prompt."
        )


@dataclass
class _EagerCandidateStep:
    """Forward all K candidates of every row (tree or expand), score them, select, commit the winners."""

    forward: CandidateForward
    head: Any
    thresholds: torch.Tensor
    steer: ValueSteerConfig
    feature_device: torch.device

    def __call__(
        self, candidates: torch.Tensor, prefix_mask: torch.Tensor, live: torch.Tensor, step: int, probs: Any
    ) -> StepResult:
        hidden, layer_states = self.forward.forward(candidates, prefix_mask)  # (B, K, H)
        hidden = hidden.to(self.feature_device)
        risks = self.head.p(hidden)  # (B, K) fp32
        policy.refuse_non_finite(risks[live], f"generation step {step}")
        if self.steer.mode == "vfd" and candidates.shape[1] > 1:
            cand_probs = policy.candidate_probs(probs, candidates).to(risks.device) if probs is not None else None
            winner = policy.select_candidates(
                risks, self.thresholds, self.steer.rule, probs=cand_probs, args_weight=self.steer.args_weight
            )  # (B,)
        else:
            winner = torch.zeros(candidates.shape[0], dtype=torch.long, device=risks.device)
        self.forward.commit(winner, prefix_mask.shape[1])
        states = None
        if layer_states is not None:
            states = tuple(policy.gather_selected(s, winner.to(s.device)) for s in layer_states)
        return StepResult(
            winner=winner,
            hidden=policy.gather_selected(hidden, winner),
            risk=policy.gather_selected(risks, winner),
            risks=risks,
            layer_states=states,
        )


def value_steered_sample(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    steer: ValueSteerConfig,
    synced_gpus: bool = False,
    streamer: Any = None,
    **model_kwargs: Any,
) -> ValueSteerOutput | torch.LongTensor:
    """Value-filtered decoding / dynamic abstention with generate's prepared processors and criteria."""
    if synced_gpus:
        raise ValueError("value steering does not support synced_gpus (FSDP / ZeRO-3); generate on one replica.")
    if generation_config.output_attentions:
        raise ValueError(
            "output_attentions is not supported with value steering: the candidate forward's attention "
            "rows do not correspond to generate's. Drop output_attentions=True."
        )
    text_config = model.config.get_text_config()
    _check_prompt_lengths(input_ids, model_kwargs.get("attention_mask"), generation_config, text_config)
    caller_cache = model_kwargs.get("past_key_values")
    refuse_rolling_static_window(caller_cache, generation_config.max_length)
    snapshot = CacheSnapshot(caller_cache)  # the loop only appends, so this restores the cache on failure
    try:
        return _steered_loop(
            model, input_ids, logits_processor, stopping_criteria, generation_config, steer, streamer, **model_kwargs
        )
    except BaseException:
        snapshot.restore()
        raise


def _steered_loop(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    steer: ValueSteerConfig,
    streamer: Any,
    **model_kwargs: Any,
) -> ValueSteerOutput | torch.LongTensor:
    """Prefill, then one candidate step per token until every row stops (see the module docstring)."""
    text_config = model.config.get_text_config()
    head = steer.load_head(hidden_size=text_config.hidden_size)
    k = steer.candidates_per_step
    batch = input_ids.shape[0]
    pad_token_id = generation_config._pad_token_tensor
    eos_ids = generation_config._eos_token_tensor
    has_eos_stop = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    if pad_token_id is not None:
        pad_token_id = pad_token_id.to(input_ids.device)
    if steer.mode == "abstain" and eos_ids is None:
        raise ValueError("abstention ends rows with EOS, but the generation config has no eos_token_id. Set one.")
    return_dict = generation_config.return_dict_in_generate
    output_scores = generation_config.output_scores
    output_logits = generation_config.output_logits
    output_hidden = generation_config.output_hidden_states and return_dict

    prefix_mask = model_kwargs.get("attention_mask")  # None when generate dropped an all-ones mask
    cache = model_kwargs.get("past_key_values")

    # Prefill exactly as generate does; catch the last prompt state on its way into lm_head.
    lm_head = model.get_output_embeddings()
    capture = _CaptureLmHeadInput()
    handle = lm_head.register_forward_pre_hook(capture)
    try:
        outputs = model._prefill(input_ids, generation_config, model_kwargs)
    finally:
        handle.remove()
    cache = outputs.past_key_values if outputs.past_key_values is not None else cache
    if cache is None:
        raise ValueError("value steering needs the KV cache; do not pass use_cache=False.")
    if prefix_mask is None:  # no padding: every cached position is a real token
        prefix_mask = torch.ones(batch, int(cache.get_seq_length()), dtype=torch.long, device=input_ids.device)
    assert capture.hidden is not None
    next_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
    _check_logits_path(model, capture.hidden, outputs.logits[:, -1])
    feature_device = capture.hidden.device
    head = head.placed(feature_device)  # where the final norm runs (device_map="auto"); a copy, never a move
    thresholds = steer.thresholds(head, batch, feature_device)  # (B,)
    direction = steer.risk_direction(head)

    path = choose_path(
        steer.candidate_forward,
        cache,
        getattr(model.config, "_attn_implementation", None),
        k,
        rule=steer.rule,
        trace_candidates=steer.trace_candidates,
        device_type=feature_device.type,
    )
    if path == "lazy":
        candidate_step: Any = LazyCandidateStep(
            decoder=model.get_decoder(),
            cache=cache,
            head=head,
            thresholds=thresholds,
            num_candidates=k,
            batch_size=batch,
            mask_dtype=model.dtype,
            attn_implementation=getattr(model.config, "_attn_implementation", None),
            feature_device=feature_device,
            output_hidden_states=output_hidden,
        )
        finish = candidate_step.natural
    else:
        forward = CandidateForward(
            decoder=model.get_decoder(),
            cache=cache,
            path=path,
            num_candidates=k,
            batch_size=batch,
            mask_dtype=model.dtype,
            output_hidden_states=output_hidden,
        )
        if path == "expand" and k > 1:
            forward.expand_cache()
        candidate_step = _EagerCandidateStep(forward, head, thresholds, steer, feature_device)
        finish = forward

    prefix_mask = prefix_mask.to(input_ids.device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    abstain_pending = torch.zeros(batch, dtype=torch.bool, device=feature_device)
    prompt_risk = None
    if steer.mode == "abstain":  # the last prompt state decides the first token
        prompt_risk = head.p(capture.hidden)  # (B,)
        policy.refuse_non_finite(prompt_risk, "the last prompt token")
        abstain_pending = policy.crossed(prompt_risk, thresholds, direction)
    abstained = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    abstain_step = torch.full((batch,), -1, dtype=torch.long, device=input_ids.device)

    scores: tuple[torch.Tensor, ...] | None = () if (return_dict and output_scores) else None
    raw_logits: tuple[torch.Tensor, ...] | None = () if (return_dict and output_logits) else None
    hidden_steps: tuple[Any, ...] | None = () if output_hidden else None
    if output_hidden:
        hidden_steps += (outputs.hidden_states,)
    del outputs
    risk_steps: list[torch.Tensor] = []
    intervention_steps: list[torch.Tensor] = []
    cand_steps: list[torch.Tensor] = []
    cand_risk_steps: list[torch.Tensor] = []
    feature_steps: list[torch.Tensor] = []
    step = 0

    while True:
        step_scores = logits_processor(input_ids, next_logits)  # (B, V)
        if steer.mode == "abstain":
            force = abstain_pending.to(step_scores.device) & unfinished
            step_scores = policy.force_eos(step_scores, force, int(eos_ids.flatten()[0]))
            abstain_step = torch.where(force & ~abstained, step, abstain_step)
            abstained |= force
        if scores is not None:
            scores += (step_scores,)
        if raw_logits is not None:
            raw_logits += (next_logits,)

        if generation_config.do_sample:
            probs = torch.softmax(step_scores, dim=-1)
            candidates = policy.sample_candidates(probs, k)  # (B, K)
        else:
            probs = torch.softmax(step_scores, dim=-1) if steer.rule == "args" else None
            candidates = policy.top_candidates(step_scores, k)
        if has_eos_stop and pad_token_id is not None:
            candidates = torch.where(unfinished[:, None], candidates, pad_token_id)

        live = unfinished.to(feature_device)
        result = candidate_step(candidates, prefix_mask, live, step, probs)
        next_tokens = policy.gather_selected(candidates, result.winner.to(candidates.device))  # (B,)
        winner_hidden, winner_risk = result.hidden, result.risk  # (B, H), (B,)
        nan = torch.full_like(winner_risk, float("nan"))
        risk_steps.append(torch.where(live, winner_risk, nan).to(input_ids.device))
        intervention_steps.append(policy.intervened(candidates, next_tokens) & unfinished)
        if steer.trace_candidates:
            cand_steps.append(candidates)
            cand_risk_steps.append(torch.where(live[:, None], result.risks, float("nan")).to(input_ids.device))
        if steer.trace_features:
            feature_steps.append(torch.where(live[:, None], winner_hidden.float(), float("nan")).to(input_ids.device))
        if hidden_steps is not None and result.layer_states is not None:
            hidden_steps += (tuple(s[:, None] for s in result.layer_states),)
        if steer.mode == "abstain":
            abstain_pending = policy.crossed(winner_risk, thresholds, direction)

        next_logits = output_embedding_logits(model, winner_hidden).to(dtype=torch.float32, device=input_ids.device)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        prefix_mask = torch.cat([prefix_mask, prefix_mask.new_ones(batch, 1)], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        unfinished &= ~stopping_criteria(input_ids, scores)
        step += 1
        if not bool(unfinished.any()):
            break

    if streamer is not None:
        streamer.end()
    if hidden_steps is not None:  # like generate: one entry per score (the last step's forward scored nothing)
        hidden_steps = hidden_steps[:step]
    finish.collapse_cache()
    finish.drop_last()
    if not return_dict:
        return input_ids
    return ValueSteerOutput(
        sequences=input_ids,
        scores=scores,
        logits=raw_logits,
        hidden_states=hidden_steps,
        past_key_values=cache,
        value_scores=torch.stack(risk_steps, dim=1),
        interventions=torch.stack(intervention_steps, dim=1),
        candidate_tokens=torch.stack(cand_steps, dim=1) if cand_steps else None,
        candidate_risks=torch.stack(cand_risk_steps, dim=1) if cand_risk_steps else None,
        features=torch.stack(feature_steps, dim=1) if feature_steps else None,
        abstained=abstained if steer.mode == "abstain" else None,
        abstain_step=abstain_step if steer.mode == "abstain" else None,
        thresholds=thresholds,
        prompt_risk=prompt_risk,
    )
