"""Which head-training setting catches more at the same false-intervention rate, judged on train prompts alone.

The validation split (57 prompts, 23 toxic continuations) moves a sequence AUROC by several points between
runs of one recipe, too little to pick a training setting by. This grouped cross-validation uses the 433
train prompts instead: each of 4 folds of prompts (`vsteer_hf.train.crossfit.prompt_folds`, as the calibrate
stage deals them) is scored by a head trained on the other three, exactly as the pipeline trains its head
(offensive-word targets, early stopping on validation). Pooled over the folds (13,856 continuations, 1,499
toxic, 5,907 offensive words), per setting (`--train-samples N`: the heads learn from the first N samples of
each train prompt only, a learning curve; the folds are still scored on all their samples):

- the sequence AUROC of the max risk;
- at the threshold c(α) that flags a share α of the safe continuations (what the card's ĉ(α) means), the
  share of toxic continuations flagged, and the share of offensive words flagged at their first token (the
  state VFD scores when the word can still be swapped) or at any of their tokens.

The test split is never read. `word-recall` reads how the shipped head flags offensive words in the plain
samples of each split, by how often the word occurs in train.

    python results/smollm2-rtp/train_cv.py cv --work runs/ship3 --out results/smollm2-rtp/train_cv.json \
        'default={}' 'alpha-pos-0.9={"alpha_pos": 0.9}' 'epochs-20={"epochs": 20}'
    python results/smollm2-rtp/train_cv.py cv --work runs/ship3 --out results/smollm2-rtp/train_cv.json \
        --train-samples 8 'samples-8={}'
    python results/smollm2-rtp/train_cv.py word-recall --work runs/ship3 --out results/smollm2-rtp/word_recall.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsteer_hf.backbones import load_tokenizer
from vsteer_hf.eval.judges import get_judge
from vsteer_hf.head import load_value_head
from vsteer_hf.train.crossfit import HELD_OUT, HeldOutFold, prompt_folds
from vsteer_hf.train.features import FeatureCache
from vsteer_hf.train.targets import WORD, token_spans, token_targets
from vsteer_hf.train.trainer import TrainConfig, auroc, train_value_head

FOLDS = 4
ALPHAS = (0.1, 0.3, 0.5)
FREQUENCY_BINS = ((0, "0"), (1, "1-4"), (5, "5-19"), (20, "20-99"), (100, "100+"))


def _setup(work: Path) -> tuple[FeatureCache, Any, Any]:
    config = json.loads((work / "pipeline.json").read_text())
    return FeatureCache(work / "features"), load_tokenizer(config["backbone"]), get_judge(config["judge"])


def offensive_words(cache: FeatureCache, tokenizer: Any, targets: dict[int, np.ndarray], split: str) -> dict:
    """{cache index: [(word, its token positions)]} for every word whose tokens all carry target 1."""
    found: dict[int, list[tuple[str, list[int]]]] = {}
    for i in cache.split(split):
        row = targets[i]
        if row.max() < 0.5:
            continue
        ids = cache.records[i]["token_ids"]
        spans = token_spans(tokenizer, ids)[: len(row)]
        for m in WORD.finditer(tokenizer.decode(ids, skip_special_tokens=True)):
            positions = [t for t, (lo, hi) in enumerate(spans) if lo < m.end() and m.start() < hi]
            if positions and all(row[t] >= 0.5 for t in positions):
                found.setdefault(i, []).append((m.group().lower(), positions))
    return found


def cv(args: argparse.Namespace) -> None:
    work, out = Path(args.work), Path(args.out)
    cache, tokenizer, judge = _setup(work)
    targets = token_targets("offensive-words", cache, judge, tokenizer)  # train + validation, as the train stage
    words = offensive_words(cache, tokenizer, targets, "train")
    train = cache.split("train")
    folds = prompt_folds([cache.records[i]["prompt_id"] for i in train], FOLDS)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for spec in args.settings:
        name, overrides = spec.split("=", 1)[0], json.loads(spec.split("=", 1)[1])
        if name in results and not args.force:
            continue
        config = dataclasses.replace(TrainConfig(device="cpu"), **overrides)
        began = time.perf_counter()
        max_risk, labels, first, anywhere, epochs = [], [], [], [], []
        for k, fold in enumerate(folds):
            view = HeldOutFold(cache, fold)
            if args.train_samples:  # fewer samples per train prompt to learn from; the folds score all of theirs
                view.records = [
                    {**r, "split": "unused"} if r["split"] == "train" and r["sample"] >= args.train_samples else r
                    for r in view.records
                ]
            fitted = train_value_head(view, config, progress=False, token_targets=targets)
            epochs.append([fitted.best_epoch, len(fitted.history)])
            with torch.no_grad():
                for i in view.split(HELD_OUT):
                    p = fitted.head.p(cache.rows(i)).numpy()
                    max_risk.append(p.max())
                    labels.append(cache.records[i]["label"])
                    for _, positions in words.get(i, []):
                        first.append(p[positions[0]])
                        anywhere.append(p[positions].max())
            print(f"{name}: fold {k + 1}/{FOLDS} done ({time.perf_counter() - began:.0f} s)", flush=True)
        max_risk, labels, first, anywhere = map(np.asarray, (max_risk, labels, first, anywhere))
        safe, toxic = max_risk[labels < 0.5], max_risk[labels >= 0.5]
        row: dict[str, Any] = {
            "overrides": overrides,
            "train_samples_per_prompt": args.train_samples,
            "best_epoch_and_run": epochs,
            "seconds": round(time.perf_counter() - began),
            "sequences": len(labels),
            "toxic": len(toxic),
            "offensive_words": len(first),
            "sequence_auroc": auroc(max_risk, labels),
        }
        for alpha in ALPHAS:
            c = float(np.quantile(safe, 1 - alpha))
            row[f"alpha={alpha}"] = {
                "threshold": c,
                "toxic_flagged": float(np.mean(toxic >= c)),
                "word_flagged_first_token": float(np.mean(first >= c)),
                "word_flagged_any_token": float(np.mean(anywhere >= c)),
            }
        results[name] = row
        print(name, json.dumps(row), flush=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


def word_recall(args: argparse.Namespace) -> None:
    """Share of offensive words the head flags (any token at or over the card's threshold) in each split's
    plain samples, by how many times the word occurs in train."""
    work = Path(args.work)
    cache, tokenizer, judge = _setup(work)
    head = load_value_head(args.head)
    threshold = head.card.threshold
    splits = ("train", "validation", "test")
    targets = token_targets("offensive-words", cache, judge, tokenizer, splits=splits)
    flagged: dict[str, dict[str, list[bool]]] = {s: collections.defaultdict(list) for s in splits}
    with torch.no_grad():
        for split in splits:
            for i, found in offensive_words(cache, tokenizer, targets, split).items():
                p = head.p(cache.rows(i)).numpy()
                for word, positions in found:
                    flagged[split][word].append(bool(p[positions].max() >= threshold))
    in_train = {w: len(v) for w, v in flagged["train"].items()}
    report: dict[str, Any] = {"head": args.head, "threshold": threshold}
    for split in splits:
        bins: dict[str, list[bool]] = {label: [] for _, label in FREQUENCY_BINS}
        for word, hits in flagged[split].items():
            label = [lab for low, lab in FREQUENCY_BINS if in_train.get(word, 0) >= low][-1]
            bins[label] += hits
        everything = [h for hits in flagged[split].values() for h in hits]
        report[split] = {
            "occurrences": len(everything),
            "flagged": float(np.mean(everything)),
            "by_train_count": {
                k: {"occurrences": len(v), "flagged": float(np.mean(v)) if v else None} for k, v in bins.items()
            },
        }
        print(split, json.dumps(report[split]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    step = steps.add_parser("cv", help="grouped 4-fold CV over train prompts, one row per setting")
    step.add_argument("settings", nargs="+", help="NAME=JSON of TrainConfig overrides, e.g. 'lr-6e-4={\"lr\": 6e-4}'")
    step.add_argument("--force", action="store_true", help="re-run settings already in --out")
    step.add_argument("--train-samples", type=int, help="train on the first N samples of each prompt (default: all)")
    recall = steps.add_parser("word-recall", help="the shipped head's recall of offensive words, by train frequency")
    recall.add_argument("--head", default="smollm2-135m-instruct-rtp-toxicity")
    for sub in (step, recall):
        sub.add_argument("--work", required=True, help="a pipeline work folder (its features and pipeline.json)")
        sub.add_argument("--out", required=True)
    args = parser.parse_args()
    {"cv": cv, "word-recall": word_recall}[args.step](args)


if __name__ == "__main__":
    main()
