"""`vsteer profs-sweep`: choose ProFS's k and layers on validation prompts, then save the edited model."""

from __future__ import annotations

import argparse
from typing import Any


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 1,2,4,8") from None


class ProFSSweepCommand:
    """Edit from training pairs at each (layers, k); keep the least toxic setting within the budget."""

    name = "profs-sweep"
    help = "choose ProFS's k and layers on validation prompts under a reference-perplexity budget; save the edit"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--pairs", required=True, help="pipeline work folder (train split) or a pairs .jsonl")
        parser.add_argument("--out", required=True, help="folder for the edited model and profs_edit.json")
        parser.add_argument("--model", default=None, help="base model: name, hub id or folder (default: SmolLM2)")
        parser.add_argument("--max-pairs", type=int, default=500, help="at most this many pairs (the paper: 500)")
        grid = parser.add_argument_group("the sweep")
        grid.add_argument("--ks", type=_ints, default=None, help="k values, e.g. 1,2,4,8 (default: those + default k)")
        grid.add_argument("--layers", default=None, help="inclusive layer ranges, e.g. 14-28,14-29 (default: 3)")
        grid.add_argument("--budget", type=float, default=0.10, help="max reference-perplexity increase (0.1: +10%%)")
        grid.add_argument("--pooling", default="reference", choices=("reference", "masked"))
        grid.add_argument("--drop-first", action="store_true", help="leave each text's first token out of the mean")
        val = parser.add_argument_group("validation")
        val.add_argument("--prompts", default="rtp", help="prompt source; its validation split is used")
        val.add_argument("--limit", type=int, default=None, help="at most this many validation prompts")
        val.add_argument("--samples-per-prompt", type=int, default=2)
        val.add_argument("--max-new-tokens", type=int, default=32)
        val.add_argument("--batch-size", type=int, default=64)
        val.add_argument("--seed", type=int, default=0)
        val.add_argument("--judge", default="toxicity", help="toxicity | llm:<model>")
        val.add_argument("--reference-text", default=None, help="a UTF-8 text file instead of the built-in")
        val.add_argument("--reference-offset", type=int, default=2048, help="skip these tokens (compare reports them)")
        val.add_argument("--reference-tokens", type=int, default=1024, help="reference tokens scored per setting")
        run = parser.add_argument_group("run")
        run.add_argument("--device", default=None, help="cpu, cuda or 'auto'")
        run.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
        run.add_argument("--no-progress", action="store_true", help="hide progress bars")

    def run(self, args: argparse.Namespace) -> int:
        from vsteer_hf.backbones import DEFAULT_BACKBONE, load_backbone
        from vsteer_hf.eval.judges import get_judge
        from vsteer_hf.eval.prompts import load_prompts
        from vsteer_hf.eval.reference_text import load_reference_text, read_reference_file
        from vsteer_hf.eval.runner import GenerationSettings
        from vsteer_hf.eval.tradeoff import reference_slice
        from vsteer_hf.profs import ProFSConfig, load_pairs, parse_layer_ranges, save_profs_model, select_profs

        progress = not args.no_progress
        pairs, origin = load_pairs(args.pairs, args.max_pairs)
        prompts = load_prompts(args.prompts, split="validation", limit=args.limit)
        if not prompts:
            raise SystemExit(f"vsteer profs-sweep: no validation prompts in {args.prompts!r}")
        model_name = args.model or DEFAULT_BACKBONE
        model, tokenizer = load_backbone(model_name, dtype=args.dtype, device=args.device, progress=progress)
        reference = read_reference_file(args.reference_text) if args.reference_text else load_reference_text(progress)
        ids = reference_slice(tokenizer, reference.text, args.reference_offset, args.reference_tokens)
        settings = GenerationSettings(
            samples_per_prompt=args.samples_per_prompt,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        validation: dict[str, Any] = {
            "model": model_name,
            "prompts": f"{args.prompts}, split validation",
            "n_prompts": len(prompts),
            "samples_per_prompt": args.samples_per_prompt,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
            "judge": args.judge,
            "reference_tokens": f"{args.reference_offset}..{args.reference_offset + len(ids)} of {reference.name}",
            "pairs": f"{len(pairs)} pairs of {origin}",
        }
        selection, record = select_profs(
            model,
            tokenizer,
            [good for _, good, _ in pairs],
            [bad for _, _, bad in pairs],
            prompts,
            settings,
            get_judge(args.judge),
            ids,
            ks=args.ks,
            layer_ranges=parse_layer_ranges(args.layers) if args.layers else None,
            budget=args.budget,
            config=ProFSConfig(pooling=args.pooling, drop_first=args.drop_first),
            progress=progress,
            validation=validation,
        )
        print(selection.table())
        if record is None:
            print(f"no setting within +{args.budget:.0%} reference perplexity; nothing saved (raise --budget)")
            return 1
        out = save_profs_model(model, tokenizer, args.out)
        print(f"chosen: {selection.chosen_point.label}; edited model and profs_edit.json in {out}")
        return 0
