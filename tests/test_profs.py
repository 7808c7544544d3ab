"""Tests for vsteer_hf.profs: planted toxic directions, module location, embeddings, end to end."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)
from transformers.pytorch_utils import Conv1D

from vsteer_hf.profs import (
    PROFS_RECORD_NAME,
    ProFSConfig,
    ProFSRecord,
    apply_profs,
    apply_profs_from_embeddings,
    decoder_layers,
    default_k,
    default_layers,
    find_value_projection,
    layer_sentence_embeddings,
    load_profs_record,
    project_out,
    save_profs_model,
    toxic_subspace,
)

H = 32
WORDS = [
    *("the", "a", "cat", "dog", "sat", "ran", "on", "mat", "park", "you"),
    *("are", "kind", "awful", "idiot", "hate", "love", "nice", "people", "today"),
]


def tiny_llama(intermediate: int = 64, init: float = 0.02) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=H,
        intermediate_size=intermediate,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        initializer_range=init,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(init: float = 0.02) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=H, n_layer=4, n_head=4, vocab_size=100, initializer_range=init, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer built offline, deliberately without a pad token."""
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def value_module(model: nn.Module, layer: int) -> nn.Module:
    return find_value_projection(decoder_layers(model)[layer], H)[1]


def planted_embeddings(num_layers: int, n: int = 12, rank: int = 2, seed: int = 0):
    """Per layer: non_preferred = preferred + C Vᵀ exactly, with V ⟂ the preferred top direction.

    Returns embeddings (num_layers, n, H) twice and the planted bases V (num_layers, H, rank).
    """
    g = torch.Generator().manual_seed(seed)
    pref = torch.randn(num_layers, n, H, generator=g) + 3 * torch.randn(num_layers, 1, H, generator=g)
    bases = []
    for layer in range(num_layers):
        top = torch.linalg.svd(pref[layer], full_matrices=False).Vh[0]  # (H,)
        q, _ = torch.linalg.qr(torch.cat([top[:, None], torch.randn(H, rank, generator=g)], dim=1))
        bases.append(q[:, 1:])  # (H, rank), orthonormal and ⟂ top
    v = torch.stack(bases)  # (L, H, rank)
    coef = 2 + torch.rand(num_layers, n, rank, generator=g)  # (L, n, rank)
    return pref, pref + coef @ v.transpose(1, 2), v


