"""The value head's card: the typed ``<weights>.meta.json`` sidecar (feature spec, threshold, ĉ(α) curve).

The format is the value-steer vLLM plugin's, plus a few top-level keys of ours; unknown keys survive
a round trip so a newer writer's sidecar is never truncated.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

RISK_DIRECTIONS = ("above", "below")


@dataclass
class FeatureSpec:
    """Which tensor the head was trained on; the plugin sidecar's ``feature_spec`` object."""

    layer: str = field(default="final", metadata={"help": "decoder layer: the final one"})
    norm: str = field(default="post", metadata={"help": "after the final norm, i.e. lm_head's input"})
    pooling: str = field(default="none", metadata={"help": "none: scored per token"})
    dtype: str = field(default="fp32", metadata={"help": "the head casts its input to this dtype"})
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "keys from newer writers"})


@dataclass
class HeadCard:
    """Typed view of the ``<weights>.meta.json`` sidecar written by the value-steer plugin.

    Plugin format (``value_steer/train_probe.py:save_probe_checkpoint`` and
    ``scripts/decode_extract.py --phase calibrate``)::

        {"feature_spec": {"layer": "final", "norm": "post", "pooling": "none", "dtype": "fp32"},
         "threshold": 0.80 | null,
         "meta": {"model": "<backbone id>", "domain": ..., "loss": ..., ...,
                  "calibration": {"alphas": [...], "thresholds": [...], "method": ..., "n": ...,
                                  "n_safe": ..., "guarantee": "P(intervene | safe) <= alpha"}}}

    We add top-level ``hidden_size``, ``backbone``, ``risk_direction``, ``writer`` (the plugin ignores
    them) and keep every key we do not know, so a newer writer's sidecar survives a round trip.
    """

    hidden_size: int | None = field(default=None, metadata={"help": "H of the backbone; checked on load"})
    backbone: str | None = field(default=None, metadata={"help": "backbone name/id (plugin: meta.model)"})
    threshold: float | None = field(
        default=None,
        metadata={
            "help": "the single threshold the writer recommends; the plugin uses it when no threshold "
            "is configured. The published head's is a conservative conformal one (~0.8), not its ~0.3 "
            "steering setpoint."
        },
    )
    curve: dict[float, float] = field(
        default_factory=dict,
        metadata={"help": "conformal ĉ(α): alpha -> threshold with P(intervene | safe) <= alpha"},
    )
    risk_direction: str = field(
        default="above",
        metadata={"help": "'above': the head scores P(undesirable); intervene/abstain when p >= threshold"},
    )
    feature_spec: FeatureSpec = field(default_factory=FeatureSpec)
    training: dict[str, Any] = field(default_factory=dict, metadata={"help": "plugin meta, minus model"})
    calibration: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "meta.calibration minus the curve (method, n, n_safe, ...)"}
    )
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "unknown top-level keys"})

    def threshold_for_alpha(self, alpha: float) -> float:
        """ĉ(α) from the calibrated curve: the exact grid point, else a linear interpolation between
        the two neighbouring α grid points (the conformal guarantee strictly holds only on the grid).
        Refuses to extrapolate."""
        alphas = sorted(self.curve)
        if not alphas:
            raise ValueError(
                "this head's card has no conformal ĉ(α) curve; pass threshold= explicitly or calibrate "
                "the head on held-out data to get a curve"
            )
        a = float(alpha)
        if a in self.curve:
            return float(self.curve[a])
        if not alphas[0] <= a <= alphas[-1]:
            raise ValueError(
                f"alpha={a} is outside the calibrated range [{alphas[0]}, {alphas[-1]}] of this head's "
                f"ĉ(α) curve (grid {alphas}); pick an alpha in that range, pass threshold= explicitly, "
                "or calibrate the head at that alpha"
            )
        hi = next(i for i, x in enumerate(alphas) if x > a)
        a0, a1 = alphas[hi - 1], alphas[hi]
        c0, c1 = self.curve[a0], self.curve[a1]
        return float(c0 + (c1 - c0) * (a - a0) / (a1 - a0))

    # ---- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The sidecar object, in the plugin's format plus our top-level keys."""
        spec = {k: v for k, v in asdict(self.feature_spec).items() if k != "extra"}
        meta = dict(self.training)
        if self.backbone is not None:
            meta["model"] = self.backbone
        if self.curve or self.calibration:
            alphas = sorted(self.curve)
            meta["calibration"] = {
                **self.calibration,
                "alphas": alphas,
                "thresholds": [self.curve[a] for a in alphas],
            }
        return {
            **self.extra,
            "feature_spec": {**self.feature_spec.extra, **spec},
            "threshold": self.threshold,
            "meta": meta,
            "hidden_size": self.hidden_size,
            "backbone": self.backbone,
            "risk_direction": self.risk_direction,
            "writer": _writer(),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "<sidecar>") -> HeadCard:
        """Parse and type-check a sidecar object; errors name `source` and the bad key."""

        def bad(what: str) -> ValueError:
            return ValueError(f"{source}: corrupt value-head sidecar: {what}")

        if not isinstance(data, Mapping):
            raise bad(f"expected a JSON object at the top level, got {type(data).__name__}")
        data = dict(data)
        threshold = _opt_prob(data.pop("threshold", None), "threshold", bad)
        hidden_size = data.pop("hidden_size", None)
        if hidden_size is not None and (not _is_int(hidden_size) or hidden_size <= 0):
            raise bad(f"'hidden_size' must be a positive integer or null, got {hidden_size!r}")
        risk = data.pop("risk_direction", "above")
        if risk not in RISK_DIRECTIONS:
            raise bad(f"'risk_direction' must be one of {list(RISK_DIRECTIONS)}, got {risk!r}")

        spec_raw = _or_empty(data.pop("feature_spec", None))
        if not isinstance(spec_raw, Mapping) or not all(isinstance(v, str) for v in spec_raw.values()):
            raise bad(f"'feature_spec' must be an object of strings, got {spec_raw!r}")
        names = {f.name for f in fields(FeatureSpec)} - {"extra"}
        spec = FeatureSpec(
            **{k: v for k, v in spec_raw.items() if k in names},
            extra={k: v for k, v in spec_raw.items() if k not in names},
        )

        meta = _or_empty(data.pop("meta", None))
        if not isinstance(meta, Mapping):
            raise bad(f"'meta' must be an object, got {type(meta).__name__}")
        meta = dict(meta)
        backbone = data.pop("backbone", None)
        meta_model = meta.pop("model", None)
        backbone = backbone if backbone is not None else meta_model
        if backbone is not None and not isinstance(backbone, str):
            raise bad(f"'backbone' / 'meta.model' must be a string, got {backbone!r}")
        calibration = _or_empty(meta.pop("calibration", None))
        if not isinstance(calibration, Mapping):
            raise bad(f"'meta.calibration' must be an object, got {type(calibration).__name__}")
        calibration = dict(calibration)
        alphas = calibration.pop("alphas", [])
        thresholds = calibration.pop("thresholds", [])
        if not isinstance(alphas, list) or not isinstance(thresholds, list) or len(alphas) != len(thresholds):
            raise bad("'meta.calibration.alphas' and '.thresholds' must be lists of equal length")
        curve: dict[float, float] = {}
        for a, c in zip(alphas, thresholds, strict=True):
            a = _opt_prob(a, "meta.calibration.alphas[]", bad)
            if a is None or a in curve:
                raise bad(f"'meta.calibration.alphas' must be distinct numbers in [0, 1], got {alphas!r}")
            c = _opt_prob(c, "meta.calibration.thresholds[]", bad)
            if c is None:
                raise bad(f"'meta.calibration.thresholds' must be numbers in [0, 1], got {thresholds!r}")
            curve[a] = c
        data.pop("writer", None)  # rewritten on save
        return cls(
            hidden_size=hidden_size,
            backbone=backbone,
            threshold=threshold,
            curve=curve,
            risk_direction=risk,
            feature_spec=spec,
            training=meta,
            calibration=calibration,
            extra=data,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadCard:
        """Read a sidecar file; corrupt JSON or wrong types raise ValueError naming the file."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: value-head sidecar is not valid JSON ({e}); fix or delete it") from e
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


def _writer() -> str:
    try:
        return f"vsteer_hf {importlib.metadata.version('vsteer-hf')}"
    except importlib.metadata.PackageNotFoundError:
        return "vsteer_hf"


def _or_empty(x: Any) -> Any:
    return {} if x is None else x


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _opt_prob(x: Any, key: str, bad) -> float | None:
    """None, or a finite number in [0, 1] (probability thresholds and alphas)."""
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not 0 <= x <= 1:
        raise bad(f"'{key}' must be a number in [0, 1] or null, got {x!r}")
    return float(x)
