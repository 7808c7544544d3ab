"""Decode cost of value-filtered decoding (VFD) and abstention against plain `generate`.

Measures, for a chosen backbone, greedy decoding with a never-intervening value head (bias -50: every step
still forwards and scores all K candidates, so this is the pure overhead): per-token decode latency,
tokens/s, time to first token and peak memory (CPU: the process's RSS; CUDA: `max_memory_allocated`) for
plain generate, VFD with each K on the tree and the expand candidate path, and dynamic abstention. Each
configuration runs in its own fresh subprocess, so peaks are that configuration's own; the configurations of
one prompt length and batch are driven round-robin, so background load falls on all alike. Every ratio is
against plain generate measured in the same invocation with the same prompt length and batch.

Models: `llama-50m` (config, random weights, fp32; the CPU target), `llama-81m` (the earlier CPU table),
`smollm2-135m` (the embedded backbone, real weights), `mistral-7b-shape` (Mistral-7B's shapes, random
weights, bf16; needs a GPU). Speed does not depend on weight values.

Run:
    python benchmarks/bench_decode.py                       # CPU target: llama-50m, prompts 32,512, batch 1
    python benchmarks/bench_decode.py --quick               # < 1 minute smoke test
    python benchmarks/bench_decode.py --model smollm2-135m --k 1,8 --paths tree
    python benchmarks/bench_decode.py --model mistral-7b-shape --prompts 512,2048 --batch 1,16 --k 1,2,4,8,16
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SEED = 0
_SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# name -> (transformers config class, config kwargs, dtype, device kind)
MODELS: dict[str, tuple[str, dict[str, Any], str, str]] = {
    # hidden 512, 10 layers, tied embeddings: 50.5M parameters, 34.1M outside the embedding.
    "llama-50m": (
        "LlamaConfig",
        {
            "hidden_size": 512,
            "num_hidden_layers": 10,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "intermediate_size": 1536,
            "vocab_size": 32000,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": True,
            **_SPECIAL,
        },
        "float32",
        "cpu",
    ),
    # hidden 768, 8 layers, tied embeddings: 81.2M parameters, 56.6M outside the embedding.
    "llama-81m": (
        "LlamaConfig",
        {
            "hidden_size": 768,
            "num_hidden_layers": 8,
            "num_attention_heads": 12,
            "num_key_value_heads": 12,
            "intermediate_size": 2048,
            "vocab_size": 32000,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": True,
            **_SPECIAL,
        },
        "float32",
        "cpu",
    ),
    "smollm2-135m": ("embedded", {}, "float32", "cpu"),
    # Mistral-7B-v0.3's shapes: 7.25B parameters.
    "mistral-7b-shape": (
        "MistralConfig",
        {
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "vocab_size": 32768,
            "max_position_embeddings": 32768,
            "sliding_window": None,
            "tie_word_embeddings": False,
            **_SPECIAL,
        },
        "bfloat16",
        "cuda",
    ),
}


def methods(ks: list[int], paths: list[str]) -> list[tuple[str, dict[str, Any] | None]]:
    """(row label, ValueSteerConfig keyword arguments or None for plain generate); plain generate first."""
    return [
        ("plain generate", None),
        *[(f"VFD {path} K={k}", {"num_candidates": k, "candidate_forward": path}) for path in paths for k in ks],
        ("abstain", {"mode": "abstain"}),
    ]


# --------------------------------------------------------------------------- worker (one configuration)
def _vm_kib(field: str) -> int:
    """A `Vm*` line of /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def cpu_pressure() -> float | None:
    """Share of the last 10 s in which some runnable task waited for a CPU (Linux PSI), in percent."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def worker(spec: dict[str, Any]) -> None:
    """Serve one configuration: build the model, then answer `warmup` / `repeat` / `finish` lines on stdin
    with one JSON line each on the original stdout (anything a library prints goes to stderr)."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import resource

    import torch

    torch.set_num_threads(spec["threads"])
    import transformers
    from transformers import AutoModelForCausalLM

    from vsteer_hf import ValueHead, ValueSteerConfig, enable_value_steer

    torch.manual_seed(SEED)
    config_class, config_kwargs, dtype_name, device_kind = MODELS[spec["model"]]
    dtype = getattr(torch, dtype_name)
    device = torch.device("cuda" if device_kind == "cuda" else "cpu")
    if config_class == "embedded":
        from vsteer_hf.backbones import ensure_default_backbone

        model = AutoModelForCausalLM.from_pretrained(ensure_default_backbone(), dtype=dtype, attn_implementation="sdpa")
    else:
        config = getattr(transformers, config_class)(**config_kwargs)
        with device:
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model = enable_value_steer(model.to(device)).eval()
    config = model.config
    head = ValueHead(config.hidden_size)
    with torch.no_grad():
        head[4].bias.fill_(-50.0)  # risk ~ 2e-22: never intervenes, never abstains
    steer = None
    if spec["steer"] is not None:
        steer = ValueSteerConfig(head=head, threshold=0.5, **spec["steer"])
    batch, prompt, new = spec["batch"], spec["prompt"], spec["new_tokens"]
    gen = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(3, config.vocab_size, (batch, prompt), generator=gen).to(device)  # no special ids
    attention_mask = torch.ones_like(input_ids)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    class StepClock:
        """Streamer that timestamps each `put`: the prompt first, then one per generated token."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            sync()
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(max_new_tokens: int, clock: StepClock | None = None) -> tuple[float, torch.Tensor]:
        kwargs: dict[str, Any] = {"value_steer": steer} if steer is not None else {}
        sync()
        start = time.perf_counter()
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,  # suppresses EOS: every run emits exactly max_new_tokens
            do_sample=False,
            streamer=clock,
            **kwargs,
        )
        sync()
        elapsed = time.perf_counter() - start
        if out.shape != (batch, prompt + max_new_tokens):
            raise RuntimeError(f"expected {max_new_tokens} new tokens per row, got shape {tuple(out.shape)}")
        return elapsed, out[:, prompt:].cpu()

    def reply(message: dict[str, Any]) -> None:
        channel.write(json.dumps(message) + "\n")

    reply(
        {
            "parameters": sum(p.numel() for p in model.parameters()),
            "embedding_parameters": model.get_input_embeddings().weight.numel(),
            "torch_threads": torch.get_num_threads(),
            "rss_after_load_kib": _vm_kib("VmRSS"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cuda_after_load_mib": torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            "maxrss_after_load_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }
    )
    for command in sys.stdin:
        command = command.strip()
        if command == "warmup":
            elapsed, tokens = run(new)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)  # peaks from here on: the timed runs
            reply({"warmup_s": elapsed, "tokens": tokens.tolist()})
        elif command == "repeat":
            loadavg, pressure = os.getloadavg()[0], cpu_pressure()
            ttft, _ = run(1)
            clock = StepClock()
            start = time.perf_counter()
            total, _ = run(new, clock)
            token_times = clock.times[1:]  # drop the prompt's put
            steps = [1e3 * (b - a) for a, b in itertools.pairwise(token_times)]
            reply(
                {
                    "ttft_s": ttft,
                    "total_s": total,
                    "first_token_in_run_s": token_times[0] - start,
                    "step_ms": steps,
                    "loadavg_1min": loadavg,
                    "cpu_pressure_avg10": pressure,
                }
            )
        elif command == "finish":
            cuda_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            reply(
                {
                    "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                    "vmhwm_kib": _vm_kib("VmHWM"),
                    "cuda_peak_mib": cuda_peak,
                }
            )
            return
        else:
            raise ValueError(f"unknown worker command {command!r}")


# --------------------------------------------------------------------------- driver
class Worker:
    """A configuration's own interpreter, driven line by line (so its `ru_maxrss` is that configuration's)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1
        )
        self.raw: dict[str, Any] = {"repeats": []}

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            tail = self.stderr.read()[-4000:]
            raise RuntimeError(f"worker for {self.spec} exited with {self.proc.returncode}:\n{tail}")
        return json.loads(line)

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def measure_group(
    specs: list[dict[str, Any]], repeats: int, progress: Any, concurrent: bool = True
) -> list[dict[str, Any]]:
    """Start one worker per configuration, then run warm-up and repeats round-robin (rotating the order
    each round), so that load from other processes spreads over all configurations alike. With
    `concurrent=False` (a GPU, where several copies of a large model do not fit) one worker runs at a time."""
    if not concurrent:
        return [raw for spec in specs for raw in measure_group([spec], repeats, progress)]
    workers = [Worker(spec) for spec in specs]
    try:
        for w in workers:  # all load in parallel; timing starts once every one is ready
            w.raw.update(w.receive())
        progress.update(len(workers))
        for w in workers:
            w.raw.update(w.ask("warmup"))
            progress.update(1)
        for r in range(repeats):
            shift = r % len(workers)
            for w in workers[shift:] + workers[:shift]:
                w.raw["repeats"].append(w.ask("repeat"))
                progress.update(1)
        for w in workers:
            w.raw.update(w.ask("finish"))
            w.proc.wait()
    finally:
        for w in workers:
            w.close()
    return [w.raw for w in workers]


