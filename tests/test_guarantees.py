"""What value steering guarantees, one test per promise (README: "What is guaranteed").

Bad settings and input fail with messages that name the fix; NaN never decides a token; the
candidate mask is the brute-force one for any padding; long runs do not grow memory; threads do
not share state; the same seed gives the same text on both candidate paths.
"""

from __future__ import annotations

import gc
import os
import sys
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import PAD, VOCAB, batch_inputs, make_head, tiny_model, tiny_tokenizer

from vsteer_hf import ValueSteerConfig, enable_value_steer
from vsteer_hf.head import HeadCard, ValueHead
from vsteer_hf.hf.candidates import CandidateForward, next_positions, tree_attention_mask


def steered(**overrides):
    return enable_value_steer(tiny_model("llama", **overrides))


def cfg(head, **kw):
    kw.setdefault("threshold", 0.5)
    return ValueSteerConfig(head=head, **kw)


# --------------------------------------------------------------------------- bad settings: messages
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_candidates": 0}, r"num_candidates must be an integer >= 1, got 0"),
        ({"num_candidates": -3}, r"num_candidates must be an integer >= 1, got -3"),
        ({"threshold": 1.5}, r"threshold\[0\] = 1\.5 is not a finite value in \[0, 1\]"),
        ({"threshold": -0.1}, r"threshold\[0\] = -0\.1 is not a finite value in \[0, 1\]"),
        ({"threshold": float("nan")}, r"threshold\[0\] = nan is not a finite value in \[0, 1\]"),
        ({"threshold": None, "alpha": 1.2}, r"alpha must lie in \(0, 1\), got 1\.2"),
    ],
)
def test_bad_settings_name_the_problem(kwargs, message):
    kwargs.setdefault("threshold", 0.5)
    with pytest.raises(ValueError, match=message):
        ValueSteerConfig(head=make_head(32), **kwargs)


def test_alpha_between_grid_points_interpolates_and_outside_the_curve_is_refused():
    card = HeadCard(curve={0.1: 0.8, 0.3: 0.4})
    head = ValueHead(32, card)
    assert ValueSteerConfig(head=head, alpha=0.2).thresholds(head, 1, "cpu").item() == pytest.approx(0.6)
    with pytest.raises(ValueError, match=r"alpha=0\.5 is outside the calibrated range \[0\.1, 0\.3\]"):
        ValueSteerConfig(head=head, alpha=0.5).thresholds(head, 1, "cpu")
    bare = ValueHead(32)
    with pytest.raises(ValueError, match="has no conformal ĉ\\(α\\) curve; pass threshold= explicitly"):
        ValueSteerConfig(head=bare, alpha=0.1).thresholds(bare, 1, "cpu")


def test_head_hidden_size_mismatch_names_both_sizes():
    model = steered()
    with pytest.raises(ValueError, match="value head expects hidden size 48 but the backbone has 32"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, value_steer=cfg(make_head(48)))


def test_k_larger_than_the_tokens_left_after_top_k_repeats_the_natural_sample():
    """top_k=2 leaves two tokens: K=8 candidates hold those two (extra columns repeat candidate 0),
    so VFD can only choose between them; every committed token is one of the row's candidates."""
    model = steered()
    ids, mask = batch_inputs(3)
    torch.manual_seed(0)
    out = model.generate(
        ids,
        attention_mask=mask,
        do_sample=True,
        top_k=2,
        max_new_tokens=6,
        value_steer=cfg(make_head(32, scale=3.0), num_candidates=8, trace_candidates=True),
        return_dict_in_generate=True,
    )
    cands = out.candidate_tokens  # (B, T, K)
    committed = out.sequences[:, ids.shape[1] :]
    for b in range(3):
        for t in range(cands.shape[1]):
            row = cands[b, t].tolist()
            assert len(set(row)) <= 2
            assert row[2:] == [row[0]] * 6 or len(set(row)) == 1
            assert committed[b, t].item() in row


# --------------------------------------------------------------------------- bad input: messages
def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="the prompt is empty: value steering needs at least one token"):
        steered().generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2, value_steer=cfg(make_head(32)))


def test_a_batch_row_that_is_all_padding_is_refused():
    ids, mask = batch_inputs(3)
    mask[2] = 0
    with pytest.raises(ValueError, match=r"prompt row\(s\) \[2\] of the batch are all padding"):
        steered().generate(ids, attention_mask=mask, max_new_tokens=2, value_steer=cfg(make_head(32)))


