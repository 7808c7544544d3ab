"""Plots, each written to a PNG: the trade-off plot of `vsteer compare` (judged toxicity against
fluency, one point per method), the per-token risk of steered generations, a head's training curves
and its ĉ(α) calibration curve.

Every function works from plain data (the rows of ``compare.json``, the pipeline's stage reports,
lists of risks), so saved results can be re-plotted. matplotlib is imported inside the functions,
with the non-interactive Agg backend; it comes with the ``[eval]`` extra.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot(what: str) -> Any:
    """matplotlib.pyplot on the Agg backend (files only: nothing opens a window)."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"{what} needs matplotlib: pip install 'vsteer-hf[eval]'") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _interval(estimate: dict[str, Any] | None) -> tuple[float, float, float] | None:
    if not estimate:
        return None
    value, low, high = (float(estimate.get(k, math.nan)) for k in ("value", "low", "high"))
    return None if math.isnan(value) else (value, low, high)


def _label(name: str) -> str:
    """A method name short enough for the plot: a model folder path keeps only its last part."""
    prefix, _, ident = name.rpartition("model:")
    if ident.startswith(("/", ".", "~")) or ident.count("/") > 1:
        return f"{prefix}model:.../{Path(ident).name}"
    return name


def _annotate(ax: Any, labels: list[tuple[str, float, float]], dpi: float, fontsize: float = 8) -> None:
    """Label each point to its upper right, lifting a label while its box would overlap an earlier one."""
    ax.get_xlim(), ax.get_ylim()  # settle autoscaling before reading positions
    char_px, step_pt = 0.6 * fontsize * dpi / 72, fontsize * 1.4
    placed: list[tuple[float, float, float]] = []  # (left px, right px, baseline px)
    for text, xv, yv in labels:
        px, py = ax.transData.transform((xv, yv))
        left, right = px + 8 * dpi / 72, px + 8 * dpi / 72 + len(text) * char_px
        level = 0
        while any(
            left < r0 and l0 < right and abs(py + level * step_pt * dpi / 72 - b0) < step_pt * dpi / 72
            for l0, r0, b0 in placed
        ):
            level += 1
        placed.append((left, right, py + level * step_pt * dpi / 72))
        ax.annotate(text, (xv, yv), xytext=(8, 4 + level * step_pt), textcoords="offset points", fontsize=fontsize)


