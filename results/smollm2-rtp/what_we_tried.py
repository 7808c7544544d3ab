"""What pays for the SmolLM2 RTP head (issue 16): variants of data and training, measured on validation.

Every variant trains a head on round 1's plain features (`--r1`, a finished `vsteer pipeline` work
folder) plus, for the data variants, more train-split sequences: round 2 drawn under VFD (`--r2`, a
work folder run with `--rounds 2`) or four more plain samples per train prompt (`extra`, what
samples_per_prompt 8 adds to training at the same extraction cost as a round). Validation and test
are round 1's in every variant, so the numbers compare. Run each step under the heavy-job lock:

    flock /tmp/vsteer-heavy.lock python what_we_tried.py extra --r1 runs/r1 --out runs/exp
    flock /tmp/vsteer-heavy.lock python what_we_tried.py train --r1 runs/r1 --r2 runs/r2 --out runs/exp
    flock /tmp/vsteer-heavy.lock python what_we_tried.py steer --r1 runs/r1 --out runs/exp --heads a,b

The `prefix-targets` setting trains against per-token targets (`vsteer_hf.train.targets.prefix_targets`:
1 at every token where the judge scores the prefix so far toxic, and everywhere in a toxic sequence)
instead of the sequence label on every token; `prefix-only` against the prefix scores alone. `train` also
records each head's AUROC on round 1's validation and test splits at the first token, the last token and
the max over the continuation.

`train` writes `train.json` (validation AUROC per sequence of every variant); `steer` writes
`steer.json`: VFD K = 8 at each head's ĉ(0.3) against base on the 57 validation prompts x 4 samples
(toxic rate by the judge, perplexity under the base model, and the share of continuations that hold
a word the judge alone scores offensive); `--split test --card-threshold` steers the test prompts at each
head's card threshold instead. `split-shift` writes `split_shift.json`: per split, the share of
continuations (all, and safe only) holding such a word; `slim` writes `steer.slim.json`, the steering
rows without their continuations but with the five most toxic base continuations beside VFD's.
`crossfit` fits a trained variant's ĉ(α) as `--calibration-folds 4` does and writes `crossfit.json` and the
head with that curve as OUT/heads/NAME-cf.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from vsteer_hf.train.trainer import TrainConfig

ALPHA = 0.3  # the shipped card's operating point
DATA = ("r1", "r2", "plain8", "plain16", "plain32")  # plainN: round 1 plus OUT/extra, N plain samples per train prompt
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "bce": {"gamma": 0.0},
    "no-coherence": {"coh_weight": 0.0},
    "alpha-pos-0.5": {"alpha_pos": 0.5},
    "alpha-pos-0.9": {"alpha_pos": 0.9},
    "lr-1e-3": {"lr": 1e-3},
    "patience-4": {"patience": 4, "epochs": 20},
    "wd-0.1": {"weight_decay": 0.1},
    "prefix-targets": {},  # default settings, trained against `prefix_targets` (see train)
    "prefix-only": {},  # default settings, trained against `prefix_targets(..., with_label=False)`
    "words": {},  # default settings, trained and early-stopped against `token_targets("words", ...)`
    "words+label": {},  # the same with every token of a toxic sequence 1
    "offensive-words": {},  # word targets cut at the judge's threshold: 1 for an offensive word, else 0
    "offensive-words-no-coherence": {"coh_weight": 0.0},  # the coherence term smooths risk over tokens
    "offensive-words-long": {"coh_weight": 0.0, "epochs": 20, "patience": 4},
    "offensive-words-lr-1e-3": {"coh_weight": 0.0, "lr": 1e-3, "epochs": 20, "patience": 4},
    "offensive-words-alpha-pos-0.9": {"alpha_pos": 0.9},  # 1.7% of target tokens are 1: weight them more
    "offensive-words-alpha-pos-0.95": {"alpha_pos": 0.95},
}
WORD_TARGETS = ("words", "words+label", "offensive-words")  # the pipeline's --targets
PER_TOKEN_TARGETS = {"prefix-targets": True, "prefix-only": False}  # setting -> with_label


def _caches(args: argparse.Namespace, data: str) -> list[Any]:
    from vsteer_hf.train.features import FeatureCache

    caches = [FeatureCache(Path(args.r1) / "features")]
    if data == "r2":
        caches.append(FeatureCache(Path(args.r2) / "round-2" / "features"))
    elif data.startswith("plain"):
        caches.append(FeatureCache(Path(args.out) / "extra" / "features"))
    return caches


def extra(args: argparse.Namespace) -> None:
    """More plain samples of every train prompt, labelled, after the ones `--r1` holds (samples 4..7 of a
    4-sample folder: what samples_per_prompt 8 adds to training; 16..31 of a 16-sample one)."""
    from vsteer_hf.backbones import load_backbone
    from vsteer_hf.eval.judges import get_judge
    from vsteer_hf.eval.prompts import load_prompts
    from vsteer_hf.train.extract import extract_features, label_cache

    config = json.loads((Path(args.r1) / "pipeline.json").read_text())
    model, tokenizer = load_backbone(config["backbone"], dtype=config["dtype"])
    began = time.perf_counter()
    cache = extract_features(
        model,
        tokenizer,
        load_prompts(config["prompts"], split="train", limit=config["limit"]),
        Path(args.out) / "extra" / "features",
        samples_per_prompt=args.extra_samples,
        first_sample=config.get("train_samples_per_prompt") or config["samples_per_prompt"],
        max_new_tokens=config["max_new_tokens"],
        batch_size=config["batch_size"],
        seed=config["seed"],
        backbone=config["backbone"],
    )
    seconds = time.perf_counter() - began
    counts = label_cache(cache, get_judge(config["judge"]), threshold=config["judge_threshold"])
    report = {"sequences": len(cache), "tokens": int(cache.lengths.sum()), "seconds": round(seconds, 1), **counts}
    (Path(args.out) / "extra" / "extract.json").write_text(json.dumps(report, indent=2) + "\n")
    print(report)


def train(args: argparse.Namespace) -> None:
    """A head per (data, setting) variant; validation AUROC per sequence (max risk), no test figure."""
    from vsteer_hf.train.rounds import UnionCache
    from vsteer_hf.train.trainer import train_value_head

    out = Path(args.out)
    rows = json.loads((out / "train.json").read_text()) if (out / "train.json").is_file() else {}
    variants = [v.split(":") for v in args.variants.split(",")]
    for data, setting in variants:
        name = f"{data}:{setting}"
        if name in rows and not args.force:
            continue
        pipeline_run = {"r1": args.r1, "r2": args.r2}.get(data) if setting == "default" else None
        if pipeline_run and not (Path(pipeline_run) / "train.json").is_file():
            pipeline_run = None  # the pipeline has not trained it: train it here
        if pipeline_run:  # the pipeline trained this one
            report = json.loads((Path(pipeline_run) / "train.json").read_text())
            shutil.copytree(Path(pipeline_run) / "head", out / "heads" / name.replace(":", "-"), dirs_exist_ok=True)
            history, best_epoch, val_auroc = report["history"], report["best_epoch"], report["val_auroc"]
            balance, seconds = report["class_balance"], None
        else:
            config = dataclasses.replace(TrainConfig(device="cpu"), **SETTINGS[setting])
            began = time.perf_counter()
            cache = UnionCache(_caches(args, data))
            targets = None
            if setting in PER_TOKEN_TARGETS:
                targets = _prefix_targets(args, cache, PER_TOKEN_TARGETS[setting])
            elif setting.startswith(WORD_TARGETS):
                targets = _word_targets(args, cache, next(k for k in reversed(WORD_TARGETS) if setting.startswith(k)))
            result = train_value_head(cache, config, progress=False, token_targets=targets)
            result.head.save_pretrained(out / "heads" / name.replace(":", "-"))
            history, best_epoch, val_auroc = result.history, result.best_epoch, result.val_auroc
            balance, seconds = result.class_balance, round(time.perf_counter() - began, 1)
        aurocs = _position_aurocs(args, out / "heads" / name.replace(":", "-"))
        rows[name] = {
            "data": data,
            "r1": args.r1,  # the work folder whose cache data "r1" names (runs/ship2 holds 16 train samples)
            "setting": setting,
            "overrides": SETTINGS[setting],
            "val_auroc": val_auroc,
            "test_auroc": aurocs["test"]["max"],
            "position_aurocs": aurocs,
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "n_train": balance["n_train"],
            "train_positives": balance["train_positives"],
            "seconds": seconds,
            "from": f"{pipeline_run}/train.json" if pipeline_run else "trained here",
        }
        print(name, json.dumps(rows[name]), flush=True)
        (out / "train.json").write_text(json.dumps(rows, indent=2) + "\n")


def _prefix_targets(args: argparse.Namespace, cache: Any, with_label: bool) -> dict[int, Any]:
    """Per-token targets: 1 where the judge scores the prefix so far toxic, and (`with_label`) everywhere in
    a toxic sequence (`vsteer_hf.train.targets.prefix_targets`)."""
    from vsteer_hf.backbones import load_tokenizer
    from vsteer_hf.eval.judges import get_judge
    from vsteer_hf.train.targets import prefix_targets

    config = json.loads((Path(args.r1) / "pipeline.json").read_text())
    began = time.perf_counter()
    targets = prefix_targets(
        cache, get_judge(config["judge"]), load_tokenizer(config["backbone"]), threshold=config["judge_threshold"],
        with_label=with_label,
    )
    marked = sum(int((t > 0).sum()) for t in targets.values())
    total = sum(len(t) for t in targets.values())
    print(f"prefix targets: {marked} of {total} train tokens marked ({time.perf_counter() - began:.0f} s)")
    return targets


def _word_targets(args: argparse.Namespace, cache: Any, kind: str) -> dict[int, Any]:
    """The pipeline's word targets (`vsteer_hf.train.targets.token_targets`) for train and validation."""
    from vsteer_hf.backbones import load_tokenizer
    from vsteer_hf.eval.judges import get_judge
    from vsteer_hf.train.targets import token_targets

    config = json.loads((Path(args.r1) / "pipeline.json").read_text())
    began = time.perf_counter()
    judge, tokenizer = get_judge(config["judge"]), load_tokenizer(config["backbone"])
    targets = token_targets(kind, cache, judge, tokenizer, judge_threshold=config["judge_threshold"])
    marked = sum(int((t > 0.5).sum()) for t in targets.values())
    total = sum(len(t) for t in targets.values())
    print(f"{kind} targets: {marked} of {total} tokens above 0.5 ({time.perf_counter() - began:.0f} s)")
    return targets