def test_prompt_beyond_the_models_positions_is_refused():
    model = steered()
    long = torch.randint(3, VOCAB, (1, 300))
    with pytest.raises(ValueError, match=r"a prompt has 300 tokens but the model handles at most 256 positions"):
        model.generate(long, max_new_tokens=2, value_steer=cfg(make_head(32)))
    near = torch.randint(3, VOCAB, (1, 250))
    with pytest.raises(ValueError, match=r"plus max_new_tokens=10 runs past .* lower max_new_tokens to 6"):
        model.generate(near, max_new_tokens=10, value_steer=cfg(make_head(32)))
    out = model.generate(near, min_new_tokens=6, max_new_tokens=6, value_steer=cfg(make_head(32)))
    assert out.shape == (1, 256)


def test_no_pad_token_pads_finished_rows_with_eos_like_generate():
    """generate falls back to EOS for padding; the steered loop gets the same fallback."""
    model = steered()
    model.generation_config.pad_token_id = None
    ids, mask = batch_inputs(3)
    never = cfg(make_head(32, bias=-50.0))
    plain = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, value_steer=never)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)


def test_extraction_without_a_pad_token_names_the_fix(tmp_path):
    from vsteer_hf.train.extract import extract_features

    tok = tiny_tokenizer()
    tok.padding_side = "left"
    tok.pad_token = None
    with pytest.raises(ValueError, match=r"the tokenizer has no pad token; set tokenizer\.pad_token"):
        extract_features(tiny_model(), tok, [], tmp_path / "features")


class _NaNAfter(ValueHead):
    """Scores normally for `good` calls, then returns NaN: a head that breaks mid-generation."""

    def __init__(self, hidden_size: int, good: int):
        super().__init__(hidden_size)
        self.good, self.calls = good, 0

    def logit(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = super().logit(hidden)
        return out if self.calls <= self.good else torch.full_like(out, float("nan"))


@pytest.mark.parametrize(
    ("path", "bias", "good", "failing_step"),
    [
        ("tree", 0.0, 2, 2),  # one head call per step: steps 0 and 1 commit, step 2 is NaN
        ("lazy", -50.0, 2, 2),  # candidate 0 always safe: one call per step as well
        ("lazy", 50.0, 3, 1),  # always flagged: two calls per step, the NaN comes in step 1's alternatives
    ],
)
def test_nan_risk_names_the_step_and_commits_nothing(path, bias, good, failing_step):
    from transformers.generation.streamers import BaseStreamer

    class Record(BaseStreamer):
        def __init__(self):
            self.tokens: list[int] = []

        def put(self, value):
            self.tokens += value.flatten().tolist()

        def end(self):
            pass

    model = steered()
    head = _NaNAfter(32, good=good)
    with torch.no_grad():
        head[4].bias.fill_(bias)
    streamer = Record()
    prompt = torch.tensor([[5, 6, 7]])
    message = f"NaN or infinite risk at generation step {failing_step}; refusing to commit"
    with pytest.raises(FloatingPointError, match=message):
        model.generate(
            prompt,
            min_new_tokens=6,
            max_new_tokens=6,
            value_steer=cfg(head, candidate_forward=path),
            streamer=streamer,
        )
    assert len(streamer.tokens) == 3 + failing_step, "a token was committed on a NaN risk"


def test_nan_risk_on_the_prompt_state_stops_abstention_before_the_first_token():
    model = steered()
    head = _NaNAfter(32, good=0)
    with pytest.raises(FloatingPointError, match="NaN or infinite risk at the last prompt token"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=3, value_steer=cfg(head, mode="abstain"))


def test_head_on_another_device_is_placed_where_the_final_norm_runs_without_moving_it(monkeypatch):
    """The head is copied to the device of the hidden state `lm_head` consumes (`device_map="auto"`
    can put it anywhere); the caller's module stays where it was."""
    seen: list[torch.device] = []
    original = ValueHead.placed

    def spy(self, device):
        seen.append(torch.device(device))
        return original(self, device)

    monkeypatch.setattr(ValueHead, "placed", spy)
    head = make_head(32)
    steered().generate(torch.tensor([[5, 6]]), max_new_tokens=2, value_steer=cfg(head))
    assert seen == [torch.device("cpu")]
    meta_copy = head.placed("meta")  # the copy path, on the one other device a CPU machine has
    assert meta_copy[0].weight.is_meta and not head[0].weight.is_meta


# --------------------------------------------------------------------------- the candidate mask, brute force
@st.composite
def _padding(draw):
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 9))
    rows = [draw(st.lists(st.booleans(), min_size=length, max_size=length)) for _ in range(batch)]
    k = draw(st.integers(1, 6))
    spare = draw(st.integers(0, 5))
    return torch.tensor(rows, dtype=torch.long), k, length + k + spare


