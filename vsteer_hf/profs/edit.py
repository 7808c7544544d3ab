"""The ProFS edit: the toxic subspace of preference pairs, projected out of MLP value matrices in place."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from vsteer_hf.profs.embeddings import layer_sentence_embeddings
from vsteer_hf.profs.modules import _check_layer_ids, _hidden_size, _linear_dims, _targets, decoder_layers
from vsteer_hf.profs.record import ProFSConfig, ProFSRecord, _library_version, default_k, default_layers


def toxic_subspace(
    preferred: torch.Tensor, non_preferred: torch.Tensor, k: int, centering: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis (H, k) of the toxic subspace and all singular values of the preference matrix.

    T = (preferred - non_preferred) / 2 (the reference code's sign; the subspace does not depend on
    it). Centering removes from T the top right-singular vector of the uncentered preferred
    embeddings, which carries the shared "mean sentence" direction rather than toxicity.
    """
    if preferred.ndim != 2 or preferred.shape != non_preferred.shape:
        raise ValueError(
            f"preferred {tuple(preferred.shape)} and non_preferred {tuple(non_preferred.shape)} must "
            "both be (N, H) with the same shape (row i of each is one pair)."
        )
    n, h = preferred.shape
    if not 1 <= k <= min(n, h):
        raise ValueError(f"k={k} must be in [1, min(pairs={n}, hidden={h})]; lower k or add pairs.")
    pref = preferred.float()
    t = (pref - non_preferred.float()) / 2  # (N, H)
    if centering:
        top = torch.linalg.svd(pref, full_matrices=False).Vh[0]  # (H,)
        t = t - torch.outer(t @ top, top)  # (N, H)
    _, s, vh = torch.linalg.svd(t, full_matrices=False)  # s (min(N, H),), vh (min(N, H), H)
    if s[k - 1] <= 1e-6 * s[0].clamp_min(1e-30):
        warnings.warn(
            f"k={k} exceeds the numerical rank of the preference matrix; the trailing basis vectors "
            "are arbitrary. Lower k.",
            stacklevel=2,
        )
    return vh[:k].T.contiguous(), s  # (H, k), (min(N, H),)


@torch.no_grad()
def project_out(module: nn.Module, basis: torch.Tensor, *, project_bias: bool = True) -> None:
    """In place, W <- (I - V Vᵀ) W on the output side of a Linear or Conv1D (and b <- (I - V Vᵀ) b).

    Afterwards no input can move the module's output along span(V). Computed in float32 and cast
    back, so in half precision the residual along V is at the dtype's rounding level.
    """
    dims = _linear_dims(module)
    if dims is None:
        raise TypeError(f"project_out needs an nn.Linear or Conv1D, got {type(module).__name__}.")
    weight = module.weight
    if weight.is_meta or not weight.dtype.is_floating_point:
        raise TypeError(
            f"Cannot edit a {weight.dtype} weight on {weight.device}: load the model unquantized and "
            "without disk/meta offloading."
        )
    if basis.ndim != 2 or basis.shape[0] != dims[1]:
        raise ValueError(f"basis {tuple(basis.shape)} must be (out={dims[1]}, k).")
    v = basis.to(weight.device, torch.float32)  # (H, k)
    w = weight.float()
    # Conv1D weight is (in, H): y = x W + b; Linear weight is (H, in): y = W x + b.
    w = w - (w @ v) @ v.T if isinstance(module, Conv1D) else w - v @ (v.T @ w)
    weight.copy_(w)
    if project_bias and module.bias is not None:
        b = module.bias.float()  # (H,)
        module.bias.copy_(b - v @ (v.T @ b))


def _resolve(config: ProFSConfig, model: nn.Module, num_pairs: int) -> tuple[int, list[int]]:
    num_layers = len(decoder_layers(model))
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.layers == "auto":
        layers = default_layers(num_layers, model_type)
    else:
        layers = _check_layer_ids(config.layers, num_layers)
    hidden = _hidden_size(model)
    k = default_k(hidden, num_pairs, model_type, num_layers) if config.k == "auto" else int(config.k)
    if k > min(num_pairs, hidden):
        raise ValueError(f"k={k} exceeds min(pairs={num_pairs}, hidden={hidden}); lower k, add pairs, or use k='auto'.")
    return k, layers


