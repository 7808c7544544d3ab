"""Batched sampling of (prompt, sample) jobs: one seeded `generate` call per batch, with token progress.

Extraction, evaluation (demo, compare) and the pipeline's sweep all sample prompt sets the same
way; this is the one place that batches, seeds, calls generate and reports progress. The seed of
each batch is the caller's (`batch_seed`), so a caller keeps its own reproducibility contract.
Progress moves per decoding step (a streamer counts the rows still generating), with tokens/s and
an ETA; without progress no streamer is passed, so the generate call is the plain one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from vsteer_hf.eval.prompts import PromptRecord

Job = tuple[PromptRecord, int]  # (prompt, sample index)


def prompt_text(tokenizer: Any, text: str, chat: bool) -> str:
    """The string fed to the model: raw continuation, or the user turn wrapped in the chat template."""
    if not chat:
        return text
    if tokenizer.chat_template is None:
        raise ValueError("chat=True but the tokenizer has no chat template; use chat=False for raw continuation.")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


@dataclass
class SampledBatch:
    """One batch: its jobs, the tokenized inputs, generate's output and the seconds generate took."""

    jobs: list[Job]
    inputs: Any
    output: Any
    seconds: float

    @property
    def prompt_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


class TokenProgress:
    """A generate streamer that advances a tqdm bar by the rows still generating, once per step."""

    def __init__(self, bar: Any, rows: int, eos_ids: set[int]) -> None:
        self.bar, self.eos_ids = bar, eos_ids
        self.live = torch.ones(rows, dtype=torch.bool)
        self.seen_prompt = False
        self.tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate hands the prompt over first
            self.seen_prompt = True
            return
        tokens = value.reshape(-1)
        count = int(self.live.sum())
        self.bar.update(count)
        self.tokens += count
        if self.eos_ids:
            finished = torch.zeros_like(self.live)
            for eos in self.eos_ids:
                finished |= tokens == eos
            self.live &= ~finished

    def end(self) -> None:
        pass


def _eos_ids(model: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def sample_in_batches(
    model: Any,
    tokenizer: Any,
    jobs: Sequence[Job],
    *,
    batch_seed: Callable[[int, list[Job]], int],
    batch_size: int = 32,
    max_new_tokens: int = 32,
    top_p: float = 0.9,
    temperature: float = 1.0,
    chat: bool = False,
    value_steer: Any = None,
    progress: bool = True,
    desc: str = "generate",
) -> Iterator[SampledBatch]:
    """Yield one `SampledBatch` per `batch_size` jobs, in order.

    Each batch is tokenized (left padding, the tokenizer's own), seeded with
    `torch.manual_seed(batch_seed(batch_index, batch))` and sampled with top-p/temperature (top-k off)
    in one `generate(..., return_dict_in_generate=True)` call, steered when `value_steer` is given.
    The progress bar counts generated tokens (total: jobs x `max_new_tokens`, lowered as rows end
    early), so it moves every step and shows tokens/s and an ETA.
    """
    extra = {"value_steer": value_steer} if value_steer is not None else {}
    bar = tqdm(total=len(jobs) * max_new_tokens, desc=desc, unit="tok", disable=not progress, dynamic_ncols=True)
    eos_ids = _eos_ids(model)
    try:
        for batch_index, start in enumerate(range(0, len(jobs), batch_size)):
            batch = list(jobs[start : start + batch_size])
            texts = [prompt_text(tokenizer, p.text, chat) for p, _ in batch]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
            inputs = inputs.to(model.device)
            streamer = TokenProgress(bar, len(batch), eos_ids) if progress else None
            if streamer is not None:
                extra["streamer"] = streamer
            torch.manual_seed(batch_seed(batch_index, batch))
            began = time.perf_counter()
            out = model.generate(
                **inputs,
                do_sample=True,
                top_p=top_p,
                temperature=temperature,
                top_k=0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                return_dict_in_generate=True,
                **extra,
            )
            seconds = time.perf_counter() - began
            if streamer is not None:  # rows that ended early free their remaining token slots
                bar.total -= len(batch) * max_new_tokens - streamer.tokens
                bar.set_postfix_str(f"{start + len(batch)}/{len(jobs)} prompts", refresh=True)
            yield SampledBatch(batch, inputs, out, seconds)
    finally:
        bar.close()
