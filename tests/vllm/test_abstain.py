"""Abstention inside vLLM ends exactly the rows, at exactly the steps, that the transformers path ends."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import NEW_TOKENS, close_engine, engine_kwargs, make_head, prompts, tiny_model

from vsteer_hf import ValueSteerConfig, enable_value_steer

HEAD = dict(bias=0.0, scale=3.0, seed=7)
NEVER = 0.999999  # engine default: a sigmoid risk of this head never reaches it


def _transformers_runs(threshold: float):
    """Per prompt: generated tokens (EOS included), abstained flag and step, and per-token risks."""
    model = enable_value_steer(tiny_model())
    steer = ValueSteerConfig(head=make_head(**HEAD), threshold=threshold, mode="abstain")
    runs = []
    for ids in prompts():
        out = model.generate(
            input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS, value_steer=steer,
            return_dict_in_generate=True,
        )
        runs.append(
            {
                "tokens": out.sequences[0, len(ids):].tolist(),
                "abstained": bool(out.abstained[0]),
                "step": int(out.abstain_step[0]),
                "risks": out.value_scores[0].tolist(),
            }
        )
    return runs


def _separating_threshold(row_peaks: list[float]) -> float:
    """The midpoint of the widest gap between the rows' peak risks: rows above it cross, no peak sits near it."""
    values = sorted(row_peaks)
    gaps = [(values[i + 1] - values[i], i) for i in range(len(values) - 1)]
    _, i = max(gaps)
    return (values[i] + values[i + 1]) / 2


@pytest.fixture(scope="module")
def reference():
    plain = _transformers_runs(NEVER)
    # A committed token's risk decides the next token, so the last one decides nothing.
    threshold = _separating_threshold([max(run["risks"][:-1]) for run in plain])
    runs = _transformers_runs(threshold)
    ended = sum(run["abstained"] for run in runs)
    assert 0 < ended < len(runs), "the test needs some rows that abstain and some that do not"
    return threshold, runs


@pytest.fixture(scope="module")
def extension_llm(model_folder, head_folder):
    from vsteer_hf.vllm import steered_llm

    llm = steered_llm(
        str(model_folder), abstain={"value_head_path": str(head_folder(**HEAD)), "threshold": NEVER}, **engine_kwargs()
    )
    yield llm
    close_engine(llm)


def _engine_tokens(llm, threshold: float | None):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    extra = None if threshold is None else {"abstain_threshold": threshold}
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, extra_args=extra)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts()], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _assert_same_rows_end(engine_tokens, runs):
    for engine, run in zip(engine_tokens, runs, strict=True):
        assert engine == run["tokens"]
        if run["abstained"]:  # the forced EOS sits at the step the transformers path reports
            assert engine[run["step"]] == 2 and len(engine) == run["step"] + 1


def test_worker_extension_abstains_like_transformers(extension_llm, reference):
    threshold, runs = reference
    _assert_same_rows_end(_engine_tokens(extension_llm, threshold), runs)


def test_engine_default_threshold_applies_without_extra_args(extension_llm):
    never = _transformers_runs(NEVER)
    assert not any(run["abstained"] for run in never)
    _assert_same_rows_end(_engine_tokens(extension_llm, None), never)


def test_bad_request_threshold_is_refused_at_admission(extension_llm):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="abstain_threshold"):
        extension_llm.generate([{"prompt_token_ids": [1, 5]}], SamplingParams(extra_args={"abstain_threshold": 1.5}))


def test_plugin_architecture_abstains_like_transformers(model_folder, head_folder, reference, extension_llm):
    """`vllm serve` route: the `ValueSteer<Arch>` class registered by the general plugin entry point."""
    from vllm import LLM

    from vsteer_hf.vllm import LOGITS_PROCESSORS

    threshold, runs = reference
    llm = LLM(
        model=str(model_folder),
        hf_overrides={"architectures": ["ValueSteerLlamaForCausalLM"]},
        logits_processors=list(LOGITS_PROCESSORS),  # not an entry point: V2's loader refuses V1 classes
        additional_config={"abstain": {"value_head_path": str(head_folder(**HEAD)), "threshold": threshold}},
        **engine_kwargs(),
    )
    try:
        _assert_same_rows_end(_engine_tokens(llm, None), runs)
    finally:
        close_engine(llm)
