"""`vsteer` command line: one object per subcommand, `main(argv) -> int`.

vsteer generate --model MODEL --head HEAD --prompt "..." [--chat] [--threshold T | --alpha A] [-k K] [--compare]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


class GenerateCommand:
    """Steer one or more prompts and print the text; `--compare` adds the unsteered text and per-token risk."""

    name = "generate"
    help = "generate steered text with a value head"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, help="hub id or local folder of a causal LM")
        parser.add_argument("--head", required=True, help="value head: file, folder or hub id")
        parser.add_argument(
            "--head-filename", default=None, help="file inside a head folder/repo (sub-paths allowed)"
        )
        parser.add_argument(
            "--prompt", action="append", required=True, help="prompt text; repeat for a batch"
        )
        parser.add_argument(
            "--chat", action="store_true", help="wrap each prompt with the tokenizer's chat template"
        )
        decision = parser.add_mutually_exclusive_group(required=True)
        decision.add_argument("--threshold", type=float, help="risk threshold in [0, 1] (e.g. 0.3)")
        decision.add_argument(
            "--alpha", type=float, help="false-intervention rate on the head's calibrated curve"
        )
        parser.add_argument(
            "-k", "--num-candidates", type=int, default=None, help="candidates per step (default 8)"
        )
        parser.add_argument("--mode", choices=("vfd", "abstain"), default="vfd")
        parser.add_argument("--max-new-tokens", type=int, default=64)
        parser.add_argument(
            "--greedy", action="store_true", help="greedy decoding (top-K deterministic candidates)"
        )
        parser.add_argument("--temperature", type=float, default=None)
        parser.add_argument("--top-p", type=float, default=None)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--device", default=None, help="e.g. cpu, cuda, or 'auto' for device_map='auto'")
        parser.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16")
        parser.add_argument(
            "--compare", action="store_true", help="also print the unsteered text and per-token risk"
        )
        parser.add_argument(
            "--json", action="store_true", help="print one JSON object per prompt instead of text"
        )

    def run(self, args: argparse.Namespace) -> int:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from vsteer_hf import ValueSteerConfig, enable_value_steer, load_value_head

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokenizer.padding_side = "left"  # our own instance: batched generation needs left padding
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise SystemExit(
                    "error: the tokenizer has neither a pad nor an eos token; cannot batch prompts."
                )
            tokenizer.pad_token = tokenizer.eos_token
        load_kwargs: dict[str, Any] = {
            "dtype": args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
        }
        if args.device == "auto":
            load_kwargs["device_map"] = "auto"
        model = AutoModelForCausalLM.from_pretrained(args.model, **load_kwargs)
        if args.device not in (None, "auto"):
            model.to(args.device)
        model = enable_value_steer(model.eval())
        hidden_size = model.config.get_text_config().hidden_size
        head = load_value_head(args.head, filename=args.head_filename, hidden_size=hidden_size)

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
            base = model.generate(
                **common, value_steer=ValueSteerConfig(head=head, threshold=1.0, num_candidates=1)
            )
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


COMMANDS = (GenerateCommand(),)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vsteer", description="Value-head safety steering for transformers."
    )
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
