"""On-policy rounds: extract again under VFD with the previous round's head, label, retrain on the union.

Round 1 is the pipeline's own extract -> label -> train. Round r > 1 samples the *train* prompts with
VFD (K = `round_num_candidates`, threshold ĉ(`round_alpha`) of round r-1's head, fitted as the calibrate
stage fits it, on round 1's safe validation generations) through the same `extract_features` loop
(`generate(..., value_steer=)`), keeps the states of the committed tokens (what VFD scored and kept,
the alternatives it chose included), labels them with the judge and trains a fresh head on rounds 1..r.
Validation and test stay round 1's plain samples, so early stopping, AUROC and the conformal guarantee
(a statement about plain continuations, which VFD leaves alone while they stay under the threshold)
read the same data whatever the number of rounds. The candidates VFD rejected are scored but not kept:
they have no continuation for the judge to label.

    work/round-1/{train.json, head/}                                      round 1 (one-round train stage)
    work/round-<r>/{extract.json, label.json, train.json, features/, head/}   r = 2..N
    work/train.json, work/head/        the last round's, with every round summarised in both
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from vsteer_hf.train.features import FeatureCache, SequenceRecords
from vsteer_hf.train.provenance import new_run_id, stage_options

if TYPE_CHECKING:
    from vsteer_hf.head import ValueHead
    from vsteer_hf.train.pipeline import Pipeline

ROUND_STAGES = ("extract", "label", "train")


def round_dirs(workdir: Path) -> list[Path]:
    """The round folders a multi-round train stage left in `workdir` (empty for one round)."""
    folders = [p for p in workdir.glob("round-*") if p.is_dir() and p.name[len("round-") :].isdigit()]
    return sorted(folders, key=lambda p: int(p.name[len("round-") :]))  # round-10 after round-9


def remove_rounds(workdir: Path) -> None:
    for folder in round_dirs(workdir):
        shutil.rmtree(folder)


def check_unfinished_rounds(pipe: Pipeline, force: bool) -> None:
    """Unfinished rounds resume only under the train fingerprint (options and earlier stages) that started them."""
    if not round_dirs(pipe.workdir):
        return
    started = pipe.workdir / "train.started.json"
    record = json.loads(started.read_text()) if started.is_file() else None
    if record is not None and record == pipe._fingerprint("train"):
        return
    if force:
        remove_rounds(pipe.workdir)
        return
    why = "with other options or earlier stages" if record is not None else "by an unrecorded run"
    raise ValueError(
        f"{pipe.workdir}: round-*/ hold unfinished on-policy rounds started {why}; discard them with "
        f"`vsteer train --workdir {pipe.workdir} --force`, or use a new --workdir."
    )


class UnionCache(SequenceRecords):
    """Several feature caches read as one, for training: the union's sequences are theirs, in order.

    Offers what `train_value_head` and the pipeline read from a `FeatureCache` (records, labels, rows,
    splits); each record gains `round` (1-based position of its cache). Labels are read when built.
    """

    def __init__(self, caches: Sequence[FeatureCache]) -> None:
        if not caches:
            raise ValueError("UnionCache needs at least one feature cache.")
        sizes = sorted({c.hidden_size for c in caches})
        if len(sizes) > 1:
            raise ValueError(f"the caches hold hidden sizes {sizes}; a union needs one backbone's features.")
        self.caches = list(caches)
        self.hidden_size = caches[0].hidden_size
        self.directory = caches[0].directory  # named in error messages
        self._where = [(c, i) for c, cache in enumerate(caches) for i in range(len(cache))]
        self.records = [{**caches[c].records[i], "round": c + 1} for c, i in self._where]
        self.lengths = np.concatenate([c.lengths for c in caches])  # (N,)

    @property
    def backbone(self) -> str | None:
        return self.caches[0].backbone

    def __len__(self) -> int:
        return len(self._where)

    def rows(self, i: int, max_tokens: int | None = None) -> Tensor:
        c, j = self._where[i]
        return self.caches[c].rows(j, max_tokens)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]]:
        return self.rows(i), self.records[i]


def round_threshold(head: ValueHead, calibration: FeatureCache, alpha: float) -> float:
    """ĉ(alpha) of `head` on the safe validation generations of `calibration`, as the calibrate stage fits it."""
    from vsteer_hf.train.calibrate import conformal_curve, sequence_max_risks

    scores, labels = sequence_max_risks(head, calibration, "validation")
    return conformal_curve(scores[labels == 0], (alpha,))[alpha]


class _Backbone:
    """The backbone and judge, loaded on first use: a resumed run whose rounds are all done needs neither."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe, self._model = pipe, None

    def model(self) -> tuple[Any, Any]:
        if self._model is None:
            from vsteer_hf.backbones import load_backbone

            cfg = self.pipe.config
            self._model = load_backbone(
                cfg.backbone, dtype=cfg.dtype, device=self.pipe.device, progress=self.pipe.progress
            )
        return self._model


def _sub_stage(path: Path, inputs: dict[str, str], options: dict[str, Any], compute: Callable[[], dict]) -> dict:
    """Reuse `path`'s report while it was made with `options` on `inputs`; else (re)compute it and write it."""
    if path.is_file():
        report = json.loads(path.read_text())
        if report["fingerprint"] == {"options": options, "inputs": inputs}:
            return report
    path.parent.mkdir(parents=True, exist_ok=True)
    body = compute()
    report = {
        "stage": f"{path.parent.name}/{path.stem}",
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run_id": new_run_id(),
        "fingerprint": {"options": options, "inputs": inputs},
        **body,
    }
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report


