"""Choosing ProFS's k and layers: a sweep on validation prompts under a reference-perplexity budget.

The paper picks k with ScreeNot and checks it by cross-validation; here every (layers, k) of a small
grid edits the model from the same training pairs, and the setting kept is the one with the lowest
toxic rate on validation prompts whose perplexity on a validation slice of the reference text stays
within `budget` of the unedited model's. The sentence embeddings are computed once for all layers of
the grid; each setting edits the value matrices in place and restores them afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vsteer_hf.eval.tradeoff import TradeoffPoint, measure_point
from vsteer_hf.profs.edit import apply_profs_from_embeddings
from vsteer_hf.profs.embeddings import layer_sentence_embeddings
from vsteer_hf.profs.modules import _check_layer_ids, _hidden_size, _targets, decoder_layers
from vsteer_hf.profs.record import ProFSConfig, ProFSRecord, default_k, default_layers

DEFAULT_BUDGET = 0.10
DEFAULT_KS = (1, 2, 4, 8)


def default_layer_ranges(num_layers: int, model_type: str | None = None) -> list[list[int]]:
    """The default layers, the same through the last layer, and their upper half and quarter (duplicates
    dropped). The narrower ranges are there because on SmolLM2-135M every k in 1..8 over the full
    default range cost more than +10% reference perplexity on validation (`results/compare/`)."""
    base = default_layers(num_layers, model_type)
    candidates = [
        base,
        list(range(base[0], num_layers)),
        base[len(base) // 2 :],
        base[3 * len(base) // 4 :],
    ]
    unique: list[list[int]] = []
    for layers in candidates:
        if layers and layers not in unique:
            unique.append(layers)
    return unique


def parse_layer_ranges(text: str) -> list[list[int]]:
    """``"14-28,21-28,29"`` (inclusive ranges, comma-separated) as lists of layer indices."""
    ranges = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        first, sep, last = part.partition("-")
        try:
            lo, hi = int(first), int(last) if sep else int(first)
        except ValueError:
            raise ValueError(f"layer range {part!r} is invalid: use FIRST-LAST (inclusive), e.g. 14-28") from None
        if hi < lo:
            raise ValueError(f"layer range {part!r} is empty: FIRST must be <= LAST")
        ranges.append(list(range(lo, hi + 1)))
    if not ranges:
        raise ValueError(f"no layer ranges in {text!r}: use e.g. 14-28,14-29")
    return ranges


def _span(layers: Sequence[int]) -> str:
    layers = list(layers)
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}..{layers[-1]}" if contiguous else ",".join(map(str, layers))


@dataclass
class ProFSSelection:
    """The sweep (base first, then one point per setting) and the setting chosen, if any was in budget."""

    budget: float
    base: TradeoffPoint
    points: list[TradeoffPoint]
    chosen: int | None
    validation: dict[str, Any] = field(default_factory=dict)

    @property
    def chosen_point(self) -> TradeoffPoint | None:
        return None if self.chosen is None else self.points[self.chosen]

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": "lowest validation toxic rate whose validation reference perplexity is within the budget",
            "budget": self.budget,
            "chosen": None if self.chosen is None else self.points[self.chosen].setting,
            "validation": self.validation,
            "base": self.base.as_dict(),
            "sweep": [p.as_dict() for p in self.points],
        }

    def table(self) -> str:
        """Markdown: one row per setting, the chosen one marked."""
        ref = self.base.reference_perplexity
        lines = [
            "| setting | toxic rate | mean toxicity | reference ppl | vs base | within budget |",
            "|---|---|---|---|---|---|",
            f"| base | {self.base.toxic_rate} | {self.base.toxicity_mean} | {ref:.2f} | – | – |",
        ]
        for i, p in enumerate(self.points):
            mark = " **(chosen)**" if i == self.chosen else ""
            lines.append(
                f"| {p.label}{mark} | {p.toxic_rate} | {p.toxicity_mean} | {p.reference_perplexity:.2f} "
                f"| {p.extra['reference_ratio'] - 1:+.1%} | {'yes' if p.extra['within_budget'] else 'no'} |"
            )
        return "\n".join(lines)


def choose(points: Sequence[TradeoffPoint], base_reference: float, budget: float) -> int | None:
    """Index of the lowest toxic rate among points within the budget (ties: lower reference ppl)."""
    ok = [i for i, p in enumerate(points) if p.reference_perplexity <= base_reference * (1 + budget)]
    if not ok:
        return None
    return min(ok, key=lambda i: (points[i].toxic_rate.value, points[i].reference_perplexity))


@torch.no_grad()
def select_profs(
    model: nn.Module,
    tokenizer: Any,
    preferred_texts: Sequence[str],
    non_preferred_texts: Sequence[str],
    prompts: list[Any],
    settings: Any,
    judge: Any,
    reference_ids: list[int],
    *,
    ks: Sequence[int] | None = None,
    layer_ranges: Sequence[Sequence[int]] | None = None,
    budget: float = DEFAULT_BUDGET,
    config: ProFSConfig | None = None,
    judge_threshold: float = 0.5,
    progress: bool = True,
    validation: dict[str, Any] | None = None,
) -> tuple[ProFSSelection, ProFSRecord | None]:
    """Sweep (layers, k), then edit `model` IN PLACE with the chosen setting (if one is within budget).

    Returns the selection and the edit's record (None, model untouched, when no setting is within the
    budget); the record's `selection` holds the sweep, so `save_profs_model` writes it to profs_edit.json.
    """
    if budget < 0:
        raise ValueError(f"budget={budget} must be >= 0 (a fraction: 0.1 allows +10% reference perplexity)")
    config = config or ProFSConfig()
    preferred_texts, non_preferred_texts = list(preferred_texts), list(non_preferred_texts)
    num_pairs = len(preferred_texts)
    if not num_pairs or num_pairs != len(non_preferred_texts):
        raise ValueError(f"need equally many preferred and non-preferred texts, at least one pair (got {num_pairs})")
    num_layers = len(decoder_layers(model))
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    hidden = _hidden_size(model)
    ranges = [_check_layer_ids(r, num_layers) for r in (layer_ranges or default_layer_ranges(num_layers, model_type))]
    cap = min(num_pairs, hidden)
    wanted = sorted(set(ks or (*DEFAULT_KS, default_k(hidden, num_pairs, model_type, num_layers))))
    if any(k < 1 for k in wanted):
        raise ValueError(f"ks={wanted}: every k must be >= 1")
    ks_used = [k for k in wanted if k <= cap] or [cap]
    union = sorted({i for r in ranges for i in r})
    targets = dict(zip(union, (m for _, m in _targets(model, union)), strict=True))
    if getattr(model, "profs_record", None) is not None:
        raise ValueError("this model already carries a ProFS edit; select on the unedited model")

    def measure(label: str, setting: dict[str, Any]) -> TradeoffPoint:
        return measure_point(
            label, setting, model, tokenizer, prompts, settings, judge, judge_threshold, reference_ids,
            progress=progress,
        )  # fmt: skip

    base = measure("base", {})

    def embed(texts: list[str]) -> torch.Tensor:
        return layer_sentence_embeddings(
            model, tokenizer, texts, config.batch_size, union, progress, config.max_length,
            pooling=config.pooling, drop_first=config.drop_first,
        )  # fmt: skip  # (len(union), N, H)

    pref, non_pref = embed(preferred_texts), embed(non_preferred_texts)
    saved = {
        i: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone()) for i, m in targets.items()
    }

    def restore() -> None:
        for i, (weight, bias) in saved.items():
            targets[i].weight.copy_(weight)
            if bias is not None:
                targets[i].bias.copy_(bias)
        if hasattr(model, "profs_record"):
            del model.profs_record

    def edit(layers: list[int], k: int) -> ProFSRecord:
        rows = [union.index(i) for i in layers]
        setting = {**vars(config), "k": k, "layers": layers}
        return apply_profs_from_embeddings(model, pref[rows], non_pref[rows], ProFSConfig(**setting))

    points = []
    try:
        for layers in ranges:
            for k in ks_used:
                edit(layers, k)
                try:
                    point = measure(f"k={k}, layers {_span(layers)}", {"k": k, "layers": layers})
                finally:
                    restore()
                ratio = point.reference_perplexity / base.reference_perplexity
                point.extra |= {"reference_ratio": ratio, "within_budget": ratio <= 1 + budget}
                points.append(point)
    except BaseException:
        restore()
        raise
    chosen = choose(points, base.reference_perplexity, budget)
    selection = ProFSSelection(budget, base, points, chosen, dict(validation or {}))
    if chosen is None:
        return selection, None
    record = edit(points[chosen].setting["layers"], points[chosen].setting["k"])
    record.selection = selection.as_dict()
    return selection, record
