"""The `vllm.general_plugins` entry point and the model classes it registers, for `vllm serve`.

`register()` adds, for every registered `*ForCausalLM` architecture X, an architecture named
`ValueSteerX` (lazily: nothing is imported until an engine picks it). Selecting it with
`--hf-overrides '{"architectures": ["ValueSteerX"]}'` loads X unchanged plus a value head from
`additional_config`, scored on every `compute_logits` input. The classes are built on demand by
this module's `__getattr__`, so no table of model families is kept.
"""

from __future__ import annotations

from functools import cache
from typing import Any

PREFIX = "ValueSteer"


def register() -> None:
    """Register `ValueSteer<Arch>` for every causal-LM architecture vLLM knows (called by vLLM at start-up)."""
    from vllm import ModelRegistry

    for arch in list(ModelRegistry.get_supported_archs()):
        if arch.endswith("ForCausalLM") and not arch.startswith(PREFIX):
            ModelRegistry.register_model(f"{PREFIX}{arch}", f"{__name__}:{PREFIX}{arch}")


@cache
def steered_model_class(arch: str) -> type:
    """A subclass of vLLM's class for `arch` whose `compute_logits` also feeds the value head."""
    from vllm import ModelRegistry

    from vsteer_hf.vllm.channel import channel_for, install_hook
    from vsteer_hf.vllm.settings import enabled_sections, steering_from_additional_config

    registered = ModelRegistry.models.get(arch)
    if registered is None:
        raise ValueError(f"vLLM has no architecture {arch!r} to steer; see ModelRegistry.get_supported_archs().")
    base = registered.load_model_cls()

    def __init__(self: Any, *, vllm_config: Any, prefix: str = "") -> None:
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        sections = enabled_sections(vllm_config.additional_config)
        if not sections:
            raise ValueError(
                f"architecture {PREFIX}{arch} loads a value head but additional_config has no enabled 'abstain' or "
                "'vfd' section; add one with a 'value_head_path', or select the plain architecture."
            )
        steering = steering_from_additional_config(vllm_config.additional_config, sections[0])
        assert steering is not None
        hidden_size = vllm_config.model_config.get_hidden_size()
        install_hook(self, channel_for(vllm_config), steering.config.load_head(), hidden_size)

    return type(f"{PREFIX}{arch}", (base,), {"__init__": __init__, "__module__": __name__})


def __getattr__(name: str) -> type:
    if name.startswith(PREFIX) and name.endswith("ForCausalLM"):
        return steered_model_class(name[len(PREFIX) :])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