def tradeoff_plot(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    x: str = "perplexity",
    y: str = "toxic_rate",
    title: str | None = None,
    curves: dict[str, Sequence[dict[str, Any]]] | None = None,
) -> Path:
    """Write a PNG of `y` (default the judge's toxic rate) against `x` (default the perplexity of the
    generations under the base model), with their 95% intervals as error bars. Marker area grows with
    tokens/s, which is also printed beside each name. Methods without both numbers (failed ones
    included) are listed under the plot instead. `curves` (name -> points with the same `x`/`y`
    entries, e.g. a threshold or a ProFS sweep) are drawn as lines through their points, sorted by `x`.
    """
    plt = _pyplot("the trade-off plot")
    points, missing = [], []
    for row in rows:
        px, py = _interval(row.get(x)), _interval(row.get(y))
        if row.get("error") or px is None or py is None:
            missing.append(f"{row.get('name')}: {'failed' if row.get('error') else 'no ' + (x if px is None else y)}")
            continue
        points.append((row["name"], px, py, row.get("tokens_per_s")))
    speeds = [s for *_, s in points if isinstance(s, (int, float)) and math.isfinite(s) and s > 0]
    fastest = max(speeds, default=1.0)

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    try:
        colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
        labels = []
        for i, (name, (xv, xl, xh), (yv, yl, yh), speed) in enumerate(points):
            ok = isinstance(speed, (int, float)) and math.isfinite(speed) and speed > 0
            size = 40 + 400 * (speed / fastest if ok else 0.0)
            colour = colours[i % len(colours)]
            ax.errorbar(
                xv,
                yv,
                xerr=[[max(xv - xl, 0.0)], [max(xh - xv, 0.0)]],
                yerr=[[max(yv - yl, 0.0)], [max(yh - yv, 0.0)]],
                fmt="none",
                ecolor=colour,
                alpha=0.6,
                capsize=3,
            )
            ax.scatter([xv], [yv], s=size, color=colour, alpha=0.8, edgecolors="black", linewidths=0.5, zorder=3)
            labels.append((f"{_label(name)} ({speed:.1f} tok/s)" if ok else _label(name), xv, yv))
        for j, (name, curve) in enumerate((curves or {}).items()):
            xy = sorted(
                (c[0], d[0]) for p in curve if (c := _interval(p.get(x))) is not None and (d := _interval(p.get(y)))
            )
            if xy:
                ax.plot(*zip(*xy, strict=True), linestyle="--", marker="o", markersize=4, linewidth=1.2,
                        color=f"C{(len(points) + j) % 10}", label=f"{name} sweep", zorder=2)  # fmt: skip
        if curves:
            ax.legend(fontsize=8, loc="upper right")
        ax.set_xlabel("perplexity of the generations under the base model (lower: more fluent)")
        ax.set_ylabel("toxic rate by the judge (lower: safer)")
        ax.set_title(title or "vsteer compare: toxicity vs fluency (95% CIs; marker area ~ tokens/s)", fontsize=10)
        ax.grid(True, alpha=0.3)
        if y == "toxic_rate" and points:
            top = max(p[2][2] for p in points)
            ax.set_ylim(-0.02, min(1.05, max(top, 0.05) * 1.15 + 0.02 * len(points)))
        _annotate(ax, labels, fig.dpi)
        if not points:
            ax.text(0.5, 0.5, "no method has both numbers", ha="center", va="center", transform=ax.transAxes)
        if missing:
            fig.text(0.01, 0.01, "not plotted: " + "; ".join(missing), fontsize=7, va="bottom", wrap=True)
            fig.subplots_adjust(bottom=0.18)
        return _save(fig, path)
    finally:
        plt.close(fig)


def _token_label(token: str, width: int = 10) -> str:
    """A token as a tick label: line breaks and tabs made visible, long pieces cut."""
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= width else text[: width - 1] + "…"


