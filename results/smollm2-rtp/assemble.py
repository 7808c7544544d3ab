"""Start the issue-16 word-target work folder from caches already drawn, instead of drawing them again (58 min).

`vsteer pipeline --train-samples-per-prompt 16` extracts in two passes: samples 0..3 of every prompt,
then samples 4..15 of the train prompts. `vsteer extract --workdir R1` drew the first pass with the
same options, and `what_we_tried.py extra --extra-samples 12 --out EXP` the second, with the same
calls (`extract_features`, same prompts in the same order, batch size, seed, first sample). This copies
both caches into WORK/features in that order, checks that one batch of each pass drawn again here gives
the same tokens, and records the started extraction, so the pipeline resumes it (nothing left to draw),
then labels, trains, calibrates and sweeps:

    python assemble.py --first runs/r1 --second runs/exp16/extra --work runs/ship
    vsteer pipeline --workdir runs/ship --train-samples-per-prompt 16 --targets words

Without `--second` it copies only the first pass of `--first` (samples 0..3 of every prompt; the same draws
at any train-samples-per-prompt) and the pipeline draws the second pass itself:

    python assemble.py --first runs/ship3 --work runs/ship64 --train-samples-per-prompt 64 \
        --targets offensive-words --calibration-folds 4
    vsteer pipeline --workdir runs/ship64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path


def copy_cache(source: Path, writer, below_sample: int | None = None) -> int:
    """Copy `source`'s sequences (only samples below `below_sample`, if given) in their order."""
    from vsteer_hf.train.features import FeatureCache

    cache = FeatureCache(source / "features" if (source / "features").is_dir() else source)
    keep = [i for i in range(len(cache)) if below_sample is None or cache.records[i]["sample"] < below_sample]
    for i in keep:
        features, record = cache[i]
        writer.add(features, {k: v for k, v in record.items() if k != "label"})  # the label stage relabels
    lines = (cache.directory / "generations.jsonl").read_text().splitlines(keepends=True)
    with open(writer.directory / "generations.jsonl", "a", encoding="utf-8") as out:
        out.writelines(line for line in lines if below_sample is None or json.loads(line)["sample"] < below_sample)
    return len(keep)


def redraw_matches(config, work: Path, train_only: bool) -> bool:
    """Draw the first batch of a pass again and compare its tokens with the copied cache."""
    from vsteer_hf.backbones import load_backbone
    from vsteer_hf.eval.prompts import load_prompts, split_of
    from vsteer_hf.train.extract import extract_features
    from vsteer_hf.train.features import FeatureCache

    model, tokenizer = load_backbone(config.backbone, dtype=config.dtype, progress=False)
    prompts = [p for s in ("train", "validation", "test") for p in load_prompts(config.prompts, split=s)]
    if train_only:
        prompts = [p for p in prompts if split_of(p.text) == "train"]
    first, count = (config.samples_per_prompt, config.train_samples_per_prompt - config.samples_per_prompt) if (
        train_only) else (0, config.samples_per_prompt)
    per_batch = -(-config.batch_size // count)  # prompts that fill the first batch
    with tempfile.TemporaryDirectory() as tmp:
        again = extract_features(
            model, tokenizer, prompts[:per_batch], Path(tmp) / "f", samples_per_prompt=count, first_sample=first,
            max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, chat=config.chat, top_p=config.top_p,
            temperature=config.temperature, seed=config.seed, backbone=config.backbone, progress=False,
        )
        stored = {(r["prompt_id"], r["sample"]): r["token_ids"] for r in FeatureCache(work / "features").records}
        rows = again.records[: config.batch_size]
        return all(stored[(r["prompt_id"], r["sample"])] == r["token_ids"] for r in rows)


def main() -> None:
    from vsteer_hf.train.features import FeatureCache, FeatureCacheWriter
    from vsteer_hf.train.pipeline import Pipeline, PipelineConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", required=True, help="work folder of the first pass (vsteer extract)")
    parser.add_argument(
        "--second", help="cache folder of the train prompts' extra samples (default: copy --first's first pass only)"
    )
    parser.add_argument("--work", required=True, help="the new work folder")
    parser.add_argument("--train-samples-per-prompt", type=int, default=16)
    parser.add_argument("--targets", default="words")
    parser.add_argument("--calibration-folds", type=int, default=0)
    args = parser.parse_args()
    first, work = Path(args.first), Path(args.work)
    stored = json.loads((first / "pipeline.json").read_text())
    config = dataclasses.replace(
        PipelineConfig.from_dict(stored),
        train_samples_per_prompt=args.train_samples_per_prompt,
        targets=args.targets,
        calibration_folds=args.calibration_folds,
    )
    source = FeatureCache(first / "features")
    with FeatureCacheWriter(work / "features", source.hidden_size, meta=source.meta["meta"]) as writer:
        if args.second:
            counts = [copy_cache(first, writer), copy_cache(Path(args.second), writer)]
        else:
            counts = [copy_cache(first, writer, below_sample=config.samples_per_prompt), 0]
    checks = {"first pass": redraw_matches(config, work, False)}
    if args.second:
        checks["second pass"] = redraw_matches(config, work, True)
    print(f"copied {counts[0]} + {counts[1]} sequences; first batch drawn again matches: {checks}")
    if not all(checks.values()):
        raise SystemExit("a pass drawn again differs from its cache: do not assemble, run the pipeline instead")
    pipe = Pipeline(work, config)
    (work / "pipeline.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    pipe._started_path("extract").write_text(json.dumps(pipe._fingerprint("extract")) + "\n")


if __name__ == "__main__":
    main()
