"""VFD inside the vLLM engine (`ValueSteerWorker`) against plain vLLM and against the transformers VFD loop."""

from __future__ import annotations

import re

import pytest
import torch
from engine_helpers import close_engine, engine_kwargs, make_head, prompts, tiny_model

from vsteer_hf import ValueSteerConfig, enable_value_steer

K = 4
LONG = 44  # new tokens: prompts of 5-10 tokens cross the 32-token block
STEERING_HEAD = dict(bias=0.0, scale=3.0, seed=7)
NEVER = {"vfd_threshold": 1.0}  # every risk is below 1: candidate 0 always wins
# Few KV blocks (6 requests x 2 blocks would need 12): the scheduler must preempt and recompute.
TIGHT = dict(num_gpu_blocks_override=9, max_num_batched_tokens=64)


def _kwargs() -> dict:
    return {**engine_kwargs(), **TIGHT}


@pytest.fixture(scope="module")
def steering_head(head_folder):
    return head_folder(**STEERING_HEAD)


@pytest.fixture(scope="module")
def llm(model_folder, steering_head):
    from vsteer_hf.vllm import steered_llm

    vfd = {"value_head_path": str(steering_head), "threshold": 0.5, "num_candidates": K}
    engine = steered_llm(str(model_folder), vfd=vfd, **_kwargs())
    yield engine
    close_engine(engine)


@pytest.fixture(scope="module")
def eager(model_folder, steering_head):
    """Every candidate forwarded in one pass: the path the default lazy pass replaces."""
    from vsteer_hf.vllm import steered_llm

    vfd = {"value_head_path": str(steering_head), "threshold": 0.5, "num_candidates": K, "candidate_forward": "expand"}
    engine = steered_llm(str(model_folder), vfd=vfd, **_kwargs())
    yield engine
    close_engine(engine)


@pytest.fixture(scope="module")
def plain(model_folder):
    from vllm import LLM

    engine = LLM(model=str(model_folder), async_scheduling=False, **_kwargs())
    yield engine
    close_engine(engine)


def _params(max_tokens: int = LONG, **extra):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **extra)


def _long_prompt() -> list[int]:
    g = torch.Generator().manual_seed(11)
    return [1, *torch.randint(3, 90, (99,), generator=g).tolist()]  # 100 tokens: two 64-token chunks


def _staggered(llm, token_prompts, params, arrive_at):
    """Run through the engine's step API, adding prompt i at step arrive_at[i]; tokens per prompt, in order."""
    engine = llm.llm_engine
    done: dict[str, list[int]] = {}
    step, pending = 0, list(range(len(token_prompts)))
    while pending or engine.has_unfinished_requests():
        for i in [i for i in pending if arrive_at[i] <= step]:
            engine.add_request(str(i), {"prompt_token_ids": token_prompts[i]}, params)
            pending.remove(i)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
    return [done[str(i)] for i in range(len(token_prompts))]


def _count_preemptions(llm) -> list[int]:
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    counter = [0]
    original = scheduler._preempt_request

    def counting(*args, **kwargs):
        counter[0] += 1
        return original(*args, **kwargs)

    scheduler._preempt_request = counting
    return counter


def test_never_intervening_greedy_equals_plain_vllm(llm, plain):
    """44 tokens (a block crossed), a chunked 100-token prompt, staggered arrivals, and preemption."""
    from vsteer_hf.vllm import take_vfd_records

    token_prompts = [*prompts(), _long_prompt()]
    arrive_at = [0, 0, 3, 5, 9, 14, 2]
    preempted = _count_preemptions(llm)
    expected = _staggered(plain, token_prompts, _params(), arrive_at)
    llm.collective_rpc("vsteer_take_forward_counts")
    steered = _staggered(llm, token_prompts, _params(extra_args=NEVER), arrive_at)
    counts = llm.collective_rpc("vsteer_take_forward_counts")[0]
    assert steered == expected
    assert counts["skipped"] > 0 and counts["full"] > 0, counts  # both paths ran
    assert all(len(t) == LONG for t in steered)
    assert preempted[0] > 0, "the test needs the scheduler to preempt"
    records = llm.collective_rpc("vsteer_take_records")[0]
    assert len(records) == len(token_prompts)
    assert all(not any(r["interventions"]) for r in records.values())
    assert all(len(r["value_scores"]) == LONG for r in records.values())

    # the offline generate route too, with the per-request records in output order
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], _params(extra_args=NEVER), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == expected[: len(prompts())]
    assert [len(r["value_scores"]) for r in take_vfd_records(llm, outs)] == [LONG] * len(prompts())


def _transformers_vfd(threshold: float, max_new_tokens: int, sample_seed: int | None = None):
    """The eager transformers loop (every candidate forwarded, tree path), one prompt at a time."""
    model = enable_value_steer(tiny_model())
    steer = ValueSteerConfig(
        head=make_head(**STEERING_HEAD), threshold=threshold, num_candidates=K, candidate_forward="tree"
    )
    runs = []
    for ids in prompts():
        sampling = {"do_sample": False}
        if sample_seed is not None:
            torch.manual_seed(sample_seed)
            sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
        out = model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, value_steer=steer,
            return_dict_in_generate=True, **sampling,
        )
        runs.append((out.sequences[0, len(ids):].tolist(), out.value_scores[0].tolist(), out.interventions[0].tolist()))
    return runs


