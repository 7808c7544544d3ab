"""Train a `ValueHead` from a `FeatureCache` alone (no backbone in memory).

Every token of a sequence is trained against the sequence's label with `value_head_loss` (focal +
TD-coherence); AdamW with linear warm-up then linear decay; early stopping on validation loss restores
the best epoch. One process (accelerate only places tensors on its device); labels >= 0.5 count as
positives for AUROC and class balance.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from vsteer_hf.head import FeatureSpec, ValueHead
from vsteer_hf.train.calibrate import max_over_trajectory
from vsteer_hf.train.features import FeatureCache
from vsteer_hf.train.losses import value_head_loss

__all__ = ["TrainConfig", "TrainResult", "auroc", "linear_warmup_decay", "train_value_head"]

DEVICES = ("auto", "cpu")


@dataclass
class TrainConfig:
    """How `train_value_head` trains.

    Optimisation: ``epochs`` (10, as the published head), ``lr`` (3e-4: AdamW on a fresh H×H MLP; at
    H = 4096 1e-3 tends to overshoot — tiny test heads want more), ``weight_decay`` (0.01),
    ``batch_size`` (64 sequences), ``warmup_frac`` (0.05 of all steps, then linear decay to ~0),
    ``max_grad_norm`` (1.0; None = no clipping).
    Loss (`value_head_loss`, reduction "sequence"): ``alpha_pos`` 0.7, ``gamma`` 1.0, ``coh_weight`` 0.1.
    Early stopping: ``patience`` 2 epochs without a validation-loss drop of more than ``min_delta`` (0).
    ``exact_epochs`` (None: early stopping as above): run exactly that many epochs of the ``epochs``-long
    schedule and keep the last, neither stopping early nor picking the best; the cross-fitted fold heads use
    it to repeat the final head's training rather than re-decide it on less data.
    Data: ``max_tokens`` (None = all; else each sequence's first max_tokens tokens), ``seed`` (0: head
    init and shuffling; the global RNG is left alone).
    Runtime: ``device`` "auto" (accelerate's choice: a GPU if visible) or "cpu".
    """

    epochs: int = field(default=10, metadata={"help": "maximum number of passes over the train split"})
    lr: float = field(default=3e-4, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decoupled weight decay"})
    batch_size: int = field(default=64, metadata={"help": "sequences per step, padded to the longest"})
    warmup_frac: float = field(default=0.05, metadata={"help": "fraction of all steps spent warming up"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient-norm clip; None: off"})
    alpha_pos: float = field(default=0.7, metadata={"help": "focal weight of positive (undesirable) tokens"})
    gamma: float = field(default=1.0, metadata={"help": "focal focusing exponent"})
    coh_weight: float = field(default=0.1, metadata={"help": "weight of the TD-coherence penalty"})
    patience: int | None = field(default=2, metadata={"help": "epochs without improvement before stopping"})
    min_delta: float = field(default=0.0, metadata={"help": "a val-loss drop must exceed this to count"})
    exact_epochs: int | None = field(
        default=None, metadata={"help": "run exactly this many epochs of the schedule and keep the last"}
    )
    max_tokens: int | None = field(default=None, metadata={"help": "truncate sequences to this many tokens"})
    seed: int = field(default=0, metadata={"help": "seeds head init and batch order"})
    device: str = field(default="auto", metadata={"help": "'auto' (accelerate) or 'cpu'"})

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "batch_size": self.batch_size >= 1,
            "warmup_frac": 0 <= self.warmup_frac < 1,
            "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0,
            "patience": self.patience is None or self.patience >= 1,
            "exact_epochs": self.exact_epochs is None or 1 <= self.exact_epochs <= self.epochs,
            "max_tokens": self.max_tokens is None or self.max_tokens >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid TrainConfig values: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")
        if self.device not in DEVICES:
            raise ValueError(
                f"device must be one of {list(DEVICES)}, got {self.device!r}; pick a GPU with CUDA_VISIBLE_DEVICES"
            )


@dataclass
class TrainResult:
    """The trained head (frozen, eval, CPU) and what happened.

    ``history``: one dict per epoch run (epoch, train_loss, val_loss, lr at its end). ``val_auroc``: per
    sequence, score = max over trajectory of p. ``val_auroc_per_position[t]``: AUROC of p at token t
    against the sequence label over sequences with > t tokens (NaN where one class only).
    """

    head: ValueHead
    history: list[dict[str, float]]
    best_epoch: int
    stopped_early: bool
    val_auroc: float
    val_auroc_per_position: list[float]
    class_balance: dict[str, Any]
    config: TrainConfig

    @property
    def train_loss(self) -> list[float]:
        return [h["train_loss"] for h in self.history]

    @property
    def val_loss(self) -> list[float]:
        return [h["val_loss"] for h in self.history]


# --------------------------------------------------------------------------- metrics and schedule
def auroc(scores: Sequence[float] | np.ndarray | Tensor, labels: Sequence[float] | np.ndarray | Tensor) -> float:
    """Area under the ROC curve, P(score_pos > score_neg) + ½·P(tie), from average ranks (Mann–Whitney).

    ``labels`` are 0/1 (anything >= 0.5 is positive). NaN when only one class is present.
    """
    s = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64).ravel()
    y = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels, dtype=np.float64).ravel() >= 0.5
    if s.shape != y.shape:
        raise ValueError(f"auroc got {s.size} scores for {y.size} labels")
    if np.isnan(s).any():
        raise ValueError("auroc scores contain NaN")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # average 1-based rank of each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def linear_warmup_decay(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): (step+1)/(W+1) while step < W, peak 1 at step W,
    then (total - step)/(total - W) down to 1/(total - W) at the last step."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


# --------------------------------------------------------------------------- batches
def _labels(cache: FeatureCache, indices: list[int], split: str) -> np.ndarray:
    labels = cache.labels(indices)
    missing = [cache.records[i] for i, y in zip(indices, labels, strict=True) if y is None]
    if missing:
        example = (missing[0]["prompt_id"], missing[0]["sample"])
        raise ValueError(
            f"{cache.directory}: {len(missing)} of {len(indices)} sequences in split {split!r} have no label "
            f"(e.g. {example}); judge them and call FeatureCache.set_labels first"
        )
    return np.asarray(labels, dtype=np.float32)


def _batches(
    cache: FeatureCache,
    indices: Sequence[int],
    labels: np.ndarray,
    batch_size: int,
    max_tokens: int | None,
    order: np.ndarray,
    token_targets: Mapping[int, np.ndarray] | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(features (B, T, H), mask (B, T), labels (B,), or (B, T) from `token_targets`) on CPU, right-padded
    with zeros."""
    h = cache.hidden_size
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        seqs = [cache.rows(indices[r], max_tokens) for r in rows]
        t = max(s.shape[0] for s in seqs)
        feats = torch.zeros(len(seqs), t, h)  # (B, T, H)
        mask = torch.zeros(len(seqs), t, dtype=torch.long)  # (B, T)
        for b, s in enumerate(seqs):
            feats[b, : s.shape[0]] = s
            mask[b, : s.shape[0]] = 1
        if token_targets is None:
            yield feats, mask, torch.from_numpy(labels[rows])
            continue
        targets = torch.zeros(len(seqs), t)  # (B, T)
        for b, (r, s) in enumerate(zip(rows, seqs, strict=True)):
            targets[b, : s.shape[0]] = torch.as_tensor(token_targets[indices[r]][: s.shape[0]], dtype=torch.float32)
        yield feats, mask, targets


def _check_token_targets(
    cache: FeatureCache, indices: Sequence[int], targets: Mapping[int, np.ndarray], max_tokens: int | None, split: str
) -> None:
    """Every sequence of `split` needs one target in [0, 1] per token it trains (or validates) on."""
    for i in indices:
        if i not in targets:
            raise ValueError(f"token_targets has no entry for {split} sequence {i}; give one per {split} sequence")
        need = min(int(cache.lengths[i]), max_tokens or int(cache.lengths[i]))
        row = np.asarray(targets[i], dtype=np.float32)
        if row.ndim != 1 or len(row) < need:
            raise ValueError(f"token_targets[{i}] has shape {row.shape}; sequence {i} has {need} tokens to train on")
        if ((row < 0) | (row > 1) | np.isnan(row)).any():
            raise ValueError(f"token_targets[{i}] holds values outside [0, 1]")


def _n_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


@torch.no_grad()
def _evaluate(
    head, cache, indices, labels, cfg, device, probs: bool = False, progress: bool = False, token_targets=None
):
    """Mean validation loss (weighted by sequences; against `token_targets` when given, else the labels)
    and, if ``probs``, each sequence's p trajectory."""
    head.eval()
    total, count, trajectories = 0.0, 0, []
    order = np.arange(len(indices))
    batches = _batches(cache, indices, labels, cfg.batch_size, cfg.max_tokens, order, token_targets)
    n_batches = _n_batches(len(indices), cfg.batch_size)
    for feats, mask, y in tqdm(batches, total=n_batches, desc="val", leave=False, disable=not progress):
        feats, mask, y = feats.to(device), mask.to(device), y.to(device)
        logits = head.logit(feats)  # (B, T)
        loss = value_head_loss(logits, y, mask, cfg.alpha_pos, cfg.gamma, cfg.coh_weight, reduction="sequence")
        total += float(loss) * len(y)
        count += len(y)
        if probs:
            p = torch.sigmoid(logits).cpu()  # (B, T)
            lengths = mask.sum(dim=1).cpu()
            trajectories += [p[b, : lengths[b]] for b in range(len(y))]
    return total / max(count, 1), trajectories


def _auroc_per_position(padded: Tensor, valid: Tensor, labels: np.ndarray) -> list[float]:
    """AUROC of column t of ``padded`` (N, T) over its valid rows, for t = 0..T-1."""
    p, ok = padded.numpy(), valid.numpy() > 0
    return [auroc(p[ok[:, t], t], labels[ok[:, t]]) for t in range(p.shape[1])]


# --------------------------------------------------------------------------- training
def train_value_head(
    cache: FeatureCache,
    config: TrainConfig | None = None,
    train_split: str = "train",
    val_split: str | None = "validation",
    head_init: ValueHead | None = None,
    progress: bool = True,
    token_targets: Mapping[int, np.ndarray] | None = None,
) -> TrainResult:
    """Train a `ValueHead(cache.hidden_size)` on ``train_split``, early-stopping on ``val_split``.

    ``head_init`` warm-starts from a copy of that head (the caller's is not touched); its card's
    threshold and ĉ(α) curve are dropped, as they belonged to the old weights. ``val_split=None``
    trains all epochs with no early stopping and no validation metrics. Needs every sequence of both
    splits labelled. ``token_targets`` (cache index -> one target in [0, 1] per token, for every train
    sequence; see `vsteer_hf.train.targets`) replaces the train split's label broadcast to every token.
    When it also holds every validation sequence, validation loss and early stopping use those targets
    too (a head fitted to per-token targets is otherwise stopped by a loss it is not trained on); when
    it holds none, they use the sequence labels. Validation AUROC always ranks by the sequence labels,
    what steering is judged by.
    The returned head's card records the recipe in ``card.training``.
    """
    from accelerate import Accelerator

    cfg = config or TrainConfig()
    train_idx = cache.split(train_split)
    val_idx = cache.split(val_split) if val_split is not None else []
    y_train = _labels(cache, train_idx, train_split)
    y_val = _labels(cache, val_idx, val_split) if val_idx else np.zeros(0, dtype=np.float32)
    val_targets = None
    if token_targets is not None:
        _check_token_targets(cache, train_idx, token_targets, cfg.max_tokens, train_split)
        if any(i in token_targets for i in val_idx):
            _check_token_targets(cache, val_idx, token_targets, cfg.max_tokens, val_split)
            val_targets = token_targets

    accelerator = Accelerator(cpu=cfg.device == "cpu")
    if accelerator.num_processes > 1:
        raise RuntimeError("train_value_head runs in one process; start it without a multi-process accelerate launch")
    device = accelerator.device
    show = progress and accelerator.is_local_main_process

    if head_init is not None:
        if head_init.hidden_size != cache.hidden_size:
            raise ValueError(
                f"head_init reads hidden size {head_init.hidden_size} but the cache holds {cache.hidden_size}"
            )
        head = copy.deepcopy(head_init).float()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            head = ValueHead(cache.hidden_size)
    head.requires_grad_(True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = _n_batches(len(train_idx), cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_frac * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_warmup_decay(step, total_steps, warmup)
    )
    head, optimizer = accelerator.prepare(head, optimizer)
    model = accelerator.unwrap_model(head)  # the ValueHead itself: `.logit` is not the wrapper's forward

    rng = np.random.default_rng(cfg.seed)
    history: list[dict[str, float]] = []
    best_loss, best_epoch, best_state, bad_epochs, stopped = math.inf, -1, None, 0, False
    keep_last = not val_idx or cfg.exact_epochs is not None  # else the best epoch by validation loss is kept
    epochs = tqdm(range(cfg.exact_epochs or cfg.epochs), desc="epochs", disable=not show)
    for epoch in epochs:
        head.train()
        order = rng.permutation(len(train_idx))
        running, seen = 0.0, 0
        batches = _batches(cache, train_idx, y_train, cfg.batch_size, cfg.max_tokens, order, token_targets)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}", leave=False, disable=not show)
        for feats, mask, y in bar:
            feats, mask, y = feats.to(device), mask.to(device), y.to(device)
            logits = model.logit(feats)  # (B, T)
            loss = value_head_loss(logits, y, mask, cfg.alpha_pos, cfg.gamma, cfg.coh_weight, reduction="sequence")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg.max_grad_norm is not None:
                accelerator.clip_grad_norm_(head.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            running += float(loss.detach()) * len(y)
            seen += len(y)
        row = {"epoch": epoch, "train_loss": running / seen, "lr": scheduler.get_last_lr()[0]}
        if val_idx:
            row["val_loss"], _ = _evaluate(model, cache, val_idx, y_val, cfg, device, token_targets=val_targets)
        else:
            row["val_loss"] = math.nan
        history.append(row)
        epochs.set_postfix(train_loss=f"{row['train_loss']:.4f}", val_loss=f"{row['val_loss']:.4f}")
        if keep_last or best_state is None or row["val_loss"] < best_loss - cfg.min_delta:
            best_loss, best_epoch, bad_epochs = row["val_loss"], epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if cfg.patience is not None and bad_epochs >= cfg.patience:
                stopped = epoch < cfg.epochs - 1
                break

    head = accelerator.unwrap_model(head)
    head.load_state_dict(best_state)
    seq_auroc, pos_auroc = math.nan, []
    if val_idx:
        _, trajectories = _evaluate(head, cache, val_idx, y_val, cfg, device, probs=True, progress=show)
        padded = torch.nn.utils.rnn.pad_sequence(trajectories, batch_first=True)  # (N, T)
        valid = torch.nn.utils.rnn.pad_sequence([torch.ones(len(p)) for p in trajectories], batch_first=True)
        seq_auroc = auroc(max_over_trajectory(padded, valid), y_val)
        pos_auroc = _auroc_per_position(padded, valid, y_val)
    head = head.to("cpu").requires_grad_(False).eval()
    if device.type != "cpu":
        accelerator.free_memory()  # drops its references to the optimizer state on the device

    balance = {
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "train_positives": int((y_train >= 0.5).sum()),
        "val_positives": int((y_val >= 0.5).sum()),
        "train_pos_frac": float((y_train >= 0.5).mean()),
        "val_pos_frac": float((y_val >= 0.5).mean()) if val_idx else math.nan,
    }
    head.card = replace(
        head.card,
        backbone=cache.backbone or head.card.backbone,
        threshold=None,
        curve={},
        calibration={},
        feature_spec=FeatureSpec(),
        training={
            **head.card.training,
            "loss": "focal+td_coherence",
            "targets": "per-token" if token_targets is not None else "sequence label",
            "val_loss_on": "per-token targets" if val_targets is not None else "sequence label",
            **{k: getattr(cfg, k) for k in ("alpha_pos", "gamma", "coh_weight", "epochs", "lr", "weight_decay")},
            "batch_size": cfg.batch_size,
            "epochs_run": len(history),
            "best_epoch": best_epoch,
            "n_train": balance["n_train"],
            "n_val": balance["n_val"],
            "positives": balance["train_positives"],
            "val_auroc": None if math.isnan(seq_auroc) else seq_auroc,
            "warm_start": head_init is not None,
        },
    )
    return TrainResult(
        head=head,
        history=history,
        best_epoch=best_epoch,
        stopped_early=stopped,
        val_auroc=seq_auroc,
        val_auroc_per_position=pos_auroc,
        class_balance=balance,
        config=replace(cfg),
    )
