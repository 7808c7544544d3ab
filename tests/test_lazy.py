"""The lazy candidate path (`candidate_forward="lazy"`) against the eager paths it replaces.

Property tests over random heads, thresholds, K, padding, caches and seeds (lazy == eager tree, or expand
for sliding windows, token for token and risk for risk), and a token-oracle head that flags chosen tokens
exactly, for the promises about finality: a replaced EOS or stop string never ends a row and a streamer
never receives a replaced token.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import EOS, PAD, VOCAB, make_head, tiny_model, tiny_tokenizer
from transformers.generation.streamers import BaseStreamer

from vsteer_hf import ValueSteerConfig, enable_value_steer
from vsteer_hf.head import ValueHead

MODELS = {
    "llama": {},
    "gpt2": {},
    "qwen2": {},
    "mistral-window-4": {"sliding_window": 4},  # sliding-window layers: the eager reference is expand
}


@pytest.fixture(scope="module")
def models():
    built = {}
    for name, overrides in MODELS.items():
        family = name.split("-")[0]
        built[name] = enable_value_steer(tiny_model(family, **overrides))
    return built


def _eager_path(name: str) -> str:
    return "expand" if "window" in name else "tree"


def _run(model, ids, mask, steer, sample, seed, new_tokens, **kw):
    torch.manual_seed(seed)
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=sample,
        top_k=0,
        max_new_tokens=new_tokens,
        value_steer=steer,
        return_dict_in_generate=True,
        output_scores=True,
        **kw,
    )


def _assert_same(eager, lazy):
    assert torch.equal(lazy.sequences, eager.sequences)
    torch.testing.assert_close(lazy.value_scores, eager.value_scores, rtol=0, atol=1e-5, equal_nan=True)
    assert torch.equal(lazy.interventions, eager.interventions)
    for a, b in zip(eager.scores, lazy.scores, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert lazy.past_key_values.get_seq_length() == eager.past_key_values.get_seq_length()
    assert int(lazy.past_key_values.get_seq_length()) == lazy.sequences.shape[1] - 1


@st.composite
def _case(draw):
    name = draw(st.sampled_from(sorted(MODELS)))
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(2, 7))
    pads = [draw(st.integers(0, length - 1)) for _ in range(batch)]
    return {
        "name": name,
        "pads": pads,
        "length": length,
        "k": draw(st.integers(2, 6)),
        "threshold": draw(st.floats(0.05, 0.95)),
        "head_seed": draw(st.integers(0, 2**16)),
        "head_scale": draw(st.sampled_from([1.0, 3.0, 6.0])),
        "seed": draw(st.integers(0, 2**16)),
        "sample": draw(st.booleans()),
        "static": draw(st.booleans()),
        "eos": draw(st.booleans()),
    }


@settings(max_examples=40, deadline=None)
@given(_case())
def test_lazy_equals_the_eager_path_token_for_token_and_risk_for_risk(models, case):
    model = models[case["name"]]
    g = torch.Generator().manual_seed(case["seed"])
    batch, length = len(case["pads"]), case["length"]
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(case["pads"]):
        ids[b, :p], mask[b, :p] = PAD, 0
    head = make_head(model.config.get_text_config().hidden_size, scale=case["head_scale"], seed=case["head_seed"])
    kw = {"eos_token_id": EOS if case["eos"] else None}
    new_tokens = 6
    if case["static"]:
        if "window" in case["name"] and length + new_tokens > 4:
            new_tokens = 4 - length if length < 4 else 0  # a static window must not roll (refused up front)
            if new_tokens < 1:
                return
        kw["cache_implementation"] = "static"
    out = {}
    for path in (_eager_path(case["name"]), "lazy"):
        steer = ValueSteerConfig(
            head=head, threshold=case["threshold"], num_candidates=case["k"], candidate_forward=path
        )
        out[path] = _run(model, ids, mask, steer, case["sample"], case["seed"], new_tokens, **kw)
    _assert_same(out[_eager_path(case["name"])], out["lazy"])


def test_the_property_test_sees_interventions(models):
    """The property above means something only if its heads intervene: one fixed case that does."""
    model = models["llama"]
    ids = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    head = make_head(32, scale=3.0, seed=5)
    out = {
        path: _run(
            model,
            ids,
            mask,
            ValueSteerConfig(head=head, threshold=0.5, num_candidates=4, candidate_forward=path),
            True,
            0,
            8,
            eos_token_id=None,
        )
        for path in ("tree", "lazy")
    }
    _assert_same(out["tree"], out["lazy"])
    assert out["lazy"].interventions.any() and not out["lazy"].interventions.all()


def test_hidden_states_and_logits_outputs_equal_the_eager_path(models):
    model = models["llama"]
    ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
    head = make_head(32, scale=4.0)
    out = {}
    for path in ("tree", "lazy"):
        steer = ValueSteerConfig(
            head=head, threshold=0.5, num_candidates=4, candidate_forward=path, trace_features=True
        )
        out[path] = _run(
            model, ids, None, steer, False, 0, 6, eos_token_id=None, output_hidden_states=True, output_logits=True
        )
    _assert_same(out["tree"], out["lazy"])
    assert out["lazy"].interventions.any()
    torch.testing.assert_close(out["lazy"].features, out["tree"].features, rtol=1e-4, atol=1e-5)
    for a, b in zip(out["tree"].logits, out["lazy"].logits, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert len(out["lazy"].hidden_states) == len(out["tree"].hidden_states)
    for step_a, step_b in zip(out["tree"].hidden_states, out["lazy"].hidden_states, strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_abstention_with_lazy_is_the_ordinary_step(models):
    model = models["llama"]
    ids = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(2))
    head = make_head(32, scale=4.0)
    out = {}
    for path in ("tree", "lazy"):
        steer = ValueSteerConfig(head=head, threshold=0.6, mode="abstain", candidate_forward=path)
        out[path] = _run(model, ids, None, steer, True, 3, 8, eos_token_id=EOS)
    assert torch.equal(out["lazy"].sequences, out["tree"].sequences)
    assert torch.equal(out["lazy"].abstain_step, out["tree"].abstain_step)
    assert out["lazy"].abstained.any()


def test_never_intervening_lazy_reproduces_plain_generate_exactly(models):
    model = models["qwen2"]
    ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(4))
    steer = ValueSteerConfig(head=make_head(32, bias=-50.0), threshold=0.5, num_candidates=8, candidate_forward="lazy")
    for sample in (False, True):
        torch.manual_seed(9)
        plain = model.generate(
            input_ids=ids, do_sample=sample, top_k=0, max_new_tokens=8, return_dict_in_generate=True, output_scores=True
        )
        lazy = _run(model, ids, None, steer, sample, 9, 8)
        assert torch.equal(lazy.sequences, plain.sequences)
        for a, b in zip(plain.scores, lazy.scores, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)  # the same decode step, bit for bit


def test_auto_takes_lazy_on_cpu_for_first_safe_and_eager_otherwise(monkeypatch, models):
    import vsteer_hf.hf.decode as decode

    seen = []
    original = decode.choose_path

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(decode, "choose_path", spy)
    model = models["llama"]
    ids = torch.tensor([[5, 6, 7]])
    head = make_head(32)
    for steer in (
        ValueSteerConfig(head=head, threshold=0.5),
        ValueSteerConfig(head=head, threshold=0.5, rule="args"),
        ValueSteerConfig(head=head, threshold=0.5, trace_candidates=True),
        ValueSteerConfig(head=head, threshold=0.5, num_candidates=1),
    ):
        model.generate(ids, max_new_tokens=2, value_steer=steer)
    assert seen == ["lazy", "tree", "tree", "expand"]
    with pytest.raises(ValueError, match="candidate_forward='lazy' needs rule='first_safe'"):
        ValueSteerConfig(head=head, threshold=0.5, rule="args", candidate_forward="lazy")
    with pytest.raises(ValueError, match="cannot trace every candidate's risk"):
        ValueSteerConfig(head=head, threshold=0.5, trace_candidates=True, candidate_forward="lazy")


# --------------------------------------------------------------------------- finality: a token-oracle head
class _TokenOracle(ValueHead):
    """Risk 0.9 for states that fed a banned token, 0.1 otherwise: it reads the token ids the decoder's
    embedding last received (a hook), so it flags exactly the banned tokens on every candidate path."""

    def __init__(self, model, banned: set[int]):
        super().__init__(model.config.get_text_config().hidden_size)
        self.banned = torch.tensor(sorted(banned))
        self.last_ids: torch.Tensor | None = None
        self.handle = model.get_input_embeddings().register_forward_pre_hook(self._see)

    def _see(self, module, args):
        self.last_ids = args[0]

    def logit(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.last_ids is not None
        ids = self.last_ids.reshape(hidden.shape[:-1])
        bad = torch.isin(ids, self.banned.to(ids.device))
        return torch.where(bad, 2.1972, -2.1972).to(hidden.dtype)  # sigmoid: 0.9 / 0.1


def _greedy_tokens(model, ids, steps):
    return model.generate(input_ids=ids, do_sample=False, max_new_tokens=steps, eos_token_id=None)[0, ids.shape[1] :]


@pytest.mark.parametrize("path", ["tree", "lazy"])
def test_a_flagged_eos_never_ends_the_row(models, path):
    model = models["llama"]
    ids = torch.tensor([[5, 9, 14, 3]])
    natural = _greedy_tokens(model, ids, 6)
    eos = int(natural[2])  # the token plain greedy emits third: make it the EOS
    plain = model.generate(input_ids=ids, do_sample=False, max_new_tokens=6, eos_token_id=eos)
    assert plain.shape[1] == ids.shape[1] + 3 and int(plain[0, -1]) == eos, "plain generate must stop on it"
    oracle = _TokenOracle(model, {eos})
    try:
        out = model.generate(
            input_ids=ids,
            do_sample=False,
            max_new_tokens=6,
            eos_token_id=eos,
            value_steer=ValueSteerConfig(head=oracle, threshold=0.5, num_candidates=4, candidate_forward=path),
            return_dict_in_generate=True,
        )
    finally:
        oracle.handle.remove()
    generated = out.sequences[0, ids.shape[1] :]
    assert generated.shape[0] == 6, "the row went on past the replaced EOS"
    assert eos not in generated.tolist()
    assert torch.equal(generated[:2], natural[:2]) and bool(out.interventions[0, 2])


class _Collect(BaseStreamer):
    def __init__(self):
        self.tokens: list[int] = []

    def put(self, value):
        self.tokens += value.flatten().tolist()

    def end(self):
        pass


@pytest.mark.parametrize("path", ["tree", "lazy"])
def test_a_flagged_stop_string_never_ends_the_row_and_is_never_streamed(models, path):
    model = models["llama"]
    tok = tiny_tokenizer(rename={"w95": "abcdef"})  # stop-string matching probes the vocabulary with "abcdef"
    ids = torch.tensor([[5, 9, 14, 3]])
    natural = _greedy_tokens(model, ids, 6)
    word = tok.convert_ids_to_tokens(int(natural[1]))
    kw = dict(input_ids=ids, do_sample=False, max_new_tokens=6, eos_token_id=None, stop_strings=[word], tokenizer=tok)
    plain_stream = _Collect()
    plain = model.generate(**kw, streamer=plain_stream)
    assert plain.shape[1] == ids.shape[1] + 2, "plain generate must stop on the stop string"
    assert int(natural[1]) in plain_stream.tokens[ids.shape[1] :]
    oracle = _TokenOracle(model, {int(natural[1])})
    stream = _Collect()
    try:
        out = model.generate(
            **kw,
            streamer=stream,
            value_steer=ValueSteerConfig(head=oracle, threshold=0.5, num_candidates=4, candidate_forward=path),
        )
    finally:
        oracle.handle.remove()
    generated = out[0, ids.shape[1] :]
    assert generated.shape[0] == 6, "the row went on past the replaced stop string"
    assert int(natural[1]) not in stream.tokens[ids.shape[1] :], "the streamer received the rejected token"
    assert stream.tokens[ids.shape[1] :] == generated.tolist()
