"""The comparison's result: one row per method, its markdown table and notes, and the files it writes."""

from __future__ import annotations

import dataclasses
import json
import platform
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vsteer_hf.eval.stats import Estimate

DISTINCT_N = (1, 2, 3)


@dataclass
class MethodRow:
    """One method's numbers (None where not measured) and its `error` if it failed."""

    name: str
    model: str
    n: int = 0
    toxic_rate: Estimate | None = None
    toxicity_mean: Estimate | None = None
    unsafe_rate: Estimate | None = None
    overrefusal: Estimate | None = None
    perplexity: Estimate | None = None
    reference_perplexity: float | None = None
    distinct: dict[int, float] = field(default_factory=dict)
    tokens_per_s: float | None = None
    peak_memory_mib: float | None = None
    interventions_per_token: float | None = None
    abstain_rate: float | None = None
    seconds: float | None = None
    error: str | None = None
    metric_errors: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = value.as_dict() if isinstance(value, Estimate) else value
        data["distinct"] = {f"distinct-{n}": v for n, v in self.distinct.items()}
        return data


def _cell(row: MethodRow, name: str, fmt: Callable[[Any], str] = str) -> str:
    if name in row.metric_errors:
        return "error"
    value = getattr(row, name)
    return "–" if value is None else fmt(value)


@dataclass
class CompareResult:
    """Rows in the order the methods were given, notes on how to read them, and the settings used."""

    rows: list[MethodRow]
    notes: list[str]
    settings: dict[str, Any]
    reference: dict[str, Any] | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # extra trade-off points per method
    equal_fluency: dict[str, Any] | None = None  # each method at the fluency budget (compare_curves)
    profs_selection: dict[str, Any] | None = None  # the validation sweep that chose ProFS's setting
    profs_selection_table: str | None = None

    def table(self) -> str:
        """Markdown table, one row per method; "–" = not measured, "error" = see the notes."""
        lines = [
            "| method | n | toxic rate | mean toxicity | unsafe rate | over-refusal | perplexity (base model) "
            "| reference ppl | distinct-1/2/3 | tokens/s | peak mem (MiB) | error |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            distinct = " / ".join(f"{r.distinct[n]:.3f}" for n in DISTINCT_N) if r.distinct else "–"
            error = (r.error or "").replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| {r.name} | {r.n} | {_cell(r, 'toxic_rate')} | {_cell(r, 'toxicity_mean')} "
                f"| {_cell(r, 'unsafe_rate')} | {_cell(r, 'overrefusal')} | {_cell(r, 'perplexity')} "
                f"| {_cell(r, 'reference_perplexity', lambda v: f'{v:.2f}')} | {distinct} "
                f"| {_cell(r, 'tokens_per_s', lambda v: f'{v:.1f}')} "
                f"| {_cell(r, 'peak_memory_mib', lambda v: f'{v:.0f}')} | {error} |"
            )
        return "\n".join(lines)

    def markdown(self) -> str:
        """The table followed by the notes and any per-metric errors."""
        from vsteer_hf.eval.compare_curves import equal_fluency_markdown

        parts = ["# vsteer compare", "", self.table(), ""]
        if self.equal_fluency is not None:
            parts += [*equal_fluency_markdown(self.equal_fluency), ""]
        if self.profs_selection_table is not None:
            budget = self.profs_selection["budget"]
            parts += ["## ProFS selection (validation split)", "", f"Budget: +{budget:.0%} reference perplexity.", ""]
            parts += [self.profs_selection_table, ""]
        parts += ["## Notes", ""]
        parts += [f"- {note}" for note in self.notes]
        errors = [f"- {r.name} / {m}: {e}" for r in self.rows for m, e in r.metric_errors.items()]
        if errors:
            parts += ["", "## Metric errors", "", *errors]
        return "\n".join(parts) + "\n"

    def as_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "environment": self.environment,
            "reference_text": self.reference,
            "rows": [r.as_dict() for r in self.rows],
            "notes": self.notes,
            "curves": self.curves,
            "equal_fluency": self.equal_fluency,
            "profs_selection": self.profs_selection,
        }

    def _plot_curves(self) -> dict[str, list[dict[str, Any]]]:
        """Each method's curve for the plot: the base row, then the method's row and its extra points."""
        if self.equal_fluency is None:
            return {}
        base = self.equal_fluency["base"]
        return {name: [base, *points] for name, points in self.equal_fluency["methods"].items()}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, default=str) + "\n"

    def write(self, out: str | Path) -> dict[str, Path]:
        """Write compare.md, compare.json and compare.png (the trade-off plot; skipped with a warning when
        matplotlib is missing) into `out`; returns the paths written."""
        from vsteer_hf.eval.plots import tradeoff_plot

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"md": folder / "compare.md", "json": folder / "compare.json", "png": folder / "compare.png"}
        paths["md"].write_text(self.markdown(), encoding="utf-8")
        paths["json"].write_text(self.to_json(), encoding="utf-8")
        try:
            tradeoff_plot(self.as_dict()["rows"], paths["png"], curves=self._plot_curves())
        except ImportError as err:  # the numbers are written; only the picture is missing
            warnings.warn(f"compare.png not written: {err}", stacklevel=2)
            del paths["png"]
        return paths


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return getattr(value, "name", None) or getattr(value, "__name__", None) or repr(value)


