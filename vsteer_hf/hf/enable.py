"""`enable_value_steer(model)`: teach a transformers causal LM the `value_steer=` argument of generate.

The model's class is swapped, in place, for a same-named subclass whose `generate` accepts
`value_steer` and whose `_sample` runs the value-steered loop while a config is active. Everything
else (weights, `save_pretrained`, `config.architectures`, plain `generate`) is untouched, and
`disable_value_steer` swaps the original class back. The active config lives in a ContextVar, so
threads steering the same model at once each see their own.
"""

from __future__ import annotations

import contextvars
import warnings
from typing import Any

import torch
from transformers.generation.configuration_utils import GenerationMode

from vsteer_hf.config import ValueSteerConfig
from vsteer_hf.hf.decode import value_steered_sample

_ACTIVE: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("vsteer_active", default=None)
_STEERABLE_MODES = (GenerationMode.SAMPLE, GenerationMode.GREEDY_SEARCH)


class ValueSteerMixin:
    """Mixed in front of the model's own class by `enable_value_steer`."""

    _vsteer_original_class: type

    def generate(self, *args: Any, value_steer: ValueSteerConfig | None = None, **kwargs: Any) -> Any:
        if value_steer is None:
            return super().generate(*args, **kwargs)
        if not isinstance(value_steer, ValueSteerConfig):
            raise TypeError(
                f"value_steer must be a ValueSteerConfig, got {type(value_steer).__name__}. "
                "Build one with ValueSteerConfig(head=..., threshold=...)."
            )
        _refuse_unsteerable(self, args, kwargs)
        state = {"config": value_steer, "entered": False}
        token = _ACTIVE.set(state)
        try:
            result = super().generate(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)
        if not state["entered"]:
            raise RuntimeError(
                "generate finished without entering the value-steered loop, so nothing was steered. "
                "This generation mode is not supported with value_steer."
            )
        return result

    def _sample(
        self,
        input_ids: torch.LongTensor,
        logits_processor: Any,
        stopping_criteria: Any,
        generation_config: Any,
        synced_gpus: bool = False,
        streamer: Any = None,
        **model_kwargs: Any,
    ) -> Any:
        state = _ACTIVE.get()
        if state is None or state["entered"]:
            return super()._sample(
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                synced_gpus=synced_gpus,
                streamer=streamer,
                **model_kwargs,
            )
        state["entered"] = True
        return value_steered_sample(
            self,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            steer=state["config"],
            synced_gpus=synced_gpus,
            streamer=streamer,
            **model_kwargs,
        )

    def _prepare_cache_for_generation(
        self,
        generation_config: Any,
        model_kwargs: dict,
        generation_mode: Any,
        batch_size: int,
        max_cache_length: int,
    ) -> Any:
        # A static cache must hold the K candidate slots of the last step too.
        state = _ACTIVE.get()
        if state is not None and not state["entered"]:
            max_cache_length += state["config"].candidates_per_step
        return super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )


def _refuse_unsteerable(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Fail before any work for decoding strategies value steering cannot drive."""
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
        raise ValueError(
            "value steering cannot ride assisted/speculative decoding (drafts are verified as a causal chain). "
            "Drop assistant_model / prompt_lookup_num_tokens."
        )
    if kwargs.get("custom_generate") is not None:
        raise ValueError("value_steer already replaces the decoding loop; drop custom_generate.")
    probe = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "inputs")}
    positional_config = args[1] if len(args) > 1 else None  # generate(inputs, generation_config, ...)
    generation_config, _ = model._prepare_generation_config(probe.pop("generation_config", positional_config), **probe)
    mode = generation_config.get_generation_mode()
    if mode not in _STEERABLE_MODES:
        raise ValueError(
            f"value steering supports greedy decoding and sampling, not {mode.value!r} "
            f"(num_beams={generation_config.num_beams}). Set num_beams=1."
        )


_SUBCLASSES: dict[type, type] = {}


def enable_value_steer(model: Any) -> Any:
    """Let `model.generate` take `value_steer=ValueSteerConfig(...)`. Changes `model` in place and returns it.

    Works for decoder-only `AutoModelForCausalLM` models; encoder-decoder models are refused.
    Enabling twice warns and changes nothing.
    """
    if isinstance(model, ValueSteerMixin):
        warnings.warn("value steering is already enabled on this model; nothing changed.", stacklevel=2)
        return model
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise TypeError(f"{type(model).__name__} is not a transformers generative model.")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model; value steering supports decoder-only "
            "causal LMs (AutoModelForCausalLM)."
        )
    if model.get_output_embeddings() is None:
        raise ValueError(
            f"{type(model).__name__} has no output embedding (lm_head); load it with AutoModelForCausalLM."
        )
    cls = type(model)
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(
            cls.__name__,
            (ValueSteerMixin, cls),
            {"__module__": cls.__module__, "_vsteer_original_class": cls},
        )
    model.__class__ = _SUBCLASSES[cls]
    return model


def disable_value_steer(model: Any) -> Any:
    """Undo `enable_value_steer` in place; a model that was never enabled is returned unchanged."""
    if isinstance(model, ValueSteerMixin):
        model.__class__ = model._vsteer_original_class
    return model
