"""`vsteer extract|label|train|calibrate|sweep|pipeline`: one pipeline stage, or all, in a work folder.

Argument parsing and the one-line stage summaries; the stages themselves are `vsteer_hf.train.pipeline`
(imported only when a stage runs, so `vsteer --help` loads no torch).
"""

from __future__ import annotations

import argparse
import json
from typing import Any


class StageCommand:
    """One pipeline stage (or all of them) in a work folder; settings persist in `<workdir>/pipeline.json`."""

    def __init__(self, name: str, help: str, stages: tuple[str, ...]) -> None:
        self.name, self.help, self.stages = name, help, stages

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--workdir", required=True, help="work folder (created; stages resume inside it)")
        parser.add_argument("--force", action="store_true", help="re-run stages that already completed")
        parser.add_argument("--device", default=None, help="where the backbone runs: cpu (default), cuda, or 'auto'")
        data = parser.add_argument_group("data (first run of a workdir; later runs reuse pipeline.json)")
        data.add_argument("--backbone", help="backbone name, hub id or folder (default: smollm2-135m-instruct)")
        data.add_argument("--dtype", help="backbone dtype for extraction and sweep: float32 (default), bfloat16")
        data.add_argument("--prompts", help="rtp | advbench | harmbench | overrefusal | a file (default rtp)")
        data.add_argument("--limit", type=int, help="at most this many prompts per split")
        data.add_argument("--chat", action="store_true", default=None, help="wrap prompts in the chat template")
        data.add_argument("--samples-per-prompt", type=int)
        data.add_argument(
            "--train-samples-per-prompt", type=int, help="more plain samples for the train prompts only (default: same)"
        )
        data.add_argument("--max-new-tokens", type=int)
        data.add_argument("--batch-size", type=int)
        data.add_argument("--seed", type=int)
        data.add_argument("--judge", help="toxicity | refusal | llm:<model> (default toxicity)")
        train = parser.add_argument_group("training")
        train.add_argument("--epochs", type=int)
        train.add_argument("--lr", type=float)
        train.add_argument(
            "--targets",
            choices=("label", "words", "words+label", "offensive-words"),  # train.targets.TARGETS, without numpy
            help="per-token targets: the sequence label (default), the judge's score of each token's word, both, "
            "or 1 where the judge alone calls the token's word undesirable",
        )
        train.add_argument(
            "--calibration-folds",
            type=int,
            help="calibrate: also fit ĉ(α) on train, cross-fitted over N >= 2 folds of its prompts (default 0: off)",
        )
        train.add_argument(
            "--rounds", type=int, help="on-policy rounds: 1 (default) or N > 1 to resample the train prompts under VFD"
        )
        train.add_argument("--round-alpha", type=float, help="rounds > 1: steer at the previous head's ĉ(α) (0.3)")
        train.add_argument("--round-candidates", type=int, dest="round_num_candidates", help="rounds > 1: VFD's K (8)")

    def run(self, args: argparse.Namespace) -> int:
        from vsteer_hf.train.pipeline import Pipeline

        pipeline = Pipeline(args.workdir, _pipeline_config(args), device=args.device)
        reports = pipeline.run(self.stages, force=args.force)
        for stage, report in reports.items():
            print(f"== {stage}: {_stage_summary(stage, report)}")
        return 0


def _pipeline_config(args: argparse.Namespace) -> Any:
    """The stored config of the workdir (or the defaults), with the options given on this command line."""
    import dataclasses
    from pathlib import Path

    from vsteer_hf.train.pipeline import PipelineConfig
    from vsteer_hf.train.trainer import TrainConfig

    stored = Path(args.workdir) / "pipeline.json"
    config = PipelineConfig()
    if stored.is_file():
        data = json.loads(stored.read_text())
        train = TrainConfig(**data.pop("train", {}))
        data["alphas"] = tuple(data.get("alphas", config.alphas))
        data["sweep_alphas"] = tuple(data.get("sweep_alphas", config.sweep_alphas))
        config = PipelineConfig(**data, train=train)
    names = (
        "backbone",
        "dtype",
        "prompts",
        "limit",
        "chat",
        "samples_per_prompt",
        "train_samples_per_prompt",
        "max_new_tokens",
        "batch_size",
        "seed",
        "judge",
        "targets",
        "calibration_folds",
        "rounds",
        "round_alpha",
        "round_num_candidates",
    )
    updates = {n: getattr(args, n, None) for n in names if getattr(args, n, None) is not None}
    train_updates = {n: getattr(args, n) for n in ("epochs", "lr") if getattr(args, n) is not None}
    if train_updates:
        updates["train"] = dataclasses.replace(config.train, **train_updates)
    return dataclasses.replace(config, **updates)


STAGES = ("extract", "label", "train", "calibrate", "sweep")  # vsteer_hf.train.pipeline.STAGES, without importing torch


def _stage_summary(stage: str, report: dict[str, Any]) -> str:
    if stage == "extract":
        return f"{report['sequences']} sequences, {report['tokens']} tokens in {report['seconds']} s"
    if stage == "label":
        return f"{report['positives']} of {report['labelled']} generations judged undesirable"
    if stage == "train":
        rounds = report.get("rounds")
        per_round = "; rounds: " + ", ".join(f"{r['round']}: {r['val_auroc']:.3f}" for r in rounds) if rounds else ""
        return f"best epoch {report['best_epoch']}, validation AUROC {report['val_auroc']:.3f}{per_round}"
    if stage == "sweep":
        steps = ", ".join(f"{_sweep_label(r)}: rate={r['toxic_rate']['value']:.3f}" for r in report["rows"])
        return f"recommended threshold {report['recommended_threshold']:.3f}; {steps}"
    rows = ", ".join(
        f"α={r['alpha']}: ĉ={r['threshold']:.3f} FIR={r['false_intervention_rate']:.3f}" for r in report["table"]
    )
    return f"test AUROC {report['test_auroc_sequence']:.3f}; {rows}"


def _sweep_label(row: dict[str, Any]) -> str:
    return "base" if row["threshold"] is None else f"thr={row['threshold']:.3f}"


__all__ = ["STAGES", "StageCommand"]
