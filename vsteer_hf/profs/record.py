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


@dataclass(frozen=True)
class AuthorsSetting:
    """One of the authors' edit configs: the model it was tuned on (type and depth), its layers and k."""

    config_file: str
    model_type: str
    num_layers: int
    layers: range
    k: int


# From Uppaal/detox-edit `configs/*.ini` (lowest/highest_layer_to_edit, top_k_ranks; the range is
# np.arange(lowest, highest) in `evaluation/edit_model.py`, so "highest" is exclusive and values past
# the depth add nothing). Matched only on the same model type AND depth: a 12-layer GPT-2 is not theirs.
AUTHORS_SETTINGS = (
    AuthorsSetting("gpt2-medium.ini", "gpt2", 24, range(10, 24), 2),
    AuthorsSetting("gptj-6b.ini", "gptj", 28, range(10, 27), 10),
    AuthorsSetting("mistral-7b.ini", "mistral", 32, range(15, 32), 10),  # also mistral-sft-7b.ini
    AuthorsSetting("opt-6.7b.ini", "opt", 32, range(10, 32), 10),
)


def authors_setting(model_type: str | None, num_layers: int) -> AuthorsSetting | None:
    """The authors' config for this model type and depth, if they published one."""
    for setting in AUTHORS_SETTINGS:
        if setting.model_type == model_type and setting.num_layers == num_layers:
            return setting
    return None


def default_layers(num_layers: int, model_type: str | None = None) -> list[int]:
    """The authors' layers for one of their models (`AUTHORS_SETTINGS`); otherwise the paper's start at
    the same fraction of depth (15 of 32, rounded half up) through the second-to-last layer.

    The last block is left out because its MLP writes straight into the unembedding: on SmolLM2-135M
    (30 layers) editing it alone cost far more reference-text perplexity than any other single layer
    (see the README's "Compare with ProFS"). A one-layer model keeps its only layer.
    """
    setting = authors_setting(model_type, num_layers)
    if setting is not None:
        return list(setting.layers)
    start = math.floor(num_layers * 15 / 32 + 0.5)
    return list(range(start, max(start + 1, num_layers - 1)))


def default_k(hidden_size: int, num_pairs: int, model_type: str | None = None, num_layers: int | None = None) -> int:
    """The authors' k for one of their models; otherwise k = min(10, max(2, floor(10*H/4096))): 10 at
    H=4096 (Mistral/OPT/GPT-J), 2 at H=1024 (GPT-2 medium), as they chose. Capped at pairs and H."""
    setting = authors_setting(model_type, num_layers) if num_layers is not None else None
    k = setting.k if setting is not None else min(10, max(2, (10 * hidden_size) // 4096))
    return max(1, min(k, num_pairs, hidden_size))


@dataclass
class ProFSConfig:
    """How to find and remove the toxic subspace.

    Defaults are the authors': their layers and k for their model families (`AUTHORS_SETTINGS`),
    otherwise `default_layers` / `default_k`; 500 pairs, centering on, texts truncated to 128
    tokens, and `pooling="reference"` (their padded mean; see `vsteer_hf.profs.embeddings`).
    `project_bias` also projects MLP output biases, which their code leaves untouched (it edits
    `weight` tensors only).
    """

    k: int | Literal["auto"] = field(default="auto", metadata={"help": "Subspace rank, or 'auto' (see default_k)."})
    layers: Literal["auto"] | Sequence[int] = field(
        default="auto", metadata={"help": "Decoder layer indices to edit, or 'auto' (see default_layers)."}
    )
    centering: bool = field(default=True, metadata={"help": "Remove the preferred embeddings' top direction."})
    batch_size: int = field(default=8, metadata={"help": "Texts per forward pass when embedding."})
    max_length: int | None = field(default=128, metadata={"help": "Truncate texts to this many tokens."})
    project_bias: bool = field(default=True, metadata={"help": "Also project the MLP output bias."})
    pooling: str = field(
        default="reference", metadata={"help": "'reference' (the authors' padded mean) or 'masked' (real tokens)."}
    )
    drop_first: bool = field(default=False, metadata={"help": "Leave each text's first token out of the mean."})

    def __post_init__(self) -> None:
        from vsteer_hf.profs.embeddings import POOLINGS

        if self.k != "auto" and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"k={self.k!r} is invalid: use a positive int or 'auto'.")
        if isinstance(self.layers, str) and self.layers != "auto":
            raise ValueError(f"layers={self.layers!r} is invalid: use 'auto' or a list/range of ints.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} is invalid: use a positive int.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is invalid: use one of {POOLINGS}.")


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
    pooling: str = "masked"  # records written before pooling was recorded used the masked mean
    drop_first: bool = False
    selection: dict[str, Any] | None = None  # the sweep that chose k and layers (`select_profs`), if any
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
