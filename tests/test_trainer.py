"""Trainer: learns a planted direction, early-stops on noise, schedules its LR, is seeded; AUROC helper."""

import math
from itertools import product

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vsteer_hf.head import HeadCard, ValueHead
from vsteer_hf.train.features import FeatureCache, FeatureCacheWriter
from vsteer_hf.train.losses import value_head_loss
from vsteer_hf.train.trainer import TrainConfig, auroc, linear_warmup_decay, train_value_head

H = 12


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: thread start-up dominates, and a busy machine makes it far worse."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cache(folder, n_train=96, n_val=48, signal=1.5, seed=0, labelled=True):
    """Gaussian token features; positives carry `signal` along a fixed unit direction on every token.
    With signal=0 the labels are pure noise."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(H)
    direction /= np.linalg.norm(direction)
    with FeatureCacheWriter(folder, H, {"backbone": "synthetic"}) as w:
        for i in range(n_train + n_val):
            label = int(rng.random() < 0.4)
            length = int(rng.integers(2, 9))
            x = rng.standard_normal((length, H)) + signal * label * direction
            record = {"prompt_id": i, "sample": 0, "split": "train" if i < n_train else "validation"}
            if labelled:
                record["label"] = label
            w.add(torch.from_numpy(x), record)
    return FeatureCache(folder)


def _cfg(**kw):
    return TrainConfig(**{"epochs": 8, "lr": 1e-2, "batch_size": 16, "device": "cpu", **kw})


def test_learns_a_planted_direction(tmp_path):
    cache = _cache(tmp_path)
    result = train_value_head(cache, _cfg(patience=None), progress=False)
    assert result.val_auroc > 0.95
    assert len(result.history) == 8 and result.best_epoch == int(np.argmin(result.val_loss))
    assert result.train_loss[-1] < result.train_loss[0]
    assert len(result.val_auroc_per_position) == 8  # longest validation sequence
    assert all(a > 0.8 for a in result.val_auroc_per_position[:2])
    y = np.array(cache.labels(cache.split("validation")))
    assert result.class_balance["n_val"] == 48 and result.class_balance["val_positives"] == int(y.sum())
    head = result.head
    assert isinstance(head, ValueHead) and not head.training
    assert all(not p.requires_grad and p.device.type == "cpu" for p in head.parameters())
    training = head.card.training
    assert training["loss"] == "focal+td_coherence" and training["n_train"] == 96 and training["n_val"] == 48
    assert (training["alpha_pos"], training["gamma"], training["coh_weight"]) == (0.7, 1.0, 0.1)
    assert training["positives"] == result.class_balance["train_positives"] and training["lr"] == 1e-2
    assert head.card.backbone == "synthetic" and head.card.feature_spec.layer == "final"
    head.save_pretrained(tmp_path / "head")  # the card is JSON-ready
    assert (tmp_path / "head" / "value_head.safetensors.meta.json").is_file()


def test_early_stopping_restores_the_best_epoch_on_noise(tmp_path):
    cache = _cache(tmp_path, n_train=32, n_val=32, signal=0.0)
    cfg = _cfg(epochs=30, lr=3e-2, batch_size=32, patience=1, warmup_frac=0.0)
    result = train_value_head(cache, cfg, progress=False)
    assert result.stopped_early and len(result.history) < 30
    assert result.best_epoch == len(result.history) - 2  # patience 1: one bad epoch, then stop
    # the returned head is the best epoch's: its validation loss (one batch) is that epoch's
    val = cache.split("validation")
    feats = torch.nn.utils.rnn.pad_sequence([cache[i][0] for i in val], batch_first=True)  # (N, T, H)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(cache[i][0])) for i in val], batch_first=True)
    labels = torch.tensor(cache.labels(val))
    loss = value_head_loss(result.head.logit(feats), labels, mask)
    assert float(loss) == pytest.approx(result.history[result.best_epoch]["val_loss"], rel=1e-5)


def test_exact_epochs_runs_that_many_of_the_schedule_and_keeps_the_last(tmp_path):
    """The fold heads' setting: on noise, where patience 1 stops early and keeps an earlier epoch,
    exact_epochs runs its epochs anyway, on the full-length LR schedule, the same steps as the free run,
    and returns the last epoch's head."""
    cache = _cache(tmp_path, n_train=32, n_val=32, signal=0.0)
    free = train_value_head(cache, _cfg(epochs=30, lr=3e-2, batch_size=32, patience=1), progress=False)
    assert free.stopped_early and free.best_epoch < len(free.history) - 1
    n = len(free.history) + 2
    exact = train_value_head(cache, _cfg(epochs=30, lr=3e-2, batch_size=32, patience=1, exact_epochs=n), progress=False)
    assert len(exact.history) == n and exact.best_epoch == n - 1 and not exact.stopped_early
    assert exact.history[: len(free.history)] == free.history  # same schedule, same batches, same losses
    val = cache.split("validation")
    feats = torch.nn.utils.rnn.pad_sequence([cache[i][0] for i in val], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(cache[i][0])) for i in val], batch_first=True)
    loss = value_head_loss(exact.head.logit(feats), torch.tensor(cache.labels(val)), mask)
    assert float(loss) == pytest.approx(exact.history[-1]["val_loss"], rel=1e-5)
    for bad in (0, 31):
        with pytest.raises(ValueError, match=f"exact_epochs={bad}"):
            _cfg(epochs=30, exact_epochs=bad)


