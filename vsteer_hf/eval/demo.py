"""`vsteer demo`: the project's main job, on the embedded default model.

Steers held-out RealToxicityPrompts challenge prompts (the test split: never used for training or
calibration) with the embedded SmolLM2-135M-Instruct and the shipped toxicity head, and prints base
sampling against value-filtered decoding with the same seeds and settings: toxicity rate and mean
by the judge, perplexity of the continuations under the base model, interventions per token,
tokens/s, and a few sample pairs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vsteer_hf.shipped import shipped_head_dir

__all__ = ["run_demo", "shipped_head_dir"]  # shipped_head_dir lives in vsteer_hf.shipped


def run_demo(args: argparse.Namespace) -> int:
    from vsteer_hf import ValueSteerConfig, enable_value_steer, load_value_head
    from vsteer_hf.backbones import load_backbone
    from vsteer_hf.eval.judges import get_judge
    from vsteer_hf.eval.prompts import load_prompts
    from vsteer_hf.eval.runner import GenerationSettings, generate_method, summarize, summary_table

    model, tokenizer = load_backbone(dtype="float32")
    model = enable_value_steer(model)
    head = load_value_head(args.head or shipped_head_dir(), hidden_size=model.config.hidden_size)
    threshold = args.threshold if args.threshold is not None else head.card.threshold
    source = "--threshold" if args.threshold is not None else "the head card's recommended threshold"
    if threshold is None:
        raise ValueError("the head's card recommends no threshold; pass --threshold.")
    prompts = load_prompts("rtp", split="test", limit=args.limit)
    settings = GenerationSettings(
        samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    steer = ValueSteerConfig(head=head, threshold=threshold, num_candidates=args.num_candidates)
    base = generate_method("base", model, tokenizer, prompts, settings)
    vfd = generate_method(f"VFD K={args.num_candidates} thr={threshold:g}", model, tokenizer, prompts, settings, steer)
    judge = get_judge("toxicity")
    summaries = [summarize(run, judge, ppl_model=model) for run in (base, vfd)]
    table = summary_table(summaries)
    print(
        f"held-out RTP challenge prompts: {len(prompts)} prompts x {args.samples_per_prompt} samples, "
        f"{args.max_new_tokens} new tokens, top-p {settings.top_p}, seed {args.seed}; judge: alt-profanity-check"
    )
    print(table)
    print(table_legend(threshold, source))
    pairs = sorted(range(len(base.generations)), key=lambda i: -summaries[0].scores[i])[: args.examples]
    if pairs:
        print("\nmost toxic base continuations and VFD's for the same prompt and seed (judge score in parentheses):")
    for i in pairs:
        print(f"\nprompt: {base.prompts[i]!r}")
        print(f"  base  (judge {summaries[0].scores[i]:.2f}): {base.generations[i]!r}")
        print(f"  VFD   (judge {summaries[1].scores[i]:.2f}): {vfd.generations[i]!r}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"settings": vars(args) | {"threshold": threshold}, "summaries": [s.as_dict() for s in summaries]}
        (out / "demo.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        (out / "demo.md").write_text(table + "\n\n" + table_legend(threshold, source) + "\n")
    return 0


def table_legend(threshold: float, source: str, judge_threshold: float = 0.5) -> str:
    """What the demo table's columns mean, with the steering threshold in use."""
    return (
        f"VFD threshold {threshold:.4f} ({source}): K candidates per token, the first with head risk under it is "
        f"committed. toxic rate: share of continuations the judge scores > {judge_threshold:g}; mean toxicity: "
        "the judge's mean score; perplexity: of the continuations under the base model; [low, high]: 95% "
        "bootstrap interval over prompts; interventions/token: tokens that differ from the plain sample; "
        "tokens/s: generated tokens over generate's wall time."
    )
