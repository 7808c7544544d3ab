"""VFD inside vLLM's V1 model runner: one mixin shared by the CPU and GPU runner classes.

One model forward per token (the design that ships). Step t: from each request's logits the runner
takes K candidates (its warped distribution and seeded generator; greedy: the K most probable tokens
in order) and runs one forward of R·K single-token candidate rows against each request's own paged
prefix: each row attends to the request's real blocks plus a private scratch copy of its partly
filled tail block. The shared `ValueHead` scores the rows' post-norm states, `vsteer_hf.policy` picks
a winner per request, and the winner replaces the token vLLM's sampler drew. The winner's KV is
committed at once (its scratch block, a copy of the real tail block plus the winner's slot, is copied
back whole; a winner that opens a new block waits in a holding block), and its post-norm state is
kept. Step t+1: when every scheduled row is such a pending winner (a pure-decode batch, nothing new,
resumed or chunked), vLLM's model forward is skipped: the winners' states are returned as its output,
so vLLM's own logits, sampler and bookkeeping run unchanged. Any other batch takes the full forward,
so correctness never depends on pending state.

Under `first_safe` with K > 1 the candidate pass is lazy (`candidate_forward` "auto"/"lazy"): candidate 0
wins exactly where its risk is under the threshold, so it is forwarded for every request (R rows, what a
plain decode step costs) and the other K-1 only for the requests where it is refused. `"expand"` (and
rule `args`, which weighs every candidate) forwards all R·K rows in one pass; both give the same winners.

Scratch and holding blocks live past the scheduler's `num_blocks` in the same KV allocation
(`kv_blocks.py`); the scheduler never hands them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch

from vsteer_hf import policy
from vsteer_hf.head import check_head_matches
from vsteer_hf.vllm.kv_blocks import check_block_views, copy_blocks, grow_kv_cache_config, zero_blocks
from vsteer_hf.vllm.sampling import GREEDY_EPS, warped_probs
from vsteer_hf.vllm.settings import EngineSteering, request_threshold, steering_from_additional_config

MAX_UNCLAIMED_RECORDS = 20_000  # finished requests' records kept for take_vfd_records / the HTTP route; oldest go
MAX_CANDIDATE_REQUESTS = 64  # requests per candidate forward; extra blocks = this x (K scratch + 1 holding)


@dataclass
class RequestRecord:
    """What VFD committed for one request: per token, the winner's risk and whether it was not candidate 0."""

    value_scores: list[float] = field(default_factory=list)
    interventions: list[bool] = field(default_factory=list)
    hidden: list[torch.Tensor] | None = None  # winners' post-norm states, when recording is on


