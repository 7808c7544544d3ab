"""Worker extension for offline `LLM`: installs the value head on any architecture over `collective_rpc`.

    llm = LLM(model, worker_extension_cls="vsteer_hf.vllm.worker.ValueSteerWorkerExtension",
              additional_config={"abstain": {"value_head_path": ..., "threshold": 0.3}})
    llm.collective_rpc("vsteer_install_value_head")

vLLM mixes this class into its worker, so `self` is the worker (`vllm_config`, `get_model()`).
"""

from __future__ import annotations

from typing import Any

from vsteer_hf.config import ValueSteerConfig
from vsteer_hf.vllm.channel import channel_for, install_hook
from vsteer_hf.vllm.settings import enabled_sections, steering_from_additional_config


class ValueSteerWorkerExtension:
    """`collective_rpc` methods: install or swap the head, and hand VFD probe results back."""

    vllm_config: Any  # the worker's; `get_model()` is the worker's too (no stub: vLLM refuses name clashes)

    def vsteer_install_value_head(
        self, source: str | None = None, filename: str | None = None, revision: str | None = None
    ) -> dict[str, Any]:
        """Score `compute_logits` inputs with the head `source`, default: the enabled `additional_config` section's.

        Returns the installed head's hidden size and card threshold, for the caller's log.
        """
        if self.vllm_config.speculative_config is not None:
            raise ValueError(
                "the value head needs one logits row per request; speculative decoding gives several. "
                "Create the LLM without speculative_config."
            )
        if source is None:
            sections = enabled_sections(self.vllm_config.additional_config)
            if not sections:
                raise ValueError(
                    "no value head to install: pass vsteer_install_value_head(source=...) or set additional_config="
                    '{"abstain": {...}} or {"vfd": {...}} with a "value_head_path".'
                )
            steering = steering_from_additional_config(self.vllm_config.additional_config, sections[0])
            assert steering is not None
            head = steering.config.load_head()
        else:
            named = ValueSteerConfig(head=source, threshold=0.5, head_filename=filename, head_revision=revision)
            head = named.load_head()
        hidden_size = self.vllm_config.model_config.get_hidden_size()
        model = self.get_model()  # type: ignore[attr-defined]
        install_hook(model, channel_for(self.vllm_config), head, hidden_size)
        return {"hidden_size": head.hidden_size, "card_threshold": head.card.threshold}

    def vsteer_take_vfd_probes(self) -> dict[str, dict[str, Any]]:
        """The VFD probe results recorded since the last call (tag -> risk, candidates, probs)."""
        return channel_for(self.vllm_config).take_probes()