def _extract_round(pipe: Pipeline, backbone: _Backbone, r: int, head_dir: Path, head_run: str) -> dict[str, Any]:
    """Round r's steered extraction of the train prompts (resumes a cache started from the same head)."""
    from vsteer_hf.eval.prompts import load_prompts
    from vsteer_hf.head import ValueHead
    from vsteer_hf.train.extract import extract_features

    cfg, folder = pipe.config, pipe.workdir / f"round-{r}"
    started = folder / "extract.started.json"
    if (folder / "features").exists() and (
        not started.is_file() or json.loads(started.read_text()).get("head") != head_run
    ):
        shutil.rmtree(folder / "features")  # drawn under another head: resuming would mix two policies
    started.write_text(json.dumps({"head": head_run}) + "\n")
    head = ValueHead.from_pretrained(head_dir)
    threshold = round_threshold(head, FeatureCache(pipe.workdir / "features"), cfg.round_alpha)
    prompts = load_prompts(cfg.prompts, split="train", limit=cfg.limit)
    model, tokenizer = backbone.model()
    began = time.perf_counter()
    cache = extract_features(
        model,
        tokenizer,
        prompts,
        folder / "features",
        samples_per_prompt=cfg.samples_per_prompt,
        first_sample=(r - 1) * cfg.samples_per_prompt,  # new keys and seeds: no round redraws another's
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        head=head,
        num_candidates=cfg.round_num_candidates,
        threshold=threshold,
        chat=cfg.chat,
        top_p=cfg.top_p,
        temperature=cfg.temperature,
        seed=cfg.seed,
        backbone=cfg.backbone,
        progress=pipe.progress,
    )
    started.unlink()
    tokens = int(cache.lengths.sum())
    interventions = sum(int(rec["interventions"]) for rec in cache.records)
    return {
        "sequences": len(cache),
        "tokens": tokens,
        "splits": cache.splits,
        "prompts": len(prompts),
        "seconds": round(time.perf_counter() - began, 1),
        "alpha": cfg.round_alpha,
        "threshold": threshold,
        "num_candidates": cfg.round_num_candidates,
        "interventions": interventions,
        "interventions_per_token": interventions / max(tokens, 1),
        "steered_sequences": sum(int(rec["interventions"] > 0) for rec in cache.records),
    }


def _label_round(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    from vsteer_hf.eval.judges import get_judge
    from vsteer_hf.train.extract import label_cache

    counts = label_cache(
        FeatureCache(folder / "features"), get_judge(pipe.config.judge), threshold=pipe.config.judge_threshold
    )
    return {**counts, "judge": pipe.config.judge}


def run_rounds(pipe: Pipeline) -> dict[str, Any]:
    """The train stage with `config.rounds` > 1: every round, then the last round's head as the pipeline's."""
    from vsteer_hf.head import ValueHead

    cfg, work = pipe.config, pipe.workdir
    options = stage_options(cfg.to_dict(), "train")  # the train options and the round settings
    backbone = _Backbone(pipe)
    caches = [FeatureCache(work / "features")]
    label_runs = {"label": pipe.report("label")["run_id"]}
    previous = _sub_stage(
        work / "round-1" / "train.json",
        dict(label_runs),
        options,
        lambda: pipe.train_head(UnionCache(caches), work / "round-1" / "head"),
    )
    summaries = [_summary(1, None, None, previous)]
    for r in range(2, cfg.rounds + 1):
        folder, head_dir = work / f"round-{r}", work / f"round-{r - 1}" / "head"
        head_run = previous["run_id"]
        extract = _sub_stage(
            folder / "extract.json",
            {"head": head_run},
            options,
            lambda r=r, head_dir=head_dir, head_run=head_run: _extract_round(pipe, backbone, r, head_dir, head_run),
        )
        label = _sub_stage(
            folder / "label.json",
            {"extract": extract["run_id"]},
            options,
            lambda folder=folder: _label_round(pipe, folder),
        )
        caches.append(FeatureCache(folder / "features"))
        label_runs[f"round-{r}/label"] = label["run_id"]
        previous = _sub_stage(
            folder / "train.json",
            dict(label_runs),
            options,
            lambda folder=folder: pipe.train_head(UnionCache(caches), folder / "head"),
        )
        summaries.append(_summary(r, extract, label, previous))
    head = ValueHead.from_pretrained(work / f"round-{cfg.rounds}" / "head")
    head.card.training["rounds"] = summaries
    head.save_pretrained(work / "head")
    body = {k: v for k, v in previous.items() if k not in ("stage", "finished", "run_id", "fingerprint")}
    return {**body, "rounds": summaries}


def _summary(r: int, extract: dict | None, label: dict | None, train: dict) -> dict[str, Any]:
    """One round in a line of the train report and the head card."""
    row: dict[str, Any] = {"round": r, "train_run": train["run_id"], "val_auroc": train["val_auroc"]}
    row["n_train"] = train["class_balance"]["n_train"]
    row["train_positives"] = train["class_balance"]["train_positives"]
    if extract is not None and label is not None:
        row.update(
            {
                "threshold": extract["threshold"],
                "alpha": extract["alpha"],
                "sequences": extract["sequences"],
                "interventions_per_token": extract["interventions_per_token"],
                "steered_sequences": extract["steered_sequences"],
                "positives": label["positives"],
            }
        )
    return row