def comparison_notes(job: Any, specs: Sequence[Any], rows: Sequence[MethodRow]) -> list[str]:
    """The notes on how to read the table, from the state of a finished comparison `job` (its options,
    prompts, reference text, head) followed by the notes the job collected while running."""
    opts, s = job.options, job.settings
    notes = [
        f"Every method sampled the same {len(job.prompts)} prompts ({opts.prompts}, "
        f"{f'split {opts.split}' if opts.split else 'all splits'}) x "
        f"{s.samples_per_prompt} samples with the same seeds (seed {s.seed}): top-p {s.top_p}, temperature "
        f"{s.temperature}, at most {s.max_new_tokens} new tokens, chat template {'on' if s.chat else 'off'}. "
        "Intervals are 95% percentile bootstraps over prompts.",
        f"toxic rate / mean toxicity: judge {_jsonable(opts.judge)!s}, toxic when score > {opts.judge_threshold}.",
    ]
    if opts.safety_judge is None:
        notes.append("unsafe rate: no --safety-judge given (column –).")
    else:
        notes.append(f"unsafe rate: judge {_jsonable(opts.safety_judge)!s}, unsafe when P(unsafe) > 0.5.")
    if opts.overrefusal_limit > 0:
        notes.append(
            f"over-refusal: share of {len(job.benign)} benign-but-edgy prompts ({opts.overrefusal_prompts}) "
            "refused (AdvBench refusal markers, RefusalJudge(undesirable='refusal')) or abstained on; one "
            "sample each, in the chat template when the method's tokenizer has one."
            + (f" Not measured: {job.benign_error}" if job.benign_error else "")
        )
    notes.append(
        f"perplexity (base model): of each method's continuations given their prompts under the base model "
        f"({opts.model}), pooled over tokens."
        + (
            f" Methods with another tokenizer ({', '.join(job.retokenized)}) were re-tokenized with the base tokenizer."
            if job.retokenized
            else ""
        )
    )
    if opts.reference_tokens > 0:
        if job.reference is not None:
            ref = job.reference
            notes.append(
                f"reference ppl: the first {opts.reference_tokens} tokens of {ref.name} ({ref.source}; "
                f"{ref.licence}; sha256 {ref.sha256}) under each method's own model and tokenizer, windows of "
                "at most 512 tokens. A fixed text, so no interval; steering acts at decode time, so vfd and "
                "abstain share their model's value; values under different tokenizers are not comparable."
            )
        else:
            notes.append(f"reference ppl: not measured ({job.reference_error}).")
    notes.append(
        "distinct-1/2/3: unique word n-grams / all word n-grams, pooled over all generations of a method. "
        "It is a corpus-level ratio that falls as the sample grows (resampling duplicates texts), so it has "
        "no bootstrap interval: compare methods at equal n."
    )
    if job.device.type == "cuda":
        notes.append("peak mem: torch.cuda.max_memory_allocated during the method's generation (weights included).")
    else:
        notes.append(
            "peak mem (CPU): growth of the process's RSS high-water mark (ru_maxrss) during the method's "
            "generation. ru_maxrss never falls, so 0 means the method stayed under an earlier peak; methods "
            "are run base-model ones first, then ProFS, then other models, so heavier ones come last."
        )
    notes.append("tokens/s: generated tokens / wall time inside generate, main prompts only.")
    if any(spec.mode for spec in specs):
        threshold = opts.threshold
        if threshold is None and job._head is not None:
            threshold = job._head.card.threshold
        notes.append(
            f"vfd / abstain: head {opts.head or 'shipped with vsteer_hf'} at threshold {_fmt(threshold)} (the head "
            f"card's unless --threshold), K={opts.num_candidates} candidates per step for VFD."
        )
    if any(spec.name == "profs+vfd" for spec in specs):
        notes.append(
            "profs+vfd: the head was trained on the BASE model's features; the ProFS edit shifts the hidden "
            "states it reads, so its risks (and the threshold's calibration) are off-distribution there."
        )
    failed = [r.name for r in rows if r.error]
    if failed:
        notes.append(f"failed methods ({', '.join(failed)}) are kept with their error; their numbers are –.")
    return notes + job.notes


def _environment(device: torch.device) -> dict[str, Any]:
    import importlib.metadata

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "vsteer_hf": version("vsteer-hf"),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _fmt(value: float | None) -> str:
    """A threshold as the notes print it: four decimals are what anyone sets."""
    return "none" if value is None else f"{value:.4f}"
