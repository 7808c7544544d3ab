"""Which options made each pipeline stage, so that a stage is reused only for the options that made it.

Each option of `PipelineConfig` belongs to the first stage that reads it. A stage's report carries a
fingerprint: its options and the run id of every earlier stage it was built on. A completed stage is
fresh while both still hold; reusing a stale one would mix the outputs of two recipes silently.
Reports written before fingerprints existed are adopted once, with a warning, as made with the options
of the `pipeline.json` found beside them (the old code rewrote it on every run); without one they
cannot be judged and are refused.
"""

from __future__ import annotations

import json
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

STAGE_OPTIONS: dict[str, tuple[str, ...]] = {
    "extract": (
        "backbone",
        "dtype",
        "prompts",
        "limit",
        "chat",
        "samples_per_prompt",
        "train_samples_per_prompt",
        "max_new_tokens",
        "top_p",
        "temperature",
        "batch_size",  # each batch is seeded from its first item: the batch size changes the draws
        "seed",
    ),
    "label": ("judge", "judge_threshold"),
    "train": ("train", "targets", "rounds", "round_alpha", "round_num_candidates"),
    "calibrate": ("alphas", "calibration_folds"),
    "sweep": ("sweep_alphas", "sweep_samples_per_prompt", "num_candidates"),
}
# Where training runs is the machine's, like the pipeline's --device: it does not define the recipe.
UNRECORDED_TRAIN_OPTIONS = ("device",)
# One round (no on-policy round) reads none of these: they stay out of its fingerprint, which is the
# fingerprint of the train stage before rounds existed.
ROUND_OPTIONS = ("rounds", "round_alpha", "round_num_candidates")


# Options added later, left out of a fingerprint while at the value that reproduces the runs before them,
# so a work folder made before they existed stays fresh.
NEUTRAL_VALUES = {"train_samples_per_prompt": None, "targets": "label", "calibration_folds": 0}


def stage_options(config: dict[str, Any], stage: str) -> dict[str, Any]:
    """The options of `config` (a `PipelineConfig.to_dict()`) that make `stage`, as JSON would store them."""
    options = {name: config.get(name, NEUTRAL_VALUES.get(name)) for name in STAGE_OPTIONS[stage]}
    options = {k: v for k, v in options.items() if k not in NEUTRAL_VALUES or v != NEUTRAL_VALUES[k]}
    if options.get("train_samples_per_prompt") == config.get("samples_per_prompt"):
        options.pop("train_samples_per_prompt")  # the same draws as leaving it unset
    if options.get("rounds", 1) == 1:
        options = {k: v for k, v in options.items() if k not in ROUND_OPTIONS}
    if "train" in options:
        options["train"] = {k: v for k, v in options["train"].items() if k not in UNRECORDED_TRAIN_OPTIONS}
    return json.loads(json.dumps(options, sort_keys=True))


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class Freshness:
    """Whether a stage's outputs may be reused: `status` is missing | fresh | options | inputs | unknown."""

    status: str
    reason: str = ""


def freshness(stage: str, report: dict[str, Any] | None, options: dict[str, Any], inputs: dict[str, str]) -> Freshness:
    """Judge a stage's report against the options of this run and the run ids of the earlier stages now on disk."""
    if report is None:
        return Freshness("missing")
    fingerprint = report.get("fingerprint")
    if fingerprint is None:
        return Freshness("unknown", "it predates option fingerprints and no pipeline.json says what made it")
    made = fingerprint["options"]  # a later option missing from it was at its neutral value
    changed = [_describe(name, made.get(name, NEUTRAL_VALUES.get(name)), value) for name, value in options.items()]
    dropped = sorted(set(made) - set(options))  # e.g. made with rounds=2, now one round
    changed = [c for c in changed if c]
    changed += [f"{name}={made[name]!r} (this run: unset)" for name in dropped]
    if changed:
        return Freshness("options", f"it was made with {'; '.join(changed)}")
    for earlier, run_id in inputs.items():
        if fingerprint["inputs"].get(earlier) != run_id:
            return Freshness("inputs", f"stage {earlier!r} was recomputed after it")
    return Freshness("fresh")


def _describe(name: str, made: Any, now: Any) -> str:
    if made == now:
        return ""
    if isinstance(made, dict) and isinstance(now, dict):
        return "; ".join(filter(None, (_describe(f"{name}.{k}", made.get(k), now.get(k)) for k in sorted(now))))
    return f"{name}={made!r} (this run: {now!r})"


def adopt_legacy_reports(
    reports: dict[str, dict[str, Any]], stored_config: dict[str, Any] | None, where: str
) -> list[str]:
    """Give reports without a fingerprint one from `stored_config`, in place; return the adopted stages.

    An earlier stage that finished after a later one was re-run after it: the later one is recorded as
    built on an unknown run, so it is stale. Without `stored_config` nothing is adopted (freshness says so).
    """
    if stored_config is None:
        return []
    adopted, previous = [], []
    for stage in STAGE_OPTIONS:
        report = reports.get(stage)
        if report is None:
            continue
        report.setdefault("run_id", f"legacy-{report.get('finished', 'unknown')}")
        if "fingerprint" not in report:
            finished = report.get("finished", "")
            inputs = {
                name: (reports[name]["run_id"] if reports[name].get("finished", "") <= finished else "unknown")
                for name in previous
            }
            report["fingerprint"] = {"options": stage_options(stored_config, stage), "inputs": inputs}
            adopted.append(stage)
        previous.append(stage)
    if adopted:
        warnings.warn(
            f"{where}: stages {adopted} predate option fingerprints; adopting them as made with the options of "
            "its pipeline.json (recompute with --force, or use a new --workdir, if that is not so).",
            stacklevel=3,
        )
    return adopted
