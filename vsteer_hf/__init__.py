"""vsteer_hf: value-head safety steering for Hugging Face transformers.

Value-filtered decoding (VFD) and dynamic abstention inside `model.generate(..., value_steer=cfg)`.
Importing the package loads neither vLLM nor any judge; the public names below are imported on first
use, so `vsteer --version` and `vsteer heads` answer without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "HeadCard": "vsteer_hf.head",
    "ValueHead": "vsteer_hf.head",
    "load_value_head": "vsteer_hf.head",
    "ValueSteerConfig": "vsteer_hf.config",
    "ValueSteerOutput": "vsteer_hf.hf.decode",
    "disable_value_steer": "vsteer_hf.hf.enable",
    "enable_value_steer": "vsteer_hf.hf.enable",
    "shipped_heads": "vsteer_hf.shipped",
    "shipped_head_dir": "vsteer_hf.shipped",
    "policy": None,
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'vsteer_hf' has no attribute {name!r}")
    module = _PUBLIC[name]
    value = (
        importlib.import_module(f"vsteer_hf.{name}")
        if module is None
        else getattr(importlib.import_module(module), name)
    )
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
