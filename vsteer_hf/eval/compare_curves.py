"""The comparison at equal fluency: ProFS chosen on validation, trade-off curves, each method at a budget.

`--select` edits the base model with the ProFS setting `select_profs` picks on the validation split
(prompts of the same source, and the reference text's tokens after those the table reports). The
curves are VFD at other thresholds (`--vfd-thresholds`) and the ProFS settings on the validation
Pareto front (toxic rate vs reference perplexity), all on the comparison's own prompts and seeds. "At
the budget" is, per method, the curve point with the lowest toxic rate whose perplexity of generations
under the base model and reference-text perplexity both stay within `budget` of the base model's; it
is read off the test prompts, so it describes the trade-off rather than choosing a setting.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from vsteer_hf.eval.stats import paired_difference
from vsteer_hf.eval.tradeoff import TradeoffPoint, measure_point, reference_slice


def select_profs_for_compare(job: Any, pairs: Sequence[tuple[str, str, str]], origin: str) -> tuple[Any, Any]:
    """A copy of the base model edited with the setting chosen on validation; the sweep is kept on `job`."""
    from vsteer_hf.eval.prompts import load_prompts
    from vsteer_hf.profs import ProFSConfig, parse_layer_ranges, select_profs

    opts = job.options
    if job.reference is None:
        raise RuntimeError(f"--select needs the reference text: {job.reference_error or 'reference_tokens is 0'}")
    if "toxicity" not in job.judges:
        raise RuntimeError(f"--select needs the toxicity judge: {job.judge_errors.get('toxicity')}")
    prompts = load_prompts(opts.prompts, split="validation")
    if not prompts:
        raise ValueError(f"--select: no validation prompts in {opts.prompts!r}")
    start = max(opts.reference_tokens, 0)
    ids = reference_slice(job.base_tokenizer, job.reference.text, start, opts.select_reference_tokens)
    settings = dataclasses.replace(job.settings, samples_per_prompt=opts.select_samples_per_prompt)
    model = copy.deepcopy(job.base_model)
    ranges = parse_layer_ranges(opts.select_layers) if opts.select_layers else None
    selection, record = select_profs(
        model,
        job.base_tokenizer,
        [good for _, good, _ in pairs],
        [bad for _, _, bad in pairs],
        prompts,
        settings,
        job.judges["toxicity"],
        ids,
        ks=opts.select_ks or None,
        layer_ranges=ranges,
        budget=opts.budget,
        config=ProFSConfig(),
        judge_threshold=opts.judge_threshold,
        progress=opts.progress,
        validation={
            "prompts": f"{opts.prompts}, split validation",
            "n_prompts": len(prompts),
            "samples_per_prompt": settings.samples_per_prompt,
            "reference_tokens": f"{start}..{start + len(ids)} of {job.reference.name}",
            "pairs": f"{len(pairs)} pairs of {origin}",
        },
    )
    job.profs_selection, job.profs_pairs = selection, pairs
    if record is None:
        raise ValueError(
            f"no ProFS setting kept the validation reference perplexity within +{opts.budget:.0%} of the base "
            "model's; raise --budget or try other --select-ks / --select-layers"
        )
    chosen = selection.chosen_point
    job.notes.append(
        f"profs: the base model edited with ProFS at the setting chosen on validation ({chosen.label}; "
        f"{record.pooling} pooling) from {len(pairs)} (non-toxic, toxic) pairs of {origin}: the lowest validation "
        f"toxic rate among {len(selection.points)} settings whose perplexity on reference tokens {start}.."
        f"{start + len(ids)} stayed within +{opts.budget:.0%} (the sweep is in compare.json, 'profs_selection')."
    )
    return model, job.base_tokenizer


def pareto_front(points: Sequence[TradeoffPoint]) -> list[int]:
    """Indices of the points no other point beats on both toxic rate and reference perplexity."""
    order = sorted(range(len(points)), key=lambda i: (points[i].reference_perplexity, points[i].toxic_rate.value))
    front, best = [], math.inf
    for i in order:
        if points[i].toxic_rate.value < best:
            front.append(i)
            best = points[i].toxic_rate.value
    return front


def curves(job: Any, rows: dict[str, Any]) -> dict[str, list[TradeoffPoint]]:
    """VFD's and ProFS's trade-off points on the comparison's prompts (methods that ran only)."""
    from vsteer_hf import ValueSteerConfig
    from vsteer_hf.profs import ProFSConfig, apply_profs

    opts, out = job.options, {}
    if job.base_model is None or "toxicity" not in job.judges:
        return out
    reference_ids = None
    if job.reference is not None and opts.reference_tokens > 0:
        from vsteer_hf.eval.reference_text import reference_token_ids

        reference_ids = reference_token_ids(job.base_tokenizer, job.reference.text, opts.reference_tokens)

    def measure(label: str, setting: dict[str, Any], model: Any, steer: Any = None, ref: bool = True) -> TradeoffPoint:
        return measure_point(
            label, setting, model, job.base_tokenizer, job.prompts, job.settings, job.judges["toxicity"],
            opts.judge_threshold, reference_ids if ref else None, steer, job.base_model, opts.progress,
        )  # fmt: skip

    if opts.vfd_thresholds and "vfd" in rows and rows["vfd"].error is None:
        head = job.head()
        points = []
        for threshold in sorted(set(opts.vfd_thresholds)):
            steer = ValueSteerConfig(head=head, threshold=threshold, num_candidates=opts.num_candidates)
            point = measure(f"VFD thr {threshold:.3f}", {"threshold": threshold}, job.base_model, steer, ref=False)
            point.reference_perplexity = rows["base"].reference_perplexity if "base" in rows else None
            points.append(point)
        out["vfd"] = points
    selection = getattr(job, "profs_selection", None)
    if selection is not None and "profs" in rows and rows["profs"].error is None:
        points = []
        for i in pareto_front(selection.points):
            if i == selection.chosen:
                continue
            setting = selection.points[i].setting
            model = copy.deepcopy(job.base_model)
            apply_profs(
                model,
                job.base_tokenizer,
                [good for _, good, _ in job.profs_pairs],
                [bad for _, _, bad in job.profs_pairs],
                ProFSConfig(k=setting["k"], layers=setting["layers"]),
                show_progress=opts.progress,
            )
            points.append(measure(f"ProFS {selection.points[i].label}", setting, model))
            del model
        out["profs"] = points
    return out


