"""Decode-matched feature extraction: generate with the value-steered loop itself and keep what it scored.

A head trained on prefill features can classify well yet fail to steer, because the state VFD scores
during decode differs from a full-sequence recomputation. So features come from `generate(...,
value_steer=ValueSteerConfig(..., trace_features=True))`: the post-norm state of every committed
token, exactly the tensor a head sees at inference. With K = 1 (the default) the loop never
intervenes and this is plain sampling; pass a head and K > 1 to extract on-policy for a steered model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vsteer_hf.config import ValueSteerConfig
from vsteer_hf.eval.prompts import PromptRecord, split_of
from vsteer_hf.head import ValueHead
from vsteer_hf.hf.enable import ValueSteerMixin, enable_value_steer
from vsteer_hf.sampling import prompt_text, sample_in_batches
from vsteer_hf.train.features import FeatureCache, FeatureCacheWriter

GENERATIONS_FILE = "generations.jsonl"
__all__ = ["GENERATIONS_FILE", "extract_features", "label_cache", "prompt_text"]  # prompt_text: moved, still here


def extract_features(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[PromptRecord],
    directory: str | os.PathLike,
    *,
    samples_per_prompt: int = 4,
    first_sample: int = 0,
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
    `seed` and its first item (`job_seed`), so a resumed run draws what an uninterrupted one would for
    that batch.
    Writes `features.f32` + `index.jsonl` (see `FeatureCacheWriter`) and a `generations.jsonl`.
    Sample indices run from `first_sample`: a later on-policy round draws samples no earlier round
    drew (new keys, new seeds), so the rounds' caches read as one without clashing.
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
    if num_candidates > 1:  # steered (on-policy) extraction; plain extraction's meta is unchanged
        meta["threshold"] = threshold
    if first_sample:
        meta["first_sample"] = first_sample
    jobs = [(p, s) for p in prompts for s in range(first_sample, first_sample + samples_per_prompt)]
    with FeatureCacheWriter(folder, hidden_size, meta=meta) as writer:
        todo = [(p, s) for p, s in jobs if not writer.has((p.id, s))]
        batches = sample_in_batches(
            model,
            tokenizer,
            todo,
            batch_seed=lambda _index, batch: job_seed(seed, batch[0][0].id, batch[0][1]),
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            top_p=top_p,
            temperature=temperature,
            chat=chat,
            value_steer=steer,
            progress=progress,
            desc="extract",
        )
        with open(folder / GENERATIONS_FILE, "a", encoding="utf-8") as generations:
            for sampled in batches:
                out = sampled.output
                for row, (record, sample) in enumerate(sampled.jobs):
                    live = ~out.value_scores[row].isnan()  # committed tokens, EOS included
                    ids = out.sequences[row, sampled.prompt_len :][live]
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
    return FeatureCache(folder)


def job_seed(seed: int, prompt_id: str, sample: int) -> int:
    """The torch seed of a batch led by job (prompt_id, sample): stable across processes, unlike hash().

    A sha256 of the whole id, the sample index and the run seed, so batches led by different jobs draw
    unrelated streams (ids that share a prefix, like RTP's `rtp-<digest>`, included).
    """
    digest = hashlib.sha256(f"vsteer-hf/extract/v2\0{seed}\0{prompt_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: any torch.manual_seed accepts it


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
