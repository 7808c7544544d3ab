"""Tiny real transformers models built from configs, tokenizers over their vocabulary, and heads with
known behaviour. A module of its own (not conftest.py) so that test files import it by a unique name:
tests/vllm has a conftest.py too, and two modules named `conftest` shadow each other."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

VOCAB = 96
EOS = 2
PAD = 0
FAMILIES = ("llama", "mistral", "qwen2", "gpt2")


def tiny_config(family: str, attn: str = "sdpa", **overrides):
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    if family == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
    else:
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
        extra = {"sliding_window": None} if family in ("mistral", "qwen2") else {}
        cfg = cls(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **extra,
            **common,
        )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg._attn_implementation = attn
    return cfg


def tiny_model(family: str = "llama", attn: str = "sdpa", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, attn, **overrides), attn_implementation=attn)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model.eval()


def make_head(hidden_size: int, bias: float = 0.0, scale: float = 1.0, seed: int = 1):
    """A ValueHead with random weights; `bias` shifts every logit (-50 gives a head that never fires)."""
    from vsteer_hf.head import ValueHead

    torch.manual_seed(seed)
    head = ValueHead(hidden_size)
    with torch.no_grad():
        for module in head:
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(scale)
        head[4].bias.fill_(bias)
    return head.eval().requires_grad_(False)


def batch_inputs(batch: int, seed: int = 3, length: int = 6):
    """Left-padded prompts: row i has `length - i` real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        pad = min(row, length - 1)
        ids[row, :pad] = PAD
        mask[row, :pad] = 0
    return ids, mask


WORDS = [f"w{i}" for i in range(3, VOCAB)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def tiny_tokenizer(rename: dict[str, str] | None = None):
    """A word-level fast tokenizer over the tiny vocabulary: no hub, real transformers class.

    `rename` gives some word ids another spelling (e.g. {"w10": "safe"}) for tests that need real words.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [(rename or {}).get(w, w) for w in WORDS]
    vocab = {"[PAD]": PAD, "<s>": 1, "</s>": EOS, **{w: i + 3 for i, w in enumerate(words)}}
    vocab["user"], vocab["assistant"] = vocab["w3"], vocab["w4"]
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w5"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="w5"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