def dense_edit(weight: torch.Tensor, v: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """Independent reference: (I - Q Qᵀ) applied to the output axis, Q from QR of the planted V."""
    q, _ = torch.linalg.qr(v)
    proj = torch.eye(v.shape[0]) - q @ q.T  # (H, H)
    return weight @ proj if conv1d else proj @ weight


# ----------------------------------------------------------------------------- subspace


def test_toxic_subspace_recovers_planted_direction_with_noise():
    g = torch.Generator().manual_seed(1)
    pref = torch.randn(40, H, generator=g) + 5.0  # strong shared mean direction
    top = torch.linalg.svd(pref, full_matrices=False).Vh[0]
    v = torch.randn(H, generator=g)
    v = v - (v @ top) * top
    v = v / v.norm()
    non_pref = pref + (2 + torch.rand(40, 1, generator=g)) * v + 1e-3 * torch.randn(40, H, generator=g)
    basis, s = toxic_subspace(pref, non_pref, k=1)
    assert basis.shape == (H, 1) and s.shape == (H,)
    assert abs(float(basis[:, 0] @ v)) > 0.999
    assert s[0] > 100 * s[1]


def test_toxic_subspace_orthonormal_centered_and_sign_invariant():
    g = torch.Generator().manual_seed(2)
    pref, non_pref = torch.randn(20, H, generator=g) + 2.0, torch.randn(20, H, generator=g)
    basis, _ = toxic_subspace(pref, non_pref, k=5)
    assert torch.allclose(basis.T @ basis, torch.eye(5), atol=1e-5)
    top = torch.linalg.svd(pref, full_matrices=False).Vh[0]
    assert (top @ basis).abs().max() < 1e-5  # centering removed the preferred top direction
    a, _ = toxic_subspace(pref, non_pref, k=5, centering=False)
    b, _ = toxic_subspace(non_pref, pref, k=5, centering=False)
    assert torch.allclose(a @ a.T, b @ b.T, atol=1e-5)


def test_toxic_subspace_errors_and_rank_warning():
    x = torch.randn(4, H)
    with pytest.raises(ValueError, match="same shape"):
        toxic_subspace(x, torch.randn(5, H), k=1)
    with pytest.raises(ValueError, match="k=5"):
        toxic_subspace(x, torch.randn(4, H), k=5)
    with pytest.warns(UserWarning, match="numerical rank"):
        toxic_subspace(x, x + torch.randn(1, H), k=2, centering=False)  # rank-1 difference


# ----------------------------------------------------------------------------- the edit


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_planted_direction_is_removed_from_edited_layers_only(family):
    model = tiny_llama(init=0.2) if family == "llama" else tiny_gpt2(init=0.2)
    with torch.no_grad():  # HF initialises biases to zero, which would hide a bias left unprojected
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_()
    original = copy.deepcopy(model)
    pref, non_pref, v = planted_embeddings(num_layers=4)
    edited = [1, 3]
    record = apply_profs_from_embeddings(model, pref, non_pref, ProFSConfig(k=2, layers=edited))
    assert record.layers == edited and record.k == 2 and record.num_pairs == 12
    blocks, old_blocks = decoder_layers(model), decoder_layers(original)
    x = torch.randn(3, 5, H)  # (B, T, H)
    for layer in edited:
        new, old = value_module(model, layer), value_module(original, layer)
        conv1d = isinstance(new, Conv1D)
        assert conv1d == (family == "gpt2")
        w = new.weight
        along_v = w @ v[layer] if conv1d else v[layer].T @ w
        assert along_v.norm() <= 1e-5
        assert torch.allclose(w, dense_edit(old.weight, v[layer], conv1d), atol=1e-5)
        if new.bias is not None:
            assert torch.allclose(new.bias, dense_edit(old.bias[None], v[layer], True)[0], atol=1e-5)
        out_new, out_old = blocks[layer].mlp(x), old_blocks[layer].mlp(x)  # (B, T, H)
        assert (out_old @ v[layer]).abs().max() > 1e-2  # the check below is not vacuous
        assert (out_new @ v[layer]).abs().max() <= 1e-5
        # a direction orthogonal to the subspace passes unchanged
        u = torch.randn(H)
        u = u - v[layer] @ (v[layer].T @ u)
        assert torch.allclose(out_new @ u, out_old @ u, atol=1e-5)
    edited_keys = {name + suffix for name in record.modules for suffix in (".weight", ".bias")}
    new_state, old_state = model.state_dict(), original.state_dict()
    for key, value in old_state.items():
        if key not in edited_keys:
            assert torch.equal(new_state[key], value), key


def test_project_out_bias_optional_and_half_precision():
    lin = nn.Linear(8, H)
    before = lin.bias.detach().clone()
    v = torch.linalg.qr(torch.randn(H, 2))[0]
    project_out(lin, v, project_bias=False)
    assert torch.equal(lin.bias, before) and (v.T @ lin.weight).norm() < 1e-5
    half = nn.Linear(8, H).to(torch.bfloat16)
    project_out(half, v)
    assert half.weight.dtype == torch.bfloat16 and (v.T @ half.weight.float()).norm() < 5e-2
    with pytest.raises(ValueError, match="basis"):
        project_out(lin, torch.randn(7, 2))
    with pytest.raises(TypeError, match="Linear or Conv1D"):
        project_out(nn.LayerNorm(H), v)


# ----------------------------------------------------------------------------- locating modules


def test_locates_value_projection_across_layouts():
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    square = tiny_llama(intermediate=H)  # up/gate/down all (H, H): must still pick down_proj
    opt = OPTForCausalLM(
        OPTConfig(hidden_size=H, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    )
    for model, expected, kind in [
        (llama, "model.layers.{}.mlp.down_proj", nn.Linear),
        (square, "model.layers.{}.mlp.down_proj", nn.Linear),
        (gpt2, "transformer.h.{}.mlp.c_proj", Conv1D),
        (opt, "model.decoder.layers.{}.fc2", nn.Linear),
    ]:
        names = {id(m): n for n, m in model.named_modules()}
        for i, block in enumerate(decoder_layers(model)):
            _, module = find_value_projection(block, H)
            assert names[id(module)] == expected.format(i) and isinstance(module, kind)


class _AttentionOnlyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.ModuleDict({p: nn.Linear(H, H) for p in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.norm = nn.LayerNorm(H)


class _NoMlpModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = PretrainedConfig(hidden_size=H)
        self.layers = nn.ModuleList([_AttentionOnlyBlock() for _ in range(2)])


def test_clear_error_without_mlp():
    model = _NoMlpModel()
    with pytest.raises(ValueError, match=r"No MLP output projection.*self_attn \(ModuleDict\)"):
        find_value_projection(decoder_layers(model)[0], H)
    pref, non_pref, _ = planted_embeddings(num_layers=2, n=4)
    with pytest.raises(ValueError, match="No MLP output projection"):
        apply_profs_from_embeddings(model, pref, non_pref, ProFSConfig(k=1))


# ----------------------------------------------------------------------------- embeddings

TEXTS = ["the cat sat", "you are an awful idiot today", "nice", "the dog ran on the mat in the park"]


def test_embeddings_padding_invariant_and_tokenizer_untouched():
    model, tok = tiny_llama(), tiny_tokenizer()
    tok.padding_side = "left"
    state = (tok.pad_token, tok.padding_side, len(tok))
    model.train()
    single = layer_sentence_embeddings(model, tok, TEXTS, batch_size=1, show_progress=False)
    batched = layer_sentence_embeddings(model, tok, TEXTS, batch_size=4, show_progress=False)
    assert single.shape == (4, len(TEXTS), H)
    assert torch.allclose(single, batched, atol=1e-5)
    assert (tok.pad_token, tok.padding_side, len(tok)) == state and tok.pad_token is None
    assert model.training  # mode restored
    subset = layer_sentence_embeddings(model, tok, TEXTS, layers=[3, 1], show_progress=False)
    assert torch.equal(subset, batched[[1, 3]])


def test_embeddings_are_layer_outputs_before_final_norm():
    model, tok = tiny_llama(), tiny_tokenizer()
    emb = layer_sentence_embeddings(model, tok, TEXTS[:1], show_progress=False)  # (L, 1, H)
    ids = tok(TEXTS[:1], return_tensors="pt")["input_ids"]
    states = model(input_ids=ids, output_hidden_states=True).hidden_states
    for i in range(3):
        assert torch.allclose(emb[i, 0], states[i + 1][0].mean(0), atol=1e-5)
    unnormed = copy.deepcopy(model)
    unnormed.model.norm = nn.Identity()
    raw_last = unnormed(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(emb[3, 0], raw_last[0].mean(0), atol=1e-5)
    assert not torch.allclose(emb[3, 0], states[-1][0].mean(0), atol=1e-3)


# ----------------------------------------------------------------------------- defaults and config


def test_defaults_are_the_authors_for_their_models_and_scale_for_others():
    # Uppaal/detox-edit configs/*.ini: np.arange(lowest, highest) layers and top_k_ranks
    assert default_layers(24, "gpt2") == list(range(10, 24)) and default_k(1024, 500, "gpt2", 24) == 2
    assert default_layers(28, "gptj") == list(range(10, 27)) and default_k(4096, 500, "gptj", 28) == 10
    assert default_layers(32, "mistral") == list(range(15, 32)) and default_k(4096, 500, "mistral", 32) == 10
    assert default_layers(32, "opt") == list(range(10, 32))
    # other families and depths: the paper's starting fraction, last layer left out
    assert default_layers(12, "gpt2") == list(range(6, 11))  # GPT-2 small is not one of theirs
    assert default_layers(30, "llama") == list(range(14, 29))  # SmolLM2-135M
    assert default_layers(32) == list(range(15, 31))
    assert default_layers(4) == [2] and default_layers(2) == [1] and default_layers(1) == [0]
    assert default_k(4096, 500) == 10 and default_k(1024, 500) == 2 and default_k(2048, 500) == 5
    assert default_k(32, 500) == 2 and default_k(4096, 3) == 3 and default_k(32, 1) == 1
    assert default_k(1024, 500, "gpt2", 12) == 2 and default_k(4096, 3, "mistral", 32) == 3
    with pytest.raises(ValueError, match="pooling='mean'"):
        ProFSConfig(pooling="mean")
    with pytest.raises(ValueError, match="k=0"):
        ProFSConfig(k=0)
    with pytest.raises(ValueError, match="'all'"):
        ProFSConfig(layers="all")
    pref, non_pref, _ = planted_embeddings(num_layers=4, n=3)
    with pytest.raises(ValueError, match="k=5 exceeds"):
        apply_profs_from_embeddings(tiny_llama(), pref, non_pref, ProFSConfig(k=5))
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        apply_profs_from_embeddings(tiny_llama(), pref, non_pref, ProFSConfig(k=1, layers=[4]))


# ----------------------------------------------------------------------------- end to end


def test_apply_profs_end_to_end_save_and_load(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    original = copy.deepcopy(model)
    preferred = ["the cat sat on the mat", "you are kind", "nice people today", "the dog ran", "love"]
    toxic = ["you awful idiot", "i hate you people", "awful awful idiot", "hate the dog", "idiot"]
    record = apply_profs(model, tok, preferred, toxic, ProFSConfig(), show_progress=False)
    assert model.profs_record is record
    assert (record.k, record.layers, record.num_pairs, record.centering) == (2, [2], 5, True)
    assert record.modules == ["model.layers.2.mlp.down_proj"] and record.pooling == "reference"
    assert set(record.singular_values) == {2} and len(record.singular_values[2]) == 5
    for layer in (0, 1, 3):
        assert torch.equal(value_module(model, layer).weight, value_module(original, layer).weight)
    embed = dict(show_progress=False, max_length=ProFSConfig().max_length, pooling="reference")
    p = layer_sentence_embeddings(original, tok, preferred, layers=[2], **embed)
    n = layer_sentence_embeddings(original, tok, toxic, layers=[2], **embed)
    for row, layer in enumerate((2,)):
        basis, _ = toxic_subspace(p[row], n[row], k=2)
        expected = dense_edit(value_module(original, layer).weight, basis, conv1d=False)
        assert torch.allclose(value_module(model, layer).weight, expected, atol=1e-5)

    out = save_profs_model(model, tok, tmp_path / "edited")
    assert (out / "model.safetensors").is_file() and (out / PROFS_RECORD_NAME).is_file()
    loaded = load_profs_record(out)
    assert loaded == record
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(value_module(reloaded, 3).weight, value_module(model, 3).weight)
    assert PreTrainedTokenizerFast.from_pretrained(out)("the cat")["input_ids"] == tok("the cat")["input_ids"]

    with pytest.warns(UserWarning, match="already carries a ProFS edit"):
        second = apply_profs(model, tok, preferred, toxic, ProFSConfig(k=1, layers=[0]), show_progress=False)
    assert len(second.previous) == 1 and second.previous[0]["layers"] == [2]


def test_record_tolerates_newer_keys_and_save_needs_record(tmp_path):
    with pytest.raises(ValueError, match="run apply_profs"):
        save_profs_model(tiny_llama(), None, tmp_path)
    with pytest.raises(FileNotFoundError, match=PROFS_RECORD_NAME):
        load_profs_record(tmp_path)
    record = apply_profs_from_embeddings(tiny_llama(), *planted_embeddings(4)[:2], ProFSConfig(k=2))
    data = {**record.to_dict(), "from_the_future": 1}
    (tmp_path / PROFS_RECORD_NAME).write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_profs_record(tmp_path) == record
    assert any("from_the_future" in str(w.message) for w in caught)
    assert ProFSRecord.from_dict(record.to_dict()) == record