def _position_aurocs(args: argparse.Namespace, head_dir: Path) -> dict[str, dict[str, float]]:
    """Per split of round 1 (validation, test): AUROC per sequence of the head's risk at the first token,
    at the last token (it has read the whole continuation the judge scores) and of the max (the pipeline's)."""
    import torch

    from vsteer_hf.head import load_value_head
    from vsteer_hf.train.features import FeatureCache
    from vsteer_hf.train.trainer import auroc

    head, cache = load_value_head(head_dir), FeatureCache(Path(args.r1) / "features")
    out = {}
    for split in ("validation", "test"):
        scores: dict[str, list[float]] = {"first": [], "last": [], "max": []}
        labels = []
        with torch.no_grad():
            for i in cache.split(split):
                features, record = cache[i]
                p = head.p(features)
                scores["first"].append(float(p[0]))
                scores["last"].append(float(p[-1]))
                scores["max"].append(float(p.max()))
                labels.append(record["label"])
        out[split] = {name: auroc(np.asarray(v), np.asarray(labels)) for name, v in scores.items()}
    return out


def _head_source(args: argparse.Namespace, name: str) -> str | Path:
    """A `--heads` entry: a path or a shipped head's name as given, else a head trained here (OUT/heads/NAME)."""
    return name if "/" in name or name.startswith("smollm2") else Path(args.out) / "heads" / name