def apply_profs_from_embeddings(
    model: nn.Module,
    preferred: torch.Tensor,
    non_preferred: torch.Tensor,
    config: ProFSConfig | None = None,
) -> ProFSRecord:
    """Edit `model` IN PLACE from precomputed embeddings (see `apply_profs`).

    `preferred` / `non_preferred`: (len(layers), N, H) with one row per selected layer in ascending
    order, or (num_layers, N, H) as returned by `layer_sentence_embeddings(..., layers=None)`.
    """
    config = config or ProFSConfig()
    if preferred.ndim != 3 or preferred.shape != non_preferred.shape:
        raise ValueError(
            f"preferred {tuple(preferred.shape)} and non_preferred {tuple(non_preferred.shape)} must both "
            "be (layers, N, H) with the same shape."
        )
    num_pairs = preferred.shape[1]
    k, layers = _resolve(config, model, num_pairs)
    num_layers = len(decoder_layers(model))
    if preferred.shape[0] == len(layers):
        rows = list(range(len(layers)))
    elif preferred.shape[0] == num_layers:
        rows = layers
    else:
        raise ValueError(
            f"Embeddings have {preferred.shape[0]} layer rows; expected {len(layers)} (the edited layers "
            f"{layers}) or {num_layers} (all layers)."
        )
    targets = _targets(model, layers)  # fail before any edit if a layer has no MLP
    existing = getattr(model, "profs_record", None)
    if existing is not None:
        warnings.warn(
            "This model already carries a ProFS edit; the new projection is applied on top of it.",
            stacklevel=2,
        )
    singular_values: dict[int, list[float]] = {}
    for layer, row, (_, module) in zip(layers, rows, targets, strict=True):
        basis, s = toxic_subspace(preferred[row], non_preferred[row], k, config.centering)  # (H, k)
        project_out(module, basis, project_bias=config.project_bias)
        singular_values[layer] = s.tolist()
    previous: list[dict[str, Any]] = []
    if existing is not None:
        previous = [*existing.previous, {**existing.to_dict(), "previous": []}]
    record = ProFSRecord(
        num_pairs=num_pairs,
        k=k,
        layers=layers,
        modules=[name for name, _ in targets],
        singular_values=singular_values,
        centering=config.centering,
        project_bias=config.project_bias,
        max_length=config.max_length,
        pooling=config.pooling,
        drop_first=config.drop_first,
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        library_version=_library_version(),
        previous=previous,
    )
    model.profs_record = record
    return record


def apply_profs(
    model: nn.Module,
    tokenizer: Any,
    preferred_texts: Sequence[str],
    non_preferred_texts: Sequence[str],
    config: ProFSConfig | None = None,
    show_progress: bool = True,
) -> ProFSRecord:
    """Project each selected layer's toxic subspace out of its MLP value matrix. Edits the model IN PLACE.

    Pair i is (preferred_texts[i], non_preferred_texts[i]), e.g. (non-toxic, toxic). Returns the
    record, also attached as `model.profs_record`; warns if the model already carries one (edits
    stack). The edited model runs at the base model's speed and saves like any other.
    """
    config = config or ProFSConfig()
    preferred_texts, non_preferred_texts = list(preferred_texts), list(non_preferred_texts)
    if not preferred_texts or len(preferred_texts) != len(non_preferred_texts):
        raise ValueError(
            f"Need equally many preferred ({len(preferred_texts)}) and non-preferred "
            f"({len(non_preferred_texts)}) texts, at least one pair."
        )
    _, layers = _resolve(config, model, len(preferred_texts))
    _targets(model, layers)  # fail before the expensive forward passes

    def embed(texts: list[str]) -> torch.Tensor:
        return layer_sentence_embeddings(
            model,
            tokenizer,
            texts,
            config.batch_size,
            layers,
            show_progress,
            config.max_length,
            pooling=config.pooling,
            drop_first=config.drop_first,
        )  # (len(layers), N, H)

    return apply_profs_from_embeddings(model, embed(preferred_texts), embed(non_preferred_texts), config)
