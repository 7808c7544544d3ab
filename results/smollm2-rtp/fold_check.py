"""Why a cross-fitted calibration misses at high α (runs/ship3's too cautious, runs/ship64's too eager).

Cross-fitting scores each train fold's safe generations with a head trained without that fold and lets those
scores stand in for the final head's. If the fold heads score safe text higher than the final head does, the
low quantiles of the calibration scores (the thresholds at high α) come out too high and the final head
intervenes less often than α there; lower, and it intervenes more often. For each fold count this trains the
fold heads as the calibrate stage does, then scores the test split's safe generations (which no head saw)
with every fold head and with the final head, refits ĉ(α) from validation + the out-of-fold scores, and
measures it on test.
`--fold-training recipe` (the calibrate stage since 2026-12-05) trains each fold head for the epochs the final
head kept and keeps the last; `early-stopped` (the stage before) lets each early-stop on validation and keep
its best epoch, as the final head itself was trained.

    python results/smollm2-rtp/fold_check.py --work runs/ship3 --folds 4,8 --fold-training early-stopped \
        --out results/smollm2-rtp/fold_check.json
    python results/smollm2-rtp/fold_check.py --work runs/ship3 --folds 4 \
        --out results/smollm2-rtp/fold_check.epochs-as-final.json
    python results/smollm2-rtp/fold_check.py --work runs/ship64 --folds 4 \
        --out results/smollm2-rtp/fold_check.ship64.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from vsteer_hf.head import ValueHead
from vsteer_hf.train.calibrate import DEFAULT_ALPHAS, calibration_report, sequence_max_risks
from vsteer_hf.train.crossfit import HELD_OUT, HeldOutFold, prompt_folds
from vsteer_hf.train.features import FeatureCache
from vsteer_hf.train.pipeline import Pipeline, PipelineConfig

QUANTILES = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
FOLD_TRAINING = {
    "recipe": "for the final head's epochs, last kept",
    "early-stopped": "early-stopped on validation, best epoch kept",
}
TABLE_KEYS = ("alpha", "threshold", "false_interventions", "false_intervention_rate", "wilson_low", "wilson_high")


def quantiles(scores: np.ndarray) -> dict[str, float]:
    return {str(q): float(np.quantile(scores, q)) for q in QUANTILES}


def check(
    work: Path, folds: int, final_test_safe: np.ndarray, validation_safe: np.ndarray, exact_epochs: int | None
) -> dict:
    """Fold heads of `work`'s recipe for `folds` folds: their test scores, kept epochs and the refitted curve.
    `exact_epochs`: train each for that many epochs and keep the last (None: early-stop, keep the best).
    Each fold head also scores validation's safe generations beside the final head (`validation_safe`): the
    same comparison without reading test."""
    config = PipelineConfig.from_dict(json.loads((work / "pipeline.json").read_text()))
    fold_config = dataclasses.replace(config.train, exact_epochs=exact_epochs)
    pipeline = Pipeline(work, config, progress=False)
    cache = FeatureCache(work / "features")
    train = cache.split("train")
    out_of_fold, heads, start = [], [], time.time()
    for k, fold in enumerate(prompt_folds([cache.records[i]["prompt_id"] for i in train], folds)):
        view = HeldOutFold(cache, fold)
        result = pipeline._fit(view, fold_config)
        risks, labels = sequence_max_risks(result.head, view, HELD_OUT)
        out_of_fold.append(risks[labels == 0])
        test_risks, test_labels = sequence_max_risks(result.head, cache, "test")
        test_safe = test_risks[test_labels == 0]
        val_risks, val_labels = sequence_max_risks(result.head, cache, "validation")
        val_safe = val_risks[val_labels == 0]
        heads.append(
            {
                "fold": k + 1,
                "best_epoch": result.best_epoch + 1,
                "epochs_run": len(result.history),
                "test_safe_quantiles": quantiles(test_safe),
                "share_of_test_safe_scored_higher_than_final": float(np.mean(test_safe > final_test_safe)),
                "share_of_validation_safe_scored_higher_than_final": float(np.mean(val_safe > validation_safe)),
            }
        )
        print(f"folds={folds} fold {k + 1}: {heads[-1]}  ({time.time() - start:.0f} s)", flush=True)
    table = calibration_report(np.concatenate([validation_safe, *out_of_fold]), final_test_safe, DEFAULT_ALPHAS)
    return {
        "alphas_inside_wilson": sum(r["wilson_low"] <= r["alpha"] <= r["wilson_high"] for r in table),
        "table": [{key: r[key] for key in TABLE_KEYS} for r in table],
        "fold_heads": heads,
        "seconds": time.time() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/ship3"), help="the pipeline folder of the head")
    parser.add_argument("--folds", default="4,8", help="fold counts, comma-separated")
    parser.add_argument(
        "--fold-training",
        choices=("recipe", "early-stopped"),
        default="recipe",
        help="recipe: the final head's epochs, last kept; early-stopped: the calibrate stage before 2026-12-05",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("fold_check.json"))
    args = parser.parse_args()
    final = ValueHead.from_pretrained(args.work / "head")
    cache = FeatureCache(args.work / "features")
    train_epochs = json.loads((args.work / "train.json").read_text())
    risks = {split: sequence_max_risks(final, cache, split) for split in ("validation", "test")}
    validation_safe = risks["validation"][0][risks["validation"][1] == 0]
    final_test_safe = risks["test"][0][risks["test"][1] == 0]
    report = {
        "work": str(args.work),
        "final_head": {
            "best_epoch": train_epochs["best_epoch"] + 1,
            "epochs_run": len(train_epochs["history"]),
            "test_safe_quantiles": quantiles(final_test_safe),
            "n_test_safe": int(final_test_safe.size),
        },
        "fold_heads_trained": FOLD_TRAINING[args.fold_training],
        "folds": {},
    }
    fixed = train_epochs["best_epoch"] + 1 if args.fold_training == "recipe" else None
    for folds in (int(f) for f in args.folds.split(",")):
        report["folds"][str(folds)] = check(args.work, folds, final_test_safe, validation_safe, fixed)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
