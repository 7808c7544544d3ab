from __future__ import annotations

import math

import torch
from tiny_models import tiny_model

from vsteer_hf.eval.perplexity import continuation_nll, pooled_perplexity, text_perplexity


def test_continuation_nll_matches_token_by_token_computation():
    model = tiny_model("llama")
    prompts = [[5, 6, 7], [8]]
    conts = [[9, 10], [11, 12, 13]]
    got = continuation_nll(model, prompts, conts, batch_size=2)
    for (nll, count), p, c in zip(got, prompts, conts, strict=True):
        seq = torch.tensor([p + c])
        logp = torch.log_softmax(model(input_ids=seq).logits.float()[0], -1)
        expected = -sum(float(logp[len(p) - 1 + i, tok]) for i, tok in enumerate(c))
        assert count == len(c)
        assert math.isclose(nll, expected, rel_tol=1e-4)
    assert math.isclose(pooled_perplexity(got), math.exp(sum(n for n, _ in got) / 5), rel_tol=1e-6)


def test_text_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ppl = text_perplexity(model, list(range(3, 60)), window=16)
    assert math.isclose(ppl, model.config.vocab_size, rel_tol=1e-4)
