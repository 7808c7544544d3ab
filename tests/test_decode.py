"""Value-steered generate against plain generate and against a brute-force reference."""

from __future__ import annotations

import pytest
import torch
from tiny_models import EOS, FAMILIES, PAD, batch_inputs, make_head, tiny_model
from transformers import StaticCache
from transformers.generation.streamers import BaseStreamer

from vsteer_hf import ValueSteerConfig, disable_value_steer, enable_value_steer, policy
from vsteer_hf.hf.candidates import CandidateForward

NEW_TOKENS = 8


def _generate(model, ids, mask, *, steer=None, sample=False, seed=0, **kw):
    torch.manual_seed(seed)
    extra = {"value_steer": steer} if steer is not None else {}
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=sample,
        max_new_tokens=NEW_TOKENS,
        return_dict_in_generate=True,
        output_scores=True,
        **({"top_k": 20} if sample else {}),
        **extra,
        **kw,
    )


def _assert_same_as_plain(model, ids, mask, steer, sample, **kw):
    plain = _generate(model, ids, mask, sample=sample, **kw)
    steered = _generate(model, ids, mask, steer=steer, sample=sample, **kw)
    assert torch.equal(plain.sequences, steered.sequences)
    assert len(plain.scores) == len(steered.scores)
    for a, b in zip(plain.scores, steered.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not steered.interventions.any()
    return steered


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("sample", [False, True])
@pytest.mark.parametrize("path", ["tree", "expand", "lazy"])
def test_never_intervening_head_reproduces_generate_across_models(family, attn, sample, path):
    model = enable_value_steer(tiny_model(family, attn))
    head = make_head(model.config.get_text_config().hidden_size, bias=-50.0)
    ids, mask = batch_inputs(3)
    steer = ValueSteerConfig(head=head, threshold=0.5, num_candidates=8, candidate_forward=path)
    _assert_same_as_plain(model, ids, mask, steer, sample)


@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("path", ["tree", "expand", "lazy"])
@pytest.mark.parametrize("sample", [False, True])
def test_never_intervening_head_reproduces_generate_settings(k, batch, static, path, sample):
    model = enable_value_steer(tiny_model("llama"))
    head = make_head(32, bias=-50.0)
    ids, mask = batch_inputs(batch)
    steer = ValueSteerConfig(head=head, threshold=0.5, num_candidates=k, candidate_forward=path)
    kw = {"cache_implementation": "static"} if static else {}
    out = _assert_same_as_plain(model, ids, mask, steer, sample, **kw)
    if static:
        assert isinstance(out.past_key_values, StaticCache)


def _reference_vfd(model, head, ids, mask, k, threshold, steps, sample, seed):
    """K separate full forwards per step, no cache: the definition VFD must match."""
    torch.manual_seed(seed)
    ids, mask = ids.clone(), mask.clone()
    committed = []
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        if sample:
            probs = torch.softmax(logits, -1)
            cands = policy.sample_candidates(probs, k)
        else:
            cands = policy.top_candidates(logits, k)
        risks = torch.empty(cands.shape)
        for j in range(k):
            ext_ids = torch.cat([ids, cands[:, j : j + 1]], -1)
            ext_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
            ext_pos = (ext_mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ext_ids, attention_mask=ext_mask, position_ids=ext_pos, output_hidden_states=True)
            risks[:, j] = head.p(out.hidden_states[-1][:, -1])
        thr = torch.full((ids.shape[0],), threshold)
        win = policy.select_candidates(risks, thr)
        tok = cands.gather(1, win[:, None])
        committed.append(tok)
        ids = torch.cat([ids, tok], -1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
    return torch.cat(committed, -1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("path", ["tree", "expand", "lazy"])
@pytest.mark.parametrize("sample", [False, True])
def test_intervening_head_matches_brute_force_reference(family, path, sample):
    model = enable_value_steer(tiny_model(family))
    hidden = model.config.get_text_config().hidden_size
    head = make_head(hidden, scale=4.0)
    ids, mask = batch_inputs(3)
    threshold = 0.5
    steer = ValueSteerConfig(head=head, threshold=threshold, num_candidates=4, candidate_forward=path)
    torch.manual_seed(0)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=sample,
        top_k=0,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        value_steer=steer,
        return_dict_in_generate=True,
    )
    expected = _reference_vfd(model, head, ids, mask, 4, threshold, NEW_TOKENS, sample, seed=0)
    assert torch.equal(out.sequences[:, ids.shape[1] :], expected)
    assert out.interventions.any(), "the head should intervene at least once for this test to mean anything"


@pytest.mark.parametrize("path", ["tree", "expand"])
@pytest.mark.parametrize("static", [False, True])
def test_candidate_hidden_states_equal_plain_decode(path, static):
    model = tiny_model("llama")
    ids, mask = batch_inputs(3)
    k = 5
    cache = StaticCache(config=model.config, max_cache_len=32) if static else None
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    fwd = CandidateForward(model.get_decoder(), out.past_key_values, path, k, 3, torch.float32)
    if path == "expand":
        fwd.expand_cache()
    cands = torch.randint(3, 90, (3, k), generator=torch.Generator().manual_seed(5))
    hidden, _ = fwd.forward(cands, mask)
    for j in range(k):
        ext_ids = torch.cat([ids, cands[:, j : j + 1]], -1)
        ext_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
        ext_pos = (ext_mask.cumsum(-1) - 1).clamp(min=0)
        ref = model(input_ids=ext_ids, attention_mask=ext_mask, position_ids=ext_pos, output_hidden_states=True)
        torch.testing.assert_close(hidden[:, j], ref.hidden_states[-1][:, -1], atol=1e-4, rtol=1e-4)


def test_continuing_from_returned_cache_matches_plain_generate():
    model = enable_value_steer(tiny_model("llama"))
    head = make_head(32, scale=4.0)
    ids, mask = batch_inputs(2)
    steer = ValueSteerConfig(head=head, threshold=0.5, num_candidates=4)
    first = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        eos_token_id=None,
        value_steer=steer,
        return_dict_in_generate=True,
    )
    seq = first.sequences
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], -1)
    assert first.past_key_values.get_seq_length() == seq.shape[1] - 1
    cont = model.generate(
        input_ids=seq,
        attention_mask=full_mask,
        past_key_values=first.past_key_values,
        max_new_tokens=4,
        eos_token_id=None,
    )
    fresh = model.generate(input_ids=seq, attention_mask=full_mask, max_new_tokens=4, eos_token_id=None)
    assert torch.equal(cont, fresh)