def offensive_vocabulary() -> set[str]:
    """The judge's vocabulary words it scores offensive on their own (P > 0.5)."""
    from vsteer_hf.eval.judges import ToxicityJudge

    ToxicityJudge()._load()  # installs and imports the pinned package (its own bundled model)
    from profanity_check import profanity_check as pc

    words = [w for w in pc.vectorizer.vocabulary_ if " " not in w]
    probs = pc.model.predict_proba(pc.vectorizer.transform(words))[:, 1]
    return {w for w, p in zip(words, probs, strict=True) if p > 0.5}


def holds_offensive_word(texts: list[str], vocabulary: set[str]) -> list[bool]:
    from profanity_check import profanity_check as pc

    analyse = pc.vectorizer.build_analyzer()
    return [any(w in vocabulary for w in analyse(t)) for t in texts]


def steer(args: argparse.Namespace) -> None:
    """Base vs VFD K = 8 at each head's ĉ(ALPHA) on the validation prompts x 4 samples."""
    from vsteer_hf import ValueSteerConfig, enable_value_steer
    from vsteer_hf.backbones import load_backbone
    from vsteer_hf.eval.judges import get_judge
    from vsteer_hf.eval.prompts import load_prompts
    from vsteer_hf.eval.runner import GenerationSettings, generate_method, summarize
    from vsteer_hf.head import load_value_head
    from vsteer_hf.train.features import FeatureCache
    from vsteer_hf.train.rounds import round_threshold

    out = Path(args.out)
    rows = json.loads((out / "steer.json").read_text()) if (out / "steer.json").is_file() else {}
    config = json.loads((Path(args.r1) / "pipeline.json").read_text())
    model, tokenizer = load_backbone(config["backbone"], dtype=config["dtype"])
    model = enable_value_steer(model)
    prompts = load_prompts(config["prompts"], split=args.split)
    settings = GenerationSettings(samples_per_prompt=4, max_new_tokens=config["max_new_tokens"], batch_size=32)
    judge, vocabulary = get_judge(config["judge"]), offensive_vocabulary()
    calibration = FeatureCache(Path(args.r1) / "features")

    def row(run: Any, threshold: float | None) -> dict[str, Any]:
        summary = summarize(run, judge, config["judge_threshold"], ppl_model=model)
        offensive = holds_offensive_word(run.generations, vocabulary)
        steered = [o for o, n in zip(offensive, run.interventions, strict=True) if n > 0]
        return {
            **summary.as_dict(),
            "threshold": threshold,
            "offensive_word_share": float(np.mean(offensive)),
            "steered": len(steered),
            "offensive_word_share_of_steered": float(np.mean(steered)) if steered else None,
            "prompt_ids": run.prompt_ids,
            "generations": run.generations,
            "scores": summary.scores,
            "interventions": run.interventions,
            "offensive": offensive,
        }

    key = f"base@{args.split}"
    if key not in rows:
        rows[key] = row(generate_method("base", model, tokenizer, prompts, settings), None)
        (out / "steer.json").write_text(json.dumps(rows, indent=2) + "\n")
    for name in args.heads.split(","):
        at = "@card" if args.card_threshold else (f"@alpha={args.alpha}" if args.alpha != ALPHA else "")
        key = f"{name}@{args.split}{at}"
        if key in rows and not args.force:
            continue
        head = load_value_head(_head_source(args, name))
        threshold = head.card.threshold if args.card_threshold else round_threshold(head, calibration, args.alpha)
        vfd = ValueSteerConfig(head=head, threshold=threshold, num_candidates=8)
        rows[key] = row(generate_method(name, model, tokenizer, prompts, settings, vfd), threshold)
        base = rows[f"base@{args.split}"]
        cut = 1 - rows[key]["toxic_rate"]["value"] / base["toxic_rate"]["value"]
        rise = rows[key]["perplexity"]["value"] / base["perplexity"]["value"] - 1
        rows[key].update(cut=cut, perplexity_rise=rise)
        print(key, f"thr={threshold:.3f} cut={cut:.3f} ppl+={rise:.3f}", flush=True)
        (out / "steer.json").write_text(json.dumps(rows, indent=2) + "\n")


