"""VFD through the vLLM step loop against plain vLLM greedy and against the transformers VFD loop."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import NEW_TOKENS, close_engine, engine_kwargs, make_head, prompts, tiny_model

from vsteer_hf import ValueSteerConfig, enable_value_steer

K = 4
NEVER_HEAD = dict(bias=-50.0, scale=1.0, seed=1)  # risk ~ 0: never intervenes
STEERING_HEAD = dict(bias=0.0, scale=3.0, seed=7)


@pytest.fixture(scope="module")
def llm(model_folder, head_folder):
    from vsteer_hf.vllm import steered_llm

    vfd = {"value_head_path": str(head_folder(**NEVER_HEAD)), "threshold": 0.5, "num_candidates": K}
    engine = steered_llm(str(model_folder), vfd=vfd, **engine_kwargs())
    yield engine
    close_engine(engine)


def _token_prompts():
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=ids) for ids in prompts()]


def _greedy(**extra):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, **extra)


def test_never_intervening_head_reproduces_plain_greedy(llm):
    from vsteer_hf.vllm import stack_outputs, vfd_generate

    plain = llm.generate(_token_prompts(), _greedy(), use_tqdm=False)
    steered = vfd_generate(llm, _token_prompts(), _greedy())
    for p, s in zip(plain, steered, strict=True):
        assert s.token_ids == list(p.outputs[0].token_ids)
        assert s.text == p.outputs[0].text
        assert s.finish_reason == p.outputs[0].finish_reason
        assert not any(s.interventions)
        assert all(r < 1e-6 for r in s.value_scores)
    stacked = stack_outputs(steered)
    assert stacked["value_scores"].shape == stacked["interventions"].shape == (len(steered), NEW_TOKENS)


def _transformers_vfd(threshold: float):
    model = enable_value_steer(tiny_model())
    steer = ValueSteerConfig(head=make_head(**STEERING_HEAD), threshold=threshold, num_candidates=K)
    runs = []
    for ids in prompts():
        out = model.generate(
            input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS, value_steer=steer,
            return_dict_in_generate=True,
        )
        runs.append((out.sequences[0, len(ids):].tolist(), out.value_scores[0].tolist(), out.interventions[0].tolist()))
    return runs


def test_intervening_head_commits_the_transformers_tokens_step_by_step(llm, head_folder):
    from vsteer_hf.vllm import vfd_generate

    # Threshold: the median committed risk of an unsteered run, so candidate 0 is often refused.
    unsteered = _transformers_vfd(1.0)
    threshold = float(torch.tensor([r for _, risks, _ in unsteered for r in risks]).median())
    reference = _transformers_vfd(threshold)
    assert any(any(flags) for _, _, flags in reference), "the test needs a head that intervenes"

    llm.collective_rpc("vsteer_install_value_head", args=(str(head_folder(**STEERING_HEAD)),))
    try:
        steered = vfd_generate(llm, _token_prompts(), _greedy(extra_args={"vfd_threshold": threshold}))
    finally:
        llm.collective_rpc("vsteer_install_value_head")  # back to the engine's configured head
    for out, (tokens, risks, flags) in zip(steered, reference, strict=True):
        assert out.token_ids == tokens
        assert out.interventions == flags
        torch.testing.assert_close(torch.tensor(out.value_scores), torch.tensor(risks), atol=1e-4, rtol=1e-4)


def test_sampling_is_reproducible_with_a_seed(llm):
    from vllm import SamplingParams

    from vsteer_hf.vllm import vfd_generate

    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_tokens=6, seed=3)
    first = vfd_generate(llm, _token_prompts()[:2], params, trace_candidates=True)
    again = vfd_generate(llm, _token_prompts()[:2], params)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    for out in first:  # a never-intervening head commits candidate 0, and candidates are distinct tokens
        assert [c[0] for c in out.candidate_tokens] == out.token_ids
        assert all(len(set(c)) == K for c in out.candidate_tokens)


@pytest.mark.parametrize(
    ("setting", "message"),
    [({"logprobs": 2}, "logprobs"), ({"prompt_logprobs": 1}, "prompt logprobs"), ({"n": 2}, "n > 1"),
     ({"stop": ["w7"]}, "stop strings"), ({"repetition_penalty": 1.2}, "repetition_penalty")],
)
def test_settings_the_loop_cannot_honour_are_refused(llm, setting, message):
    from vllm import SamplingParams

    from vsteer_hf.vllm import vfd_generate

    with pytest.raises(ValueError, match=message):
        vfd_generate(llm, _token_prompts()[:1], SamplingParams(max_tokens=2, **setting))