@settings(max_examples=200, deadline=None)
@given(_padding())
def test_tree_mask_and_positions_equal_a_brute_force_construction(data):
    prefix_mask, k, kv_length = data
    batch, length = prefix_mask.shape
    mask = tree_attention_mask(prefix_mask, k, kv_length, torch.float32)
    assert mask.shape == (batch, 1, k, kv_length)
    low = torch.finfo(torch.float32).min
    for b in range(batch):
        for row in range(k):
            for col in range(kv_length):
                sees = (col < length and prefix_mask[b, col] == 1) or col == length + row
                assert mask[b, 0, row, col].item() == (0.0 if sees else low)
    # generate's own rule for the next token: cumsum(mask) - 1 over the prefix plus the new token
    extended = torch.cat([prefix_mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
    expected = (extended.cumsum(-1) - 1)[:, -1]
    assert next_positions(prefix_mask).tolist() == expected.tolist()


@st.composite
def _left_padding(draw):
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(2, 7))
    pads = [draw(st.integers(0, length - 1)) for _ in range(batch)]
    return length, pads, draw(st.integers(1, 5)), draw(st.integers(0, 2**16))


@pytest.fixture(scope="module")
def llama_module():
    return tiny_model("llama")


@settings(max_examples=15, deadline=None)
@given(_left_padding())
def test_tree_candidates_see_what_a_plain_forward_of_each_candidate_sees(llama_module, data):
    """For random left padding and K, each tree row's hidden state is the plain decode of that candidate."""
    from transformers import DynamicCache

    model = llama_module
    length, pads, k, seed = data
    g = torch.Generator().manual_seed(seed)
    batch = len(pads)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pads):
        ids[b, :p], mask[b, :p] = PAD, 0
    candidates = torch.randint(3, VOCAB, (batch, k), generator=g)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
        forward = CandidateForward(
            decoder=model.model, cache=cache, path="tree", num_candidates=k, batch_size=batch, mask_dtype=model.dtype
        )
        tree, _ = forward.forward(candidates, mask)  # (B, K, H)
        for j in range(k):
            full_ids = torch.cat([ids, candidates[:, j : j + 1]], dim=1)
            full_mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
            full_pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
            plain = model.model(input_ids=full_ids, attention_mask=full_mask, position_ids=full_pos)
            torch.testing.assert_close(tree[:, j], plain.last_hidden_state[:, -1], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- determinism
def _sampled(model, path, seed, head):
    ids, mask = batch_inputs(3)
    torch.manual_seed(seed)
    return model.generate(
        ids,
        attention_mask=mask,
        do_sample=True,
        max_new_tokens=10,
        value_steer=cfg(head, num_candidates=4, candidate_forward=path),
        return_dict_in_generate=True,
    )


def test_same_seed_same_output_and_tree_and_expand_agree():
    model = steered()
    head = make_head(32, scale=3.0)
    a, b = _sampled(model, "tree", 7, head), _sampled(model, "tree", 7, head)
    torch.testing.assert_close(a.sequences, b.sequences, rtol=0, atol=0)
    torch.testing.assert_close(a.value_scores, b.value_scores, rtol=0, atol=0, equal_nan=True)
    assert a.interventions.any(), "the head must intervene for the comparison to mean anything"
    expand = _sampled(model, "expand", 7, head)
    torch.testing.assert_close(expand.sequences, a.sequences, rtol=0, atol=0)
    torch.testing.assert_close(expand.value_scores, a.value_scores, rtol=1e-4, atol=1e-5, equal_nan=True)
    other = _sampled(model, "tree", 8, head)
    assert not torch.equal(other.sequences, a.sequences), "the seed must matter"


# --------------------------------------------------------------------------- threads and long runs
def test_two_threads_steering_at_once_each_get_their_own_result():
    """One model, two threads, different settings (VFD K=4 at 0.3 vs abstention at 0.6), greedy:
    each thread's outputs equal what the same call gives alone."""
    model = steered()
    head = make_head(32, scale=3.0)
    ids, mask = batch_inputs(3)
    settings_by_thread = {
        "vfd": cfg(head, num_candidates=4, threshold=0.3),
        "abstain": cfg(head, mode="abstain", threshold=0.6),
    }

    def run(config):
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=8,
            value_steer=config,
            return_dict_in_generate=True,
        )
        return out.sequences, out.value_scores, out.abstained

    alone = {name: run(c) for name, c in settings_by_thread.items()}
    assert not torch.equal(alone["vfd"][0], alone["abstain"][0]), "the two settings must give different text"
    results: dict[str, list] = {name: [] for name in settings_by_thread}
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker(name):
        try:
            barrier.wait()
            for _ in range(15):
                results[name].append(run(settings_by_thread[name]))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(name,)) for name in settings_by_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name, outs in results.items():
        assert len(outs) == 15
        for seqs, risks, abstained in outs:
            torch.testing.assert_close(seqs, alone[name][0], rtol=0, atol=0)
            torch.testing.assert_close(risks, alone[name][1], rtol=0, atol=0, equal_nan=True)
            assert (abstained is None) == (alone[name][2] is None)


