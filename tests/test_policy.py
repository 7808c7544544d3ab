"""Tests for vsteer_hf.policy: hand-made tensors, the multinomial equivalence, selection properties."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vsteer_hf import policy
from vsteer_hf.policy import (
    DIRECTIONS,
    RULES,
    candidate_probs,
    crossed,
    force_eos,
    gather_selected,
    intervened,
    refuse_non_finite,
    resolve_thresholds,
    sample_candidates,
    select_candidates,
    top_candidates,
)

INF = float("inf")
NAN = float("nan")


def _warped_probs(batch: int, vocab: int, dtype: torch.dtype, top_k: int | None = None) -> torch.Tensor:
    """Softmax of random logits, optionally top-k masked like a transformers warper."""
    logits = torch.randn(batch, vocab, dtype=torch.float32) * 3
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -INF)
    return logits.softmax(-1).to(dtype)


# --- sample_candidates ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "vocab", "k", "top_k", "dtype"),
    [
        (1, 7, 1, None, torch.float32),
        (1, 50, 4, None, torch.float32),
        (3, 1000, 8, None, torch.float32),
        (4, 300, 8, 3, torch.float32),
        (2, 64, 5, None, torch.float64),
    ],
)
def test_candidate_zero_is_multinomial_sample(batch, vocab, k, top_k, dtype):
    torch.manual_seed(1234)
    probs = _warped_probs(batch, vocab, dtype, top_k)
    for seed in range(200):
        torch.manual_seed(seed)
        expected = torch.multinomial(probs, 1).squeeze(1)
        after_multinomial = torch.rand(3)
        torch.manual_seed(seed)
        candidates = sample_candidates(probs, k)
        after_candidates = torch.rand(3)
        assert candidates.shape == (batch, k)
        assert candidates.dtype == torch.long
        assert torch.equal(candidates[:, 0], expected), f"seed {seed}"
        assert torch.equal(after_candidates, after_multinomial), "global RNG state diverged"


def test_candidate_zero_matches_multinomial_with_explicit_generator():
    probs = _warped_probs(3, 200, torch.float32)
    for seed in range(50):
        expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
        got = sample_candidates(probs, 4, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got[:, 0], expected)


def test_candidate_zero_matches_multinomial_under_ties():
    # In bf16 the race values p/q tie often; multinomial breaks ties by argmax, topk does not.
    torch.manual_seed(0)
    probs = torch.randn(8, 8000).softmax(-1).to(torch.bfloat16)
    for seed in range(60):  # about 5 rows whose topk and argmax disagree
        torch.manual_seed(seed)
        expected = torch.multinomial(probs, 1).squeeze(1)
        torch.manual_seed(seed)
        got = sample_candidates(probs, 6)
        assert torch.equal(got[:, 0], expected), f"seed {seed}"
        for row in got:
            assert len(set(row.tolist())) == 6


def test_sample_candidates_distinct_and_nonzero():
    torch.manual_seed(0)
    probs = _warped_probs(5, 100, torch.float32)
    candidates = sample_candidates(probs, 8)
    for row, p in zip(candidates, probs, strict=True):
        assert len(set(row.tolist())) == 8
        assert (p[row] > 0).all()


def test_sample_candidates_fills_zero_probability_with_candidate_zero():
    probs = torch.tensor(
        [
            [0.0, 0.5, 0.0, 0.5, 0.0, 0.0],  # two live tokens
            [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],  # one live token
            [0.25, 0.25, 0.25, 0.25, 0.0, 0.0],  # four live tokens
        ]
    )
    for seed in range(20):
        candidates = sample_candidates(probs, 4, generator=torch.Generator().manual_seed(seed))
        first = candidates[:, :1]
        row0 = candidates[0].tolist()
        assert set(row0[:2]) == {1, 3}
        assert row0[2:] == [row0[0]] * 2
        assert candidates[1].tolist() == [2, 2, 2, 2]
        assert sorted(candidates[2].tolist()) == [0, 1, 2, 3]
        assert (probs.gather(1, candidates) > 0).all()
        assert torch.equal(candidates[:, :1], first)


def test_sample_candidates_k_larger_than_vocab_pads():
    probs = torch.tensor([[0.2, 0.8]])
    candidates = sample_candidates(probs, 5, generator=torch.Generator().manual_seed(0))
    assert candidates.shape == (1, 5)
    assert set(candidates[0, :2].tolist()) == {0, 1}
    assert (candidates[0, 2:] == candidates[0, 0]).all()


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_num_candidates_validated(bad):
    with pytest.raises(ValueError, match="num_candidates"):
        sample_candidates(torch.full((1, 4), 0.25), bad)
    with pytest.raises(ValueError, match="num_candidates"):
        top_candidates(torch.zeros(1, 4), bad)


def test_sample_candidates_rejects_1d():
    with pytest.raises(ValueError, match="2-D"):
        sample_candidates(torch.full((4,), 0.25), 2)


# --- top_candidates ---------------------------------------------------------------------------


def test_top_candidates_descending_and_masked():
    scores = torch.tensor(
        [
            [0.1, 3.0, -1.0, 2.0, 0.5],
            [-INF, -INF, 1.0, -INF, 0.0],
        ]
    )
    candidates = top_candidates(scores, 3)
    assert candidates.tolist() == [[1, 3, 4], [2, 4, 2]]


def test_top_candidates_column_zero_is_argmax_under_ties():
    scores = torch.zeros(3, 1000)  # topk's tie order differs from argmax's at this size
    scores[:, [4, 9, 30]] = 1.0
    candidates = top_candidates(scores, 4)
    assert torch.equal(candidates[:, 0], scores.argmax(-1))
    for row in candidates:
        assert set(row[:3].tolist()) == {4, 9, 30}
        assert len(set(row.tolist())) == 4


def test_top_candidates_more_ties_than_k():
    scores = torch.zeros(2, 1000)
    scores[:, 100:110] = 1.0  # ten tied maxima, argmax's token may be outside topk(3)
    candidates = top_candidates(scores, 3)
    assert candidates[:, 0].tolist() == [100, 100]
    for row in candidates:
        assert len(set(row.tolist())) == 3
        assert all(100 <= t < 110 for t in row.tolist())


def test_top_candidates_random_matches_argmax():
    torch.manual_seed(0)
    scores = torch.randn(6, 500).to(torch.bfloat16)  # bf16 makes ties likely
    candidates = top_candidates(scores, 8)
    assert torch.equal(candidates[:, 0], scores.argmax(-1))
    values = scores.gather(1, candidates)
    assert (values[:, :-1] >= values[:, 1:]).all()


# --- candidate_probs / gather_selected / intervened ------------------------------------------


def test_candidate_probs_gathers():
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.5, 0.0]])
    got = candidate_probs(probs, torch.tensor([[2, 0], [1, 1]]))
    assert torch.equal(got, torch.tensor([[0.7, 0.1], [0.5, 0.5]]))


def test_gather_selected_2d_and_3d():
    values = torch.arange(12).view(3, 4)
    index = torch.tensor([3, 0, 2])
    assert gather_selected(values, index).tolist() == [3, 4, 10]
    values3 = torch.arange(24).view(3, 4, 2)
    assert gather_selected(values3, index).tolist() == [[6, 7], [8, 9], [20, 21]]
    values4 = torch.randn(3, 4, 2, 5)
    assert torch.equal(gather_selected(values4, index), values4[torch.arange(3), index])


def test_intervened():
    candidates = torch.tensor([[5, 6, 7], [1, 2, 3]])
    assert intervened(candidates, torch.tensor([5, 3])).tolist() == [False, True]


# --- resolve_thresholds -----------------------------------------------------------------------


def test_resolve_thresholds_scalar_sequence_tensor():
    assert torch.equal(resolve_thresholds(0.5, 3, "cpu"), torch.full((3,), 0.5))
    assert resolve_thresholds(1, 2, "cpu").tolist() == [1.0, 1.0]
    got = resolve_thresholds([0.1, 0.0, 1.0], 3, "cpu")
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert torch.allclose(got, torch.tensor([0.1, 0.0, 1.0]))
    assert resolve_thresholds(torch.tensor([0.2, 0.3], dtype=torch.float64), 2, "cpu").dtype == torch.float32
    assert resolve_thresholds(torch.tensor(0.25), 4, "cpu").tolist() == [0.25] * 4
    assert resolve_thresholds((0.3,), 1, torch.device("cpu")).device.type == "cpu"


@pytest.mark.parametrize(
    ("threshold", "batch", "pattern"),
    [
        (1.5, 2, r"threshold\[0\] = 1\.5 .*\[0, 1\]"),
        (-0.1, 1, r"threshold\[0\] = -0\.1"),
        ([0.2, NAN], 2, r"threshold\[1\] = nan"),
        ([0.2, INF], 2, r"threshold\[1\] = inf"),
        (torch.tensor([0.5, 2.0]), 2, r"threshold\[1\] = 2\.0"),
        ([0.2, 0.3], 3, r"got 2 thresholds for a batch of 3 rows; pass one float .* exactly 3"),
        (torch.tensor([0.2]), 2, r"got 1 thresholds for a batch of 2"),
        (torch.zeros(2, 2), 2, r"0-D or 1-D"),
        (["0.5"], 1, r"threshold\[0\] must be a float"),
        ("0.5", 1, r"got str"),
        (True, 1, r"got bool"),
    ],
)
def test_resolve_thresholds_errors(threshold, batch, pattern):
    with pytest.raises(ValueError, match=pattern):
        resolve_thresholds(threshold, batch, "cpu")


# --- select_candidates ------------------------------------------------------------------------


def test_select_first_safe_hand_made():
    risks = torch.tensor(
        [
            [0.9, 0.2, 0.1],  # first safe is column 1, not the least risky column 2
            [0.1, 0.9, 0.9],  # natural sample is safe
            [0.9, 0.8, 0.95],  # none safe -> least risky
            [0.7, 0.6, 0.6],  # none safe, tie -> lowest index
        ]
    )
    thresholds = torch.tensor([0.5, 0.5, 0.5, 0.5])
    assert select_candidates(risks, thresholds).tolist() == [1, 0, 1, 1]


def test_select_threshold_is_strict_and_per_row():
    risks = torch.tensor([[0.5, 0.4], [0.5, 0.4]])
    assert select_candidates(risks, torch.tensor([0.5, 0.6])).tolist() == [1, 0]


def test_select_nan_never_beats_finite():
    risks = torch.tensor([[NAN, 0.9, NAN], [NAN, NAN, NAN], [NAN, 0.1, 0.3]])
    thresholds = torch.tensor([0.5, 0.5, 0.5])
    assert select_candidates(risks, thresholds).tolist() == [1, 0, 1]
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.3, 0.3, 0.4], [0.9, 0.05, 0.05]])
    assert select_candidates(risks, thresholds, rule="args", probs=probs).tolist()[0] == 1
    assert select_candidates(risks, thresholds, rule="args", probs=probs).tolist()[2] == 1


def test_select_args_rule():
    risks = torch.tensor([[0.5, 0.3, 0.1], [0.2, 0.2, 0.2]])
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    thresholds = torch.zeros(2)
    # row 0: 0.5-0.6=-0.1, 0.3-0.3=0.0, 0.1-0.1=0.0 -> 0 ; row 1: picks the most likely
    assert select_candidates(risks, thresholds, "args", probs).tolist() == [0, 1]
    # weight 0 -> pure risk
    assert select_candidates(risks, thresholds, "args", probs, args_weight=0.0).tolist() == [2, 0]


def test_select_args_needs_probs():
    with pytest.raises(ValueError, match="probs"):
        select_candidates(torch.zeros(1, 2), torch.zeros(1), rule="args")


def test_select_unknown_rule_lists_allowed():
    with pytest.raises(ValueError, match=r"'greedy'.*first_safe, args"):
        select_candidates(torch.zeros(1, 2), torch.zeros(1), rule="greedy")


def test_select_bf16_risks_compare_at_float32():
    # 0.501 rounds to 0.5 in bf16: comparing in bf16 would call risk 0.5 unsafe under threshold 0.501.
    risks = torch.tensor([[0.5, 0.25]], dtype=torch.bfloat16)
    assert select_candidates(risks, torch.tensor([0.5])).tolist() == [1]
    assert select_candidates(risks, torch.tensor([0.501])).tolist() == [0]


_risk = st.one_of(st.floats(0.0, 1.0, width=32), st.just(NAN))


@st.composite
def _risk_batch(draw):
    batch = draw(st.integers(1, 6))
    k = draw(st.integers(1, 8))
    risks = [[draw(_risk) for _ in range(k)] for _ in range(batch)]
    thresholds = [draw(st.floats(0.0, 1.0, width=32)) for _ in range(batch)]
    return torch.tensor(risks), torch.tensor(thresholds)


@settings(max_examples=300, deadline=None)
@given(_risk_batch())
def test_select_first_safe_properties(data):
    risks, thresholds = data
    batch, k = risks.shape
    winners = select_candidates(risks, thresholds)
    assert winners.shape == (batch,) and winners.dtype == torch.long
    for b in range(batch):
        w = int(winners[b])
        row = risks[b].tolist()
        thr = float(thresholds[b])
        assert 0 <= w < k
        safe = [j for j, r in enumerate(row) if r < thr]
        if safe:
            assert w == safe[0]
        else:
            finite = [r for r in row if not math.isnan(r)]
            if finite:
                assert row[w] == min(finite)
                assert w == row.index(min(finite))
            else:
                assert w == 0
        if any(not math.isnan(r) for r in row):
            assert not math.isnan(row[w]), "NaN won over a finite risk"
        # rows are independent
        alone = select_candidates(risks[b : b + 1], thresholds[b : b + 1])
        assert int(alone[0]) == w


@settings(max_examples=200, deadline=None)
@given(_risk_batch(), st.floats(0.0, 4.0))
def test_select_args_properties(data, weight):
    risks, thresholds = data
    batch, k = risks.shape
    probs = torch.rand(batch, k)
    winners = select_candidates(risks, thresholds, "args", probs, args_weight=weight)
    for b in range(batch):
        w = int(winners[b])
        assert 0 <= w < k
        if not risks[b].isnan().all():
            assert not risks[b, w].isnan()
        alone = select_candidates(risks[b : b + 1], thresholds[b : b + 1], "args", probs[b : b + 1], weight)
        assert int(alone[0]) == w


# --- crossed / force_eos ----------------------------------------------------------------------


def test_crossed_directions_and_nan():
    risk = torch.tensor([0.2, 0.5, 0.8, NAN])
    thr = torch.full((4,), 0.5)
    # "above": p >= thr, the complement of VFD's "safe iff p < thr" (and the plugin's rule);
    # "below": p < thr, the plugin's "quit when value is low"
    assert crossed(risk, thr).tolist() == [False, True, True, False]
    assert crossed(risk, thr, "above").tolist() == [False, True, True, False]
    assert crossed(risk, thr, "below").tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match=r"'sideways'.*above, below"):
        crossed(risk, thr, "sideways")
    assert DIRECTIONS == ("above", "below")
    assert RULES == ("first_safe", "args")


def test_force_eos_rows_only_out_of_place():
    scores = torch.arange(12, dtype=torch.float32).view(3, 4)
    original = scores.clone()
    out = force_eos(scores, torch.tensor([False, True, False]), eos_token_id=2)
    assert torch.equal(scores, original), "input was modified"
    assert torch.equal(out[0], original[0]) and torch.equal(out[2], original[2])
    assert out[1].tolist() == [-INF, -INF, 0.0, -INF]
    assert out.dtype == scores.dtype and out.shape == scores.shape


def test_force_eos_then_argmax_and_sampling_give_eos():
    scores = torch.randn(2, 10, dtype=torch.float16)
    out = force_eos(scores, torch.tensor([True, True]), 7)
    assert out.argmax(-1).tolist() == [7, 7]
    assert torch.multinomial(out.float().softmax(-1), 1).squeeze(1).tolist() == [7, 7]


def test_force_eos_bad_id():
    with pytest.raises(ValueError, match="eos_token_id 10 is outside"):
        force_eos(torch.zeros(1, 10), torch.tensor([True]), 10)


def test_module_imports_only_torch_and_stdlib():
    tree = ast.parse(Path(policy.__file__).read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots <= {"__future__", "math", "numbers", "collections", "torch"}, roots


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_refuse_non_finite_names_where(bad):
    refuse_non_finite(torch.tensor([0.0, 0.5, 1.0]), "step 0")  # finite risks pass
    with pytest.raises(FloatingPointError, match="NaN or infinite risk at VFD step 3; refusing to commit"):
        refuse_non_finite(torch.tensor([[0.1, bad]]), "VFD step 3")
