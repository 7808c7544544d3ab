"""ProFS pooling: the authors' padded mean reproduced from their formulas, and the first-token artefact."""

from __future__ import annotations

import copy

import pytest
import torch
from test_profs import H, tiny_llama, tiny_tokenizer, value_module
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vsteer_hf.profs import ProFSConfig, apply_profs, layer_sentence_embeddings, toxic_subspace
from vsteer_hf.profs.embeddings import authors_padding_side

WORDS = [f"w{i}" for i in range(60)]
PREFERRED = ["w3 w4 w5 w6", "w7 w8", "w9 w10 w11 w12 w13 w14 w15", "w16 w17 w18", "w19", "w20 w21 w22 w23 w24"]
NON_PREFERRED = ["w40 w41", "w42 w43 w44 w45 w46 w47", "w48", "w49 w50 w51", "w52 w53 w54 w55 w56", "w57 w58"]


def word_tokenizer(**kwargs) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over WORDS, without a pad token (the authors then pad with EOS)."""
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>", **kwargs
    )


def authors_edit(model, tokenizer, preferred, non_preferred, layers, k):
    """Written from the paper and detox.py's formulas, independently of vsteer_hf.profs: pad every text
    of one side to the longest (pad = EOS), mean hidden state over all positions, T = (P - N) / 2,
    T <- T (I - u uᵀ) with u the top right-singular vector of P, P_toxic = sum of the top-k right-singular
    vectors' outer products, and W_value <- (I - P_toxic) W_value on the output (hidden) axis."""
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token

    def sentence_embeddings(texts):
        inputs = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
        with torch.no_grad():
            states = model(**inputs, output_hidden_states=True).hidden_states[1:]  # L x (N, T, H)
        return torch.stack(states).mean(dim=2)  # (L, N, H), padding included

    pref, non_pref = sentence_embeddings(preferred), sentence_embeddings(non_preferred)
    edited = {}
    for layer in layers:
        t = (pref[layer] - non_pref[layer]) / 2
        u = torch.linalg.svd(pref[layer], full_matrices=False).Vh[0][:, None]  # (H, 1)
        t = t @ (torch.eye(H) - u @ u.T)
        v = torch.linalg.svd(t, full_matrices=False).Vh[:k].T  # (H, k)
        p_toxic = sum(v[:, [r]] @ v[:, [r]].T for r in range(k))
        w = value_module(model, layer).weight  # Linear (H, intermediate): output axis first
        edited[layer] = (w.T @ (torch.eye(H) - p_toxic)).T
    return edited


@pytest.mark.parametrize("side", ["right", "left"])
def test_reference_pooling_reproduces_the_authors_formulas(side):
    model = tiny_llama(init=0.2)
    tokenizer = word_tokenizer(**({"padding_side": "left"} if side == "left" else {}))
    tokenizer.padding_side = "left" if side == "right" else "right"  # set later on the instance: ignored
    assert authors_padding_side(tokenizer) == side
    tokenizer.padding_side = side  # the authors' tokenizer as loaded
    expected = authors_edit(model, tokenizer, PREFERRED, NON_PREFERRED, layers=[1, 2], k=2)
    tokenizer.padding_side = "left" if side == "right" else "right"
    original = copy.deepcopy(model)
    config = ProFSConfig(k=2, layers=[1, 2], batch_size=4)
    assert config.pooling == "reference"  # the default
    apply_profs(model, tokenizer, PREFERRED, NON_PREFERRED, config, show_progress=False)
    for layer in (1, 2):
        got = value_module(model, layer).weight
        assert torch.allclose(got, expected[layer], atol=1e-5), layer
        assert not torch.allclose(got, value_module(original, layer).weight, atol=1e-3)
    # not vacuous: the masked mean gives another edit
    masked = copy.deepcopy(original)
    apply_profs(masked, tokenizer, PREFERRED, NON_PREFERRED, ProFSConfig(k=2, layers=[1, 2], pooling="masked"), False)
    assert not torch.allclose(value_module(masked, 1).weight, expected[1], atol=1e-3)


PLANTED = [5, 17, 29]
WIDTH = 12  # the length limit in the artefact test