def test_outputs_shapes_and_trace():
    model = enable_value_steer(tiny_model("llama"))
    head = make_head(32, scale=4.0)
    ids, mask = batch_inputs(3)
    steer = ValueSteerConfig(head=head, threshold=[0.2, 0.5, 0.9], num_candidates=4, trace_candidates=True)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=6,
        eos_token_id=None,
        value_steer=steer,
        return_dict_in_generate=True,
    )
    assert out.value_scores.shape == (3, 6)
    assert out.interventions.shape == (3, 6)
    assert out.candidate_tokens.shape == out.candidate_risks.shape == (3, 6, 4)
    assert torch.equal(out.thresholds, torch.tensor([0.2, 0.5, 0.9]))
    generated = out.sequences[:, ids.shape[1] :]
    # the committed token is one of the candidates and its risk is the reported one
    hit = out.candidate_tokens == generated[..., None]
    assert hit.any(-1).all()
    # an intervention is exactly "committed differs from candidate 0"
    assert torch.equal(out.interventions, generated != out.candidate_tokens[..., 0])


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_receives_prompt_then_every_committed_token():
    model = enable_value_steer(tiny_model("llama"))
    ids, mask = batch_inputs(1)
    streamer = _Collect()
    steer = ValueSteerConfig(head=make_head(32, scale=4.0), threshold=0.5, num_candidates=4)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        eos_token_id=None,
        value_steer=steer,
        streamer=streamer,
    )
    assert streamer.ended
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks[1:]])
    assert torch.equal(streamed, out[0, ids.shape[1] :])


