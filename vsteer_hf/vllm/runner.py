"""VFD inside vLLM's V1 model runner: one mixin shared by the CPU and GPU runner classes.

Two passes per token (the design that ships): vLLM runs its own step, whose logits give each
request K candidates (its warped distribution and seeded generator; greedy: the K most probable
tokens in order). Then one extra forward of R·K single-token candidate rows against each request's
own paged prefix: each row attends to the request's real blocks plus a private scratch copy of its
partly filled tail block, so the real cache is never written. The shared `ValueHead` scores the
rows' post-norm states, `vsteer_hf.policy` picks a winner per request, and the winner replaces the
token vLLM's sampler drew. The next ordinary step feeds the winner and writes its KV for real.

Scratch blocks live past the scheduler's `num_blocks` in the same KV allocation: the runner grows
the allocation and its strides before vLLM allocates, and the scheduler never hands them out.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch

from vsteer_hf import policy
from vsteer_hf.head import check_head_matches
from vsteer_hf.vllm.sampling import GREEDY_EPS, warped_probs
from vsteer_hf.vllm.settings import EngineSteering, request_threshold, steering_from_additional_config

MAX_CANDIDATE_REQUESTS = 64  # requests per candidate forward; scratch blocks = this x K


@dataclass
class RequestRecord:
    """What VFD committed for one request: per token, the winner's risk and whether it was not candidate 0."""

    value_scores: list[float] = field(default_factory=list)
    interventions: list[bool] = field(default_factory=list)
    hidden: list[torch.Tensor] | None = None  # winners' post-norm states, when recording is on