def risk_plot(
    traces: Sequence[dict[str, Any]], threshold: float, path: str | os.PathLike, title: str | None = None
) -> Path:
    """Write a PNG with one panel per generation: the value head's risk of each committed token, the
    threshold as a dashed line, and the interventions (tokens VFD committed instead of the plain
    sample) as red crosses. Each trace is a dict with ``name`` and ``risks`` and, optionally,
    ``tokens`` (strings, written under the axis) and ``interventions`` (booleans). NaN risks (steps
    after a row finished) are left out.
    """
    if not traces:
        raise ValueError("risk_plot needs at least one trace ({'name', 'risks', ...})")
    panels = []
    for trace in traces:
        risks = [float(r) for r in trace["risks"]]
        tokens, marks = trace.get("tokens"), trace.get("interventions")
        for key, values in (("tokens", tokens), ("interventions", marks)):
            if values is not None and len(values) != len(risks):
                raise ValueError(
                    f"trace {trace['name']!r}: {len(values)} {key} for {len(risks)} risks; give one per token"
                )
        keep = [i for i, r in enumerate(risks) if not math.isnan(r)]
        panels.append(
            (
                str(trace["name"]),
                [risks[i] for i in keep],
                [str(tokens[i]) for i in keep] if tokens is not None else None,
                [bool(marks[i]) for i in keep] if marks is not None else [False] * len(keep),
            )
        )
    plt = _pyplot("the risk plot")
    longest = max((len(p[1]) for p in panels), default=0)
    labelled = any(p[2] is not None for p in panels)
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(min(24.0, max(7.0, 0.24 * longest)), (3.0 if labelled else 2.2) * len(panels) + 0.6),
        dpi=110,
        sharey=True,
        squeeze=False,
    )
    try:
        for ax, (name, risks, tokens, marks) in zip(axes[:, 0], panels, strict=True):
            steps = list(range(len(risks)))
            ax.plot(steps, risks, marker="o", markersize=3, linewidth=1.2, color="C0", label="risk")
            ax.axhline(threshold, linestyle="--", color="grey", linewidth=1, label=f"threshold {threshold:.3f}")
            hits = [i for i in steps if marks[i]]
            if hits:
                ax.scatter(hits, [risks[i] for i in hits], marker="x", s=60, color="C3", zorder=3, label="intervention")
            ax.set_title(f"{name}: {len(hits)} interventions in {len(risks)} tokens", fontsize=9, loc="left")
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlim(-0.5, max(longest, 1) - 0.5)
            ax.set_ylabel("risk")
            ax.grid(True, alpha=0.3)
            if tokens is not None:
                ax.set_xticks(steps)
                ax.set_xticklabels([_token_label(t) for t in tokens], rotation=90, fontsize=7)
            else:
                ax.set_xlabel("generated token")
            ax.legend(loc="upper right", fontsize=7)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def training_plot(
    history: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    best_epoch: int | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG of the training and validation loss per epoch: the ``history`` of `train_value_head`
    (or of the pipeline's ``train.json``), with ``best_epoch`` (the one kept) marked."""
    if not history:
        raise ValueError("training_plot needs a non-empty history (one dict per epoch)")
    plt = _pyplot("the training plot")
    epochs = [int(row["epoch"]) for row in history]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    try:
        ax.plot(epochs, [float(row["train_loss"]) for row in history], marker="o", label="train loss")
        val = [float(row.get("val_loss", math.nan)) for row in history]
        if not all(math.isnan(v) for v in val):
            ax.plot(epochs, val, marker="o", label="validation loss")
        if best_epoch is not None:
            ax.axvline(best_epoch, linestyle="--", color="grey", linewidth=1, label=f"kept: epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (focal + TD-coherence)")
        ax.set_xticks(epochs)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title or "value head training", fontsize=10)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def calibration_plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path:
    """Write a PNG of a head's calibration from `calibration_report` rows (``calibrate.json``'s ``table``):
    left, the threshold ĉ(α) per α; right, the false-intervention rate measured on held-out safe
    generations, with its 95% Wilson interval, against the target rate α."""
    if not rows:
        raise ValueError("calibration_plot needs calibration rows (one dict per alpha)")
    plt = _pyplot("the calibration plot")
    rows = sorted(rows, key=lambda r: float(r["alpha"]))
    alphas = [float(r["alpha"]) for r in rows]
    rates = [float(r["false_intervention_rate"]) for r in rows]
    low = [max(0.0, rate - float(r["wilson_low"])) for rate, r in zip(rates, rows, strict=True)]
    high = [max(0.0, float(r["wilson_high"]) - rate) for rate, r in zip(rates, rows, strict=True)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    try:
        left.plot(alphas, [float(r["threshold"]) for r in rows], marker="o")
        left.set_xlabel("α (target false-intervention rate)")
        left.set_ylabel("threshold ĉ(α)")
        left.set_title(f"ĉ(α) from {rows[0].get('n_calib', '?')} safe calibration generations", fontsize=9)
        right.errorbar(alphas, rates, yerr=[low, high], fmt="o", capsize=3, label="held-out rate (95% Wilson)")
        right.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="target: rate = α")
        right.set_xlim(0, min(1.0, max(alphas) * 1.1 + 0.02))
        right.set_ylim(0, 1)
        right.set_xlabel("α")
        right.set_ylabel("false-intervention rate")
        right.set_title(f"measured on {rows[0].get('n_heldout', '?')} held-out safe generations", fontsize=9)
        right.legend(fontsize=8, loc="upper left")
        for ax in (left, right):
            ax.grid(True, alpha=0.3)
        fig.suptitle(title or "calibration: intervene when risk ≥ ĉ(α)", fontsize=10)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)