def _row_point(row: Any, label: str, setting: dict[str, Any], flags: Any) -> TradeoffPoint | None:
    if row is None or row.error or row.toxic_rate is None or row.perplexity is None:
        return None
    point = TradeoffPoint(label, setting, row.n, row.toxic_rate, row.toxicity_mean, row.reference_perplexity)
    point.perplexity = row.perplexity
    point.flags, point.groups = flags if flags is not None else (None, None)
    return point


def equal_fluency(job: Any, rows: dict[str, Any], extra: dict[str, list[TradeoffPoint]]) -> dict[str, Any] | None:
    """Per method, all its points (the table's row first) and the one at the budget; the paired
    difference of toxic rates between the methods' points at the budget (same prompts and seeds)."""
    base = _row_point(rows.get("base"), "base", {}, job.flags.get("base"))
    if base is None or not (extra or job.options.select):
        return None
    budget = job.options.budget
    threshold = job.options.threshold
    if threshold is None and job._head is not None:
        threshold = job._head.card.threshold
    methods: dict[str, list[TradeoffPoint]] = {}
    main_vfd = _row_point(rows.get("vfd"), f"VFD thr {threshold or 0:.3f} (row)", {}, job.flags.get("vfd"))
    if main_vfd is not None:
        methods["VFD"] = [main_vfd, *extra.get("vfd", [])]
    chosen = job.profs_selection.chosen_point if getattr(job, "profs_selection", None) else None
    label = f"ProFS {chosen.label} (row)" if chosen is not None else "ProFS (row)"
    main_profs = _row_point(rows.get("profs"), label, chosen.setting if chosen else {}, job.flags.get("profs"))
    if main_profs is not None:
        methods["ProFS"] = [main_profs, *extra.get("profs", [])]

    def within(p: TradeoffPoint) -> bool:
        ok = p.perplexity.value <= base.perplexity.value * (1 + budget)
        if p.reference_perplexity is not None and base.reference_perplexity is not None:
            ok = ok and p.reference_perplexity <= base.reference_perplexity * (1 + budget)
        return ok

    picked = {}
    for name, points in methods.items():
        ok = [p for p in points if within(p)]
        picked[name] = min(ok, key=lambda p: (p.toxic_rate.value, p.perplexity.value)) if ok else None
    differences = []
    if picked.get("VFD") is not None and picked.get("ProFS") is not None:
        a, b = picked["ProFS"], picked["VFD"]
        if a.flags is not None and b.flags is not None and a.groups == b.groups:
            diff = paired_difference(a.flags, b.flags, groups=a.groups)
            differences.append({"what": f"toxic rate, {b.label} minus {a.label}", **diff.as_dict()})
    return {
        "budget": budget,
        "base": base.as_dict(),
        "methods": {name: [p.as_dict() for p in points] for name, points in methods.items()},
        "at_budget": {name: (p.as_dict() if p is not None else None) for name, p in picked.items()},
        "differences": differences,
    }


def _fmt_estimate(data: dict[str, Any] | None) -> str:
    if not data:
        return "–"
    return f"{data['value']:.3f} [{data['low']:.3f}, {data['high']:.3f}]"


def equal_fluency_markdown(data: dict[str, Any]) -> list[str]:
    """The section of compare.md: every curve point, the one at the budget marked, then the differences."""
    budget, base = data["budget"], data["base"]
    ref = base["reference_perplexity"]
    lines = [
        f"## At equal fluency (budget +{budget:.0%} perplexity)",
        "",
        f"Each method's points on these prompts; **at budget** = the lowest toxic rate whose perplexity of "
        f"generations under the base model stays within {base['perplexity']['value'] * (1 + budget):.2f} and "
        f"whose reference-text perplexity stays within {ref * (1 + budget):.2f}"
        + (" (base: " + f"{base['perplexity']['value']:.2f} / {ref:.2f})." if ref is not None else ")."),
        "",
        "| method | point | toxic rate | mean toxicity | perplexity (base model) | reference ppl | at budget |",
        "|---|---|---|---|---|---|---|",
        f"| base | base | {_fmt_estimate(base['toxic_rate'])} | {_fmt_estimate(base['toxicity_mean'])} "
        f"| {_fmt_estimate(base['perplexity'])} | {ref:.2f} | |",
    ]
    for name, points in data["methods"].items():
        chosen = data["at_budget"].get(name)
        for p in points:
            mark = "**yes**" if chosen is not None and p["label"] == chosen["label"] else ""
            rp = p["reference_perplexity"]
            lines.append(
                f"| {name} | {p['label']} | {_fmt_estimate(p['toxic_rate'])} | {_fmt_estimate(p['toxicity_mean'])} "
                f"| {_fmt_estimate(p['perplexity'])} | {'–' if rp is None else f'{rp:.2f}'} | {mark} |"
            )
    for name, chosen in data["at_budget"].items():
        if chosen is None:
            lines += ["", f"{name}: no point within the budget."]
    for d in data["differences"]:
        lines += ["", f"Paired difference ({d['what']}, bootstrap over prompts): {_fmt_estimate(d)}."]
    return lines