def test_schedule_values():
    # total 10 steps, 2 warm-up steps: 1/3, 2/3, peak 1 at step 2, then (10 - s)/8
    got = [linear_warmup_decay(s, 10, 2) for s in range(10)]
    assert got == pytest.approx([1 / 3, 2 / 3, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert [linear_warmup_decay(s, 4, 0) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_trainer_follows_the_schedule(tmp_path):
    cache = _cache(tmp_path, n_train=40, n_val=8)  # 3 steps per epoch at batch 16
    result = train_value_head(cache, _cfg(epochs=4, lr=0.1, warmup_frac=0.25, patience=None), progress=False)
    total, warmup = 12, 3
    # the LR after epoch e is the one for the next step, (e+1)*3
    expected = [0.1 * linear_warmup_decay(3 * (e + 1), total, warmup) for e in range(4)]
    assert [h["lr"] for h in result.history] == pytest.approx(expected)


def test_deterministic_with_a_seed(tmp_path):
    cache = _cache(tmp_path, n_train=32, n_val=16)
    cfg = _cfg(epochs=3)
    a, b = (train_value_head(cache, cfg, progress=False) for _ in range(2))
    c = train_value_head(cache, _cfg(epochs=3, seed=1), progress=False)
    state_a, state_b, state_c = (r.head.state_dict() for r in (a, b, c))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert a.history == b.history
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)


def test_warm_start_copies_the_head_and_drops_its_calibration(tmp_path):
    cache = _cache(tmp_path, n_train=16, n_val=8)
    init = ValueHead(H, HeadCard(threshold=0.8, curve={0.1: 0.8}, training={"domain": "hh"}))
    before = {k: v.clone() for k, v in init.state_dict().items()}
    result = train_value_head(cache, _cfg(epochs=1), head_init=init, progress=False)
    assert all(torch.equal(before[k], v) for k, v in init.state_dict().items())
    assert init.card.threshold == 0.8
    card = result.head.card
    assert card.threshold is None and card.curve == {} and card.training["domain"] == "hh"
    assert card.training["warm_start"] is True
    with pytest.raises(ValueError, match="hidden size 4"):
        train_value_head(cache, _cfg(epochs=1), head_init=ValueHead(4), progress=False)


def test_no_validation_split_runs_every_epoch(tmp_path):
    cache = _cache(tmp_path, n_train=16, n_val=0)
    result = train_value_head(cache, _cfg(epochs=2), val_split=None, progress=False)
    assert len(result.history) == 2 and result.best_epoch == 1 and math.isnan(result.val_auroc)


def test_errors(tmp_path):
    cache = _cache(tmp_path, n_train=8, n_val=4, labelled=False)
    with pytest.raises(ValueError, match=r"8 of 8 sequences in split 'train' have no label.*set_labels"):
        train_value_head(cache, _cfg(), progress=False)
    with pytest.raises(ValueError, match="no sequences in split 'dev'"):
        train_value_head(cache, _cfg(), val_split="dev", progress=False)
    with pytest.raises(ValueError, match="lr=0"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="device must be one of"):
        TrainConfig(device="cuda:1")


def _broadcast_labels(cache, value=lambda y: y, splits=("train",)):
    return {i: np.full(int(cache.lengths[i]), value(y), dtype=np.float32)
            for split in splits for i, y in zip(cache.split(split), cache.labels(cache.split(split)), strict=True)}


def test_token_targets_replace_the_train_labels(tmp_path):
    cache = _cache(tmp_path, n_train=64, n_val=32)
    cfg = _cfg(epochs=4, patience=None)
    plain = train_value_head(cache, cfg, progress=False)
    same = train_value_head(cache, cfg, progress=False, token_targets=_broadcast_labels(cache))
    assert all(torch.equal(plain.head.state_dict()[k], v) for k, v in same.head.state_dict().items())
    assert plain.history == same.history  # the label broadcast to every token is what training used
    # inverted targets: the head learns the planted direction backwards, judged on the true labels
    inverted = train_value_head(cache, cfg, progress=False, token_targets=_broadcast_labels(cache, lambda y: 1 - y))
    assert plain.val_auroc > 0.9 and inverted.val_auroc < 0.5  # ignoring the targets would give > 0.9
    assert inverted.head.card.training["targets"] == "per-token"
    assert plain.head.card.training["targets"] == "sequence label"


def test_token_targets_are_checked(tmp_path):
    cache = _cache(tmp_path, n_train=8, n_val=4)
    good = _broadcast_labels(cache)
    first = cache.split("train")[0]
    with pytest.raises(ValueError, match=f"no entry for train sequence {first}"):
        train_value_head(cache, _cfg(), progress=False, token_targets={k: v for k, v in good.items() if k != first})
    with pytest.raises(ValueError, match=rf"token_targets\[{first}\] has shape \(1,\)"):
        train_value_head(cache, _cfg(), progress=False, token_targets={**good, first: np.zeros(1)})
    with pytest.raises(ValueError, match="outside"):
        train_value_head(cache, _cfg(), progress=False, token_targets={**good, first: good[first] + 2})


def test_token_targets_for_validation_drive_early_stopping(tmp_path):
    cache = _cache(tmp_path, n_train=64, n_val=32)
    cfg = _cfg(epochs=6, patience=1)
    invert = lambda y: 1 - y  # noqa: E731
    train_only = train_value_head(cache, cfg, progress=False, token_targets=_broadcast_labels(cache, invert))
    both = _broadcast_labels(cache, invert, splits=("train", "validation"))
    with_val = train_value_head(cache, cfg, progress=False, token_targets=both)
    # judged on the labels, learning the inverted targets only makes validation worse: stopped at once;
    # judged on the same inverted targets, validation improves as training does
    assert train_only.best_epoch == 0 and len(train_only.history) == 2
    assert with_val.best_epoch == cfg.epochs - 1 and len(with_val.history) == cfg.epochs
    val_losses = [h["val_loss"] for h in with_val.history]
    assert val_losses == sorted(val_losses, reverse=True)
    assert with_val.head.card.training["val_loss_on"] == "per-token targets"
    assert train_only.head.card.training["val_loss_on"] == "sequence label"
    assert with_val.val_auroc < 0.5  # AUROC still ranks by the true sequence labels
    first_val = cache.split("validation")[0]
    partial = {k: v for k, v in both.items() if k != first_val}
    with pytest.raises(ValueError, match=f"no entry for validation sequence {first_val}"):
        train_value_head(cache, cfg, progress=False, token_targets=partial)


# --------------------------------------------------------------------------- AUROC
def _brute_auroc(scores, labels):
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in product(pos, neg))
    return wins / (len(pos) * len(neg))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), max_size=30))
def test_auroc_matches_pairwise_count(pairs):
    scores = [s / 5 for s, _ in pairs]  # few distinct values: many ties
    labels = [int(y) for _, y in pairs]
    expected = _brute_auroc(scores, labels)
    got = auroc(scores, labels)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


def test_auroc_known_values():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert auroc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    with pytest.raises(ValueError, match="2 scores for 3 labels"):
        auroc([0.1, 0.2], [0, 1, 1])
