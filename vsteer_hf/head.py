"""The scalar value head and how it loads: an fp32 MLP over the backbone's final post-norm hidden state
(the tensor ``lm_head`` consumes), per token, predicting P(undesirable).

Weights load strictly from safetensors or tensor-only pickles (the value-steer vLLM plugin's
``value_head.bin`` + ``.meta.json`` format reads unchanged; the checks live in ``head_format``, the
sidecar in ``head_card``). The head knows nothing of tokens: which hidden state to feed it, and what
to do above the threshold, is the caller's business.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from torch import nn

from vsteer_hf._hub import hub_resolves
from vsteer_hf.head_card import RISK_DIRECTIONS, FeatureSpec, HeadCard, _is_int, _writer
from vsteer_hf.head_format import read_checked_state_dict
from vsteer_hf.shipped import is_shipped_head, shipped_head_dir, unknown_head_message

__all__ = [
    "DEFAULT_FILENAMES",
    "RISK_DIRECTIONS",
    "SIDECAR_SUFFIX",
    "WEIGHTS_NAME",
    "FeatureSpec",
    "HeadCard",
    "ValueHead",
    "_writer",
    "check_head_matches",
    "load_value_head",
]

SIDECAR_SUFFIX = ".meta.json"
WEIGHTS_NAME = "value_head.safetensors"
# Looked for, in this order, in a folder or hub repo when no `filename=` is given.
DEFAULT_FILENAMES = ("value_head.safetensors", "model.safetensors", "value_head.bin", "value_head.pt")
_COPY_LOCK = threading.Lock()


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
    state, h = read_checked_state_dict(weights)
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
            raise FileNotFoundError(_missing_in_folder(src, filename, names))
        weights = found[0]
    elif _looks_local(src) or os.path.isabs(src):
        raise FileNotFoundError(f"{src}: no such value-head file or folder")
    elif is_shipped_head(src):
        if revision is not None:
            raise ValueError(f"revision={revision!r} pins a hub repo's commit, but {src!r} is a shipped head; drop it")
        return _resolve(shipped_head_dir(src), filename, None, hub_kwargs)
    elif "/" not in src:  # not a hub id (owner/name): answer at once instead of asking the hub
        raise FileNotFoundError(unknown_head_message(src))
    else:
        return _download(src, filename, revision, hub_kwargs)
    sidecar = weights + SIDECAR_SUFFIX
    return weights, (sidecar if os.path.isfile(sidecar) else None)


def _missing_in_folder(folder: str, filename: str | None, names: tuple[str, ...]) -> str:
    held = sorted(n for n in os.listdir(folder) if not n.endswith(SIDECAR_SUFFIX))[:8]
    if filename is not None:
        return (
            f"{folder}: no file {filename!r} in this folder (filename=); it holds {held}. Pass the name of the "
            f"weights file there, or drop filename= to look for {list(DEFAULT_FILENAMES)}"
        )
    return f"{folder}: no value-head weights (looked for {list(names)}; it holds {held}); pass filename="


def _download(
    repo_id: str, filename: str | None, revision: str | None, hub_kwargs: dict[str, Any]
) -> tuple[str, str | None]:
    names = (filename,) if filename is not None else DEFAULT_FILENAMES
    weights, offline = None, None
    if not hub_kwargs.get("local_files_only") and not hub_resolves():
        hub_kwargs = {**hub_kwargs, "local_files_only": True}  # no network: the cache answers at once
    for name in names:
        try:
            weights = hf_hub_download(repo_id, name, revision=revision, **hub_kwargs)
            break
        except EntryNotFoundError as e:  # absent from the repo, or (Local...) from the offline cache
            if isinstance(e, LocalEntryNotFoundError) and offline is None:
                # the hub is unreachable: the other names come from the local cache or not at all
                # (each retried download would wait out its own network timeouts)
                offline = e
                hub_kwargs = {**hub_kwargs, "local_files_only": True}
    if weights is None:
        where = f"hub repo {repo_id!r} (revision {revision or 'main'})"
        if offline is not None:
            raise FileNotFoundError(
                f"{where}: none of {list(names)} is in the local cache and the hub is unreachable; connect to the "
                "network once (the head is then cached), pass a local file or folder, or a shipped head's name "
                "(`vsteer heads`)"
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


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda == cuda:<current>, as tensor placement sees it."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index
