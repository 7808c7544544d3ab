"""What the decode benchmark runs: the backbones, the workloads, the methods, and building one in a worker.

Workloads:
- `never` (default): random prompt ids of the requested length, greedy, a value head that never intervenes
  (bias -50: every step still forwards and scores all K candidates, so this is the pure overhead).
- `rtp`: the embedded SmolLM2-135M-Instruct with the shipped toxicity head at its card's threshold, on the
  first RealToxicityPrompts prompts (left-padded batches, raw continuation), top-p 0.9 sampling with a fixed
  seed: interventions at a realistic rate (reported per token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SEED = 0
_SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# name -> (transformers config class, config kwargs, dtype, device kind)
MODELS: dict[str, tuple[str, dict[str, Any], str, str]] = {
    # hidden 512, 10 layers, tied embeddings: 50.5M parameters, 34.1M outside the embedding.
    "llama-50m": (
        "LlamaConfig",
        {
            "hidden_size": 512,
            "num_hidden_layers": 10,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "intermediate_size": 1536,
            "vocab_size": 32000,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": True,
            **_SPECIAL,
        },
        "float32",
        "cpu",
    ),
    # hidden 768, 8 layers, tied embeddings: 81.2M parameters, 56.6M outside the embedding.
    "llama-81m": (
        "LlamaConfig",
        {
            "hidden_size": 768,
            "num_hidden_layers": 8,
            "num_attention_heads": 12,
            "num_key_value_heads": 12,
            "intermediate_size": 2048,
            "vocab_size": 32000,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": True,
            **_SPECIAL,
        },
        "float32",
        "cpu",
    ),
    # llama-81m's shapes with grouped-query attention (12 heads, 4 KV heads), as most current models use.
    "llama-81m-gqa": (
        "LlamaConfig",
        {
            "hidden_size": 768,
            "num_hidden_layers": 8,
            "num_attention_heads": 12,
            "num_key_value_heads": 4,
            "intermediate_size": 2048,
            "vocab_size": 32000,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": True,
            **_SPECIAL,
        },
        "float32",
        "cpu",
    ),
    "smollm2-135m": ("embedded", {}, "float32", "cpu"),
    # Mistral-7B-v0.3's shapes: 7.25B parameters.
    "mistral-7b-shape": (
        "MistralConfig",
        {
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "vocab_size": 32768,
            "max_position_embeddings": 32768,
            "sliding_window": None,
            "tie_word_embeddings": False,
            **_SPECIAL,
        },
        "bfloat16",
        "cuda",
    ),
}


WORKLOADS = ("never", "rtp")
SHIPPED_HEAD = Path(__file__).resolve().parent.parent / "vsteer_hf" / "heads" / "smollm2-135m-instruct-rtp-toxicity"


def methods(ks: list[int], paths: list[str], abstain: bool = True) -> list[tuple[str, dict[str, Any] | None]]:
    """(row label, ValueSteerConfig keyword arguments or None for plain generate); plain generate first."""
    return [
        ("plain generate", None),
        *[(f"VFD {path} K={k}", {"num_candidates": k, "candidate_forward": path}) for path in paths for k in ks],
        *([("abstain", {"mode": "abstain"})] if abstain else []),
    ]


def build(spec: dict[str, Any]) -> dict[str, Any]:
    """Model, steering config, inputs and generate keywords for one configuration (run inside the worker)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from vsteer_hf import ValueHead, ValueSteerConfig, enable_value_steer

    torch.manual_seed(SEED)
    config_class, config_kwargs, dtype_name, device_kind = MODELS[spec["model"]]
    dtype = getattr(torch, dtype_name)
    device = torch.device("cuda" if device_kind == "cuda" else "cpu")
    tokenizer = None
    if config_class == "embedded":
        from vsteer_hf.backbones import load_backbone

        model, tokenizer = load_backbone(dtype=dtype_name, progress=False)
    else:
        config = getattr(transformers, config_class)(**config_kwargs)
        with device:
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model = enable_value_steer(model.to(device)).eval()
    batch = spec["batch"]
    if spec.get("workload", "never") == "rtp":
        from vsteer_hf.eval.prompts import load_rtp
        from vsteer_hf.head import load_value_head

        if tokenizer is None:
            raise SystemExit("--workload rtp needs --model smollm2-135m (the shipped head's backbone)")
        head = load_value_head(SHIPPED_HEAD)
        threshold = float(head.card.threshold)
        texts = [r.text for r in load_rtp()[:batch]]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        input_ids, attention_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        sampling: dict[str, Any] = {"do_sample": True, "top_p": 0.9, "top_k": 0, "temperature": 1.0}
    else:
        head = ValueHead(model.config.hidden_size)
        with torch.no_grad():
            head[4].bias.fill_(-50.0)  # risk ~ 2e-22: never intervenes, never abstains
        threshold = 0.5
        gen = torch.Generator().manual_seed(SEED)
        input_ids = torch.randint(3, model.config.vocab_size, (batch, spec["prompt"]), generator=gen).to(device)
        attention_mask = torch.ones_like(input_ids)
        sampling = {"do_sample": False}
    steer = None if spec["steer"] is None else ValueSteerConfig(head=head, threshold=threshold, **spec["steer"])
    return {
        "model": model,
        "steer": steer,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "sampling": sampling,
        "device": device,
        "threshold": threshold,
    }