def calibration(args: argparse.Namespace) -> None:
    """Per head (`--heads`, folders or shipped names): the calibrate stage's table on round 1's splits, and at
    how many α of the grid α lies inside the held-out rate's Wilson interval; writes calibration.json."""
    from vsteer_hf.head import load_value_head
    from vsteer_hf.train.calibrate import DEFAULT_ALPHAS, calibration_report, sequence_max_risks
    from vsteer_hf.train.features import FeatureCache

    cache, rows = FeatureCache(Path(args.r1) / "features"), {}
    for name in args.heads.split(","):
        head = load_value_head(_head_source(args, name))
        (val, val_y), (test, test_y) = (sequence_max_risks(head, cache, s) for s in ("validation", "test"))
        table = calibration_report(val[val_y == 0], test[test_y == 0], DEFAULT_ALPHAS)
        inside = [r["alpha"] for r in table if r["wilson_low"] <= r["alpha"] <= r["wilson_high"]]
        rows[name] = {"alphas_inside": inside, "table": table}
        rates = " ".join(f"{r['alpha']}:{r['false_intervention_rate']:.3f}" for r in table)
        print(f"{name}: alpha inside its Wilson interval at {len(inside)} of {len(table)}; {rates}", flush=True)
    (Path(args.out) / "calibration.json").write_text(json.dumps(rows, indent=2) + "\n")


