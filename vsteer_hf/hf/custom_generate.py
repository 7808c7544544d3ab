"""Value steering through `generate(custom_generate=...)`, for models you cannot or will not patch.

    model.generate(**inputs, custom_generate=vsteer_hf.hf.custom_generate.steered_generate,
                   value_steer=ValueSteerConfig(...))

This route loses what generate does not forward to a custom callable: `streamer=` and the
`tokenizer=` that `stop_strings` needs are not passed, and a static cache is not sized for the K
candidate slots (a clear error asks for the dynamic cache). `enable_value_steer` has none of these
limits.
"""

from __future__ import annotations

from typing import Any

import torch

from vsteer_hf.config import ValueSteerConfig
from vsteer_hf.hf.decode import ValueSteerOutput, value_steered_sample


def steered_generate(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    value_steer: ValueSteerConfig | None = None,
    synced_gpus: bool = False,
    **model_kwargs: Any,
) -> ValueSteerOutput | torch.LongTensor:
    """A `custom_generate` callable running the value-steered loop with generate's prepared pieces."""
    if not isinstance(value_steer, ValueSteerConfig):
        raise ValueError("custom_generate=steered_generate needs value_steer=ValueSteerConfig(...) in the same call.")
    if generation_config.num_beams != 1:
        raise ValueError(
            f"value steering supports greedy decoding and sampling, not num_beams={generation_config.num_beams}."
        )
    return value_steered_sample(
        model,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        steer=value_steer,
        synced_gpus=synced_gpus,
        **model_kwargs,
    )
