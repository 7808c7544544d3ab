"""ProFS settings and the record of an edit: defaults, `ProFSConfig`, `ProFSRecord`, profs_edit.json."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from torch import nn

PROFS_RECORD_NAME = "profs_edit.json"


def default_layers(num_layers: int) -> list[int]:
    """The paper edits layers 15..31 of 32: the same fraction of depth, start = round(L*15/32) half up."""
    return list(range(math.floor(num_layers * 15 / 32 + 0.5), num_layers))


def default_k(hidden_size: int, num_pairs: int) -> int:
    """k = min(10, max(2, floor(10*H/4096))): 10 at H=4096 (Mistral/OPT/GPT-J), 2 at H=1024
    (GPT-2 medium), as in the paper; then capped at the number of pairs and H."""
    return max(1, min(10, max(2, (10 * hidden_size) // 4096), num_pairs, hidden_size))


@dataclass
class ProFSConfig:
    """How to find and remove the toxic subspace.

    Defaults follow the paper/reference configs (k=10, layers 15..31 for 32-layer 7B models, 500
    pairs, centering on, reference truncation to 128 tokens), scaled to other sizes by
    `default_k` / `default_layers`. `project_bias` also projects MLP output biases, which the
    reference code leaves untouched (it edits `weight` tensors only).
    """

    k: int | Literal["auto"] = field(default="auto", metadata={"help": "Subspace rank, or 'auto' (see default_k)."})
    layers: Literal["auto"] | Sequence[int] = field(
        default="auto", metadata={"help": "Decoder layer indices to edit, or 'auto' (see default_layers)."}
    )
    centering: bool = field(default=True, metadata={"help": "Remove the preferred embeddings' top direction."})
    batch_size: int = field(default=8, metadata={"help": "Texts per forward pass when embedding."})
    max_length: int | None = field(default=128, metadata={"help": "Truncate texts to this many tokens."})
    project_bias: bool = field(default=True, metadata={"help": "Also project the MLP output bias."})

    def __post_init__(self) -> None:
        if self.k != "auto" and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"k={self.k!r} is invalid: use a positive int or 'auto'.")
        if isinstance(self.layers, str) and self.layers != "auto":
            raise ValueError(f"layers={self.layers!r} is invalid: use 'auto' or a list/range of ints.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} is invalid: use a positive int.")


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vsteer-hf")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class ProFSRecord:
    """What an edit did; attached to the model as `model.profs_record` and saved as profs_edit.json."""

    num_pairs: int
    k: int
    layers: list[int]
    modules: list[str]
    singular_values: dict[int, list[float]]  # layer -> all singular values of its preference matrix
    centering: bool
    project_bias: bool
    max_length: int | None
    timestamp: str
    library_version: str
    method: str = "ProFS"
    previous: list[dict[str, Any]] = field(default_factory=list)  # earlier edits of the same weights

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["singular_values"] = {str(k): v for k, v in self.singular_values.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProFSRecord:
        """Tolerates keys written by a newer version (ignored with a warning)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"Ignoring unknown ProFS record keys {unknown}.", stacklevel=2)
        kwargs = {key: value for key, value in data.items() if key in known}
        kwargs["singular_values"] = {int(k): list(v) for k, v in kwargs.get("singular_values", {}).items()}
        return cls(**kwargs)


def save_profs_model(model: nn.Module, tokenizer: Any, directory: str | Path) -> Path:
    """Save the edited model (safetensors), its tokenizer and `profs_edit.json` to `directory`."""
    record = getattr(model, "profs_record", None)
    if record is None:
        raise ValueError("The model carries no ProFS record; run apply_profs(model, ...) before saving.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / PROFS_RECORD_NAME).write_text(json.dumps(record.to_dict(), indent=2) + "\n")
    return directory


def load_profs_record(directory: str | Path) -> ProFSRecord:
    """Read `profs_edit.json` from a local folder, or from a hub model id if no such folder exists."""
    path = Path(directory)
    if path.is_dir():
        path = path / PROFS_RECORD_NAME
        if not path.is_file():
            raise FileNotFoundError(f"No {PROFS_RECORD_NAME} in {directory}; was it saved by save_profs_model?")
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(directory), PROFS_RECORD_NAME))
    return ProFSRecord.from_dict(json.loads(path.read_text()))
