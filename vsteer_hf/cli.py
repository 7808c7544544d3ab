"""`vsteer` command line: one object per subcommand, `main(argv) -> int`.

vsteer generate --prompt "..." [--model MODEL] [--head HEAD] [--chat] [--threshold T | --alpha A] [-k K] [--compare]
vsteer heads            (the shipped value heads; load one by name)
vsteer demo [--limit N]
vsteer compare [--methods base,vfd,abstain,profs,profs+vfd,model:ID] [--pairs WORKDIR|PAIRS.jsonl] [--out DIR]
vsteer profs-sweep --pairs WORKDIR|PAIRS.jsonl --out DIR [--ks 1,2,4,8] [--layers 14-28,14-29] [--budget 0.1]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from vsteer_hf.profs_sweep_command import ProFSSweepCommand  # argument parsing only: no torch at import
from vsteer_hf.stage_command import STAGES, StageCommand  # the same

DEFAULT_MODEL = "smollm2-135m-instruct"  # vsteer_hf.backbones.DEFAULT_BACKBONE, without importing torch


class GenerateCommand:
    """Steer one or more prompts and print the text; `--compare` adds the unsteered text and per-token risk."""

    name = "generate"
    help = "generate steered text with a value head (default: the embedded SmolLM2 and its shipped head)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--model", default=DEFAULT_MODEL, help=f"hub id, local folder or {DEFAULT_MODEL} (default, embedded)"
        )
        parser.add_argument(
            "--head",
            default=None,
            help="value head: shipped head name (`vsteer heads`), file, folder or hub id "
            "(default: the shipped head trained for --model)",
        )
        parser.add_argument("--head-filename", default=None, help="file inside a head folder/repo (sub-paths allowed)")
        parser.add_argument(
            "--head-revision", default=None, help="hub branch, tag or commit of the head (pin a commit for audits)"
        )
        parser.add_argument("--revision", default=None, help="hub branch, tag or commit of --model")
        parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
        parser.add_argument("--chat", action="store_true", help="wrap each prompt with the tokenizer's chat template")
        decision = parser.add_mutually_exclusive_group()
        decision.add_argument("--threshold", type=float, help="risk threshold in [0, 1] (default: the head card's)")
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

        from vsteer_hf import ValueSteerConfig, enable_value_steer, load_value_head
        from vsteer_hf.backbones import load_backbone

        dtypes = ("auto", "float32", "bfloat16", "float16")
        if args.dtype not in dtypes:
            raise ValueError(f"--dtype {args.dtype!r} is not one of {list(dtypes)}.")
        head_source = args.head if args.head is not None else _default_head(args.model)
        model, tokenizer = load_backbone(
            args.model, dtype=args.dtype, device=args.device, revision=args.revision, progress=not args.json
        )
        model = enable_value_steer(model)
        hidden_size = model.config.get_text_config().hidden_size
        head = load_value_head(
            head_source, filename=args.head_filename, revision=args.head_revision, hidden_size=hidden_size
        )
        threshold, source = _threshold_in_use(args, head)

        texts = list(args.prompt)
        if args.chat:
            if tokenizer.chat_template is None:
                raise ValueError(f"--chat given but {args.model}'s tokenizer has no chat template; drop --chat.")
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
            head=head, threshold=threshold, alpha=args.alpha, num_candidates=args.num_candidates, mode=args.mode
        )
        torch.manual_seed(args.seed)
        steered = model.generate(**common, value_steer=steer)
        base = None
        if args.compare:  # K = 1 never intervenes: plain decoding, with the head's risk read along the way
            torch.manual_seed(args.seed)
            base = model.generate(**common, value_steer=ValueSteerConfig(head=head, threshold=1.0, num_candidates=1))
        prompt_len = inputs["input_ids"].shape[1]
        direction = steer.risk_direction(head)
        setting = {
            "model": str(args.model),
            "head": str(head_source),
            "mode": args.mode,
            "num_candidates": steer.candidates_per_step,
            "threshold_source": source,
            "direction": direction,
        }
        if not args.json:
            print(_setting_line(setting, float(steered.thresholds[0])))
        for row, prompt in enumerate(args.prompt):
            record = _row_record(tokenizer, steered, row, prompt_len, prompt, direction)
            if base is not None:
                record["base"] = _row_record(tokenizer, base, row, prompt_len, prompt, direction)
            print(json.dumps({**record, "setting": setting}) if args.json else _format(record, args.mode, direction))
        if not args.json:
            print(_legend(args.mode, base is not None, direction))
        return 0


def _default_head(model: str) -> str:
    """The shipped head trained for `model`, or an error naming --head."""
    from vsteer_hf.shipped import shipped_heads

    for shipped in shipped_heads():
        if shipped.backbone == str(model):
            return shipped.name
    raise ValueError(
        f"no shipped head was trained for {model!r}; pass --head (a file, folder or hub id). "
        "`vsteer heads` lists the shipped ones and their backbones"
    )


def _threshold_in_use(args: argparse.Namespace, head: Any) -> tuple[float | None, str]:
    """(--threshold or the card's when neither it nor --alpha is given, where the threshold comes from)."""
    if args.threshold is not None:
        return args.threshold, "--threshold"
    if args.alpha is not None:
        return None, f"ĉ(α={args.alpha:g}) on the head's calibrated curve (--alpha)"
    if head.card.threshold is None:
        raise ValueError("the head's card recommends no threshold; pass --threshold T (e.g. 0.3) or --alpha A")
    return head.card.threshold, "the head card's recommended threshold"


def _setting_line(setting: dict[str, Any], threshold: float) -> str:
    k = f", K={setting['num_candidates']}" if setting["mode"] == "vfd" else ""
    return (
        f"model: {setting['model']} | head: {setting['head']} | {setting['mode']}{k} | "
        f"threshold {threshold:.4f} ({setting['threshold_source']})\n"
    )


def _row_record(
    tokenizer: Any, out: Any, row: int, prompt_len: int, prompt: str, direction: str = "above"
) -> dict[str, Any]:
    gen = out.sequences[row, prompt_len:]
    keep = ~out.value_scores[row].isnan()
    risk = out.value_scores[row][keep]
    threshold = out.thresholds[row].to(risk.device)
    crossed = risk < threshold if direction == "below" else risk >= threshold
    tokens = [tokenizer.decode([int(t)]) for t in gen[keep]]
    record: dict[str, Any] = {
        "prompt": prompt,
        "text": tokenizer.decode(gen, skip_special_tokens=True),
        "tokens": tokens,
        "risk": [round(float(r), 4) for r in out.value_scores[row][keep]],
        "intervened": [bool(i) for i in out.interventions[row][keep]],
        "over_threshold": [bool(c) for c in crossed],
        "threshold": round(float(out.thresholds[row]), 4),
    }
    if out.abstained is not None:
        record["abstained"] = bool(out.abstained[row])
        step = int(out.abstain_step[row])
        record["abstain_step"] = step if record["abstained"] else None
        if record["abstained"]:  # the state that decided: the last prompt token at step 0, else the previous token
            prompt_risk = getattr(out, "prompt_risk", None)
            deciding = prompt_risk[row] if step == 0 and prompt_risk is not None else out.value_scores[row, step - 1]
            record["deciding_risk"] = round(float(deciding), 4)
    return record


def _format(record: dict[str, Any], mode: str = "vfd", direction: str = "above") -> str:
    lines = [f"prompt: {record['prompt']}", f"steered: {record['text']}"]
    base = record.get("base")
    if base is not None:
        lines.append(f"base:    {base['text']}")
    threshold = record["threshold"]
    if mode == "vfd":
        fallback = sum(record["over_threshold"])
        extra = f"; {fallback} with no candidate under the threshold (lowest risk taken)" if fallback else ""
        lines.append(f"interventions: {sum(record['intervened'])} of {len(record['tokens'])} tokens{extra}")
    if "abstained" in record:
        if record["abstained"]:
            step = record["abstain_step"]
            state = "the last prompt token" if step == 0 else f"the token at step {step - 1}"
            op = "<" if direction == "below" else ">="
            lines.append(
                f"abstained: yes, ended at step {step}: risk {record['deciding_risk']:.4f} {op} threshold "
                f"{threshold:.4f} after {state}"
            )
        else:
            lines.append("abstained: no")
    if base is not None:
        lines.append("  step  steered token       risk   |  base token          risk")
        for i in range(max(len(record["tokens"]), len(base["tokens"]))):
            lines.append(f"  {i:4d}  {_cell(record, i, mode == 'vfd')}  |  {_cell(base, i, mark=False)}")
    return "\n".join(lines) + "\n"


def _cell(record: dict[str, Any], i: int, mark: bool = True) -> str:
    if i >= len(record["tokens"]):
        return " " * 27
    flag = " "
    if mark and record["over_threshold"][i]:
        flag = "!"
    elif mark and record["intervened"][i]:
        flag = "*"
    return f"{record['tokens'][i]!r:18.18s} {record['risk'][i]:6.3f}{flag}"


def _legend(mode: str, table: bool, direction: str) -> str:
    crossed = "below" if direction == "below" else "at or above"
    parts = [
        "risk: the value head's P(undesirable) of each committed token (the state after it)",
    ]
    if mode == "vfd":
        parts.append("an intervention commits another candidate than the plain sample")
        if table:
            parts.append(
                "* intervened: another candidate than the plain sample, under the threshold; ! no candidate was "
                f"under the threshold (all {crossed} it), so the lowest-risk one was taken"
            )
    else:
        parts.append(f"abstention ends the text (EOS) once the risk is {crossed} the threshold")
    if table:
        parts.append("the base text and column: plain sampling with the same seed, scored by the same head")
    return "legend: " + "; ".join(parts) + "."


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


class HeadsCommand:
    """List the value heads that ship with the package: name, backbone, threshold and recorded results."""

    name = "heads"
    help = "list the shipped value heads (load one by name: --head NAME, load_value_head(NAME))"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json", action="store_true", help="one JSON object per head")

    def run(self, args: argparse.Namespace) -> int:
        from vsteer_hf.shipped import format_heads, shipped_heads

        heads = shipped_heads()
        if args.json:
            for head in heads:
                print(json.dumps(head.as_dict()))
        else:
            print(format_heads(heads))
        return 0


COMMANDS = (
    DemoCommand(),
    CompareCommand(),
    ProFSSweepCommand(),
    GenerateCommand(),
    HeadsCommand(),
    StageCommand("extract", "decode-matched feature extraction (needs the backbone)", ("extract",)),
    StageCommand("label", "judge every extracted generation", ("label",)),
    StageCommand("train", "train a value head from the feature cache", ("train",)),
    StageCommand("calibrate", "fit the conformal ĉ(α) curve and check it on held-out data", ("calibrate",)),
    StageCommand("sweep", "steer validation prompts at a few thresholds; record the recommended one", ("sweep",)),
    StageCommand("pipeline", "extract, label, train, calibrate and sweep, resuming completed stages", STAGES),
)


def _version() -> str:
    """The installed distribution's version, without importing torch (the package imports it)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("vsteer-hf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vsteer", description="Value-head safety steering for transformers.")
    parser.add_argument("--version", action="version", version=f"vsteer {_version()}")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error"
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_arguments(sub.add_parser(command.name, help=command.help, parents=[debug]))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = next(c for c in COMMANDS if c.name == args.command)
    try:
        return command.run(args)
    except (ValueError, OSError, RuntimeError) as err:  # FileNotFoundError, PackageInstallError included
        if args.debug:
            raise
        lines = [ln for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
        more = " (--debug shows the traceback)" if len(lines) > 1 or not isinstance(err, (ValueError, OSError)) else ""
        print(f"error: {lines[0]}{more}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
