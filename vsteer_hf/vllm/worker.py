"""Workers: the abstention extension (installs the head over `collective_rpc`) and `ValueSteerWorker` (VFD).

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
    """`collective_rpc` methods for abstention: install or swap the head."""

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


def _platform_worker() -> type:
    """vLLM's worker class for this machine (CPU or GPU), the base `ValueSteerWorker` extends."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


class ValueSteerWorker(_platform_worker()):  # type: ignore[misc]
    """vLLM worker whose model runner does VFD in the engine: `LLM(worker_cls=...)` / `--worker-cls`.

    Configured by `additional_config={"vfd": {...}}`; per-request `SamplingParams.extra_args`
    `vfd_threshold` / `vfd_alpha`. Per-token risks and flags: `collective_rpc("vsteer_take_records")`.
    """

    def init_device(self) -> None:
        check_engine_supports_vfd(self.vllm_config, getattr(self, "use_v2_model_runner", False))
        super().init_device()
        from vsteer_hf.vllm.runner import steered_runner_class

        runner = self.model_runner
        runner.__class__ = steered_runner_class(type(runner))
        runner.vsteer_setup()

    def vsteer_take_records(self, request_id: str | None = None) -> dict[str, dict[str, Any]]:
        """Per-token `value_scores` and `interventions` recorded so far (all, or of front-end id `request_id`),
        handed over once; `POST /v1/vfd_records` (records_endpoint.py) serves them over HTTP."""
        return self.model_runner.vsteer_take_records(request_id)

    def vsteer_take_forward_counts(self) -> dict[str, int]:
        """Since the last call: model forwards `skipped` and `full`, candidate rows forwarded, tokens steered."""
        return self.model_runner.vsteer_take_forward_counts()

    def vsteer_record_hidden(self, on: bool = True) -> None:
        """Also keep each committed token's candidate post-norm state (for tests; costs memory)."""
        self.model_runner._vsteer_record_hidden = bool(on)


def check_engine_supports_vfd(vllm_config: Any, uses_v2_runner: bool) -> None:
    """Refuse engine settings in-engine VFD cannot honour, each with its fix."""
    if uses_v2_runner:
        raise ValueError(
            "ValueSteerWorker patches vLLM's V1 model runner, but this engine uses the V2 runner; "
            "start it with VLLM_USE_V2_MODEL_RUNNER=0."
        )
    if vllm_config.speculative_config is not None:
        raise ValueError(
            "VFD commits one of K candidates per step and cannot ride speculative decoding; "
            "start the engine without speculative_config / --speculative-config."
        )
    if vllm_config.scheduler_config.async_scheduling:
        raise ValueError(
            "VFD replaces the sampled token before it is returned, which async scheduling does not allow; "
            "start the engine with async_scheduling=False (--no-async-scheduling)."
        )
    if vllm_config.parallel_config.world_size > 1:
        raise ValueError("in-engine VFD runs on one worker; use tensor_parallel_size=1 and pipeline_parallel_size=1.")
