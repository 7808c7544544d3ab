"""Parse the vLLM plugin's `additional_config` sections into the shared `ValueSteerConfig`.

The published head's usage is `additional_config={"vfd": {...}}` or `{"abstain": {...}}` with
`value_head_path`, `threshold`, `num_candidates`; per-request `SamplingParams.extra_args` keys
`vfd_threshold` / `abstain_threshold` override the threshold. This module imports no vLLM.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vsteer_hf.config import ValueSteerConfig

SECTIONS = ("abstain", "vfd")
# Keys this adapter reads, per section (`alpha` is ours: ĉ(α) on the head card's curve).
COMMON_KEYS = ("enabled", "value_head_path", "head_filename", "head_revision", "threshold", "alpha", "direction")
SECTION_KEYS = {
    "abstain": (*COMMON_KEYS, "eos_token_id"),
    "vfd": (*COMMON_KEYS, "num_candidates", "rule", "args_weight", "prob_weight", "candidate_forward"),
}
# How the engine forwards the K candidates: `lazy` (candidate 0 for every request, the other K-1 only where
# it is not safe; `first_safe` only), `expand` (all K as rows in one pass), `auto` (lazy where exact).
ENGINE_CANDIDATE_PATHS = ("auto", "lazy", "expand")
# The reference plugin's engine-internal tuning knobs: they change no decision, so they are accepted and ignored.
IGNORED_PLUGIN_KEYS = ("strict", "single_stream", "scratch_max_seqs", "capture_kv_ops", "capture_kv_max_rows")


@dataclass(frozen=True)
class EngineSteering:
    """One enabled `additional_config` section: its mode, the shared config, and abstention's EOS override."""

    mode: str
    config: ValueSteerConfig
    eos_token_id: int | None = None

    def default_threshold(self) -> float:
        """The section's threshold, or ĉ(α) on the head's curve: the value used when a request names none."""
        head = self.config.load_head()
        return float(self.config.thresholds(head, 1, "cpu")[0])

    def forwards_lazily(self) -> bool:
        """Whether the engine forwards candidate 0 first and the others only where it is refused: exact
        under `first_safe` (candidate 0 wins iff it is safe), and only worth it with K > 1."""
        config = self.config
        return config.candidate_forward != "expand" and config.rule == "first_safe" and config.candidates_per_step > 1

    def request_threshold(self, extra_args: Mapping[str, Any] | None, default: float) -> float:
        """`extra_args[f"{mode}_threshold"]`, or ĉ(`extra_args[f"{mode}_alpha"]`), else `default`."""
        return request_threshold(self, extra_args, default)


def steering_from_additional_config(additional_config: Mapping[str, Any] | None, mode: str) -> EngineSteering | None:
    """The `mode` section of vLLM's `additional_config` as an `EngineSteering`, or None when absent/disabled.

    Unknown keys, a missing head or threshold, and both sections enabled at once raise ValueError naming the fix.
    """
    if mode not in SECTIONS:
        raise ValueError(f"mode={mode!r} is not one of {SECTIONS}.")
    enabled = enabled_sections(additional_config)
    if mode not in enabled:
        return None
    section = dict(additional_config[mode])  # type: ignore[index]
    allowed = SECTION_KEYS[mode]
    unknown = sorted(set(section) - set(allowed) - set(IGNORED_PLUGIN_KEYS))
    if unknown:
        raise ValueError(
            f"additional_config[{mode!r}] has unknown keys {unknown}; allowed keys: {', '.join(allowed)}."
        )
    if section.get("args_fallback"):
        raise ValueError("additional_config['vfd']['args_fallback'] is not supported; use 'rule': 'args' instead.")
    head = section.get("value_head_path")
    if not head:
        raise ValueError(
            f"additional_config[{mode!r}] needs 'value_head_path': a value-head file, folder or hub id "
            '(e.g. {"value_head_path": "value_head.bin", "threshold": 0.3}).'
        )
    threshold, alpha = section.get("threshold"), section.get("alpha")
    kwargs: dict[str, Any] = {
        "head": head,
        "head_filename": section.get("head_filename"),
        "head_revision": section.get("head_revision"),
        "mode": mode,
        "direction": section.get("direction"),
    }
    if mode == "vfd":
        kwargs["num_candidates"] = section.get("num_candidates")
        kwargs["rule"] = section.get("rule", "first_safe")
        weight = section.get("args_weight", section.get("prob_weight", 1.0))
        kwargs["args_weight"] = float(weight)
        path = section.get("candidate_forward", "auto")
        if path not in ENGINE_CANDIDATE_PATHS:
            raise ValueError(
                f"additional_config['vfd']['candidate_forward'] = {path!r}; the engine takes one of "
                f"{', '.join(ENGINE_CANDIDATE_PATHS)} (transformers' 'tree' path has no engine counterpart)."
            )
        kwargs["candidate_forward"] = path
    if threshold is None and alpha is None:
        threshold = _card_threshold(kwargs, mode)
    config = ValueSteerConfig(threshold=threshold, alpha=alpha, **kwargs)
    eos = section.get("eos_token_id")
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or eos < 0):
        raise ValueError(f"additional_config['abstain']['eos_token_id'] must be a token id >= 0, got {eos!r}.")
    return EngineSteering(mode=mode, config=config, eos_token_id=eos)


