"""The decode benchmark's report: the markdown table, the JSON record and the plot."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path
from typing import Any

WORKLOAD_TEXT = {
    "never": "random prompt ids, greedy, a value head that never intervenes",
    "rtp": "RealToxicityPrompts prompts (left-padded; prompt = longest), top-p 0.9 sampling, the shipped head at "
    "its card's threshold",
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ratio(value: float, base: float) -> float | None:
    return value / base if base > 0 else None


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def fmt_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    s, m = env["settings"], env["model"]
    pressure = [
        r["cpu_pressure_avg10"] for row in rows for r in row["raw"]["repeats"] if r["cpu_pressure_avg10"] is not None
    ]
    load = (
        f"CPU pressure from other processes during the repeats (PSI some avg10): median "
        f"{statistics.median(pressure):.0f}%, max {max(pressure):.0f}%."
        if pressure
        else f"1-min load average at start {env['loadavg_1min_start']:.1f}."
    )
    cuda = m["device"] != "cpu"
    weights = "real weights" if m["name"] == "smollm2-135m" else "random weights"
    where = (
        f"GPU: {m['device']}; host CPU: {env['cpu']}"
        if cuda
        else f"CPU: {env['cpu']}, {s['threads']} threads ({env['cpu_count']} visible)"
    )
    memory_header = "peak CUDA MiB | × plain" if cuda else "peak RSS MiB | Δ RSS MiB | × plain"
    lines = [
        f"# Decode cost of value steering ({m['device']})",
        "",
        f"`{m['name']}`: {m['parameters'] / 1e6:.1f}M parameters ({weights}, "
        f"{m['non_embedding_parameters'] / 1e6:.1f}M outside the input embedding), {m['dtype']}, sdpa, "
        f"{s['new_tokens']} new tokens, {s['repeats']} repeats after a warm-up, "
        f"{WORKLOAD_TEXT[s.get('workload', 'never')]}.",
        f"{where}; torch {env['torch']}, transformers {env['transformers']}; {env['date']}. {load}",
        "",
        *([] if env.get("complete", True) else ["**Partial: the run stopped before every configuration ran.**", ""]),
        f"| prompt | batch | method | ms/token | × plain | best ms/token | × plain | tokens/s | × plain | TTFT ms "
        f"| × plain | interventions/token | {memory_header} |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" * memory_header.count("|")) + "---:|",
    ]
    for r in rows:
        v, x = r["summary"], r["vs_plain"]
        memory = (
            f"{v['cuda_peak_mib']:.0f} | {fmt_ratio(x['cuda_peak_mib'])}"
            if cuda
            else f"{v['peak_rss_mib']:.0f} | {v['rss_increase_mib']:.0f} | {fmt_ratio(x['rss_increase_mib'])}"
        )
        lines.append(
            f"| {r['prompt']} | {r['batch']} | {r['method']} "
            f"| {v['ms_per_token']:.1f} | {fmt_ratio(x['ms_per_token'])} "
            f"| {v['ms_per_token_best']:.1f} | {fmt_ratio(x['ms_per_token_best'])} "
            f"| {v['tokens_per_s']:.1f} | {fmt_ratio(x['tokens_per_s'])} "
            f"| {v['ttft_ms']:.0f} | {fmt_ratio(x['ttft_ms'])} "
            f"| {fmt_rate(r.get('interventions_per_token'))} | {memory} |"
        )
    lines += [
        "",
        "ms/token: median over repeats of each repeat's median decode step (time between consecutive tokens); "
        "best: the fastest single step, least touched by other load. tokens/s: new tokens over the median "
        "whole generate, prefill included (× plain: throughput ratio). interventions/token: committed tokens "
        "that differ from the natural sample, over all generated tokens of the warm-up run. TTFT: median "
        "generate with max_new_tokens=1 (for VFD this includes "
        "scoring the first K candidates). Peak RSS: `ru_maxrss` of the configuration's own process; Δ RSS: "
        "peak minus the RSS after the model was built; peak CUDA: `max_memory_allocated` over the timed runs, "
        "weights included. Ratios: against plain generate with the same prompt "
        "and batch, measured in the same invocation, interleaved round-robin.",
    ]
    differ = [r for r in rows if not r["tokens_match_plain"] and not r.get("interventions_per_token")]
    if differ:
        lines.append("")
        lines.append(
            "Tokens differ from plain generate without an intervention for: "
            + ", ".join(f"{r['method']} (prompt {r['prompt']}, batch {r['batch']})" for r in differ)
        )
    return "\n".join(lines) + "\n"


def plot(env: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> bool:
    """Per-token cost relative to plain generate, one line per candidate path and prompt length: against K
    when several K ran, else against the batch size. Needs matplotlib (the `eval` extra); False without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steered = [r for r in rows if r["value_steer"] and r["value_steer"].get("candidate_forward")]
    by_k = len({r["value_steer"]["num_candidates"] for r in steered}) > 1
    fig, ax = plt.subplots(figsize=(6.5, 4))
    styles = {"tree": "-o", "expand": "--s", "lazy": "-.^"}
    keys = sorted({(r["value_steer"]["candidate_forward"], r["prompt"], r["batch"] if by_k else 0) for r in steered})
    for path_name, prompt, batch in keys:
        points = sorted(
            (r["value_steer"]["num_candidates"] if by_k else r["batch"], r["vs_plain"]["ms_per_token"])
            for r in steered
            if r["value_steer"]["candidate_forward"] == path_name
            and r["prompt"] == prompt
            and (not by_k or r["batch"] == batch)
            and r["vs_plain"]["ms_per_token"] is not None
        )
        if points:
            label = f"{path_name}, prompt {prompt}" + (f", batch {batch}" if by_k else "")
            ax.plot(*zip(*points, strict=True), styles.get(path_name, "-"), label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (candidates per step)" if by_k else "batch size")
    ax.set_ylabel("ms/token ÷ plain generate")
    ax.set_title(f"VFD decode cost, {env['model']['name']} on {env['model']['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(env: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> str:
    """The markdown table to `out`, everything (raw timings included) to `out`.json, the plot to `out`.png."""
    table = markdown(env, rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    plot(env, rows, out.with_suffix(".png"))
    return table
