"""Fixtures shared by the suite; the helpers they use live in tiny_models.py."""

from __future__ import annotations

import pytest
from tiny_models import tiny_model, tiny_tokenizer


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def model_dir(tmp_path):
    """A tiny Llama and its tokenizer saved to a local folder, as from_pretrained expects."""
    folder = tmp_path / "tiny-llama"
    # room for the README quickstart's max_new_tokens=400 (steering refuses to run past the positions)
    tiny_model("llama", max_position_embeddings=1024).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