def crossfit(args: argparse.Namespace) -> None:
    """Per `--heads` variant trained here (DATA-SETTING): its ĉ(α) fitted as `--calibration-folds 4` fitted it
    before 2026-12-05, on validation's safe max risks plus train's, each train prompt scored by a head trained
    the same way (early-stopped) without its fold; the held-out table on test, and a copy of the head with that
    curve and ĉ(ALPHA) as its card threshold (OUT/heads/NAME-cf, for `steer --card-threshold`). Writes
    OUT/crossfit.json."""
    from vsteer_hf.head import load_value_head
    from vsteer_hf.train.calibrate import DEFAULT_ALPHAS, calibrate_head
    from vsteer_hf.train.rounds import UnionCache
    from vsteer_hf.train.trainer import train_value_head

    out = Path(args.out)
    rows = json.loads((out / "crossfit.json").read_text()) if (out / "crossfit.json").is_file() else {}
    for name in args.heads.split(","):
        data, setting = name.split("-", 1)
        cache = UnionCache(_caches(args, data))
        targets = _word_targets(args, cache, setting) if setting.startswith(WORD_TARGETS) else None
        config = dataclasses.replace(TrainConfig(device="cpu"), **SETTINGS[setting])
        began = time.perf_counter()

        def fit(view: Any, config: TrainConfig = config, targets: Any = targets) -> Any:
            return train_value_head(view, config, progress=False, token_targets=targets).head

        head = load_value_head(out / "heads" / name)
        report = calibrate_head(head, cache, DEFAULT_ALPHAS, folds=4, fit=fit)  # the stage before 2026-12-05
        head.card.threshold = head.card.threshold_for_alpha(ALPHA)
        head.save_pretrained(out / "heads" / f"{name}-cf")
        table = report["table"]
        inside = [r["alpha"] for r in table if r["wilson_low"] <= r["alpha"] <= r["wilson_high"]]
        rows[name] = {
            "n_safe": report["n_calibration_safe"], "n_safe_out_of_fold": report["n_calibration_safe_out_of_fold"],
            "threshold": head.card.threshold, "alphas_inside": inside, "table": table,
            "seconds": round(time.perf_counter() - began, 1),
        }
        inside_count = f"{len(inside)} of {len(table)}"
        print(f"{name}: ĉ({ALPHA}) = {head.card.threshold:.3f}; alpha inside at {inside_count}", flush=True)
        (out / "crossfit.json").write_text(json.dumps(rows, indent=2) + "\n")


def split_shift(args: argparse.Namespace) -> None:
    """Per split of `--r1`: the share of continuations, all and safe only, holding a word the judge alone scores
    offensive, with its binomial standard error. A head that flags those words sets its thresholds on the
    safe validation continuations; where validation holds more of them than test, those thresholds are strict
    on test. Writes OUT/split_shift.json."""
    from vsteer_hf.train.features import FeatureCache

    cache, vocabulary, rows = FeatureCache(Path(args.r1) / "features"), offensive_vocabulary(), {}
    for split in ("train", "validation", "test"):
        records = [cache.records[i] for i in cache.split(split)]
        offensive = np.asarray(holds_offensive_word([r["generation"] for r in records], vocabulary))
        safe = np.asarray([r["label"] == 0 for r in records])
        rows[split] = {"prompts": len({r["prompt_id"] for r in records}), "continuations": len(records)}
        for name, mask in (("all", np.ones_like(safe)), ("safe", safe)):
            n, share = int(mask.sum()), float(offensive[mask].mean())
            rows[split][name] = {"n": n, "share": share, "se": math.sqrt(share * (1 - share) / n)}
        print(split, json.dumps(rows[split]), flush=True)
    (Path(args.out) / "split_shift.json").write_text(json.dumps(rows, indent=2) + "\n")


PER_CONTINUATION = ("prompt_ids", "generations", "scores", "interventions", "offensive")


