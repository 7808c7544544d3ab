"""Engine test helpers: the suite's tiny model and head (tests/tiny_models.py) at a size vLLM's CPU attention takes."""

from __future__ import annotations

import gc
import importlib.util
import sys
from pathlib import Path

import torch

_HERE = Path(__file__).parent


def _root_helpers():
    """The suite's tiny-model helpers (tests/tiny_models.py), found by path whatever sys.path holds."""
    name = "tiny_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _HERE.parent / "tiny_models.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


helpers = _root_helpers()
# vLLM's CPU attention needs a head dimension of at least 32.
ENGINE_MODEL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
HIDDEN = ENGINE_MODEL["hidden_size"]
NEW_TOKENS = 12


def tiny_model():
    return helpers.tiny_model("llama", **ENGINE_MODEL)


def make_head(bias: float = 0.0, scale: float = 1.0, seed: int = 1):
    return helpers.make_head(HIDDEN, bias=bias, scale=scale, seed=seed)


def engine_kwargs() -> dict:
    return dict(dtype="float32", enforce_eager=True, block_size=32, max_model_len=256, seed=0)


def prompts(count: int = 6, seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(3, helpers.VOCAB, (4 + i,), generator=g).tolist()] for i in range(count)]


def close_engine(llm) -> None:
    del llm
    gc.collect()
