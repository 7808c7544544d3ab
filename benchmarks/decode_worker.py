"""Timing one decode configuration in its own process, and driving several of them round-robin.

`worker` runs inside a fresh interpreter (`bench_decode.py --worker SPEC`), builds its configuration and
answers `warmup` / `repeat` / `finish` commands with one JSON line each, so its peak RSS is its own;
`measure_group` starts one per configuration and interleaves their repeats so background load falls on all
alike; `summarize` turns a worker's raw timings into the table's medians.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from decode_setup import SEED, build


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


class StepClock:
    """Streamer that timestamps each `put`: the prompt first, then one per generated token. Steps timed
    inside one run, so a per-step figure never subtracts two runs' noise. `sync` waits for the device."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def step_ms(self) -> list[float]:
        """Milliseconds between consecutive generated tokens (the prompt's put dropped)."""
        return [1e3 * (b - a) for a, b in itertools.pairwise(self.times[1:])]


def worker(spec: dict[str, Any]) -> None:
    """Serve one configuration: build the model, then answer `warmup` / `repeat` / `finish` lines on stdin
    with one JSON line each on the original stdout (anything a library prints goes to stderr)."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import resource

    import torch

    torch.set_num_threads(spec["threads"])
    built = build(spec)
    model, steer, device = built["model"], built["steer"], built["device"]
    input_ids, attention_mask, sampling = built["input_ids"], built["attention_mask"], built["sampling"]
    batch, prompt, new = input_ids.shape[0], input_ids.shape[1], spec["new_tokens"]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(max_new_tokens: int, clock: StepClock | None = None) -> tuple[float, torch.Tensor, int | None]:
        kwargs: dict[str, Any] = {"value_steer": steer} if steer is not None else {}
        torch.manual_seed(SEED)  # sampled workloads: every method draws from the same stream
        sync()
        start = time.perf_counter()
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,  # suppresses EOS: every run emits exactly max_new_tokens
            streamer=clock,
            return_dict_in_generate=True,
            **sampling,
            **kwargs,
        )
        sync()
        elapsed = time.perf_counter() - start
        sequences = out.sequences
        if sequences.shape != (batch, prompt + max_new_tokens):
            raise RuntimeError(f"expected {max_new_tokens} new tokens per row, got shape {tuple(sequences.shape)}")
        interventions = getattr(out, "interventions", None)
        changed = int(interventions.sum()) if interventions is not None else None
        return elapsed, sequences[:, prompt:].cpu(), changed

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
            elapsed, tokens, changed = run(new)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)  # peaks from here on: the timed runs
            reply(
                {
                    "warmup_s": elapsed,
                    "tokens": tokens.tolist(),
                    "interventions": changed,
                    "interventions_per_token": None if changed is None else changed / (batch * new),
                    "prompt_tokens": prompt,
                    "threshold": built["threshold"],
                }
            )
        elif command == "repeat":
            loadavg, pressure = os.getloadavg()[0], cpu_pressure()
            ttft, _, _ = run(1)
            clock = StepClock(sync)
            start = time.perf_counter()
            total, _, _ = run(new, clock)
            token_times, steps = clock.times[1:], clock.step_ms()  # token_times: the prompt's put dropped
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


class Worker:
    """A configuration's own interpreter, driven line by line (so its `ru_maxrss` is that configuration's)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "bench_decode.py"), "--worker", json.dumps(spec)]
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
