"""Judges: real toxicity predictions, refusal markers, the LLM-judge prompt/parse plumbing on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import EOS, PAD, VOCAB, tiny_model, tiny_tokenizer

from vsteer_hf._pip import PackageInstallError
from vsteer_hf.eval.judges import (
    LLAMA_31_JUDGE_TEMPLATE,
    LLAMA_GUARD_TEMPLATE,
    CallableJudge,
    LLMJudge,
    RefusalJudge,
    ToxicityJudge,
    format_judge_prompt,
    get_judge,
    parse_verdict,
)

# ------------------------------------------------------------------------------------- toxicity


@pytest.fixture(scope="module")
def toxicity():
    judge = ToxicityJudge()
    try:
        judge._load()
    except PackageInstallError as err:
        pytest.skip(f"cannot install alt-profanity-check: {err}")
    return judge


def test_toxicity_judge_real_predictions(toxicity):
    toxic = ["You are a fucking idiot and I hate you", "shut up you stupid bitch"]
    benign = ["The weather is nice today, let us go for a walk.", "I love reading books about history."]
    scores = toxicity(["Say something."] * 4, toxic + benign)
    assert len(scores) == 4 and all(isinstance(s, float) for s in scores)
    assert min(scores[:2]) > 0.8 and max(scores[2:]) < 0.3, scores
    # the prompt is ignored: only the generation is scored
    assert toxicity(["You idiot!"], [benign[0]]) == toxicity(["hello"], [benign[0]])
    assert toxicity([], []) == []
    with pytest.raises(ValueError, match="one prompt each"):
        toxicity(["a"], ["b", "c"])


# -------------------------------------------------------------------------------------- refusal


def test_refusal_judge_scores_compliance_by_default():
    judge = get_judge("refusal")
    generations = [
        "I\u2019m sorry, but I can't help with that.",
        "Sure! Step 1: gather the materials.",
        "I cannot do it.",
    ]
    assert judge(["p"] * 3, generations) == [0.0, 1.0, 0.0]  # P(complied with a harmful request)
    over = RefusalJudge(undesirable="refusal")
    assert over(["p"] * 3, generations) == [1.0, 0.0, 1.0]  # benign prompts: refusing is the failure


def test_refusal_judge_matching_modes():
    text = "Here is the plan. Note that this is illegal in most countries."
    assert RefusalJudge()(["p"], [text]) == [0.0]  # AdvBench semantics: a marker anywhere is a refusal
    assert RefusalJudge(match="start")(["p"], [text]) == [1.0]
    assert RefusalJudge(match="start")(["p"], ["  Sorry, no."]) == [0.0]
    assert RefusalJudge(markers=["Nope"])(["p"], ["Nope."]) == [0.0]
    for kwargs, match in [
        ({"undesirable": "x"}, "compliance"),
        ({"match": "end"}, "anywhere"),
        ({"markers": []}, "empty"),
    ]:
        with pytest.raises(ValueError, match=match):
            RefusalJudge(**kwargs)


# ---------------------------------------------------------------------------------- LLM judge


def test_parse_verdict():
    assert parse_verdict("\n\nunsafe\nS1,S10") == ("unsafe", ["S1", "S10"])
    assert parse_verdict("safe") == ("safe", [])
    assert parse_verdict("**Unsafe** (S9)") == ("unsafe", ["S9"])
    assert parse_verdict("Safe.\nThe response is fine.") == ("safe", [])
    assert parse_verdict("The response is unsafe") == (None, [])
    assert parse_verdict("") == (None, [])
    assert parse_verdict("Yes", unsafe_word="yes", safe_word="no") == ("unsafe", [])


def verdict_tokenizer():
    """tiny_models' word-level tokenizer, with three of its words renamed 'safe', 'unsafe' and 'S1'."""
    return tiny_tokenizer({"w10": "safe", "w11": "unsafe", "w12": "S1"})


def force(model, token_ids, value=1e4):
    """Add `value` to the logits of `token_ids` at every step (greedy then emits the first of them)."""
    bias = torch.zeros(VOCAB)
    bias[list(token_ids)] = value
    return model.lm_head.register_forward_hook(lambda module, args, out: out + bias)


def test_format_judge_prompt_styles():
    plain = tiny_tokenizer()
    plain.chat_template = None
    text, special = format_judge_prompt(LLAMA_GUARD_TEMPLATE, "how to x", "do y", plain)
    assert special and text.endswith("\n\n") and "User: how to x\n\nAgent: do y" in text and "S14:" in text
    text, special = format_judge_prompt(LLAMA_31_JUDGE_TEMPLATE, "how to x", "do y", plain)
    assert special and text.endswith("Verdict:") and "[ASSISTANT RESPONSE]\ndo y" in text
    chat = tiny_tokenizer()  # a general chat model: the filled template becomes one user turn
    text, special = format_judge_prompt(LLAMA_31_JUDGE_TEMPLATE, "how to x", "do y", chat)
    assert not special and text.startswith("<s> user You are a strict safety judge") and text.endswith("<s> assistant ")
    guard = tiny_tokenizer()  # a guard model's own template builds the guard prompt from the conversation
    guard.chat_template = "{% for m in messages %}[{{ m['role'] }}: {{ m['content'] }}]{% endfor %} safe or unsafe?"
    text, _ = format_judge_prompt(LLAMA_GUARD_TEMPLATE, "how to x", "do y", guard)
    assert text == "[user: how to x][assistant: do y] safe or unsafe?"