def _median_threshold(max_new_tokens: int) -> float:
    unsteered = _transformers_vfd(1.0, max_new_tokens)
    return float(torch.tensor([r for _, risks, _ in unsteered for r in risks]).median())


def _assert_matches(llm, outs, reference, lazy: bool):
    """Tokens, flags and risks equal the reference; a lazy engine forwarded the other K-1 candidates only
    for the tokens where candidate 0 was refused (at least every intervention), the eager one all K."""
    from vsteer_hf.vllm import take_vfd_records

    counts = llm.collective_rpc("vsteer_take_forward_counts")[0]
    assert any(any(flags) for _, _, flags in reference), "the test needs a head that intervenes"
    for out, record, (tokens, risks, flags) in zip(outs, take_vfd_records(llm, outs), reference, strict=True):
        assert list(out.outputs[0].token_ids) == tokens
        assert record["interventions"] == flags
        torch.testing.assert_close(torch.tensor(record["value_scores"]), torch.tensor(risks), atol=1e-4, rtol=1e-4)
    steered = sum(len(tokens) for tokens, _, _ in reference)
    interventions = sum(sum(flags) for _, _, flags in reference)
    assert counts["steered_tokens"] == steered
    if lazy:
        assert steered + (K - 1) * interventions <= counts["candidate_rows"] < K * steered, counts
    else:
        assert counts["candidate_rows"] == K * steered, counts


ENGINES = pytest.mark.parametrize("engine", ["llm", "eager"])


@ENGINES
def test_intervening_greedy_equals_transformers_step_by_step(request, engine):
    """Greedy candidates are the top-K tokens in order, so greedy steering does intervene."""
    llm = request.getfixturevalue(engine)
    llm.collective_rpc("vsteer_take_forward_counts")
    new = 20
    threshold = _median_threshold(new)
    reference = _transformers_vfd(threshold, new)
    prompt_list = [{"prompt_token_ids": p} for p in prompts()]
    outs = llm.generate(prompt_list, _params(new, extra_args={"vfd_threshold": threshold}), use_tqdm=False)
    _assert_matches(llm, outs, reference, lazy=engine == "llm")


@ENGINES
def test_seeded_sampling_equals_transformers_step_by_step(request, engine):
    """Each request's seeded generator draws its candidates as `torch.manual_seed(seed)` + generate at batch 1."""
    from vllm import SamplingParams

    llm = request.getfixturevalue(engine)
    llm.collective_rpc("vsteer_take_forward_counts")
    new, seed = 16, 123
    threshold = _median_threshold(new)
    reference = _transformers_vfd(threshold, new, sample_seed=seed)
    params = SamplingParams(
        temperature=1.0, top_k=0, top_p=1.0, seed=seed, max_tokens=new, ignore_eos=True,
        extra_args={"vfd_threshold": threshold},
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)
    _assert_matches(llm, outs, reference, lazy=engine == "llm")


def _capture_compute_logits_inputs(worker, on, captured):
    model = worker.model_runner.model
    if on:
        original = type(model).compute_logits

        def compute_logits(hidden_states, *args, **kwargs):
            captured.append(hidden_states.detach().clone())
            return original(model, hidden_states, *args, **kwargs)

        model.compute_logits = compute_logits
    else:
        del model.compute_logits


def test_winner_state_equals_plain_vllm_state(llm, plain):
    """Each committed token's candidate-pass state equals the one plain vLLM computes when it feeds that token.

    With one pass, the VFD engine's own next step reuses that state, so the reference is another engine.
    """
    captured: list[torch.Tensor] = []
    params = _params(36, extra_args=NEVER)
    plain.collective_rpc(_capture_compute_logits_inputs, args=(True, captured))
    try:
        expected = plain.generate([{"prompt_token_ids": prompts()[2]}], _params(36), use_tqdm=False)
    finally:
        plain.collective_rpc(_capture_compute_logits_inputs, args=(False, captured))
    llm.collective_rpc("vsteer_record_hidden", args=(True,))
    try:
        outs = llm.generate([{"prompt_token_ids": prompts()[2]}], params, use_tqdm=False)
        (record,) = llm.collective_rpc("vsteer_take_records")[0].values()
    finally:
        llm.collective_rpc("vsteer_record_hidden", args=(False,))
    assert list(outs[0].outputs[0].token_ids) == list(expected[0].outputs[0].token_ids)
    winners = record["hidden"]  # (T, H): state of committed token t
    next_pass = torch.cat(captured)[1:]  # plain step t+1 feeds token t
    assert winners.shape[0] == 36 and next_pass.shape[0] == 35
    torch.testing.assert_close(winners[:-1], next_pass, atol=1e-5, rtol=1e-5)