def with_massive_first_token(model, size: float = 400.0):
    """Adds a large vector on the PLANTED dims to the residual stream at position 0, after block 0, that
    depends on the first token: SmolLM2's 'massive activation' (norm ~100x the median), planted."""
    g = torch.Generator().manual_seed(1)
    table = torch.zeros(model.config.vocab_size, H)
    table[:, PLANTED] = (1.0 + torch.rand(model.config.vocab_size, len(PLANTED), generator=g)) * size

    def hook(_module, args, kwargs, output):
        hs = output[0] if isinstance(output, tuple) else output
        hs[:, 0] += table[state["first"]]
        return output

    state = {}
    model.model.register_forward_pre_hook(
        lambda _m, args, kwargs: state.update(first=kwargs["input_ids"][:, 0]), with_kwargs=True
    )
    model.model.layers[0].register_forward_hook(hook, with_kwargs=True)
    return model


def planted_share(basis: torch.Tensor) -> float:
    """Share of the subspace's energy in the planted coordinates (1: the subspace is those dims)."""
    return float(basis[PLANTED].pow(2).sum() / basis.shape[1])


def test_masked_mean_subspace_is_the_first_token_artefact_and_reference_pooling_is_not():
    model = with_massive_first_token(tiny_llama())
    tokenizer = tiny_tokenizer()  # right padding, like SmolLM2's published tokenizer
    g = torch.Generator().manual_seed(0)
    vocab = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "park", "people", "today", "nice"]
    toxic = ["awful", "idiot", "hate"]

    def text(n, extra=()):
        words = [vocab[int(i)] for i in torch.randint(len(vocab), (n,), generator=g)]
        return " ".join([*words, *extra])

    # pairs as the pipeline builds them: a shared prompt, then a safe or a toxic continuation of any length
    lengths = torch.randint(1, 10, (40, 3), generator=g).tolist()
    prompts = [text(p + 2) for p, _, _ in lengths]
    preferred = [f"{p} {text(a)}" for p, (_, a, _) in zip(prompts, lengths, strict=True)]
    non_preferred = [
        f"{p} {text(b, toxic[: 1 + i % 3])}" for i, (p, (_, _, b)) in enumerate(zip(prompts, lengths, strict=True))
    ]
    # the planted activation is there: position 0 dwarfs the rest at the edited layer
    ids = tokenizer(preferred[:1], return_tensors="pt")["input_ids"]
    states = model(input_ids=ids, output_hidden_states=True).hidden_states[3][0]  # (T, H)
    assert states[0].norm() > 20 * states[1:].norm(dim=-1).median()

    # both sides reach the length limit, so both are padded to the same width (as with the authors'
    # 128-token limit on long texts): the padded mean then weighs the first token alike in every text
    assert max(len(tokenizer(t)["input_ids"]) for t in preferred) > WIDTH
    assert max(len(tokenizer(t)["input_ids"]) for t in non_preferred) > WIDTH
    shares = {}
    for pooling in ("masked", "reference"):
        emb = dict(layers=[2], show_progress=False, max_length=WIDTH, pooling=pooling)
        pref = layer_sentence_embeddings(model, tokenizer, preferred, **emb)[0]
        non_pref = layer_sentence_embeddings(model, tokenizer, non_preferred, **emb)[0]
        shares[pooling] = planted_share(toxic_subspace(pref, non_pref, k=2)[0])
    assert shares["masked"] > 0.8, shares
    assert shares["reference"] < 0.2, shares
    # dropping the first position removes the artefact from the masked mean too
    emb = dict(layers=[2], show_progress=False, max_length=WIDTH, pooling="masked", drop_first=True)
    pref = layer_sentence_embeddings(model, tokenizer, preferred, **emb)[0]
    non_pref = layer_sentence_embeddings(model, tokenizer, non_preferred, **emb)[0]
    assert planted_share(toxic_subspace(pref, non_pref, k=2)[0]) < 0.2


def test_drop_first_needs_two_tokens_and_weights_sum_to_one():
    from vsteer_hf.profs.embeddings import _pooling_weights

    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    ref = _pooling_weights(mask, "reference", drop_first=True)
    assert torch.allclose(ref, torch.tensor([[1 / 3, 0, 1 / 3, 1 / 3], [0, 1 / 3, 1 / 3, 1 / 3]]))
    masked = _pooling_weights(mask, "masked", drop_first=True)
    assert torch.allclose(masked, torch.tensor([[0, 0, 0.5, 0.5], [0, 1.0, 0, 0]]))
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        layer_sentence_embeddings(tiny_llama(), tiny_tokenizer(), ["cat", "the cat"], drop_first=True)
    with pytest.raises(ValueError, match="pooling='mean'"):
        layer_sentence_embeddings(tiny_llama(), tiny_tokenizer(), ["cat"], pooling="mean")