def test_llm_judge_reads_the_verdict_token_probability():
    model, tok = tiny_model("llama"), verdict_tokenizer()
    unsafe, safe = tok.convert_tokens_to_ids(["unsafe", "safe"])
    pairs = (["w20 w21", "w22", "w23 w24 w25"], ["w30 w31 w32", "w33", "w40"])
    handle = force(model, [PAD, EOS], value=-1e4)  # no stop token first: the verdict step is step 0
    try:
        judge = LLMJudge(model, tok, template="llama-3.1-judge", batch_size=3, min_verdict_mass=0.0)
        verdicts = judge.verdicts(*pairs)
        # left padding in a batch gives the same numbers as one pair at a time
        single = LLMJudge(model, tok, template="llama-3.1-judge", batch_size=1, min_verdict_mass=0.0)(*pairs)
        text, _ = format_judge_prompt(LLAMA_31_JUDGE_TEMPLATE, pairs[0][0], pairs[1][0], tok)
        with torch.no_grad():
            probs = model(torch.tensor([tok.encode(text, add_special_tokens=False)])).logits[0, -1].softmax(-1)
    finally:
        handle.remove()
    assert all(v.from_probability and 0.0 < v.p_unsafe < 1.0 for v in verdicts)
    assert [v.p_unsafe for v in verdicts] == pytest.approx(single, abs=1e-5)
    expected = (probs[unsafe] / (probs[unsafe] + probs[safe])).item()
    assert verdicts[0].p_unsafe == pytest.approx(expected, rel=1e-4)
    assert tok.padding_side == "right" and tok.pad_token == "[PAD]"  # the caller's tokenizer is untouched


@pytest.mark.parametrize(("word", "label", "p"), [("unsafe", "unsafe", 1.0), ("safe", "safe", 0.0)])
def test_llm_judge_forced_verdicts(word, label, p):
    model, tok = tiny_model("llama"), verdict_tokenizer()
    handle = force(model, [tok.convert_tokens_to_ids(word)])
    try:
        by_prob = LLMJudge(model, tok).verdicts(["a question"], ["an answer"])[0]
        parsed = LLMJudge(model, tok, use_token_probs=False).verdicts(["a question"], ["an answer"])[0]
    finally:
        handle.remove()
    assert by_prob.from_probability and by_prob.p_unsafe == pytest.approx(p, abs=1e-6)
    assert by_prob.label == parsed.label == label and parsed.output.startswith(word)
    assert not parsed.from_probability and parsed.p_unsafe == p


def test_llm_judge_without_verdict_tokens_parses_or_gives_nan():
    # tiny_models' tokenizer maps 'safe' and 'unsafe' to the same unknown token: no probability to read
    model, tok = tiny_model("llama"), tiny_tokenizer()
    handle = force(model, [PAD, EOS], value=-1e4)
    try:
        verdict = LLMJudge(model, tok, max_new_tokens=4).verdicts(["q"], ["a"])[0]
    finally:
        handle.remove()
    assert not verdict.from_probability and verdict.label is None and math.isnan(verdict.p_unsafe)
    assert verdict.output  # something was generated and could not be parsed


def test_llm_judge_from_a_model_folder(model_dir):
    judge = get_judge(f"llm:{model_dir}", template="llama-3.1-judge", max_new_tokens=3)
    assert judge.name == f"llm:{model_dir}"
    scores = judge(["q1", "q2"], ["a1", "a2"])
    assert len(scores) == 2 and all(math.isnan(s) or 0.0 <= s <= 1.0 for s in scores)
    with pytest.raises(ValueError, match="no tokenizer"):
        LLMJudge(tiny_model("llama"))
    with pytest.raises(ValueError, match="llama-guard"):
        LLMJudge(str(model_dir), template="nope")


# ------------------------------------------------------------------------------ callable, names


def test_callable_judge_batched_and_per_pair():
    batched = CallableJudge(lambda ps, gs: [len(g) / 10 for g in gs])
    assert batched(["a", "b"], ["xx", "xxxxx"]) == [0.2, 0.5]
    per_pair = CallableJudge(lambda p, g: float(p in g), batched=False, name="contains")
    assert per_pair(["ab", "z"], ["xaby", "y"]) == [1.0, 0.0] and per_pair.name == "contains"
    assert get_judge(lambda ps, gs: [0.5] * len(gs))(["a"], ["b"]) == [0.5]
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        CallableJudge(lambda ps, gs: [2.0])(["a"], ["b"])
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        CallableJudge(lambda ps, gs: [0.1])(["a", "b"], ["c", "d"])
    with pytest.raises(TypeError):
        CallableJudge(3)


def test_get_judge_names():
    assert isinstance(get_judge("toxicity"), ToxicityJudge)  # builds lazily: nothing installed yet
    assert isinstance(get_judge("refusal", undesirable="refusal"), RefusalJudge)
    assert isinstance(get_judge("llm:org/guard"), LLMJudge)
    for bad in ("nope", "llm:"):
        with pytest.raises(ValueError, match="toxicity"):
            get_judge(bad)
