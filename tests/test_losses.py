"""Focal loss, TD-coherence and their sum, against hand arithmetic and independent formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from vsteer_hf.train.losses import focal_loss, td_coherence, value_head_loss

LN2, LN3 = math.log(2.0), math.log(3.0)


def _example():
    """2x3 batch; sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4; row 1 ends in padding."""
    logits = torch.tensor([[0.0, LN3, -LN3], [LN3, 0.0, 50.0]], dtype=torch.float64)
    labels = torch.tensor([1.0, 0.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logits, labels, mask


# Hand arithmetic, alpha_pos = 0.7, gamma = 1: loss = α_t (1 - p_t) (-ln p_t).
# Row 0 (y = 1, α_t = 0.7, p_t = p):
#   p = 1/2: 0.7 * 1/2 * ln 2         = 0.35  ln 2
#   p = 3/4: 0.7 * 1/4 * ln(4/3)      = 0.175 ln(4/3)
#   p = 1/4: 0.7 * 3/4 * ln 4         = 0.525 * 2 ln 2 = 1.05 ln 2
# Row 1 (y = 0, α_t = 0.3, p_t = 1 - p):
#   p = 3/4 -> p_t = 1/4: 0.3 * 3/4 * ln 4 = 0.45 ln 2
#   p = 1/2 -> p_t = 1/2: 0.3 * 1/2 * ln 2 = 0.15 ln 2
#   third token masked out.
ROW0 = [0.35 * LN2, 0.175 * math.log(4 / 3), 1.05 * LN2]
ROW1 = [0.45 * LN2, 0.15 * LN2]
FOCAL_SEQUENCE = (sum(ROW0) / 3 + sum(ROW1) / 2) / 2
FOCAL_TOKEN = (sum(ROW0) + sum(ROW1)) / 5
# TD: row 0: (ln3 - 0)^2 + (-ln3 - ln3)^2 = 5 ln²3; row 1: (0 - ln3)^2 = ln²3 (the 0 -> 50 jump is
# into padding). Mean over the 3 valid transitions: 6 ln²3 / 3 = 2 ln²3.
TD = 2 * LN3**2


def test_focal_loss_hand_computed_2x3():
    logits, labels, mask = _example()
    assert focal_loss(logits, labels, mask).item() == pytest.approx(FOCAL_SEQUENCE, rel=1e-12)
    assert focal_loss(logits, labels, mask, reduction="token").item() == pytest.approx(FOCAL_TOKEN, rel=1e-12)


def test_td_coherence_hand_computed_2x3():
    logits, _, mask = _example()
    assert td_coherence(logits, mask).item() == pytest.approx(TD, rel=1e-12)


def test_value_head_loss_is_focal_plus_weighted_td():
    logits, labels, mask = _example()
    expected = FOCAL_SEQUENCE + 0.1 * TD
    assert value_head_loss(logits, labels, mask).item() == pytest.approx(expected, rel=1e-12)
    assert value_head_loss(logits, labels, mask, coh_weight=0.0).item() == pytest.approx(FOCAL_SEQUENCE)


def test_gamma_zero_is_alpha_weighted_bce():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    targets = labels[:, None].expand(4, 7)
    weight = 0.7 * targets + 0.3 * (1 - targets)
    bce = F.binary_cross_entropy_with_logits(logits, targets, weight=weight)
    assert focal_loss(logits, labels, gamma=0.0).item() == pytest.approx(bce.item(), rel=1e-12)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_matches_textbook_formula_with_soft_labels(gamma):
    """-α_t (1 - p_t)^γ BCE, written naively, on moderate logits where naive is accurate."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, generator=g, dtype=torch.float64)
    labels = torch.rand(3, 5, generator=g, dtype=torch.float64)  # per-token soft labels
    p = torch.sigmoid(logits)
    pt = labels * p + (1 - labels) * (1 - p)
    alpha_t = 0.7 * labels + 0.3 * (1 - labels)
    bce = -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p))
    naive = (alpha_t * (1 - pt) ** gamma * bce).mean()
    got = focal_loss(logits, labels, gamma=gamma, reduction="token")
    assert got.item() == pytest.approx(naive.item(), rel=1e-10)


def test_sequence_labels_equal_broadcast_token_labels():
    logits, labels, mask = _example()
    per_token = labels[:, None].expand(2, 3).clone()
    assert focal_loss(logits, per_token, mask).item() == focal_loss(logits, labels, mask).item()


def test_masked_tokens_change_nothing_and_get_no_gradient():
    logits, labels, mask = _example()
    changed = logits.clone()
    changed[1, 2] = float("nan")  # garbage in padding must not leak, not even through the backward
    a = logits.clone().requires_grad_(True)
    b = changed.clone().requires_grad_(True)
    la, lb = value_head_loss(a, labels, mask), value_head_loss(b, labels, mask)
    la.backward()
    lb.backward()
    assert la.item() == pytest.approx(lb.item(), rel=1e-15)
    assert torch.equal(a.grad, b.grad)
    assert a.grad[1, 2] == 0 and torch.isfinite(b.grad).all()


def test_fully_masked_batch_gives_zero_with_graph():
    logits = torch.randn(2, 3, requires_grad=True)
    loss = value_head_loss(logits, torch.tensor([1.0, 0.0]), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_finite_loss_and_gradient_for_extreme_logits(dtype, gamma):
    values = [-1e4, -200.0, -30.0, 0.0, 30.0, 200.0, 1e4]
    logits = torch.tensor([values, values], dtype=dtype, requires_grad=True)
    labels = torch.tensor([1.0, 0.0], dtype=dtype)
    loss = value_head_loss(logits, labels, None, gamma=gamma)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # confidently right -> ~0 loss; confidently wrong -> large loss (≈ α_t·|logit|)
    right = focal_loss(torch.tensor([[1e4]], dtype=dtype), torch.tensor([1.0], dtype=dtype), gamma=gamma)
    wrong = focal_loss(torch.tensor([[-1e4]], dtype=dtype), torch.tensor([1.0], dtype=dtype), gamma=gamma)
    assert right.item() == pytest.approx(0.0, abs=1e-30)
    assert wrong.item() == pytest.approx(0.7 * 1e4, rel=1e-6)


def test_bad_inputs_raise():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="labels must be"):
        focal_loss(logits, torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        focal_loss(logits, torch.tensor([2.0, 0.0]))
    with pytest.raises(ValueError, match="mask shape"):
        focal_loss(logits, torch.zeros(2), torch.ones(2, 4))
    with pytest.raises(ValueError, match="reduction"):
        focal_loss(logits, torch.zeros(2), reduction="mean")
