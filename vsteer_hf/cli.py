"""`vsteer` command line: one object per subcommand, `main(argv) -> int`.

vsteer generate --model MODEL --head HEAD --prompt "..." [--chat] [--threshold T | --alpha A] [-k K] [--compare]
vsteer compare [--methods base,vfd,abstain,profs,profs+vfd,model:ID] [--pairs WORKDIR|PAIRS.jsonl] [--out DIR]
vsteer profs-sweep --pairs WORKDIR|PAIRS.jsonl --out DIR [--ks 1,2,4,8] [--layers 14-28,14-29] [--budget 0.1]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from vsteer_hf.profs.command import ProFSSweepCommand


class GenerateCommand:
    """Steer one or more prompts and print the text; `--compare` adds the unsteered text and per-token risk."""

    name = "generate"
    help = "generate steered text with a value head"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, help="hub id or local folder of a causal LM")
        parser.add_argument("--head", required=True, help="value head: file, folder or hub id")
        parser.add_argument("--head-filename", default=None, help="file inside a head folder/repo (sub-paths allowed)")
        parser.add_argument(
            "--head-revision", default=None, help="hub branch, tag or commit of the head (pin a commit for audits)"
        )
        parser.add_argument("--revision", default=None, help="hub branch, tag or commit of --model")
        parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
        parser.add_argument("--chat", action="store_true", help="wrap each prompt with the tokenizer's chat template")
        decision = parser.add_mutually_exclusive_group(required=True)
        decision.add_argument("--threshold", type=float, help="risk threshold in [0, 1] (e.g. 0.3)")
        decision.add_argument("--alpha", type=float, help="false-intervention rate on the head's calibrated curve")
        parser.add_argument("-k", "--num-candidates", type=int, default=None, help="candidates per step (default 8)")
        parser.add_argument("--mode", choices=("vfd", "abstain"), default="vfd")
        parser.add_argument("--max-new-tokens", type=int, default=64)
        parser.add_argument("--greedy", action="store_true", help="greedy decoding (top-K deterministic candidates)")
        parser.add_argument("--temperature", type=float, default=None)
        parser.add_argument("--top-p", type=float, default=None)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--device", default=None, help="e.g. cpu, cuda, or 'auto' for device_map='auto'")
        parser.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16")
        parser.add_argument("--compare", action="store_true", help="also print the unsteered text and per-token risk")
        parser.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")

    def run(self, args: argparse.Namespace) -> int:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from vsteer_hf import ValueSteerConfig, enable_value_steer, load_value_head

        tokenizer = AutoTokenizer.from_pretrained(args.model, revision=args.revision)
        tokenizer.padding_side = "left"  # our own instance: batched generation needs left padding
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise SystemExit("error: the tokenizer has neither a pad nor an eos token; cannot batch prompts.")
            tokenizer.pad_token = tokenizer.eos_token
        dtypes = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if args.dtype not in dtypes:
            raise ValueError(f"--dtype {args.dtype!r} is not one of {sorted(dtypes)}.")
        load_kwargs: dict[str, Any] = {"dtype": dtypes[args.dtype], "revision": args.revision}
        if args.device == "auto":
            load_kwargs["device_map"] = "auto"
        model = AutoModelForCausalLM.from_pretrained(args.model, **load_kwargs)
        if args.device not in (None, "auto"):
            model.to(args.device)
        model = enable_value_steer(model.eval())
        hidden_size = model.config.get_text_config().hidden_size
        head = load_value_head(
            args.head, filename=args.head_filename, revision=args.head_revision, hidden_size=hidden_size
        )

        texts = list(args.prompt)
        if args.chat:
            if tokenizer.chat_template is None:
                raise SystemExit(f"error: --chat given but {args.model}'s tokenizer has no chat template.")
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
                )
                for t in texts
            ]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not args.chat)
        inputs = inputs.to(model.device)
        sampling: dict[str, Any] = {"do_sample": not args.greedy}
        if args.temperature is not None:
            sampling["temperature"] = args.temperature
        if args.top_p is not None:
            sampling["top_p"] = args.top_p
        common = dict(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            **sampling,
        )
        steer = ValueSteerConfig(
            head=head,
            threshold=args.threshold,
            alpha=args.alpha,
            num_candidates=args.num_candidates,
            mode=args.mode,
        )
        torch.manual_seed(args.seed)
        steered = model.generate(**common, value_steer=steer)
        base = None
        if args.compare:  # K = 1 never intervenes: plain decoding, with the head's risk read along the way
            torch.manual_seed(args.seed)
            base = model.generate(**common, value_steer=ValueSteerConfig(head=head, threshold=1.0, num_candidates=1))
        prompt_len = inputs["input_ids"].shape[1]
        for row, prompt in enumerate(args.prompt):
            record = _row_record(tokenizer, steered, row, prompt_len, prompt)
            if base is not None:
                record["base"] = _row_record(tokenizer, base, row, prompt_len, prompt)
            print(json.dumps(record) if args.json else _format(record))
        return 0


def _row_record(tokenizer: Any, out: Any, row: int, prompt_len: int, prompt: str) -> dict[str, Any]:
    gen = out.sequences[row, prompt_len:]
    keep = ~out.value_scores[row].isnan()
    tokens = [tokenizer.decode([int(t)]) for t in gen[keep]]
    record: dict[str, Any] = {
        "prompt": prompt,
        "text": tokenizer.decode(gen, skip_special_tokens=True),
        "tokens": tokens,
        "risk": [round(float(r), 4) for r in out.value_scores[row][keep]],
        "intervened": [bool(i) for i in out.interventions[row][keep]],
    }
    if out.abstained is not None:
        record["abstained"] = bool(out.abstained[row])
    return record


def _format(record: dict[str, Any]) -> str:
    lines = [f"prompt: {record['prompt']}", f"steered: {record['text']}"]
    base = record.get("base")
    if base is not None:
        lines.append(f"base:    {base['text']}")
    lines.append(f"interventions: {sum(record['intervened'])} of {len(record['tokens'])} tokens")
    if "abstained" in record:
        lines.append(f"abstained: {record['abstained']}")
    if base is not None:
        lines.append("  step  steered token       risk   |  base token          risk")
        for i in range(max(len(record["tokens"]), len(base["tokens"]))):
            lines.append(f"  {i:4d}  {_cell(record, i)}  |  {_cell(base, i, mark=False)}")
    return "\n".join(lines) + "\n"


def _cell(record: dict[str, Any], i: int, mark: bool = True) -> str:
    if i >= len(record["tokens"]):
        return " " * 27
    flag = "*" if mark and record["intervened"][i] else " "
    return f"{record['tokens'][i]!r:18.18s} {record['risk'][i]:6.3f}{flag}"


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
        data.add_argument("--max-new-tokens", type=int)
        data.add_argument("--batch-size", type=int)
        data.add_argument("--seed", type=int)
        data.add_argument("--judge", help="toxicity | refusal | llm:<model> (default toxicity)")
        train = parser.add_argument_group("training")
        train.add_argument("--epochs", type=int)
        train.add_argument("--lr", type=float)

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
        "max_new_tokens",
        "batch_size",
        "seed",
        "judge",
    )
    updates = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
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
        return f"best epoch {report['best_epoch']}, validation AUROC {report['val_auroc']:.3f}"
    if stage == "sweep":
        steps = ", ".join(f"{_sweep_label(r)}: rate={r['toxic_rate']['value']:.3f}" for r in report["rows"])
        return f"recommended threshold {report['recommended_threshold']:.3f}; {steps}"
    rows = ", ".join(
        f"α={r['alpha']}: ĉ={r['threshold']:.3f} FIR={r['false_intervention_rate']:.3f}" for r in report["table"]
    )
    return f"test AUROC {report['test_auroc_sequence']:.3f}; {rows}"


def _sweep_label(row: dict[str, Any]) -> str:
    return "base" if row["threshold"] is None else f"thr={row['threshold']:.3f}"


class DemoCommand:
    """The main job: steer held-out RealToxicityPrompts with the embedded SmolLM2 and the shipped head."""

    name = "demo"
    help = "base vs value-filtered decoding on held-out RTP prompts (embedded default model)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--limit", type=int, default=None, help="number of held-out prompts (default: all)")
        parser.add_argument("--samples-per-prompt", type=int, default=1)
        parser.add_argument("--max-new-tokens", type=int, default=32)
        parser.add_argument("--threshold", type=float, default=None, help="default: the head card's threshold")
        parser.add_argument("-k", "--num-candidates", type=int, default=8)
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--head", default=None, help="another head (default: the shipped one)")
        parser.add_argument("--examples", type=int, default=3, help="sample pairs to print")
        parser.add_argument("--out", default=None, help="folder for demo.json and demo.md")

    def run(self, args: argparse.Namespace) -> int:
        from vsteer_hf.eval.demo import run_demo

        return run_demo(args)


class CompareCommand:
    """Several methods (base, VFD, abstention, ProFS, other models) on the same prompts and seeds, side by side."""

    name = "compare"
    help = "compare base, vfd, abstain, profs, profs+vfd and other models: toxicity, fluency, speed, memory"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        methods = parser.add_argument_group("methods")
        methods.add_argument("--model", default=None, help="base model: name, hub id or folder (default: SmolLM2)")
        methods.add_argument(
            "--methods",
            default="base,vfd,profs,profs+vfd",
            help="comma-separated: base, vfd, abstain, profs, profs+vfd, model:<hub id or folder>",
        )
        methods.add_argument("--head", default=None, help="value head (default: the shipped one)")
        methods.add_argument("--head-filename", default=None, help="file inside the head folder/repo")
        methods.add_argument("--head-revision", default=None, help="hub branch, tag or commit of the head")
        methods.add_argument("--threshold", type=float, default=None, help="default: the head card's threshold")
        methods.add_argument("-k", "--num-candidates", type=int, default=8, help="VFD candidates per step")
        methods.add_argument("--pairs", default=None, help="ProFS pairs: pipeline workdir (train split) or .jsonl")
        methods.add_argument("--max-pairs", type=int, default=500, help="at most this many ProFS pairs")
        methods.add_argument("--profs-model", default=None, help="a saved/published ProFS model instead of editing")
        methods.add_argument("--select", action="store_true", help="choose ProFS's k and layers on validation")
        methods.add_argument("--budget", type=float, default=0.10, help="fluency budget (0.1: +10%% perplexity)")
        methods.add_argument("--select-ks", default="", help="k values for --select, e.g. 1,2,4,8")
        methods.add_argument("--select-layers", default=None, help="layer ranges for --select, e.g. 14-28,14-29")
        methods.add_argument("--vfd-thresholds", default="", help="extra VFD thresholds for the curve, e.g. 0.4,0.5")
        data = parser.add_argument_group("prompts and sampling (shared by every method)")
        data.add_argument("--prompts", default="rtp", help="rtp | advbench | harmbench | overrefusal | a file")
        data.add_argument("--split", default="test", choices=("train", "validation", "test", "all"))
        data.add_argument("--limit", type=int, default=100, help="number of prompts (stable subset)")
        data.add_argument("--chat", action="store_true", help="wrap the prompts in the chat template")
        data.add_argument("--samples-per-prompt", type=int, default=1)
        data.add_argument("--max-new-tokens", type=int, default=32)
        data.add_argument("--batch-size", type=int, default=32)
        data.add_argument("--seed", type=int, default=0)
        metrics = parser.add_argument_group("metrics")
        metrics.add_argument("--judge", default="toxicity", help="toxicity judge: toxicity | llm:<model>")
        metrics.add_argument("--safety-judge", default=None, help="llm:<model> for the unsafe rate (optional)")
        metrics.add_argument("--overrefusal-prompts", default="overrefusal", help="benign-but-edgy prompts")
        metrics.add_argument("--overrefusal-limit", type=int, default=20, help="benign prompts per method (0: skip)")
        metrics.add_argument("--reference-tokens", type=int, default=2048, help="reference-text tokens (0: skip)")
        metrics.add_argument("--reference-text", default=None, help="a UTF-8 text file instead of the built-in")
        run = parser.add_argument_group("run")
        run.add_argument("--device", default=None, help="cpu, cuda or 'auto' (default: cuda when available)")
        run.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
        run.add_argument("--out", default=None, help="folder for compare.md, compare.json and compare.png")
        run.add_argument("--no-progress", action="store_true", help="hide progress bars")

    def run(self, args: argparse.Namespace) -> int:
        from vsteer_hf.eval.compare import CompareOptions, run_compare

        options = CompareOptions(
            methods=args.methods,
            head=args.head,
            head_filename=args.head_filename,
            head_revision=args.head_revision,
            threshold=args.threshold,
            num_candidates=args.num_candidates,
            prompts=args.prompts,
            split=None if args.split == "all" else args.split,
            limit=args.limit,
            chat=args.chat,
            samples_per_prompt=args.samples_per_prompt,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            judge=args.judge,
            safety_judge=args.safety_judge,
            overrefusal_prompts=args.overrefusal_prompts,
            overrefusal_limit=args.overrefusal_limit,
            pairs=args.pairs,
            max_pairs=args.max_pairs,
            profs_model=args.profs_model,
            select=args.select,
            budget=args.budget,
            select_ks=[int(x) for x in args.select_ks.split(",") if x.strip()],
            select_layers=args.select_layers,
            vfd_thresholds=[float(x) for x in args.vfd_thresholds.split(",") if x.strip()],
            reference_tokens=args.reference_tokens,
            reference_text=args.reference_text,
            device=args.device,
            dtype=args.dtype,
            out=args.out,
            progress=not args.no_progress,
        )
        if args.model is not None:
            options.model = args.model
        result = run_compare(options)
        print(result.markdown())
        if args.out:
            print(f"outputs (compare.md, compare.json, compare.png) in {args.out}")
        return 1 if all(row.error for row in result.rows) else 0


COMMANDS = (
    DemoCommand(),
    CompareCommand(),
    ProFSSweepCommand(),
    GenerateCommand(),
    StageCommand("extract", "decode-matched feature extraction (needs the backbone)", ("extract",)),
    StageCommand("label", "judge every extracted generation", ("label",)),
    StageCommand("train", "train a value head from the feature cache", ("train",)),
    StageCommand("calibrate", "fit the conformal ĉ(α) curve and check it on held-out data", ("calibrate",)),
    StageCommand("sweep", "steer validation prompts at a few thresholds; record the recommended one", ("sweep",)),
    StageCommand("pipeline", "extract, label, train, calibrate and sweep, resuming completed stages", STAGES),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vsteer", description="Value-head safety steering for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_arguments(sub.add_parser(command.name, help=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = next(c for c in COMMANDS if c.name == args.command)
    try:
        return command.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
