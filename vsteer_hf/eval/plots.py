"""The trade-off plot of `vsteer compare`: judged toxicity against fluency, one point per method.

Works from the rows of ``compare.json`` (plain dicts), so a saved comparison can be re-plotted.
matplotlib is imported inside the function, with the non-interactive Agg backend; it comes with the
``[eval]`` extra.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
) -> Path:
    """Write a PNG of `y` (default the judge's toxic rate) against `x` (default the perplexity of the
    generations under the base model), with their 95% intervals as error bars. Marker area grows with
    tokens/s, which is also printed beside each name. Methods without both numbers (failed ones
    included) are listed under the plot instead.
    """
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("the trade-off plot needs matplotlib: pip install 'vsteer-hf[eval]'") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