def test_eos_stops_rows_and_pads_the_rest():
    model = enable_value_steer(tiny_model("llama"))
    ids, mask = batch_inputs(3)
    steer = ValueSteerConfig(head=make_head(32, bias=-50.0), threshold=0.5, num_candidates=4)
    # make EOS the natural greedy choice after two tokens by biasing the lm_head
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[EOS, 7, 11, 13])
    steered = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=6,
        eos_token_id=[EOS, 7, 11, 13],
        value_steer=steer,
        return_dict_in_generate=True,
    )
    assert torch.equal(plain, steered.sequences)
    finished_early = (steered.sequences[:, ids.shape[1] :] == PAD).any(-1)
    if finished_early.any():
        assert torch.isnan(steered.value_scores[finished_early]).any()


def test_abstention_ends_exactly_the_rows_that_crossed():
    model = enable_value_steer(tiny_model("llama"))
    head = make_head(32, scale=4.0)
    ids, mask = batch_inputs(4)
    probe = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=EOS,
        value_steer=ValueSteerConfig(head=head, threshold=1.0, mode="abstain"),
        return_dict_in_generate=True,
    )
    assert not probe.abstained.any()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    prompt_state = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    prompt_risk = head.p(prompt_state.hidden_states[-1][:, -1])  # decides generated token 0
    # decision states: the prompt's last token, then generated tokens 0..T-2 (token t decides t+1)
    deciding = torch.cat([prompt_risk[:, None], probe.value_scores[:, :-1]], dim=1)  # (B, T)
    row_max = deciding.max(dim=1).values.sort().values
    threshold = float((row_max[1] + row_max[2]) / 2)  # two rows cross, two never do
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=EOS,
        value_steer=ValueSteerConfig(head=head, threshold=threshold, mode="abstain"),
        return_dict_in_generate=True,
    )
    prompt_len = ids.shape[1]
    for row in range(4):
        crossings = (deciding[row] > threshold).nonzero().flatten().tolist()
        expected_step = crossings[0] if crossings else -1
        assert int(out.abstain_step[row]) == expected_step, (row, deciding[row].tolist(), threshold)
        assert bool(out.abstained[row]) == (expected_step != -1)
        gen = out.sequences[row, prompt_len:]
        if expected_step != -1:
            assert int(gen[expected_step]) == EOS
            assert torch.equal(gen[:expected_step], probe.sequences[row, prompt_len : prompt_len + expected_step])
        else:
            assert torch.equal(gen, probe.sequences[row, prompt_len:])
    assert int(out.abstained.sum()) == 2


def test_abstention_on_the_prompt_state_ends_before_the_first_token():
    model = enable_value_steer(tiny_model("llama"))
    ids, mask = batch_inputs(2)
    steer = ValueSteerConfig(head=make_head(32, bias=50.0), threshold=0.5, mode="abstain")
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        eos_token_id=EOS,
        value_steer=steer,
        return_dict_in_generate=True,
    )
    assert out.abstained.all()
    assert (out.abstain_step == 0).all()
    assert (out.sequences[:, ids.shape[1]] == EOS).all()


def test_unsupported_modes_fail_clearly():
    model = enable_value_steer(tiny_model("llama"))
    ids, mask = batch_inputs(1)
    steer = ValueSteerConfig(head=make_head(32), threshold=0.5)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(input_ids=ids, attention_mask=mask, num_beams=2, max_new_tokens=3, value_steer=steer)
    with pytest.raises(ValueError, match="assisted"):
        model.generate(input_ids=ids, attention_mask=mask, assistant_model=model, max_new_tokens=3, value_steer=steer)
    with pytest.raises(ValueError, match="output_attentions"):
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            output_attentions=True,
            return_dict_in_generate=True,
            max_new_tokens=3,
            value_steer=steer,
        )
    with pytest.raises(TypeError, match="ValueSteerConfig"):
        model.generate(input_ids=ids, max_new_tokens=3, value_steer={"threshold": 0.3})


def test_head_hidden_size_mismatch_names_both_sizes():
    model = enable_value_steer(tiny_model("llama"))
    ids, mask = batch_inputs(1)
    steer = ValueSteerConfig(head=make_head(16), threshold=0.5)
    with pytest.raises(ValueError, match=r"16.*32|32.*16"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, value_steer=steer)