def enabled_sections(additional_config: Mapping[str, Any] | None) -> list[str]:
    """Names of the enabled steering sections; both at once is refused (they are separate decode modes)."""
    if additional_config is None:
        return []
    if not isinstance(additional_config, Mapping):
        raise ValueError(f"additional_config must be a dict, got {type(additional_config).__name__}.")
    enabled = []
    for name in SECTIONS:
        section = additional_config.get(name)
        if section is None:
            continue
        if not isinstance(section, Mapping):
            raise ValueError(
                f"additional_config[{name!r}] must be a dict such as "
                f'{{"value_head_path": "value_head.bin", "threshold": 0.3}}, got {section!r}.'
            )
        if section.get("enabled", True):
            enabled.append(name)
    if len(enabled) > 1:
        raise ValueError(
            "additional_config enables both 'abstain' and 'vfd'; they are separate decode modes: keep one, "
            "or set 'enabled': false in the other."
        )
    return enabled


def request_threshold(steering: EngineSteering, extra_args: Mapping[str, Any] | None, default: float) -> float:
    """Per-request threshold from `SamplingParams.extra_args`; bad values raise ValueError naming the key."""
    threshold_key, alpha_key = f"{steering.mode}_threshold", f"{steering.mode}_alpha"
    args = extra_args or {}
    if args.get(threshold_key) is not None and args.get(alpha_key) is not None:
        raise ValueError(f"extra_args has both {threshold_key!r} and {alpha_key!r}; pass one.")
    if args.get(threshold_key) is not None:
        return check_probability(args[threshold_key], f"extra_args[{threshold_key!r}]")
    if args.get(alpha_key) is not None:
        alpha = check_probability(args[alpha_key], f"extra_args[{alpha_key!r}]")
        return float(steering.config.load_head().card.threshold_for_alpha(alpha))
    return default


def check_probability(value: Any, name: str) -> float:
    """A finite float in [0, 1], else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} = {value!r} is outside [0, 1]; thresholds are risk probabilities, e.g. 0.3.")
    return float(value)


def _card_threshold(kwargs: dict[str, Any], mode: str) -> float:
    """No threshold configured: the head card's threshold, as the reference plugin does, else a clear error."""
    probe = ValueSteerConfig(threshold=0.5, **kwargs)  # only to load the head through the shared cache
    card_threshold = probe.load_head().card.threshold
    if card_threshold is None:
        raise ValueError(
            f"additional_config[{mode!r}] has no 'threshold' or 'alpha' and the head's card names no threshold; "
            "add e.g. 'threshold': 0.3, or 'alpha': 0.1 for a head with a calibrated ĉ(α) curve."
        )
    return float(card_threshold)


def check_request_args(extra_args: Mapping[str, Any] | None, mode: str) -> None:
    """The per-request `<mode>_threshold` / `<mode>_alpha` of `SamplingParams.extra_args`, checked at admission."""
    args = extra_args or {}
    for key in (f"{mode}_threshold", f"{mode}_alpha"):
        if args.get(key) is not None:
            check_probability(args[key], f"extra_args[{key!r}]")
