"""Decode cost of value-filtered decoding (VFD) and abstention against plain `generate` (the CLI).

Measures, for a chosen backbone and workload (see `decode_setup.py`): per-token decode latency, tokens/s,
time to first token, interventions per token and peak memory (CPU: the process's RSS; CUDA:
`max_memory_allocated`) for plain generate, VFD with each K on each candidate path (tree, expand, lazy) and,
for the never-intervening workload, dynamic abstention. Each configuration runs in its own fresh subprocess
(`decode_worker.py`), so peaks are that configuration's own; the configurations of one prompt length and
batch are driven round-robin, so background load falls on all alike. Every ratio is against plain generate
measured in the same invocation with the same prompts and batch. The report is `decode_report.py`.

Models: `llama-50m` (config, random weights, fp32; the CPU target), `llama-81m` (the earlier CPU table),
`llama-81m-gqa` (its shapes with 4 KV heads), `smollm2-135m` (the embedded backbone, real weights),
`mistral-7b-shape` (Mistral-7B's shapes, random weights, bf16; needs a GPU). Speed does not depend on
weight values.

Run:
    python benchmarks/bench_decode.py                       # CPU target: llama-50m, prompts 32,512, batch 1
    python benchmarks/bench_decode.py --quick               # < 1 minute smoke test
    python benchmarks/bench_decode.py --model smollm2-135m --workload rtp --batch 1,8,32 --k 8 --paths tree,lazy
    python benchmarks/bench_decode.py --model mistral-7b-shape --prompts 512,2048 --batch 1,16 --k 1,2,4,8,16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from decode_report import cpu_model, fmt_ratio, ratio, write_outputs
from decode_setup import MODELS, RESULTS_DIR, WORKLOADS, methods
from decode_worker import measure_group, summarize, worker


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_paths(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or not set(values) <= {"tree", "expand", "lazy"}:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of tree,expand,lazy, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="llama-50m", help="backbone (default llama-50m)")
    p.add_argument("--k", type=parse_ints, default=[1, 2, 4, 8, 16], help="VFD candidates K (default 1,2,4,8,16)")
    p.add_argument(
        "--paths", type=parse_paths, default=["tree", "expand"], help="candidate paths (default tree,expand)"
    )
    p.add_argument(
        "--prompts", type=parse_ints, default=[32, 512], help="prompt lengths (default 32,512; workload never)"
    )
    p.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="never",
        help="never: random ids, greedy, a never-intervening head (default); rtp: smollm2-135m with the shipped "
        "head on RealToxicityPrompts, top-p 0.9 (prompt length = the batch's longest; no abstention row)",
    )
    p.add_argument("--batch", type=parse_ints, default=[1], help="batch sizes (default 1)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per generate (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each worker (default 2)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: prompt 32, K 1,8, 16 new tokens, 1 repeat; writes bench_decode.quick.* unless --out",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown output; the JSON and the plot go next to it (.json, .png) "
        "(default benchmarks/results/bench_decode.<model>.md)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.quick:
        args.prompts, args.k, args.new_tokens, args.repeats = [32], [1, 8], 16, 1
    if args.new_tokens < 2 or args.repeats < 1 or args.threads < 1:
        raise SystemExit("--new-tokens must be >= 2, --repeats and --threads >= 1")
    device_kind = MODELS[args.model][3]
    if device_kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--model {args.model} needs a CUDA GPU (bf16, 7B parameters); none is visible here.")
    stem = f"bench_decode.{args.model}" + (f".{args.workload}" if args.workload != "never" else "")
    stem += ".quick" if args.quick else ""
    out = args.out or RESULTS_DIR / f"{stem}.md"
    if args.workload == "rtp":
        if args.model != "smollm2-135m":
            raise SystemExit("--workload rtp runs the shipped head, which is for --model smollm2-135m")
        args.prompts = [0]  # the prompts are RTP's; the table shows the padded length
    method_list = methods(args.k, args.paths, abstain=args.workload == "never")

    from tqdm import tqdm

    settings = {
        "model": args.model,
        "k": args.k,
        "paths": args.paths,
        "prompts": args.prompts,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "quick": args.quick,
        "workload": args.workload,
    }
    env: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": metadata.version("torch"),
        "transformers": metadata.version("transformers"),
        "vsteer_hf": metadata.version("vsteer-hf"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_1min_start": os.getloadavg()[0],
        "settings": settings,
        "model": {
            "name": args.model,
            "config": MODELS[args.model][1],
            "dtype": MODELS[args.model][2],
            "attn_implementation": "sdpa",
        },
    }
    groups = [(p, b) for p in args.prompts for b in args.batch]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    steps_per_group = len(method_list) * (2 + args.repeats)
    with tqdm(total=len(groups) * steps_per_group, desc="bench_decode", unit="step", file=sys.stderr) as bar:
        for prompt, batch in groups:
            bar.set_postfix_str(f"prompt {prompt} batch {batch}")
            specs = [{**settings, "prompt": prompt, "batch": batch, "steer": steer} for _, steer in method_list]
            raws = measure_group(specs, args.repeats, bar, concurrent=device_kind == "cpu")
            summaries = [summarize(raw, args.new_tokens) for raw in raws]
            base, base_tokens = summaries[0], raws[0]["tokens"]  # method_list[0] is plain generate
            for (name, steer), raw, summary in zip(method_list, raws, summaries, strict=True):
                vs_plain = {key: ratio(summary[key], base[key]) for key in summary}
                rows.append(
                    {
                        "prompt": raw["prompt_tokens"],
                        "interventions_per_token": raw["interventions_per_token"],
                        "batch": batch,
                        "method": name,
                        "value_steer": steer,
                        "summary": summary,
                        "vs_plain": vs_plain,
                        "tokens_match_plain": raw["tokens"] == base_tokens,
                        "raw": raw,
                    }
                )
                bar.write(
                    f"prompt {raw['prompt_tokens']:>4} batch {batch} {name:<16} "
                    f"{summary['ms_per_token']:7.1f} ms/token "
                    f"({fmt_ratio(vs_plain['ms_per_token'])}, {fmt_ratio(vs_plain['tokens_per_s'])} throughput)  "
                    f"TTFT {summary['ttft_ms']:6.0f} ms  "
                    f"peak {summary['peak_rss_mib']:5.0f} MiB (+{summary['rss_increase_mib']:.0f})",
                    file=sys.stderr,
                )
            env["model"]["parameters"] = raws[0]["parameters"]
            env["model"]["non_embedding_parameters"] = raws[0]["parameters"] - raws[0]["embedding_parameters"]
            env["model"]["device"] = raws[0]["device"]
            env["complete"] = len(rows) == len(groups) * len(method_list)
            env["loadavg_1min_end"] = os.getloadavg()[0]
            env["wall_s"] = time.perf_counter() - started
            table = write_outputs(env, rows, out)  # after every group, so an interrupted run keeps its rows

    print(
        f"model: {env['model']['parameters']:,} parameters "
        f"({env['model']['non_embedding_parameters']:,} outside the embedding)",
        file=sys.stderr,
    )
    print(table)
    print(f"wrote {out} and {out.with_suffix('.json')} in {env['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
