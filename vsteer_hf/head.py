"""The scalar value head and its card: an fp32 MLP that reads the backbone's final post-norm hidden
state (the tensor ``lm_head`` consumes) per token and predicts P(undesirable).

Weights load strictly from safetensors or tensor-only pickles (the value-steer vLLM plugin's
``value_head.bin`` + ``.meta.json`` format reads unchanged). The head knows nothing of tokens:
which hidden state to feed it, and what to do above the threshold, is the caller's business.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
import struct
import threading
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from torch import nn

SIDECAR_SUFFIX = ".meta.json"
WEIGHTS_NAME = "value_head.safetensors"
# Looked for, in this order, in a folder or hub repo when no `filename=` is given.
DEFAULT_FILENAMES = ("value_head.safetensors", "model.safetensors", "value_head.bin", "value_head.pt")
RISK_DIRECTIONS = ("above", "below")
_KEYS = ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")
# Weights may be stored at any float precision (they are cast to fp32 on load); nothing else.
_SAFETENSORS_FLOATS = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# A value head's safetensors header lists six tensors; a bigger header is not a value head.
_MAX_SAFETENSORS_HEADER = 1 << 20
_COPY_LOCK = threading.Lock()


def _expected_shapes(hidden_size: int) -> dict[str, tuple[int, ...]]:
    h = hidden_size
    return {
        "0.weight": (h, h),
        "0.bias": (h,),
        "2.weight": (h, h),
        "2.bias": (h,),
        "4.weight": (1, h),
        "4.bias": (1,),
    }


# --------------------------------------------------------------------------- card (sidecar)
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


# --------------------------------------------------------------------------- the head
class ValueHead(
    nn.Sequential,
    PyTorchModelHubMixin,
    library_name="vsteer-hf",
    tags=["value-head", "safety", "vsteer"],
):
    """Linear(H,H) → Tanh → Linear(H,H) → ReLU → Linear(H,1), fp32, raw logit.

    The layout (and so the state-dict keys ``0.*, 2.*, 4.*``) is the value-steer plugin's
    ``ValueHead.net``, so one checkpoint scores identically in both. ``card`` holds the sidecar.
    """

    def __init__(self, hidden_size: int, card: HeadCard | None = None):
        if not _is_int(hidden_size) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        h = hidden_size
        f32 = torch.float32
        super().__init__(
            nn.Linear(h, h, dtype=f32),
            nn.Tanh(),
            nn.Linear(h, h, dtype=f32),
            nn.ReLU(),
            nn.Linear(h, 1, dtype=f32),
        )
        card = HeadCard() if card is None else card
        if card.hidden_size is not None and card.hidden_size != h:
            raise ValueError(f"card says hidden size {card.hidden_size} but the head was built with {h}")
        self.card: HeadCard = replace(card, hidden_size=h)

    @property
    def hidden_size(self) -> int:
        return self[0].in_features

    def logit(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (...). Cast to fp32 (the training dtype) but never moved between devices."""
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"value head expects hidden size {self.hidden_size} but got a hidden state of shape "
                f"{tuple(hidden.shape)}"
            )
        if self[0].weight.dtype != torch.float32:
            raise ValueError(f"value head weights are {self[0].weight.dtype}; it runs in fp32: call .float()")
        return super().forward(hidden.to(torch.float32)).squeeze(-1)  # (..., 1) -> (...)

    def p(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (...): sigmoid(logit), P(undesirable) for a safety head."""
        return torch.sigmoid(self.logit(hidden))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logit(hidden)

    def placed(self, device: torch.device | str) -> ValueHead:
        """This head on `device`: itself when it is already there, else a frozen copy kept per device.

        Decoding puts the head where the backbone's final norm runs (``device_map="auto"``) without
        moving the caller's module, so two threads steering on different devices with one head never
        race on it. A copy is refreshed when the weights change in place (parameter version counters).
        """
        device = torch.device(device)
        params = list(self.parameters())
        if all(_same_device(p.device, device) for p in params):
            return self
        version = tuple(p._version for p in params)
        with _COPY_LOCK:
            copies: dict[str, tuple[tuple[int, ...], ValueHead]] = self.__dict__.setdefault("_device_copies", {})
            cached = copies.get(str(device))
            if cached is not None and cached[0] == version:
                return cached[1]
            with torch.device("meta"):
                copy = ValueHead(self.hidden_size, self.card)
            weights = {k: v.detach().to(device, copy=True) for k, v in self.state_dict().items()}
            copy.load_state_dict(weights, assign=True)
            copy.requires_grad_(False).eval()
            copies[str(device)] = (version, copy)
            return copy

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state.pop("_device_copies", None)  # per-process placement copies are not part of the head
        return state

    # ---- saving
    def _save_pretrained(self, save_directory: Path) -> None:
        """Hub-mixin hook: safetensors weights + sidecar + a config.json the mixin reads back."""
        from safetensors.torch import save_file

        save_directory = Path(save_directory)
        weights = save_directory / WEIGHTS_NAME
        save_file(self._plain_state_dict(), str(weights), metadata={"format": "pt"})
        self._card_for_save().save(str(weights) + SIDECAR_SUFFIX)
        (save_directory / "config.json").write_text(json.dumps({"hidden_size": self.hidden_size}, indent=2))

    def export_plugin_checkpoint(self, path: str | os.PathLike) -> tuple[str, str]:
        """Write what the vLLM plugin's ``load_value_head`` reads: ``torch.save`` of the bare
        Sequential state dict at `path` (e.g. ``value_head.bin``) and ``path + '.meta.json'``.
        Returns (weights_path, sidecar_path)."""
        path = str(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        torch.save(self._plain_state_dict(), path)
        sidecar = path + SIDECAR_SUFFIX
        self._card_for_save().save(sidecar)
        return path, sidecar

    def _plain_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}

    def _card_for_save(self) -> HeadCard:
        return replace(self.card, hidden_size=self.hidden_size)

    # ---- loading through the hub mixin
    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        hidden_size: int | None = None,
        device: str | torch.device | None = None,
        map_location: str | torch.device | None = None,
        filename: str | None = None,
        **unused: Any,
    ) -> ValueHead:
        """`from_pretrained` lands here; the same strict loader as `load_value_head`."""
        if unused:
            raise TypeError(f"ValueHead.from_pretrained got unexpected arguments: {sorted(unused)}")
        hub_kwargs = {
            "cache_dir": cache_dir,
            "force_download": force_download,
            "local_files_only": local_files_only,
            "token": token,
        }
        return _load(model_id, hidden_size, device or map_location, filename, revision, hub_kwargs)


# --------------------------------------------------------------------------- loading
def load_value_head(
    source: str | os.PathLike,
    hidden_size: int | None = None,
    device: str | torch.device | None = None,
    filename: str | None = None,
    revision: str | None = None,
) -> ValueHead:
    """Load a head, strictly, from a weights file, a folder, or a hub repo id.

    A folder or repo is searched for ``filename`` (may be a sub-path such as ``mistral/hh-rlhf.bin``),
    else for ``value_head.safetensors``, ``model.safetensors``, ``value_head.bin``, ``value_head.pt``.
    ``<weights>.meta.json`` becomes ``head.card`` when present. ``hidden_size`` (the backbone's) is
    checked against the weights. Pickles load only with ``weights_only=True``. The head comes back
    frozen, in eval mode, on ``device`` (default CPU).
    """
    return _load(source, hidden_size, device, filename, revision, {})


def check_head_matches(head: ValueHead, hidden_size: int, where: str) -> None:
    """Raise a clear error when the backbone's hidden size is not the one the head reads."""
    if head.hidden_size != hidden_size:
        trained = f" (its card names backbone {head.card.backbone!r})" if head.card.backbone else ""
        raise ValueError(
            f"{where}: value head expects hidden size {head.hidden_size} but the backbone has "
            f"{hidden_size}{trained}; load the head trained for this backbone"
        )


def _load(
    source: str | os.PathLike,
    hidden_size: int | None,
    device: str | torch.device | None,
    filename: str | None,
    revision: str | None,
    hub_kwargs: dict[str, Any],
) -> ValueHead:
    weights, sidecar = _resolve(source, filename, revision, hub_kwargs)
    if weights.endswith(".safetensors"):
        _check_layout(_safetensors_shapes(weights), weights)  # before a byte of tensor data is read
    state = _read_state_dict(weights)
    h = _check_layout({k: _shape_of(v) for k, v in state.items()}, weights)
    _check_values(state, weights)
    if hidden_size is not None and hidden_size != h:
        raise ValueError(
            f"{weights}: value head expects hidden size {h} but the backbone has {hidden_size} "
            "(hidden_size=); load the head trained for this backbone"
        )
    card = HeadCard.load(sidecar) if sidecar is not None else HeadCard()
    if card.hidden_size is not None and card.hidden_size != h:
        raise ValueError(f"{sidecar}: sidecar says hidden size {card.hidden_size} but the weights have {h}")
    head = ValueHead(h, card)
    head.load_state_dict(state, strict=True)
    head.requires_grad_(False).eval()
    return head if device is None else head.to(device)


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith((".safetensors", ".bin", ".pt", ".json"))


def _resolve(
    source: str | os.PathLike, filename: str | None, revision: str | None, hub_kwargs: dict[str, Any]
) -> tuple[str, str | None]:
    """-> (weights path, sidecar path or None), downloading from the hub when `source` is a repo id."""
    src = os.fspath(source)
    if revision is not None and (os.path.isfile(src) or os.path.isdir(src)):
        raise ValueError(
            f"revision={revision!r} pins a hub repo's commit, but {src} is a local path; drop revision= or pass "
            "the hub id instead"
        )
    if os.path.isfile(src):
        if filename is not None:
            raise ValueError(f"filename={filename!r} applies to a folder or hub repo, not the file {src}")
        weights = src
    elif os.path.isdir(src):
        names = (filename,) if filename is not None else DEFAULT_FILENAMES
        found = [os.path.join(src, n) for n in names if os.path.isfile(os.path.join(src, n))]
        if not found:
            raise FileNotFoundError(f"{src}: no value-head weights (looked for {list(names)}); pass filename=")
        weights = found[0]
    elif _looks_local(src) or os.path.isabs(src):
        raise FileNotFoundError(f"{src}: no such value-head file or folder")
    else:
        return _download(src, filename, revision, hub_kwargs)
    sidecar = weights + SIDECAR_SUFFIX
    return weights, (sidecar if os.path.isfile(sidecar) else None)


def _download(
    repo_id: str, filename: str | None, revision: str | None, hub_kwargs: dict[str, Any]
) -> tuple[str, str | None]:
    names = (filename,) if filename is not None else DEFAULT_FILENAMES
    weights, offline = None, None
    for name in names:
        try:
            weights = hf_hub_download(repo_id, name, revision=revision, **hub_kwargs)
            break
        except EntryNotFoundError as e:  # absent from the repo, or (Local...) from the offline cache
            offline = offline or (e if isinstance(e, LocalEntryNotFoundError) else None)
    if weights is None:
        where = f"hub repo {repo_id!r} (revision {revision or 'main'})"
        if offline is not None:
            raise FileNotFoundError(
                f"{where}: none of {list(names)} is in the local cache and the hub is unreachable ({offline})"
            ) from offline
        raise FileNotFoundError(f"{where} has none of {list(names)}; pass filename= (e.g. 'mistral/hh-rlhf.bin')")
    try:
        sidecar = hf_hub_download(repo_id, name + SIDECAR_SUFFIX, revision=revision, **hub_kwargs)
    except EntryNotFoundError as e:
        sidecar = None  # a bare head is fine: default card, the caller passes the threshold
        if isinstance(e, LocalEntryNotFoundError):
            warnings.warn(
                f"{repo_id}/{name}{SIDECAR_SUFFIX} is not in the local cache and the hub was not reachable; "
                "the head loads with a default card (no threshold, no ĉ(α) curve)",
                stacklevel=3,
            )
    return weights, sidecar


def _read_state_dict(path: str) -> dict[str, Any]:
    """Safetensors, or a pickle restricted to tensors (``weights_only=True``); never arbitrary code."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle.UnpicklingError, RuntimeError, EOFError, ...
        glob = re.search(r"\bGLOBAL ([\w.]+)", str(e))
        if glob:
            raise ValueError(
                f"{path}: refused: the file contains non-tensor pickle objects ({glob.group(1)}); "
                "value-head checkpoints must hold only tensors. Re-save with "
                "torch.save(head.state_dict(), path) or as .safetensors"
            ) from None
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        why = lines[-2] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
        raise ValueError(
            f"{path}: refused: not a tensor-only torch checkpoint (torch.load(weights_only=True): {why})"
        ) from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict (a mapping of tensors), got {type(state).__name__}")
    return dict(state)


def _shape_of(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _safetensors_shapes(path: str) -> dict[str, tuple[int, ...] | None]:
    """Read and check a safetensors header: float dtypes only, offsets that tile the file exactly.

    Catches truncated files, trailing data and headers announcing huge tensors without reading
    (or allocating) any tensor data. Returns the declared shapes for the layout check.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes; the 8-byte header length is missing)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise ValueError(
                f"{path}: not a value-head safetensors file: the header claims {header_len} bytes but the file has "
                f"{size - 8} after the length field (limit {_MAX_SAFETENSORS_HEADER}); the file is truncated or "
                "not safetensors. Re-download it or re-save with head.save_pretrained()"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable safetensors header ({e}); re-download or re-save the head") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object; re-download or re-save the head")
    data_len = size - 8 - header_len
    shapes: dict[str, tuple[int, ...] | None] = {}
    problems, end = [], 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(shape, list)
            or not all(_is_int(d) and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
        ):
            problems.append(f"{name}: malformed entry {info!r}")
            continue
        if dtype not in _SAFETENSORS_FLOATS:
            problems.append(f"{name}: dtype {dtype} (value-head weights must be F16, BF16, F32 or F64)")
            continue
        begin, stop = offsets
        expected = math.prod(shape) * _SAFETENSORS_FLOATS[dtype]
        if stop - begin != expected or begin < 0:
            problems.append(f"{name}: data_offsets {offsets} do not hold a {dtype} tensor of shape {shape}")
        shapes[name] = tuple(shape)
        end = max(end, stop)
    if problems:
        raise ValueError(f"{path}: refused: " + "; ".join(problems))
    if end > data_len:
        raise ValueError(
            f"{path}: truncated safetensors file: the header places tensor data up to byte {end} but only "
            f"{data_len} bytes follow it; re-download the file"
        )
    if end < data_len:
        raise ValueError(
            f"{path}: oversized safetensors file: {data_len - end} bytes follow the last tensor the header lists; "
            "the file was tampered with or mis-written. Re-download it or re-save with head.save_pretrained()"
        )
    return shapes


def _check_layout(shapes: Mapping[str, tuple[int, ...] | None], path: str) -> int:
    """Strict key/shape check against the fixed architecture; returns H from ``0.weight``.

    `shapes` maps each stored key to its shape, or None for an entry that is not a tensor.
    """
    problems = []
    not_tensors = sorted(k for k, v in shapes.items() if v is None)
    if not_tensors:
        problems.append(f"non-tensor entries {not_tensors} (save the bare Sequential state dict)")
    missing = sorted(set(_KEYS) - set(shapes))
    unexpected = sorted(set(shapes) - set(_KEYS))
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        hint = ""
        prefixes = {k.split(".", 1)[0] + "." for k in unexpected if "." in k}
        if len(prefixes) == 1 and missing:
            hint = f" (keys look prefixed with {prefixes.pop()!r}: save the Sequential's own state dict)"
        problems.append(f"unexpected keys {unexpected}{hint}")
    w0 = shapes.get("0.weight")
    h = w0[1] if w0 is not None and len(w0) == 2 else None
    if h is not None:
        wrong = [
            f"{k}: {shapes[k]} != expected {shape}"
            for k, shape in _expected_shapes(h).items()
            if shapes.get(k) is not None and shapes[k] != shape
        ]
        if wrong:
            problems.append(f"wrong shapes for hidden size {h}: " + "; ".join(wrong))
    elif w0 is not None:
        problems.append(f"'0.weight' must be a 2-D tensor, got shape {w0}")
    if problems:
        raise ValueError(
            f"{path}: not a value head (Linear(H,H) -> Tanh -> Linear(H,H) -> ReLU -> Linear(H,1)): "
            + "; ".join(problems)
        )
    assert h is not None
    return int(h)


def _check_values(state: Mapping[str, torch.Tensor], path: str) -> None:
    """Floating-point weights only, all finite: a head with NaN weights scores NaN for every token."""
    not_float = sorted(f"{k} ({v.dtype})" for k, v in state.items() if not v.is_floating_point())
    if not_float:
        raise ValueError(
            f"{path}: refused: value-head weights must be floating point, got {not_float}; re-save the head "
            "from a float model"
        )
    non_finite = sorted(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
    if non_finite:
        raise ValueError(
            f"{path}: refused: NaN or infinite values in {non_finite}; the checkpoint is corrupt or the training "
            "diverged. Re-train or re-download the head"
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda == cuda:<current>, as tensor placement sees it."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index