@dataclass
class PendingWinner:
    """A committed token whose KV and post-norm state the candidate pass already computed."""

    token: int
    position: int
    hidden: torch.Tensor  # (H,) the state vLLM's next forward would compute for this token
    held_block: int | None  # holding block with its KV (it opens a new block); None: already in the real block


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
        self._vsteer_scratch_first = -1  # K scratch blocks per chunk row, then one holding block per chunk row
        self._vsteer_pending: dict[str, PendingWinner] = {}
        self._vsteer_held = 0  # holding blocks used by this step's winners
        self._vsteer_lazy = steering.forwards_lazily()
        self._vsteer_forwards = _no_forwards()
        self._vsteer_step_input: Any = None  # the scheduler output while execute_model runs
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
        extra = self._vsteer_chunk * (self._vsteer_k + 1)
        grown = grow_kv_cache_config(self.vllm_config, kv_cache_config, extra)
        super().initialize_kv_cache(grown, *args, **kwargs)  # type: ignore[misc]
        if self._kernel_block_sizes[0] != self.cache_config.block_size:  # type: ignore[attr-defined]
            raise ValueError(
                f"VFD needs the attention kernel's block size ({self._kernel_block_sizes[0]}) to equal the KV "  # type: ignore[attr-defined]
                f"manager's ({self.cache_config.block_size}); pick block_size={self._kernel_block_sizes[0]}."  # type: ignore[attr-defined]
            )
        check_block_views(self.kv_caches, grown.num_blocks)  # type: ignore[attr-defined]

    # --- one pass: the forward of a batch of pending winners is already done ---------------------

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        self._vsteer_step_input = scheduler_output
        try:
            return super().execute_model(scheduler_output, *args, **kwargs)  # type: ignore[misc]
        finally:
            self._vsteer_step_input = None

    def _model_forward(
        self, input_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        scheduled = self._vsteer_step_input
        if scheduled is None:  # warm-up and profiling runs
            return super()._model_forward(input_ids=input_ids, positions=positions, **kwargs)  # type: ignore[misc]
        winners = self._vsteer_pending_batch(scheduled, input_ids, positions, kwargs)
        self._vsteer_pending = {}  # whichever way this step goes, the next candidate pass sets new ones
        if winners is None:
            self._vsteer_forwards["full"] += 1
            return super()._model_forward(input_ids=input_ids, positions=positions, **kwargs)  # type: ignore[misc]
        self._vsteer_forwards["skipped"] += 1
        return self._vsteer_reuse(winners, int(input_ids.shape[0]))  # type: ignore[union-attr]

    def _vsteer_pending_batch(
        self, scheduled: Any, input_ids: torch.Tensor | None, positions: torch.Tensor | None, kwargs: dict
    ) -> list[PendingWinner] | None:
        """The pending winner of every scheduled row, in batch order, or None if any row is anything else."""
        if input_ids is None or positions is None or positions.dim() != 1 or kwargs.get("inputs_embeds") is not None:
            return None
        if kwargs.get("intermediate_tensors") is not None or scheduled.scheduled_new_reqs:
            return None
        num_reqs = self.input_batch.num_reqs
        if scheduled.total_num_scheduled_tokens != num_reqs or scheduled.scheduled_spec_decode_tokens:
            return None
        resumed = scheduled.scheduled_cached_reqs.resumed_req_ids
        winners = []
        for req_id in self.input_batch.req_ids[:num_reqs]:
            winner = self._vsteer_pending.get(req_id)
            if winner is None or req_id in resumed or scheduled.num_scheduled_tokens.get(req_id) != 1:
                return None
            winners.append(winner)
        tokens, places = input_ids[:num_reqs].tolist(), positions[:num_reqs].tolist()
        if any(w.token != t or w.position != p for w, t, p in zip(winners, tokens, places, strict=True)):
            return None
        return winners

    def _vsteer_reuse(self, winners: list[PendingWinner], num_tokens: int) -> torch.Tensor:
        """Move held KV into the blocks the scheduler just allocated; return the winners' states (num_tokens, H)."""
        block_size = self.cache_config.block_size  # type: ignore[attr-defined]
        table = self.input_batch.block_table[0].block_table.cpu
        held = [(row, w) for row, w in enumerate(winners) if w.held_block is not None]
        copy_blocks(
            self.kv_caches,  # type: ignore[attr-defined]
            [w.held_block for _, w in held],  # type: ignore[misc]
            [int(table[row, w.position // block_size]) for row, w in held],
        )
        hidden = torch.stack([w.hidden for w in winners])  # (R, H)
        if num_tokens > len(winners):  # padded batch
            hidden = torch.cat([hidden, hidden.new_zeros(num_tokens - len(winners), hidden.shape[1])])
        return hidden

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
        if len(self._vsteer_records) > MAX_UNCLAIMED_RECORDS:  # a server whose clients never fetch them
            for old in [r for r in self._vsteer_records if r not in self.requests][: MAX_UNCLAIMED_RECORDS // 10]:
                del self._vsteer_records[old]
        rows = [i for i in range(num_reqs) if not discard[i]]
        if not rows:
            return None
        all_rows, all_tokens = [], []
        self._vsteer_held = 0  # holding blocks used this step
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
        scratch = self._vsteer_scratch_first + torch.arange(len(rows) * k).view(len(rows), k)  # (R, K) block ids
        thresholds = torch.tensor([self._vsteer_threshold(r, p) for r, p in zip(req_ids, params, strict=True)])
        if self._vsteer_lazy:
            winner, winner_risk, winner_hidden = self._vsteer_lazy_winners(
                candidates, rows, seq_lens, scratch, thresholds
            )
        else:
            winner, winner_risk, winner_hidden = self._vsteer_all_winners(
                candidates, probs, rows, seq_lens, scratch, thresholds
            )
        self._vsteer_forwards["steered_tokens"] += len(rows)
        tokens = policy.gather_selected(candidates, winner.to(candidates.device))  # (R,)
        changed = policy.intervened(candidates, tokens).tolist()
        self._vsteer_commit(req_ids, rows, tokens.tolist(), seq_lens, scratch, winner.tolist(), winner_hidden)
        for i, req_id in enumerate(req_ids):
            record = self._vsteer_records.setdefault(req_id, RequestRecord())
            record.value_scores.append(float(winner_risk[i]))
            record.interventions.append(bool(changed[i]))
            if self._vsteer_record_hidden:
                record.hidden = record.hidden or []
                record.hidden.append(winner_hidden[i].detach().cpu().clone())
        return tokens.to(logits.device)

    def _vsteer_score(self, hidden: torch.Tensor) -> torch.Tensor:
        risks = self._vsteer_head.placed(hidden.device).p(hidden)
        policy.refuse_non_finite(risks, "a VFD candidate")
        return risks

    def _vsteer_all_winners(
        self, candidates: torch.Tensor, probs: torch.Tensor | None, rows: list[int], seq_lens: torch.Tensor,
        scratch: torch.Tensor, thresholds: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every candidate forwarded in one pass: winner column (R,), its risk (R,) and state (R, H)."""
        k = self._vsteer_k
        hidden = self._vsteer_forward(candidates, rows, seq_lens, scratch, first_in_place=True)  # (R*K, H)
        risks = self._vsteer_score(hidden).view(len(rows), k)  # (R, K)
        config = self._vsteer.config
        if k > 1:
            cand_probs = policy.candidate_probs(probs, candidates) if probs is not None else None
            winner = policy.select_candidates(
                risks, thresholds.to(risks.device), config.rule, cand_probs, config.args_weight
            )
        else:
            winner = torch.zeros(len(rows), dtype=torch.long, device=risks.device)
        winner_hidden = hidden.view(len(rows), k, -1)[torch.arange(len(rows)), winner.to(hidden.device)]
        return winner, policy.gather_selected(risks, winner), winner_hidden

    def _vsteer_lazy_winners(
        self, candidates: torch.Tensor, rows: list[int], seq_lens: torch.Tensor, scratch: torch.Tensor,
        thresholds: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`first_safe` lazily: candidate 0 wins exactly where it is safe, so it is forwarded for every request
        and the other K-1 only for the requests where it is not ("flagged"); same result as the one pass.

        Candidate 0 writes its KV into the real tail block (see `_vsteer_forward`); the flagged requests' other
        candidates copy that block and overwrite the one slot it wrote, so they see only their own token there.
        """
        hidden = self._vsteer_forward(candidates[:, :1], rows, seq_lens, scratch[:, :1], first_in_place=True)
        risk = self._vsteer_score(hidden)  # (R,)
        thresholds = thresholds.to(risk.device)
        winner = torch.zeros(len(rows), dtype=torch.long, device=risk.device)
        flagged = (~policy.is_safe(risk, thresholds)).nonzero().flatten()  # (F,)
        if not flagged.numel():
            return winner, risk, hidden
        f = flagged.tolist()
        others = self._vsteer_k - 1
        alt_hidden = self._vsteer_forward(
            candidates[f, 1:], [rows[i] for i in f], seq_lens[f], scratch[f, 1:], first_in_place=False
        )
        alt_risk = self._vsteer_score(alt_hidden).view(len(f), others)  # (F, K-1)
        all_risks = torch.cat([risk[flagged, None], alt_risk], dim=1)  # (F, K): the one pass's column order
        chosen = policy.select_candidates(all_risks, thresholds[flagged], "first_safe")  # (F,)
        winner[flagged] = chosen
        moved = (chosen > 0).nonzero().flatten()  # flagged positions whose winner is another candidate
        if moved.numel():
            target, column = flagged[moved], chosen[moved] - 1
            hidden, risk = hidden.clone(), risk.clone()
            hidden[target] = alt_hidden.view(len(f), others, -1)[moved, column]
            risk[target] = alt_risk[moved, column]
        return winner, risk, hidden

    def _vsteer_commit(
        self, req_ids: list[str], rows: list[int], tokens: list[int], seq_lens: torch.Tensor,
        scratch: torch.Tensor, winner: list[int], winner_hidden: torch.Tensor,
    ) -> None:
        """Put each winner's KV where the next step finds it (before the next chunk reuses the scratch blocks).

        A winner inside a partly filled block: candidate 0 is already there (it was forwarded in place);
        another winner's scratch block (that block plus the winner's slot) is copied back whole into the
        real block. A winner opening a new block: the scheduler allocates that block only next step, so its
        scratch block goes to a holding block; none left, it is not pending.
        """
        block_size = self.cache_config.block_size  # type: ignore[attr-defined]
        tables = self.input_batch.block_table[0].block_table.cpu
        hold_first = self._vsteer_scratch_first + self._vsteer_chunk * self._vsteer_k
        src, dst = [], []
        for i, req_id in enumerate(req_ids):
            position = int(seq_lens[i])
            held: int | None = None
            if position % block_size:
                if winner[i]:
                    src.append(int(scratch[i, winner[i]]))
                    dst.append(int(tables[rows[i], position // block_size]))
            elif self._vsteer_held < self._vsteer_chunk:
                held = hold_first + self._vsteer_held
                self._vsteer_held += 1
                src.append(int(scratch[i, winner[i]]))
                dst.append(held)
            else:
                continue
            self._vsteer_pending[req_id] = PendingWinner(tokens[i], position, winner_hidden[i], held)
        copy_blocks(self.kv_caches, src, dst)  # type: ignore[attr-defined]

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

    def _vsteer_forward(
        self, candidates: torch.Tensor, rows: list[int], seq_lens: torch.Tensor, scratch: torch.Tensor,
        first_in_place: bool,
    ) -> torch.Tensor:
        """Post-norm states (R*C, H) of the (R, C) `candidates` fed at position seq_len, against each request's
        prefix; candidate (i, j) writes its KV into scratch block `scratch[i, j]`, a private copy of the
        request's partly filled tail block.

        `first_in_place` (column 0 is candidate 0): where the tail block is partly filled, candidate 0 writes
        straight into the request's real tail block, at the slot vLLM would write next, so when it wins
        nothing is copied. No other row reads that slot (each copy gets its own candidate's KV there), and
        the block is the request's alone (vLLM shares full blocks only)."""
        from vllm.forward_context import set_forward_context
        from vllm.v1.attention.backend import CommonAttentionMetadata

        k = candidates.shape[1]
        block_size = self.cache_config.block_size  # type: ignore[attr-defined]
        device = self.device  # type: ignore[attr-defined]
        n = len(rows) * k
        tables = self.input_batch.block_table[0].block_table.cpu[rows]  # (R, max_blocks) int32
        tail = seq_lens // block_size  # (R,) index of the block the candidate lands in
        offset = seq_lens % block_size  # (R,)
        width = int(tail.max()) + 1
        table = torch.zeros((len(rows), k, width), dtype=torch.int32)
        real_tail = tables[torch.arange(len(rows)), tail].to(torch.long)  # (R,) allocated where offset > 0
        targets = scratch.clone()  # (R, C) the block each candidate writes its KV into
        copied = torch.ones_like(scratch, dtype=torch.bool)  # (R, C) gets a private copy of the tail block
        if first_in_place:
            partial = offset > 0
            targets[partial, 0] = real_tail[partial]
            copied[partial, 0] = False
        for i in range(len(rows)):
            table[i, :, : int(tail[i])] = tables[i, : int(tail[i])]
            table[i, :, int(tail[i])] = targets[i]
        copy_pairs = copied & (offset > 0)[:, None]
        # private copies of partly filled tail blocks; a candidate opening a block gets a zeroed one, as vLLM's own
        copy_blocks(
            self.kv_caches,  # type: ignore[attr-defined]
            real_tail[:, None].expand_as(scratch)[copy_pairs].tolist(),
            scratch[copy_pairs].tolist(),
        )
        zero_blocks(self.kv_caches, scratch[(offset == 0).nonzero().flatten()].flatten().tolist())  # type: ignore[attr-defined]
        slots = (targets * block_size + offset[:, None]).flatten().to(torch.int64)
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
        self._vsteer_forwards["candidate_rows"] += n
        return hidden

    # --- results -----------------------------------------------------------------------------------

    def vsteer_take_forward_counts(self) -> dict[str, int]:
        """Since the last call: model forwards `skipped` (the candidate pass had done them) and `full`,
        `candidate_rows` forwarded by the candidate passes and `steered_tokens` committed by them."""
        counts, self._vsteer_forwards = self._vsteer_forwards, _no_forwards()
        return counts

    def vsteer_take_records(self, request_id: str | None = None) -> dict[str, dict[str, Any]]:
        """Per-token risks and intervention flags recorded so far, handed over once: all, or those of the
        front-end id `request_id` (engine ids `request_id` or `request_id-...`).

        Call it when the requests are done (after `LLM.generate` returns): a running request's record
        would continue in a fresh one.
        """
        if request_id is None:
            records, self._vsteer_records = self._vsteer_records, {}
        else:
            ids = [r for r in self._vsteer_records if r == request_id or r.startswith(f"{request_id}-")]
            records = {r: self._vsteer_records.pop(r) for r in ids}
        taken = {}
        for req_id, record in records.items():
            taken[req_id] = {"value_scores": record.value_scores, "interventions": record.interventions}
            if record.hidden is not None:
                taken[req_id]["hidden"] = torch.stack(record.hidden)
        return taken


def _no_forwards() -> dict[str, int]:
    return {"skipped": 0, "full": 0, "candidate_rows": 0, "steered_tokens": 0}


@cache
def steered_runner_class(base: type) -> type:
    """`base` (vLLM's CPU or GPU V1 runner class) with VFD mixed in; built once per base."""
    return type(f"ValueSteer{base.__name__}", (ValueSteerRunnerMixin, base), {"__module__": __name__})


__all__ = ["EngineSteering", "PendingWinner", "RequestRecord", "ValueSteerRunnerMixin", "steered_runner_class"]
