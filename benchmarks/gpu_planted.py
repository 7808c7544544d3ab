"""Decode cost at a realistic intervention rate without real weights: a head that flags a planted share of steps.

bench_decode.py measures the pure overhead with a head that never intervenes. Here the head scores one
fixed random direction w of the post-norm hidden state: risk >= 0.5 exactly when w·h exceeds q, the
(1 - rate) quantile of w·h over the states of plain sampled continuations of the same prompts, so about
`rate` of the states the model visits are flagged (checked on a held-out plain run and reported). Plain
sampled generate and VFD K=8 on every candidate path of `vsteer_hf.config.CANDIDATE_PATHS` run in one
process, repeats interleaved; reported: ms per decode step ((t(N) - t(1)) / (N - 1), timestamps of one
run's first and last generated token), its ratio to plain,
peak `max_memory_allocated` (CUDA) and its ratio, and interventions per token.

    python benchmarks/gpu_planted.py --out results/                     # mistral-7b-shape, bf16, CUDA
    python benchmarks/gpu_planted.py --dry-run --out /tmp/x             # the suite's tiny llama, CPU
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_decode: the benchmark backbones, one place
from bench_decode import MODELS
from decode_worker import StepClock

from vsteer_hf import ValueHead, ValueSteerConfig, enable_value_steer
from vsteer_hf.config import CANDIDATE_PATHS

PATHS = tuple(p for p in CANDIDATE_PATHS if p != "auto")
THRESHOLD = 0.5
SEED = 0


def planted_head(direction: torch.Tensor, cut: float, spread: float) -> ValueHead:
    """A ValueHead whose risk is >= THRESHOLD iff hidden·direction > cut (up to 1e-4 of `spread`).

    Layer 0 computes a·(h·w - cut) in one unit; tanh and ReLU keep its sign; the last layer maps a positive
    unit to a large logit and zero to -1. The other units are zero, so nothing else reaches the risk.
    """
    hidden = direction.numel()
    head = ValueHead(hidden)
    a = 1e4 / spread  # tanh(a·x) > 0.01 iff x > ~1e-6 spread
    with torch.no_grad():
        for module in (head[0], head[2], head[4]):
            module.weight.zero_()
            module.bias.zero_()
        head[0].weight[0] = a * direction
        head[0].bias[0] = -a * cut
        head[2].weight[0, 0] = 1.0
        head[4].weight[0, 0] = 200.0
        head[4].bias[0] = -1.0
    return head.eval().requires_grad_(False)


def build_model(name: str, device: torch.device) -> Any:
    import transformers
    from transformers import AutoModelForCausalLM

    if name == "tiny-llama":  # the test suite's model: a dry run exercises the code, not the numbers
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import tiny_model

        return enable_value_steer(tiny_model("llama").to(device))
    config_class, kwargs, dtype, _ = MODELS[name]
    if config_class == "embedded":
        raise SystemExit(f"--model {name} has real weights; pick one built from a config")
    torch.manual_seed(SEED)
    with device:
        model = AutoModelForCausalLM.from_config(
            getattr(transformers, config_class)(**kwargs), attn_implementation="sdpa", dtype=getattr(torch, dtype)
        )
    return enable_value_steer(model.to(device)).eval()


@torch.no_grad()
def visited_states(model: Any, ids: torch.Tensor, new_tokens: int, seed: int) -> torch.Tensor:
    """Post-norm hidden states of a plain sampled continuation, one per generated token: (B * N, H) fp32."""
    torch.manual_seed(seed)
    seqs = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        top_k=0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
    )
    states = model.get_decoder()(input_ids=seqs, attention_mask=torch.ones_like(seqs)).last_hidden_state
    return states[:, ids.shape[1] :].reshape(-1, states.shape[-1]).float()  # (B * N, H)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for planted.md and planted.json")
    parser.add_argument("--model", choices=[*sorted(MODELS), "tiny-llama"], default="mistral-7b-shape")
    parser.add_argument("--rate", type=float, default=0.03, help="planted share of flagged states (default 0.03)")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--batch", default="1,16", help="batch sizes (default 1,16)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="tiny-llama, prompt 8, batch 1,2, 8 tokens, 1 repeat")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.model, args.prompt, args.batch, args.new_tokens, args.repeats = "tiny-llama", 8, "1,2", 8, 1
    if not 0.0 < args.rate < 1.0 or args.new_tokens < 2 or args.repeats < 1:
        raise SystemExit("--rate must lie in (0, 1), --new-tokens >= 2, --repeats >= 1")
    batches = [int(b) for b in args.batch.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    model = build_model(args.model, device)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    gen = torch.Generator().manual_seed(SEED)
    direction = torch.nn.functional.normalize(torch.randn(hidden, generator=gen), dim=0).to(device)
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for batch in batches:
        ids = torch.randint(3, vocab, (batch, args.prompt), generator=gen).to(device)
        scores = visited_states(model, ids, args.new_tokens, seed=SEED + 1) @ direction
        cut = float(torch.quantile(scores, 1.0 - args.rate))
        head = planted_head(direction, cut, float(scores.std()) or 1.0).to(device)
        held_out = visited_states(model, ids, args.new_tokens, seed=SEED + 2)
        flag_rate = float((head.p(held_out) >= THRESHOLD).float().mean())
        methods: dict[str, ValueSteerConfig | None] = {"plain generate": None}
        for path in PATHS:  # a path that raises is reported; the others are still measured
            name = f"VFD {path} K={args.k}"
            try:
                steer = ValueSteerConfig(head=head, threshold=THRESHOLD, num_candidates=args.k, candidate_forward=path)
                timed(model, ids, 2, steer, device)
                methods[name] = steer
            except Exception as err:
                failed.append({"batch": batch, "method": name, "error": f"{type(err).__name__}: {err}"})
        runs = {name: {"step_ms": [], "peak_mib": [], "interventions": []} for name in methods}
        for repeat in range(args.repeats + 1):  # repeat 0 warms up
            for name, steer in methods.items():
                clock = StepClock(lambda: torch.cuda.synchronize(device) if device.type == "cuda" else None)
                _, out = timed(model, ids, args.new_tokens, steer, device, clock)
                if repeat == 0:
                    continue
                runs[name]["step_ms"].append(1e3 * (clock.times[-1] - clock.times[1]) / (args.new_tokens - 1))
                if device.type == "cuda":
                    runs[name]["peak_mib"].append(torch.cuda.max_memory_allocated(device) / 2**20)
                if steer is not None:
                    runs[name]["interventions"].append(float(out.interventions.float().mean()))
        base = runs["plain generate"]
        for name, run in runs.items():
            ms = _median(run["step_ms"])
            peak = max(run["peak_mib"]) if run["peak_mib"] else None
            base_peak = max(base["peak_mib"]) if base["peak_mib"] else None
            rows.append(
                {
                    "batch": batch,
                    "prompt": args.prompt,
                    "method": name,
                    "ms_per_step": ms,
                    "vs_plain": ms / _median(base["step_ms"]),
                    "peak_mib": peak,
                    "peak_vs_plain": peak / base_peak if peak and base_peak else None,
                    "interventions_per_token": _median(run["interventions"]) if run["interventions"] else None,
                    "planted_rate": args.rate,
                    "held_out_flag_rate": flag_rate,
                    "raw": run,
                }
            )
    env = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    errors = "".join(f"\nFAILED batch {f['batch']} {f['method']}: {f['error']}" for f in failed)
    (args.out / "planted.md").write_text(f"{env['device']}, {args.model}, {env['date']}\n\n{text}\n{errors}")
    payload = {"environment": env, "rows": rows, "failed": failed}
    (args.out / "planted.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(text + errors)
    return 1 if failed else 0


def timed(
    model: Any, ids: torch.Tensor, new_tokens: int, steer: Any, device: torch.device, clock: StepClock | None = None
) -> tuple[float, Any]:
    """Seconds for one sampled generate of exactly `new_tokens` (EOS suppressed), and its output; `clock`
    (a streamer) timestamps its tokens."""
    extra = {"value_steer": steer} if steer is not None else {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(SEED + 3)
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        top_k=0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        return_dict_in_generate=True,
        streamer=clock,
        **extra,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| batch | method | ms/step | vs plain | peak MiB | peak vs plain | interventions/token | held-out flag rate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['method']} | {r['ms_per_step']:.2f} | {r['vs_plain']:.3f}x | "
            f"{_fmt(r['peak_mib'], '.0f')} | {_fmt(r['peak_vs_plain'], '.3f')} | "
            f"{_fmt(r['interventions_per_token'], '.3f')} | {r['held_out_flag_rate']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