def grow_kv_cache_config(kv_cache_config: Any, extra_blocks: int) -> Any:
    """A copy of vLLM's `KVCacheConfig` with `extra_blocks` more blocks, strides and sizes recomputed.

    All layers share one allocation addressed as `offset + layer * layer_stride + block * block_stride`;
    growing only `num_blocks` would make layer-outermost layouts overlap, so their layer stride grows too.
    """
    grown = deepcopy(kv_cache_config)
    old, new = kv_cache_config.num_blocks, kv_cache_config.num_blocks + extra_blocks
    for tensor in grown.kv_cache_tensors:
        if tensor.host_resident:
            raise ValueError("VFD scratch blocks do not support host-resident KV caches; turn hisparse off.")
        layers = len(tensor.layers)
        if tensor.layer_stride == tensor.block_stride * old:  # layer-outermost
            tensor.layer_stride = tensor.block_stride * new
            needed = tensor.offset + layers * tensor.layer_stride
        else:  # block-outermost: a block packs every layer's page
            needed = tensor.offset + (layers - 1) * tensor.layer_stride + tensor.block_stride * new
        tensor.size = max(needed, tensor.size * new // old)
    sizes = {tensor.size for tensor in grown.kv_cache_tensors}
    if len(sizes) > 1:
        top = max(sizes)
        for tensor in grown.kv_cache_tensors:
            tensor.size = top
    grown.num_blocks = new
    return grown


class ValueSteerRunnerMixin:
    """Mixed in before vLLM's V1 runner class (`steered_runner_class`); `self` is the runner."""

    vllm_config: Any
    input_batch: Any
    requests: dict[str, Any]

    def vsteer_setup(self) -> None:
        """Read and check `additional_config["vfd"]`; called once, before the KV cache exists."""
        steering = steering_from_additional_config(self.vllm_config.additional_config, "vfd")
        if steering is None:
            raise ValueError(
                'ValueSteerWorker needs additional_config={"vfd": {"value_head_path": ..., "threshold": 0.3, '
                '"num_candidates": 8}}; for abstention use the abstain section with steered_llm instead.'
            )
        head = steering.config.load_head()
        check_head_matches(head, self.vllm_config.model_config.get_hidden_size(), where="the vLLM model (hidden size)")
        steering.config.risk_direction(head)  # VFD refuses a head that scores a value
        from vsteer_hf.vllm.admission import ADMISSION_PROCESSOR, has_admission_check

        if not has_admission_check(self.vllm_config.model_config.logits_processors):
            raise ValueError(
                "ValueSteerWorker needs its admission check, which refuses request settings VFD cannot honour "
                f"(penalties, min_p, logit_bias, logprobs, ...): pass --logits-processors {ADMISSION_PROCESSOR} "
                f"(LLM(logits_processors=[{ADMISSION_PROCESSOR!r}])), or build the engine with steered_llm(vfd=...)."
            )
        self._vsteer = steering
        self._vsteer_head = head
        self._vsteer_k = steering.config.candidates_per_step
        self._vsteer_default = steering.default_threshold()
        self._vsteer_chunk = min(int(self.vllm_config.scheduler_config.max_num_seqs), MAX_CANDIDATE_REQUESTS)
        self._vsteer_scratch_first = -1
        self._vsteer_records: dict[str, RequestRecord] = {}
        self._vsteer_generators: dict[str, torch.Generator] = {}
        self._vsteer_thresholds: dict[str, float] = {}
        self._vsteer_record_hidden = False
        self._vsteer_scheduled: Any = None

    # --- KV cache: scratch blocks past the scheduler's ---------------------------------------------

    def initialize_kv_cache(self, kv_cache_config: Any, *args: Any, **kwargs: Any) -> None:
        if len(kv_cache_config.kv_cache_groups) != 1:
            raise ValueError(
                "VFD in the engine supports models with one KV cache group (full attention); "
                f"this model has {len(kv_cache_config.kv_cache_groups)}."
            )
        self._vsteer_scratch_first = kv_cache_config.num_blocks
        grown = grow_kv_cache_config(kv_cache_config, self._vsteer_chunk * self._vsteer_k)
        super().initialize_kv_cache(grown, *args, **kwargs)  # type: ignore[misc]
        if self._kernel_block_sizes[0] != self.cache_config.block_size:  # type: ignore[attr-defined]
            raise ValueError(
                f"VFD needs the attention kernel's block size ({self._kernel_block_sizes[0]}) to equal the KV "  # type: ignore[attr-defined]
                f"manager's ({self.cache_config.block_size}); pick block_size={self._kernel_block_sizes[0]}."  # type: ignore[attr-defined]
            )

    # --- the step ----------------------------------------------------------------------------------

    def sample_tokens(self, grammar_output: Any) -> Any:
        state = self.execute_model_state  # type: ignore[attr-defined]
        self._vsteer_scheduled = None if state is None else state.scheduler_output
        return super().sample_tokens(grammar_output)  # type: ignore[misc]

    def _sample(self, logits: torch.Tensor | None, spec_decode_metadata: Any) -> Any:
        output = super()._sample(logits, spec_decode_metadata)  # type: ignore[misc]
        if logits is None or self._vsteer_scheduled is None or self._vsteer_scratch_first < 0:
            return output
        if spec_decode_metadata is not None:
            raise RuntimeError("VFD cannot ride speculative decoding; start the engine without speculative_config.")
        winners = self._vsteer_step(logits)
        if winners is not None:
            rows, tokens = winners
            sampled = output.sampled_token_ids.clone()
            sampled[rows, 0] = tokens.to(sampled.dtype)
            output.sampled_token_ids = sampled
        return output

    def _vsteer_step(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        batch = self.input_batch
        num_reqs = batch.num_reqs
        discard = self.discard_request_mask.np[:num_reqs]  # type: ignore[attr-defined]
        live_ids = set(batch.req_ids[:num_reqs])
        for gone in [r for r in self._vsteer_generators if r not in live_ids and r not in self.requests]:
            self._vsteer_generators.pop(gone, None)
            self._vsteer_thresholds.pop(gone, None)
        rows = [i for i in range(num_reqs) if not discard[i]]
        if not rows:
            return None
        all_rows, all_tokens = [], []
        for start in range(0, len(rows), self._vsteer_chunk):
            chunk = rows[start : start + self._vsteer_chunk]
            all_rows.append(torch.tensor(chunk, dtype=torch.long))
            all_tokens.append(self._vsteer_chunk_step(logits, chunk))
        return torch.cat(all_rows), torch.cat(all_tokens)

    def _vsteer_chunk_step(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Candidates, their forward, risks and winners for the requests at batch `rows`."""
        batch = self.input_batch
        k = self._vsteer_k
        req_ids = [batch.req_ids[i] for i in rows]
        params = [self.requests[r].sampling_params for r in req_ids]
        row_logits = logits[rows].float()  # (R, V)
        candidates, probs = self._vsteer_candidates(row_logits, req_ids, params)  # (R, K)
        seq_lens = self.optimistic_seq_lens_cpu[rows].to(torch.long)  # (R,) tokens in KV after this step  # type: ignore[attr-defined]
        hidden = self._vsteer_forward(candidates, rows, seq_lens)  # (R*K, H)
        risks = self._vsteer_head.placed(hidden.device).p(hidden).view(len(rows), k)  # (R, K)
        policy.refuse_non_finite(risks, "a VFD candidate")
        thresholds = torch.tensor([self._vsteer_threshold(r, p) for r, p in zip(req_ids, params, strict=True)])
        config = self._vsteer.config
        if k > 1:
            cand_probs = policy.candidate_probs(probs, candidates) if probs is not None else None
            winner = policy.select_candidates(
                risks, thresholds.to(risks.device), config.rule, cand_probs, config.args_weight
            )
        else:
            winner = torch.zeros(len(rows), dtype=torch.long, device=risks.device)
        tokens = policy.gather_selected(candidates, winner.to(candidates.device))  # (R,)
        winner_risk = policy.gather_selected(risks, winner).tolist()
        changed = policy.intervened(candidates, tokens).tolist()
        for i, req_id in enumerate(req_ids):
            record = self._vsteer_records.setdefault(req_id, RequestRecord())
            record.value_scores.append(float(winner_risk[i]))
            record.interventions.append(bool(changed[i]))
            if self._vsteer_record_hidden:
                record.hidden = record.hidden or []
                record.hidden.append(hidden.view(len(rows), k, -1)[i, int(winner[i])].detach().cpu().clone())
        return tokens.to(logits.device)

    def _vsteer_threshold(self, req_id: str, params: Any) -> float:
        if req_id not in self._vsteer_thresholds:
            self._vsteer_thresholds[req_id] = request_threshold(self._vsteer, params.extra_args, self._vsteer_default)
        return self._vsteer_thresholds[req_id]

    def _vsteer_candidates(
        self, logits: torch.Tensor, req_ids: list[str], params: list[Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(R, K) candidates from each request's own distribution, and their (R, V) probabilities for `args`."""
        k = self._vsteer_k
        want_probs = self._vsteer.config.rule == "args"
        cand_rows, prob_rows = [], []
        for i, (req_id, sp) in enumerate(zip(req_ids, params, strict=True)):
            row = logits[i : i + 1]
            if sp.temperature < GREEDY_EPS:
                cand_rows.append(policy.top_candidates(row, k))
                prob_rows.append(row.softmax(dim=-1) if want_probs else None)
            else:
                probs = warped_probs(row, float(sp.temperature), max(int(sp.top_k or 0), 0), float(sp.top_p))
                cand_rows.append(policy.sample_candidates(probs, k, self._vsteer_generator(req_id, sp, row.device)))
                prob_rows.append(probs)
        stacked = torch.cat(prob_rows) if want_probs else None
        return torch.cat(cand_rows), stacked

    def _vsteer_generator(self, req_id: str, sp: Any, device: torch.device) -> torch.Generator:
        """The request's own candidate stream: seeded with `SamplingParams.seed`, else from the global RNG."""
        gen = self._vsteer_generators.get(req_id)
        if gen is None:
            seed = sp.seed if sp.seed is not None else int(torch.randint(2**62, (1,)))
            gen = torch.Generator(device=device).manual_seed(int(seed))
            self._vsteer_generators[req_id] = gen
        return gen

    def _vsteer_forward(self, candidates: torch.Tensor, rows: list[int], seq_lens: torch.Tensor) -> torch.Tensor:
        """Post-norm states (R*K, H) of every candidate fed at position seq_len, against the request's prefix."""
        from vllm.forward_context import set_forward_context
        from vllm.v1.attention.backend import CommonAttentionMetadata

        k = self._vsteer_k
        block_size = self.cache_config.block_size  # type: ignore[attr-defined]
        device = self.device  # type: ignore[attr-defined]
        n = len(rows) * k
        tables = self.input_batch.block_table[0].block_table.cpu[rows]  # (R, max_blocks) int32
        tail = seq_lens // block_size  # (R,) index of the block the candidate lands in
        offset = seq_lens % block_size  # (R,)
        scratch = self._vsteer_scratch_first + torch.arange(n).view(len(rows), k)  # (R, K)
        width = int(tail.max()) + 1
        table = torch.zeros((len(rows), k, width), dtype=torch.int32)
        for i in range(len(rows)):
            table[i, :, : int(tail[i])] = tables[i, : int(tail[i])]
            table[i, :, int(tail[i])] = scratch[i]
        copy_rows = (offset > 0).nonzero().flatten()
        if len(copy_rows):  # private copies of partly filled tail blocks (whole blocks: layout-independent)
            src = tables[copy_rows, tail[copy_rows]].to(torch.long).repeat_interleave(k)
            dst = scratch[copy_rows].flatten()
            self._vsteer_copy_blocks(src.to(device), dst.to(device))
        slots = (scratch * block_size + offset[:, None]).flatten().to(torch.int64)
        positions = seq_lens.repeat_interleave(k)
        cm = CommonAttentionMetadata(
            query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=device),
            query_start_loc_cpu=torch.arange(n + 1, dtype=torch.int32),
            seq_lens=(positions + 1).to(torch.int32).to(device),
            num_reqs=n,
            num_actual_tokens=n,
            max_query_len=1,
            max_seq_len=int(positions.max()) + 1,
            block_table_tensor=table.view(n, width).to(device),
            slot_mapping=slots.to(device),
            causal=True,
            positions=positions.to(device),
        )
        attn_metadata: dict[str, Any] = {}
        slot_by_layer: dict[str, torch.Tensor] = {}
        for group in self.attn_groups[0]:  # type: ignore[attr-defined]
            built = group.get_metadata_builder(0).build(common_prefix_len=0, common_attn_metadata=cm)
            for name in group.layer_names:
                attn_metadata[name] = built
                slot_by_layer[name] = cm.slot_mapping
        with torch.inference_mode(), set_forward_context(
            attn_metadata, self.vllm_config, num_tokens=n, slot_mapping=slot_by_layer
        ):
            hidden = self.model(  # type: ignore[attr-defined]
                input_ids=candidates.flatten().to(device), positions=positions.to(device)
            )
        return hidden

    def _vsteer_copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        seen: set[int] = set()
        for cache_tensor in self.kv_caches:  # type: ignore[attr-defined]
            if cache_tensor.data_ptr() in seen:
                continue
            seen.add(cache_tensor.data_ptr())
            cache_tensor[dst] = cache_tensor[src]

    # --- results -----------------------------------------------------------------------------------

    def vsteer_take_records(self) -> dict[str, dict[str, Any]]:
        """Per-token risks and intervention flags of every request recorded so far, handed over once.

        Call it when the requests are done (after `LLM.generate` returns): a running request's record
        would continue in a fresh one.
        """
        records, self._vsteer_records = self._vsteer_records, {}
        taken = {}
        for req_id, record in records.items():
            taken[req_id] = {"value_scores": record.value_scores, "interventions": record.interventions}
            if record.hidden is not None:
                taken[req_id]["hidden"] = torch.stack(record.hidden)
        return taken


@cache
def steered_runner_class(base: type) -> type:
    """`base` (vLLM's CPU or GPU V1 runner class) with VFD mixed in; built once per base."""
    return type(f"ValueSteer{base.__name__}", (ValueSteerRunnerMixin, base), {"__module__": __name__})


__all__ = ["EngineSteering", "RequestRecord", "ValueSteerRunnerMixin", "grow_kv_cache_config", "steered_runner_class"]