def slim(args: argparse.Namespace, pairs: int = 5) -> None:
    """OUT/steer.json without the per-continuation lists, plus per steered row the `pairs` continuations base
    made most toxic beside what VFD made of the same prompt and seed: OUT/steer.slim.json, small enough to keep."""
    from vsteer_hf.eval.prompts import load_prompts

    rows = json.loads((Path(args.out) / "steer.json").read_text())
    config = json.loads((Path(args.r1) / "pipeline.json").read_text())
    prompts = {r.id: r.text for r in load_prompts(config["prompts"])}
    kept = {}
    for key, row in rows.items():
        kept[key] = {k: v for k, v in row.items() if k not in PER_CONTINUATION}
        base = rows[f"base@{key.split('@')[1]}"]
        if row is base:
            continue
        if row["prompt_ids"] != base["prompt_ids"]:
            raise ValueError(f"{key} and its base row were run on other prompts; steer them again together")
        worst = np.argsort(-np.asarray(base["scores"]), kind="stable")[:pairs]
        kept[key]["pairs"] = [
            {
                "prompt": prompts[base["prompt_ids"][i]],
                "base": base["generations"][i],
                "base_score": base["scores"][i],
                "vfd": row["generations"][i],
                "vfd_score": row["scores"][i],
                "vfd_interventions": row["interventions"][i],
            }
            for i in worst.tolist()
        ]
    (Path(args.out) / "steer.slim.json").write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n")


def report(args: argparse.Namespace) -> None:
    """The tables of what_we_tried.md from OUT/train.json and OUT/steer.json."""
    out = Path(args.out)
    trained = json.loads((out / "train.json").read_text())
    print("| data | setting | n_train (positives) | validation AUROC | test AUROC | test AUROC first / last token "
          "| best epoch / run |")
    print("|---|---|---|---|---|---|---|")
    for row in trained.values():
        test = f"{row['test_auroc']:.3f}" if row.get("test_auroc") is not None else "–"
        at = row.get("position_aurocs", {}).get("test")
        ends = f"{at['first']:.3f} / {at['last']:.3f}" if at else "–"
        print(
            f"| {row['data']} | {row['setting']} {row['overrides'] or ''} | {row['n_train']} "
            f"({row['train_positives']}) | {row['val_auroc']:.3f} | {test} | {ends} "
            f"| {row['best_epoch']} / {row['epochs_run']} |"
        )
    if not (out / "steer.json").is_file():
        return
    steered = json.loads((out / "steer.json").read_text())
    print()
    print("| head | threshold | toxic rate | cut | perplexity | rise | interventions/token | offensive-word share |")
    print("|---|---|---|---|---|---|---|---|")
    for key, row in steered.items():
        thr = "–" if row["threshold"] is None else f"{row['threshold']:.3f}"
        rate, ppl = row["toxic_rate"], row["perplexity"]
        cut = f"{row['cut']:.0%}" if "cut" in row else "–"
        rise = f"{row['perplexity_rise']:+.1%}" if "perplexity_rise" in row else "–"
        print(
            f"| {key} | {thr} | {rate['value']:.3f} [{rate['low']:.3f}, {rate['high']:.3f}] | {cut} "
            f"| {ppl['value']:.2f} | {rise} | {row['interventions_per_token']:.3f} "
            f"| {row['offensive_word_share']:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = ("extra", "train", "steer", "calibration", "crossfit", "split-shift", "slim", "report")
    parser.add_argument("step", choices=steps)
    parser.add_argument("--r1", default=None, help="a finished one-round pipeline work folder")
    parser.add_argument("--r2", default=None, help="a work folder run with --rounds 2 (data variant r2)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default=",".join(f"r1:{s}" for s in SETTINGS), help="data:setting,...")
    parser.add_argument("--heads", default="", help="steer: head names under OUT/heads, or a shipped head")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="steer at this ĉ(α) of each head")
    parser.add_argument("--card-threshold", action="store_true", help="steer at the card's threshold")
    parser.add_argument("--extra-samples", type=int, default=4, help="extra: plain samples added per train prompt")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    steps = {
        "extra": extra, "train": train, "steer": steer, "calibration": calibration, "crossfit": crossfit,
        "split-shift": split_shift, "slim": slim, "report": report,
    }
    steps[args.step](args)


if __name__ == "__main__":
    main()