def test_two_threads_with_their_own_abstention_processors_on_one_model():
    """The processors' lm_head hooks share the module; each must read only its own thread's states."""
    from vsteer_hf.hf.abstain import ValueAbstentionProcessor

    model = tiny_model("llama")
    head = make_head(32, scale=3.0)
    ids, mask = batch_inputs(3)

    def run(threshold):
        with ValueAbstentionProcessor(model, head, threshold) as proc:
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8, logits_processor=[proc])
            return out, proc.abstained.clone()

    alone = {t: run(t) for t in (0.3, 0.7)}
    assert not torch.equal(alone[0.3][0], alone[0.7][0]), "the two thresholds must give different text"
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(threshold):
        try:
            barrier.wait()
            for _ in range(15):
                out, abstained = run(threshold)
                torch.testing.assert_close(out, alone[threshold][0], rtol=0, atol=0)
                torch.testing.assert_close(abstained, alone[threshold][1], rtol=0, atol=0)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in (0.3, 0.7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm (Linux only)")
def test_a_thousand_steered_calls_do_not_grow_memory():
    model = steered(num_hidden_layers=1)
    head = make_head(32, scale=3.0)
    ids, mask = batch_inputs(2, length=4)
    config = cfg(head, num_candidates=4, trace_candidates=True)

    def call():
        out = model.generate(
            ids, attention_mask=mask, do_sample=True, max_new_tokens=3, value_steer=config, return_dict_in_generate=True
        )
        assert out.sequences.shape == (2, 7)

    torch.manual_seed(0)
    for _ in range(100):  # warm-up: allocator pools, lazy imports, caches
        call()
    gc.collect()
    warm = _rss_bytes()
    for _ in range(900):
        call()
    gc.collect()
    after = _rss_bytes()
    assert after <= warm * 1.05, f"RSS grew from {warm / 2**20:.1f} MiB to {after / 2**20:.1f} MiB over 900 calls"


# --------------------------------------------------------------------------- caches: limits and restoring
def test_a_static_sliding_window_that_would_roll_is_refused_before_the_first_token():
    from transformers.generation.streamers import BaseStreamer

    class Count(BaseStreamer):
        def __init__(self):
            self.puts = 0

        def put(self, value):
            self.puts += 1

        def end(self):
            pass

    model = enable_value_steer(tiny_model("mistral", sliding_window=8))
    ids, mask = batch_inputs(2)  # 6 tokens
    streamer = Count()
    with pytest.raises(ValueError, match=r"sliding-window layers of 8 slots, but prompt plus max_new_tokens needs 12"):
        model.generate(
            ids[:1],
            attention_mask=mask[:1],
            max_new_tokens=6,
            cache_implementation="static",
            value_steer=cfg(make_head(32)),
            streamer=streamer,
        )
    assert streamer.puts == 1, "only the prompt may reach the streamer: refuse before the first token"
    out = model.generate(  # within the window: runs, and the cache can be handed back
        ids,
        attention_mask=mask,
        max_new_tokens=2,
        cache_implementation="static",
        value_steer=cfg(make_head(32)),
        return_dict_in_generate=True,
    )
    assert int(out.past_key_values.get_seq_length()) == out.sequences.shape[1] - 1


@pytest.mark.parametrize("path", ["tree", "expand", "lazy"])
@pytest.mark.parametrize("static", [False, True])
def test_a_callers_cache_is_restored_when_generation_raises(path, static):
    from transformers import DynamicCache, StaticCache

    model = steered()
    ids, mask = batch_inputs(2)
    cache = StaticCache(config=model.config, max_cache_len=32) if static else DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], past_key_values=cache)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    length = int(cache.get_seq_length())
    head = _NaNAfter(32, good=3)
    with torch.no_grad():
        head[4].bias.fill_(50.0)  # every row flagged: the lazy path forwards alternatives too
    with pytest.raises(FloatingPointError):
        model.generate(
            ids,
            attention_mask=mask,
            past_key_values=cache,
            min_new_tokens=6,
            max_new_tokens=6,
            value_steer=cfg(head, num_candidates=4, candidate_forward=path),
        )
    assert int(cache.get_seq_length()) == length
    for layer, (keys, values) in zip(cache.layers, before, strict=True):
        assert layer.keys.shape == keys.shape
        torch.testing.assert_close(layer.keys[:, :, :length], keys[:, :, :length], rtol=0, atol=0)
        torch.testing.assert_close(layer.values[:, :, :length], values[:, :, :length], rtol=0, atol=0)
    # and it still continues exactly like a fresh run
    resumed = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3, do_sample=False)
    fresh = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(resumed, fresh)
