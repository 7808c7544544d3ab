"""Decode-matched feature extraction: generate with the value-steered loop itself and keep what it scored.

A head trained on prefill features can classify well yet fail to steer, because the state VFD scores
during decode differs from a full-sequence recomputation. So features come from `generate(...,
value_steer=ValueSteerConfig(..., trace_features=True))`: the post-norm state of every committed
token, exactly the tensor a head sees at inference. With K = 1 (the default) the loop never
intervenes and this is plain sampling; pass a head and K > 1 to extract on-policy for a steered model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vsteer_hf.config import ValueSteerConfig
from vsteer_hf.eval.prompts import PromptRecord, split_of
from vsteer_hf.head import ValueHead
from vsteer_hf.hf.enable import ValueSteerMixin, enable_value_steer
from vsteer_hf.train.features import FeatureCache, FeatureCacheWriter

GENERATIONS_FILE = "generations.jsonl"


def prompt_text(tokenizer: Any, text: str, chat: bool) -> str:
    """The string fed to the model: raw continuation, or the user turn wrapped in the chat template."""
    if not chat:
        return text
    if tokenizer.chat_template is None:
        raise ValueError("chat=True but the tokenizer has no chat template; use chat=False for raw continuation.")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def extract_features(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[PromptRecord],
    directory: str | os.PathLike,
    *,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    head: ValueHead | None = None,
    num_candidates: int = 1,
    threshold: float = 0.5,
    chat: bool = False,
    top_p: float = 0.9,
    temperature: float = 1.0,
    seed: int = 0,
    backbone: str | None = None,
    progress: bool = True,
) -> FeatureCache:
    """Sample `samples_per_prompt` continuations per prompt and write their decode features to `directory`.

    Resumable: (prompt id, sample) pairs already in the cache are skipped. Each batch is seeded from
    `seed` and its first item, so a resumed run draws what an uninterrupted one would for that batch.
    Writes `features.f32` + `index.jsonl` (see `FeatureCacheWriter`) and a `generations.jsonl`.
    """
    if tokenizer.padding_side != "left":
        raise ValueError(
            "batched generation needs a left-padding tokenizer; pass a copy with padding_side='left' "
            "(e.g. AutoTokenizer.from_pretrained(name, padding_side='left'))."
        )
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token on a copy.")
    hidden_size = model.config.get_text_config().hidden_size
    if head is None:
        if num_candidates != 1:
            raise ValueError("num_candidates > 1 needs a head to choose among candidates; pass head=.")
        head = ValueHead(hidden_size)  # K = 1: the head is read, never decides
    if not isinstance(model, ValueSteerMixin):
        model = enable_value_steer(model)
    steer = ValueSteerConfig(head=head, threshold=threshold, num_candidates=num_candidates, trace_features=True)
    folder = Path(directory)
    meta = {
        "backbone": backbone,
        "max_new_tokens": max_new_tokens,
        "top_p": top_p,
        "temperature": temperature,
        "num_candidates": num_candidates,
        "chat": chat,
        "seed": seed,
    }
    jobs = [(p, s) for p in prompts for s in range(samples_per_prompt)]
    device = model.device
    with FeatureCacheWriter(folder, hidden_size, meta=meta) as writer:
        todo = [(p, s) for p, s in jobs if not writer.has((p.id, s))]
        bar = tqdm(total=len(todo), desc="extract", unit="seq", disable=not progress)
        with open(folder / GENERATIONS_FILE, "a", encoding="utf-8") as generations:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                texts = [prompt_text(tokenizer, p.text, chat) for p, _ in batch]
                inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(device)
                first, first_sample = batch[0]
                torch.manual_seed(seed * 1_000_003 + _stable_int(first.id) + first_sample)
                out = model.generate(
                    **inputs,
                    do_sample=True,
                    top_p=top_p,
                    temperature=temperature,
                    top_k=0,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    return_dict_in_generate=True,
                    value_steer=steer,
                )
                prompt_len = inputs["input_ids"].shape[1]
                for row, (record, sample) in enumerate(batch):
                    live = ~out.value_scores[row].isnan()  # committed tokens, EOS included
                    ids = out.sequences[row, prompt_len:][live]
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    entry = {
                        "prompt_id": record.id,
                        "sample": sample,
                        "split": split_of(record.text),
                        "source": record.source,
                        "prompt": record.text,
                        "generation": text,
                        "token_ids": ids.tolist(),
                        "interventions": int(out.interventions[row][live].sum()),
                    }
                    writer.add(out.features[row][live].cpu(), entry)
                    generations.write(json.dumps(entry) + "\n")
                generations.flush()
                bar.update(len(batch))
        bar.close()
    return FeatureCache(folder)


def _stable_int(text: str) -> int:
    """A seed component that does not change between Python processes (unlike hash())."""
    return int.from_bytes(text.encode()[:6].ljust(6, b"\0"), "big") % 1_000_003


def label_cache(cache: FeatureCache, judge: Any, batch_size: int = 256, threshold: float = 0.5) -> dict[str, int]:
    """Judge every generation and store its binary sequence label (judge score > `threshold`)."""
    records = cache.records
    labels: dict[Any, float] = {}
    positives = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        scores = judge([r["prompt"] for r in chunk], [r["generation"] for r in chunk])
        for record, score in zip(chunk, scores, strict=True):
            label = float(score > threshold)
            positives += int(label)
            labels[(record["prompt_id"], record["sample"])] = label
    cache.set_labels(labels)
    return {"labelled": len(labels), "positives": positives}