def summarize(raw: dict[str, Any], new_tokens: int) -> dict[str, float]:
    """Medians over repeats; per-token latency is each repeat's median step interval."""
    reps = raw["repeats"]
    return {
        "ms_per_token": statistics.median(statistics.median(r["step_ms"]) for r in reps),
        "ms_per_token_best": min(min(r["step_ms"]) for r in reps),
        "ms_per_token_mean_decode": statistics.median(
            1e3 * (r["total_s"] - r["first_token_in_run_s"]) / (new_tokens - 1) for r in reps
        ),
        "tokens_per_s": new_tokens / statistics.median(r["total_s"] for r in reps),
        "ttft_ms": 1e3 * statistics.median(r["ttft_s"] for r in reps),
        "peak_rss_mib": raw["maxrss_kib"] / 1024,
        "rss_increase_mib": (raw["maxrss_kib"] - raw["rss_after_load_kib"]) / 1024,
        # on CUDA: the device's peak allocation during the timed runs (weights included), the GPU target's measure
        "cuda_peak_mib": raw["cuda_peak_mib"] if raw.get("cuda_peak_mib") is not None else float("nan"),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ratio(value: float, base: float) -> float | None:
    return value / base if base > 0 else None


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    s, m = env["settings"], env["model"]
    pressure = [
        r["cpu_pressure_avg10"] for row in rows for r in row["raw"]["repeats"] if r["cpu_pressure_avg10"] is not None
    ]
    load = (
        f"CPU pressure from other processes during the repeats (PSI some avg10): median "
        f"{statistics.median(pressure):.0f}%, max {max(pressure):.0f}%."
        if pressure
        else f"1-min load average at start {env['loadavg_1min_start']:.1f}."
    )
    cuda = m["device"] != "cpu"
    weights = "real weights" if m["name"] == "smollm2-135m" else "random weights"
    where = (
        f"GPU: {m['device']}; host CPU: {env['cpu']}"
        if cuda
        else f"CPU: {env['cpu']}, {s['threads']} threads ({env['cpu_count']} visible)"
    )
    memory_header = "peak CUDA MiB | × plain" if cuda else "peak RSS MiB | Δ RSS MiB | × plain"
    lines = [
        f"# Decode cost of value steering ({m['device']})",
        "",
        f"`{m['name']}`: {m['parameters'] / 1e6:.1f}M parameters ({weights}, "
        f"{m['non_embedding_parameters'] / 1e6:.1f}M outside the input embedding), {m['dtype']}, sdpa, greedy, "
        f"{s['new_tokens']} new tokens, {s['repeats']} repeats after a warm-up, never-intervening value head.",
        f"{where}; torch {env['torch']}, transformers {env['transformers']}; {env['date']}. {load}",
        "",
        *([] if env.get("complete", True) else ["**Partial: the run stopped before every configuration ran.**", ""]),
        f"| prompt | batch | method | ms/token | × plain | best ms/token | × plain | tokens/s | TTFT ms | × plain "
        f"| {memory_header} |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" * memory_header.count("|")) + "---:|",
    ]
    for r in rows:
        v, x = r["summary"], r["vs_plain"]
        memory = (
            f"{v['cuda_peak_mib']:.0f} | {fmt_ratio(x['cuda_peak_mib'])}"
            if cuda
            else f"{v['peak_rss_mib']:.0f} | {v['rss_increase_mib']:.0f} | {fmt_ratio(x['rss_increase_mib'])}"
        )
        lines.append(
            f"| {r['prompt']} | {r['batch']} | {r['method']} "
            f"| {v['ms_per_token']:.1f} | {fmt_ratio(x['ms_per_token'])} "
            f"| {v['ms_per_token_best']:.1f} | {fmt_ratio(x['ms_per_token_best'])} "
            f"| {v['tokens_per_s']:.1f} | {v['ttft_ms']:.0f} | {fmt_ratio(x['ttft_ms'])} "
            f"| {memory} |"
        )
    lines += [
        "",
        "ms/token: median over repeats of each repeat's median decode step (time between consecutive tokens); "
        "best: the fastest single step, least touched by other load. tokens/s: new tokens over the median "
        "whole generate, prefill included. TTFT: median generate with max_new_tokens=1 (for VFD this includes "
        "scoring the first K candidates). Peak RSS: `ru_maxrss` of the configuration's own process; Δ RSS: "
        "peak minus the RSS after the model was built; peak CUDA: `max_memory_allocated` over the timed runs, "
        "weights included. Ratios: against plain generate with the same prompt "
        "and batch, measured in the same invocation, interleaved round-robin.",
    ]
    differ = [r for r in rows if not r["tokens_match_plain"]]
    if differ:
        lines.append("")
        lines.append(
            "Tokens differ from plain generate for: "
            + ", ".join(f"{r['method']} (prompt {r['prompt']}, batch {r['batch']})" for r in differ)
        )
    return "\n".join(lines) + "\n"