def test_one_pass_skips_every_pure_decode_forward(llm, plain):
    """Four requests arriving together (8 of the 9 KV blocks: no preemption): one full forward (the prefill),
    then every decode step reuses the candidate pass, crossing the 32-token block on the way; the tokens
    still equal plain vLLM's."""
    batch = [{"prompt_token_ids": p} for p in prompts()[:4]]
    llm.collective_rpc("vsteer_take_forward_counts")
    outs = llm.generate(batch, _params(LONG, extra_args=NEVER), use_tqdm=False)
    counts = llm.collective_rpc("vsteer_take_forward_counts")[0]
    llm.collective_rpc("vsteer_take_records")
    expected = plain.generate(batch, _params(LONG), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    # never refused: the lazy candidate pass forwarded candidate 0 alone, one row per token
    assert counts == {"skipped": LONG - 1, "full": 1, "candidate_rows": 4 * LONG, "steered_tokens": 4 * LONG}


@pytest.mark.parametrize(
    ("section", "engine", "message"),
    [
        ({"num_candidatez": 4}, {}, "unknown keys"),
        ({"num_candidates": 0}, {}, "num_candidates"),
        ({"wrong_hidden": True}, {}, "hidden size"),
        ({}, {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}},
         "speculative"),
    ],
)
def test_bad_config_fails_at_engine_start(model_folder, steering_head, tmp_path, section, engine, message):
    from vllm import LLM

    from vsteer_hf.vllm import VFD_WORKER

    vfd = {"value_head_path": str(steering_head), "threshold": 0.5, "num_candidates": K, **section}
    if vfd.pop("wrong_hidden", False):
        make_head_path = tmp_path / "head-32"
        from engine_helpers import helpers

        helpers.make_head(32).save_pretrained(make_head_path)
        vfd["value_head_path"] = str(make_head_path)
    kwargs = {**engine_kwargs(), "async_scheduling": False, **engine}
    with pytest.raises(Exception, match=message):
        LLM(model=str(model_folder), worker_cls=VFD_WORKER, additional_config={"vfd": vfd}, **kwargs)


@pytest.mark.parametrize(
    ("change", "uses_v2", "message"),
    [({}, True, "VLLM_USE_V2_MODEL_RUNNER=0"), ({"async_scheduling": True}, False, "async_scheduling=False")],
)
def test_engine_settings_vfd_cannot_honour_are_refused(change, uses_v2, message):
    """What CPU vLLM never produces (it forces async scheduling off; V2 needs Triton): the check itself."""
    from types import SimpleNamespace

    from vsteer_hf.vllm.worker import check_engine_supports_vfd

    config = SimpleNamespace(
        speculative_config=None,
        scheduler_config=SimpleNamespace(async_scheduling=change.get("async_scheduling", False)),
        parallel_config=SimpleNamespace(world_size=1),
    )
    check_engine_supports_vfd(SimpleNamespace(**{**vars(config), "scheduler_config": SimpleNamespace(
        async_scheduling=False)}), uses_v2_runner=False)
    with pytest.raises(ValueError, match=message):
        check_engine_supports_vfd(config, uses_v2_runner=uses_v2)


def test_an_engine_without_the_admission_check_fails_at_start(model_folder, steering_head):
    from vllm import LLM

    from vsteer_hf.vllm import VFD_WORKER

    vfd = {"value_head_path": str(steering_head), "threshold": 0.5, "num_candidates": K}
    with pytest.raises(Exception, match=re.escape("--logits-processors vsteer_hf.vllm.admission:VFDAdmissionCheck")):
        LLM(model=str(model_folder), worker_cls=VFD_WORKER, additional_config={"vfd": vfd},
            **{**engine_kwargs(), "async_scheduling": False})


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ({"repetition_penalty": 1.3}, "repetition_penalty=1.3"),
        ({"min_p": 0.1}, "min_p=0.1"),
        ({"logit_bias": {5: 2.0}}, "logit_bias"),
        ({"logprobs": 2}, "logprobs=2"),
        ({"min_tokens": 3}, "min_tokens=3"),
        ({"extra_args": {"vfd_threshold": 1.5}}, "outside"),
    ],
)
def test_requests_vfd_cannot_honour_are_refused_at_admission(llm, setting, named):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=4, temperature=1.0, seed=0, **setting)  # greedy resets min_p itself
    with pytest.raises(Exception, match=re.escape(named)):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
    # the engine still serves a request it can honour
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4, temperature=0.0),
                       use_tqdm=False)
    assert out[0].outputs[0].token_ids and out[0].outputs[0].finish_reason in ("stop", "length")


def test_unsupported_vfd_settings_lists_only_what_changed():
    from vllm import SamplingParams

    from vsteer_hf.vllm.admission import unsupported_vfd_settings

    assert unsupported_vfd_settings(SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=1)) == []
    found = unsupported_vfd_settings(SamplingParams(presence_penalty=0.5, bad_words=["x"]))
    assert found == ["presence_penalty=0.5", "bad_words=['x']"]
