"""Exactness of value steering on the device it runs on (CUDA on a GPU; the CPU in a dry run).

Checks, each a row of the table and the JSON: a never-intervening head makes every candidate path equal
plain `generate` token for token (two families, fp32 and bf16, K=1/8, greedy and seeded sampling); with
an intervening head every path agrees with the first (tokens exactly, risks to the dtype's tolerance);
a static cache run; `device_map="auto"` (and, with CUDA, a map that puts the final norm on the CPU)
places the head where the final norm runs without moving it. Paths come from
`vsteer_hf.config.CANDIDATE_PATHS`, so a new path is checked as soon as it exists.

    python benchmarks/gpu_exactness.py --out results/           # all checks on CUDA if visible
    python benchmarks/gpu_exactness.py --dry-run --out /tmp/x   # fewer cases, CPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: the suite's models built from configs, no hub

from tiny_models import batch_inputs, make_head, tiny_model, tiny_tokenizer  # noqa: E402

from vsteer_hf import ValueSteerConfig, enable_value_steer  # noqa: E402
from vsteer_hf.config import CANDIDATE_PATHS  # noqa: E402

PATHS = tuple(p for p in CANDIDATE_PATHS if p != "auto")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RISK_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # risks in [0, 1] from bf16 hidden states, scored in fp32
FAMILIES = ("llama", "mistral")
NEW_TOKENS = 8


def _generate(model, ids, mask, steer=None, sample=False, seed=0, **kw) -> Any:
    torch.manual_seed(seed)
    extra = {"value_steer": steer} if steer is not None else {}
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=sample,
        max_new_tokens=NEW_TOKENS,
        return_dict_in_generate=True,
        **({"top_k": 20} if sample else {}),
        **extra,
        **kw,
    )


def _model(family: str, dtype: str, device: torch.device) -> Any:
    return enable_value_steer(tiny_model(family).to(device=device, dtype=DTYPES[dtype]))


def _inputs(device: torch.device, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = batch_inputs(batch)
    return ids.to(device), mask.to(device)


def _steered(model, ids, mask, head, k: int, path: str, **kw) -> Any:
    steer = ValueSteerConfig(head=head, threshold=0.5, num_candidates=k, candidate_forward=path)
    return _generate(model, ids, mask, steer, **kw)


def _attempt(run: Any, *args: Any, **kwargs: Any) -> tuple[Any, str]:
    """(result, "") or (None, the error in one line): a path that raises is a failed row, not a lost report."""
    try:
        return run(*args, **kwargs), ""
    except Exception as err:
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _row(check: str, ok: bool, detail: str = "", **case: Any) -> dict[str, Any]:
    return {"check": check, **case, "ok": bool(ok), "detail": detail}


def never_intervening(device: torch.device, dtypes: list[str], ks: list[int]) -> list[dict[str, Any]]:
    rows = []
    for family, dtype in itertools.product(FAMILIES, dtypes):
        model = _model(family, dtype, device)
        head = make_head(model.config.get_text_config().hidden_size, bias=-50.0).to(device)
        ids, mask = _inputs(device)
        for sample in (False, True):
            plain = _generate(model, ids, mask, sample=sample)
            for k, path in itertools.product(ks, PATHS):
                case = {"family": family, "dtype": dtype, "path": path, "k": k, "sample": sample}
                out, error = _attempt(_steered, model, ids, mask, head, k, path, sample=sample)
                if out is None:
                    rows.append(_row("never-intervening == plain generate", False, error, **case))
                    continue
                same = torch.equal(out.sequences, plain.sequences)
                quiet = not bool(out.interventions.any())
                detail = "" if same and quiet else ("tokens differ" if not same else "the head intervened")
                rows.append(_row("never-intervening == plain generate", same and quiet, detail, **case))
    return rows


def intervening(device: torch.device, dtypes: list[str]) -> list[dict[str, Any]]:
    """Every path against the first, with a head that intervenes: same tokens, risks within tolerance."""
    rows = []
    for family, dtype, sample in itertools.product(FAMILIES, dtypes, (False, True)):
        model = _model(family, dtype, device)
        head = make_head(model.config.get_text_config().hidden_size, scale=4.0).to(device)
        ids, mask = _inputs(device)
        outs, errors = {}, {}
        for path in PATHS:
            outs[path], errors[path] = _attempt(
                _steered, model, ids, mask, head, 4, path, sample=sample, eos_token_id=None
            )
        ref_path, ref = PATHS[0], outs[PATHS[0]]
        acted = ref is not None and bool(ref.interventions.any())
        for path in PATHS[1:]:
            out = outs[path]
            case = {"family": family, "dtype": dtype, "path": f"{path} vs {ref_path}", "k": 4, "sample": sample}
            if out is None or ref is None:
                error = errors[path] or f"{ref_path}: {errors[ref_path]}"
                rows.append(_row("intervening: paths agree", False, error, **case))
                continue
            same = torch.equal(out.sequences, ref.sequences)
            diff = _max_risk_diff(out.value_scores, ref.value_scores) if same else float("nan")
            ok = same and acted and diff <= RISK_TOLERANCE[dtype]
            detail = f"max risk diff {diff:.2e} (tol {RISK_TOLERANCE[dtype]:.0e})"
            if not same:
                detail = "tokens differ"
            elif not acted:
                detail = "the head never intervened: the comparison means nothing"
            rows.append(_row("intervening: paths agree", ok, detail, **case))
    return rows


def _max_risk_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if not torch.equal(a.isnan(), b.isnan()):
        return float("inf")
    live = ~a.isnan()
    return float((a[live].float() - b[live].float()).abs().max()) if live.any() else 0.0


def static_cache(device: torch.device, dtypes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for dtype in dtypes:
        model = _model("llama", dtype, device)
        head = make_head(model.config.hidden_size, bias=-50.0).to(device)
        ids, mask = _inputs(device)
        plain = _generate(model, ids, mask, cache_implementation="static")
        for path in PATHS:
            out, error = _attempt(_steered, model, ids, mask, head, 8, path, cache_implementation="static")
            same = out is not None and torch.equal(out.sequences, plain.sequences)
            case = {"family": "llama", "dtype": dtype, "path": path, "k": 8, "sample": False}
            detail = error or ("" if same else "tokens differ")
            rows.append(_row("static cache == plain static", same, detail, **case))
    return rows


def device_placement(device: torch.device) -> list[dict[str, Any]]:
    """From a saved folder with a device map: the head is placed where the final norm runs, never moved."""
    from transformers import AutoModelForCausalLM

    maps: dict[str, Any] = {"auto": "auto"}
    if device.type == "cuda":  # a real split: decoder layers on the GPU, final norm and lm_head on the CPU
        maps["norm on cpu"] = {
            "model.embed_tokens": 0,
            "model.rotary_emb": 0,
            "model.layers": 0,
            "model.norm": "cpu",
            "lm_head": "cpu",
        }
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tiny_model("llama").save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        reference = _model("llama", "float32", torch.device("cpu"))
        ids_cpu, mask_cpu = batch_inputs(3)
        for name, device_map in maps.items():
            try:
                model = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, dtype=torch.float32)
                model = enable_value_steer(model.eval())
                head = make_head(model.config.hidden_size, bias=-50.0).to(device)
                home = [p.device for p in head.parameters()]
                placed_on: list[str] = []
                original = head.placed
                head.placed = lambda d, _o=original, _seen=placed_on: _seen.append(str(torch.device(d))) or _o(d)
                steer = ValueSteerConfig(head=head, threshold=0.5, num_candidates=8)
                first = next(model.parameters()).device
                out = _generate(model, ids_cpu.to(first), mask_cpu.to(first), steer)
                plain = _generate(reference, ids_cpu, mask_cpu)
                norm_device = str(model.model.norm.weight.device)
                same = torch.equal(out.sequences.cpu(), plain.sequences)
                unmoved = [p.device for p in head.parameters()] == home
                followed = bool(placed_on) and set(placed_on) == {norm_device}
                ok = same and unmoved and followed
                detail = f"final norm on {norm_device}, head placed on {sorted(set(placed_on))}, lives on {home[0]}"
                if not same:
                    detail += "; tokens differ from the unmapped model"
                if not unmoved:
                    detail += "; the caller's head was moved"
            except Exception as err:  # a failure is a row, not the end of the report
                ok, detail = False, f"{type(err).__name__}: {err}"
            rows.append(_row(f"device_map={name}: head follows the final norm", ok, detail, family="llama"))
    return rows


def environment(device: torch.device) -> dict[str, Any]:
    from importlib import metadata

    env = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": str(device),
        "torch": torch.__version__,
        "transformers": metadata.version("transformers"),
        "paths": list(PATHS),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def table(rows: list[dict[str, Any]]) -> str:
    cols = ("check", "family", "dtype", "path", "k", "sample", "ok", "detail")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [("PASS" if r["ok"] else "FAIL") if c == "ok" else str(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for exactness.md and exactness.json")
    parser.add_argument("--dry-run", action="store_true", help="fp32 only, K=8, on the CPU: the code paths, quickly")
    parser.add_argument("--device", default=None, help="default: cuda if visible, else cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = ["float32"] if args.dry_run else list(DTYPES)
    ks = [8] if args.dry_run else [1, 8]
    started = time.perf_counter()
    rows = never_intervening(device, dtypes, ks)
    rows += intervening(device, dtypes)
    rows += static_cache(device, dtypes)
    rows += device_placement(device)
    env = {**environment(device), "dry_run": args.dry_run, "wall_s": round(time.perf_counter() - started, 1)}
    failed = sum(not r["ok"] for r in rows)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    summary = f"{len(rows) - failed} of {len(rows)} exactness checks pass on {env['device']} ({env['wall_s']} s)"
    (args.out / "exactness.md").write_text(f"{summary}\n\n{text}\n")
    (args.out / "exactness.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    print(text)
    print(summary)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