def test_enable_is_in_place_reversible_and_keeps_architecture(tmp_path):
    model = tiny_model("llama")
    original = type(model)
    same = enable_value_steer(model)
    assert same is model and type(model).__name__ == original.__name__
    with pytest.warns(UserWarning, match="already enabled"):
        enable_value_steer(model)
    model.save_pretrained(tmp_path)
    assert '"LlamaForCausalLM"' in (tmp_path / "config.json").read_text()
    disable_value_steer(model)
    assert type(model) is original
    with pytest.raises(ValueError, match="model_kwargs"):
        model.generate(
            input_ids=torch.tensor([[5, 6]]),
            max_new_tokens=2,
            value_steer=ValueSteerConfig(head=make_head(32), threshold=0.5),
        )


def test_sliding_window_model_uses_expand_and_still_matches_plain_generate():
    model = enable_value_steer(tiny_model("mistral", sliding_window=4))
    head = make_head(32, bias=-50.0)
    ids, mask = batch_inputs(2)
    steer = ValueSteerConfig(head=head, threshold=0.5, num_candidates=4)
    _assert_same_as_plain(model, ids, mask, steer, sample=False)
    with pytest.raises(ValueError, match="sliding window"):
        _generate(model, ids, mask, steer=ValueSteerConfig(head=head, threshold=0.5, candidate_forward="tree"))


@pytest.mark.parametrize("sample", [False, True])
def test_abstention_processor_on_stock_generate_matches_the_steered_loop(sample):
    from vsteer_hf.hf.abstain import ValueAbstentionProcessor

    model = enable_value_steer(tiny_model("llama"))
    head = make_head(32, scale=4.0)
    ids, mask = batch_inputs(4)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=EOS, do_sample=sample)
    torch.manual_seed(0)
    probe = model.generate(
        **kw,
        value_steer=ValueSteerConfig(head=head, threshold=1.0, mode="abstain"),
        return_dict_in_generate=True,
    )
    threshold = float(probe.value_scores[:, :-1].nan_to_num(0).max(dim=1).values.median())
    torch.manual_seed(0)
    steered = model.generate(
        **kw,
        value_steer=ValueSteerConfig(head=head, threshold=threshold, mode="abstain"),
        return_dict_in_generate=True,
    )
    plain_model = disable_value_steer(model)
    with ValueAbstentionProcessor(plain_model, head, threshold) as processor:
        torch.manual_seed(0)
        stock = plain_model.generate(**kw, logits_processor=[processor])
    assert torch.equal(stock, steered.sequences)
    assert torch.equal(processor.abstained, steered.abstained)
    assert torch.equal(processor.abstain_step, steered.abstain_step)
    assert steered.abstained.any()


def test_custom_generate_callable_matches_enabled_model():
    from vsteer_hf.hf.custom_generate import steered_generate

    model = tiny_model("llama")
    head = make_head(32, scale=4.0)
    ids, mask = batch_inputs(3)
    steer = ValueSteerConfig(head=head, threshold=0.5, num_candidates=4)
    via_custom = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=6,
        eos_token_id=None,
        custom_generate=steered_generate,
        value_steer=steer,
        return_dict_in_generate=True,
    )
    enabled = enable_value_steer(model)
    via_enable = enabled.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=6,
        eos_token_id=None,
        value_steer=steer,
        return_dict_in_generate=True,
    )
    assert torch.equal(via_custom.sequences, via_enable.sequences)
    assert torch.equal(via_custom.interventions, via_enable.interventions)
    assert via_enable.interventions.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_traced_features_are_exactly_what_the_head_scored(dtype):
    model = enable_value_steer(tiny_model("llama").to(dtype))
    head = make_head(32, scale=4.0)
    ids, mask = batch_inputs(3)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=6,
        eos_token_id=None,
        return_dict_in_generate=True,
        value_steer=ValueSteerConfig(head=head, threshold=0.5, num_candidates=4, trace_features=True),
    )
    assert out.features.shape == (3, 6, 32) and out.features.dtype == torch.float32
    torch.testing.assert_close(head.p(out.features), out.value_scores, atol=1e-6, rtol=1e-5)


