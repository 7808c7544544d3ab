"""The value heads that ship inside the package: found by name, listed with their backbone and results.

A shipped head is a folder under ``vsteer_hf/heads/<name>/`` (safetensors weights and their card).
``load_value_head("<name>")`` loads one without the hub; ``shipped_heads()`` lists them with what
their card records (backbone, recommended threshold, AUROC, the validation sweep).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_HEAD = "smollm2-135m-instruct-rtp-toxicity"
_WEIGHTS = "value_head.safetensors"


def _heads_root() -> Path:
    return Path(str(resources.files("vsteer_hf") / "heads"))


def shipped_head_names() -> list[str]:
    """Names of the heads in the package, sorted."""
    root = _heads_root()
    return sorted(p.name for p in root.iterdir() if (p / _WEIGHTS).is_file()) if root.is_dir() else []


def shipped_head_dir(name: str = DEFAULT_HEAD) -> Path:
    """Folder of the shipped head `name` (default: the toxicity head for SmolLM2-135M-Instruct)."""
    folder = _heads_root() / name
    if (folder / _WEIGHTS).is_file():
        return folder
    names = shipped_head_names()
    if name == DEFAULT_HEAD or name in names:
        raise FileNotFoundError(f"the shipped head {name!r} is missing from {folder}; reinstall vsteer-hf.")
    raise FileNotFoundError(unknown_head_message(name))


def unknown_head_message(name: str) -> str:
    """One line for a head name that is neither shipped, nor a local path, nor a hub id."""
    names = shipped_head_names()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (
        f"no value head named {name!r}: it is not a shipped head ({', '.join(names) or 'none installed'}), "
        f"not a local file or folder, and not a hub id (owner/name). {hint}List shipped heads with `vsteer heads`."
    )


def is_shipped_head(name: str) -> bool:
    return name in shipped_head_names()


@dataclass(frozen=True)
class ShippedHead:
    """One shipped head and what its card records."""

    name: str
    path: Path
    backbone: str | None
    threshold: float | None
    risk_direction: str
    results: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "backbone": self.backbone,
            "threshold": self.threshold,
            "risk_direction": self.risk_direction,
            "results": self.results,
        }


def shipped_heads() -> list[ShippedHead]:
    """Every shipped head with its backbone, recommended threshold and recorded results."""
    from vsteer_hf.head_card import HeadCard

    heads = []
    for name in shipped_head_names():
        folder = _heads_root() / name
        card = HeadCard.load(folder / (_WEIGHTS + ".meta.json"))
        heads.append(
            ShippedHead(name, folder, card.backbone, card.threshold, card.risk_direction, _results(card.training))
        )
    return heads


def _results(training: dict[str, Any]) -> dict[str, Any]:
    """The headline figures the training run recorded in the card (missing ones are left out)."""
    results: dict[str, Any] = {}
    for key in ("judge", "prompts", "val_auroc", "test_auroc_sequence"):
        if key in training:
            results[key] = training[key]
    sweep = training.get("threshold_sweep") or {}
    rows = sweep.get("rows") or []
    base = next((r for r in rows if r.get("threshold") is None), None)
    chosen = next((r for r in rows if r.get("alpha") == sweep.get("chosen_alpha") and r.get("threshold")), None)
    if base is not None and chosen is not None:
        results["sweep"] = {
            "split": sweep.get("split"),
            "prompts": base["toxic_rate"].get("n"),
            "base_toxic_rate": base["toxic_rate"]["value"],
            "vfd_toxic_rate": chosen["toxic_rate"]["value"],
            "vfd_threshold": chosen["threshold"],
            "base_perplexity": (base.get("perplexity") or {}).get("value"),
            "vfd_perplexity": (chosen.get("perplexity") or {}).get("value"),
            "interventions_per_token": chosen.get("interventions_per_token"),
        }
    return results


def format_heads(heads: list[ShippedHead]) -> str:
    """A plain-text table of shipped heads, with a legend for its columns."""
    lines = ["name | backbone | threshold | val AUROC | test AUROC | toxic rate base -> VFD (split, prompts)"]
    for h in heads:
        r = h.results
        sweep = r.get("sweep")
        rate = (
            f"{sweep['base_toxic_rate']:.3f} -> {sweep['vfd_toxic_rate']:.3f} ({sweep['split']}, {sweep['prompts']})"
            if sweep
            else "-"
        )
        thr = f"{h.threshold:.4f}" if h.threshold is not None else "-"
        lines.append(
            f"{h.name} | {h.backbone or '-'} | {thr} | {_num(r.get('val_auroc'))} | "
            f"{_num(r.get('test_auroc_sequence'))} | {rate}"
        )
    lines.append(
        "threshold: the card's recommended risk threshold (used when none is given); AUROC: per sequence (max risk) "
        "against the judge's labels; toxic rate: share of continuations the judge "
        + (f"({heads[0].results.get('judge')}) " if heads and heads[0].results.get("judge") else "")
        + "scores > 0.5, base sampling vs VFD at that threshold, from the card's threshold sweep."
    )
    return "\n".join(lines)


def _num(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "-"