def plot(env: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> bool:
    """Per-token cost relative to plain generate against K, one line per path and (prompt, batch).

    Needs matplotlib (the `eval` extra); returns False without it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    groups = sorted({(r["prompt"], r["batch"]) for r in rows})
    for (prompt, batch), path_name in itertools.product(groups, ("tree", "expand")):
        points = sorted(
            (r["value_steer"]["num_candidates"], r["vs_plain"]["ms_per_token"])
            for r in rows
            if r["prompt"] == prompt
            and r["batch"] == batch
            and r["value_steer"]
            and r["value_steer"].get("candidate_forward") == path_name
            and r["vs_plain"]["ms_per_token"] is not None
        )
        if points:
            style = "-o" if path_name == "tree" else "--s"
            ax.plot(*zip(*points, strict=True), style, label=f"{path_name}, prompt {prompt}, batch {batch}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (candidates per step)")
    ax.set_ylabel("ms/token ÷ plain generate")
    ax.set_title(f"VFD decode cost, {env['model']['name']} on {env['model']['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(env: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> str:
    """The markdown table to `out`, everything (raw timings included) to `out`.json, the plot to `out`.png."""
    table = markdown(env, rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    plot(env, rows, out.with_suffix(".png"))
    return table


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
    if not values or not set(values) <= {"tree", "expand"}:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of tree,expand, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="llama-50m", help="backbone (default llama-50m)")
    p.add_argument("--k", type=parse_ints, default=[1, 2, 4, 8, 16], help="VFD candidates K (default 1,2,4,8,16)")
    p.add_argument(
        "--paths", type=parse_paths, default=["tree", "expand"], help="candidate paths (default tree,expand)"
    )
    p.add_argument("--prompts", type=parse_ints, default=[32, 512], help="prompt lengths (default 32,512)")
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
    stem = f"bench_decode.{args.model}" + (".quick" if args.quick else "")
    out = args.out or RESULTS_DIR / f"{stem}.md"
    method_list = methods(args.k, args.paths)

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
                        "prompt": prompt,
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
                    f"prompt {prompt:>4} batch {batch} {name:<16} {summary['ms_per_token']:7.1f} ms/token "
                    f"({fmt_ratio(vs_plain['ms_per_token'])})  TTFT {summary['ttft_ms']:6.0f} ms  "
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
