"""Value-head weight files: strict reading of safetensors and tensor-only pickles, with layout checks.

Every check runs before the weights reach a module: safetensors headers are validated before a byte
of tensor data is read, pickles load only with ``weights_only=True``, and the keys, shapes and
values must be exactly the plugin's ``Linear(H,H) -> Tanh -> Linear(H,H) -> ReLU -> Linear(H,1)``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from typing import Any

import torch

from vsteer_hf.head_card import _is_int

_KEYS = ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")
# Weights may be stored at any float precision (they are cast to fp32 on load); nothing else.
_SAFETENSORS_FLOATS = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# A value head's safetensors header lists six tensors; a bigger header is not a value head.
_MAX_SAFETENSORS_HEADER = 1 << 20


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


def read_checked_state_dict(weights: str) -> tuple[dict[str, Any], int]:
    """(state dict, hidden size) of a value-head weights file, refused unless it is exactly a value head."""
    if weights.endswith(".safetensors"):
        _check_layout(_safetensors_shapes(weights), weights)  # before a byte of tensor data is read
    state = _read_state_dict(weights)
    h = _check_layout({k: _shape_of(v) for k, v in state.items()}, weights)
    _check_values(state, weights)
    return state, h