def test_sliding_window_cache_past_the_window_can_be_continued():
    model = enable_value_steer(tiny_model("mistral", sliding_window=4))
    head = make_head(32, scale=4.0)
    ids, mask = batch_inputs(2)
    first = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        eos_token_id=None,
        return_dict_in_generate=True,
        value_steer=ValueSteerConfig(head=head, threshold=0.5, num_candidates=4),
    )
    assert first.interventions.any()
    seq = first.sequences
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], -1)
    cont = model.generate(
        input_ids=seq,
        attention_mask=full_mask,
        past_key_values=first.past_key_values,
        max_new_tokens=4,
        eos_token_id=None,
    )
    fresh = model.generate(input_ids=seq, attention_mask=full_mask, max_new_tokens=4, eos_token_id=None)
    assert torch.equal(cont, fresh)


def test_review_regressions_hidden_states_positional_config_and_tensor_thresholds():
    from transformers import GenerationConfig

    model = enable_value_steer(tiny_model("llama"))
    ids, mask = batch_inputs(2)
    head = make_head(32, bias=-50.0)
    kw = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=4,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_hidden_states=True,
    )
    plain = model.generate(**kw)
    steered = model.generate(**kw, value_steer=ValueSteerConfig(head=head, threshold=torch.tensor([0.4, 0.6])))
    assert len(steered.hidden_states) == len(plain.hidden_states) == 4
    assert torch.equal(steered.thresholds, torch.tensor([0.4, 0.6]))
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(
            ids, GenerationConfig(num_beams=2, max_new_tokens=2), value_steer=ValueSteerConfig(head=head, threshold=0.5)
        )
    with pytest.raises(ValueError, match="threshold must be a number"):
        ValueSteerConfig(head=head, threshold="high")


def test_unpadded_batch_without_attention_mask_matches_plain_generate():
    model = enable_value_steer(tiny_model("llama"))
    ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(1))
    head = make_head(32, bias=-50.0)
    for path in ("tree", "expand"):
        plain = model.generate(input_ids=ids, max_new_tokens=5, eos_token_id=None)
        steered = model.generate(
            input_ids=ids,
            max_new_tokens=5,
            eos_token_id=None,
            value_steer=ValueSteerConfig(head=head, threshold=0.5, num_candidates=2, candidate_forward=path),
        )
        assert torch.equal(plain, steered)


def test_abstention_processor_resets_for_a_longer_prompt():
    from vsteer_hf.hf.abstain import ValueAbstentionProcessor

    model = tiny_model("llama")
    head = make_head(32, bias=50.0)
    with ValueAbstentionProcessor(model, head, 0.5) as processor:
        short, _ = batch_inputs(2, length=4)
        model.generate(input_ids=short, max_new_tokens=3, eos_token_id=EOS, logits_processor=[processor])
        long, _ = batch_inputs(3, length=9)
        out = model.generate(input_ids=long, max_new_tokens=3, eos_token_id=EOS, logits_processor=[processor])
    assert processor.abstained.shape == (3,) and processor.abstained.all()
    assert (processor.abstain_step == 0).all() and (out[:, 9] == EOS).all()


def test_direction_comes_from_the_head_card_and_vfd_refuses_a_value_head():
    model = enable_value_steer(tiny_model("llama"))
    ids, mask = batch_inputs(2)
    head = make_head(32, bias=-50.0)  # risk ~ 0: a "value" that is always low
    head.card.risk_direction = "below"
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=3,
        eos_token_id=EOS,
        return_dict_in_generate=True,
        value_steer=ValueSteerConfig(head=head, threshold=0.5, mode="abstain"),
    )
    assert out.abstained.all() and (out.abstain_step == 0).all()  # the card's "below" was used
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=3,
        eos_token_id=EOS,
        return_dict_in_generate=True,
        value_steer=ValueSteerConfig(head=head, threshold=0.5, mode="abstain", direction="above"),
    )
    assert not out.abstained.any()  # an explicit direction wins
    with pytest.raises(ValueError, match="P\\(undesirable\\)"):
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=3, value_steer=ValueSteerConfig(head=head, threshold=0.5)
        )
