"""ProFS (Projection Filter for Subspaces, Uppaal et al., ICLR 2025) weight editing for causal LMs.

Per layer, the top singular directions of paired (preferred, non-preferred) sentence-embedding
differences span a "toxic" subspace, which is projected out of the output side of that layer's MLP
value matrix. Dense Linear/Conv1D MLPs only (no mixture-of-experts, no quantized weights); in place.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

__all__ = [
    "PROFS_RECORD_NAME",
    "ProFSConfig",
    "ProFSRecord",
    "apply_profs",
    "apply_profs_from_embeddings",
    "decoder_layers",
    "default_k",
    "default_layers",
    "find_value_projection",
    "layer_sentence_embeddings",
    "load_profs_record",
    "preference_pairs_from_cache",
    "project_out",
    "read_pairs_jsonl",
    "save_profs_model",
    "toxic_subspace",
]

PROFS_RECORD_NAME = "profs_edit.json"
_MLP_NAME_PARTS = ("mlp", "ffn", "feed_forward", "feedforward")
_ATTENTION_NAME_PARTS = ("attn", "attention")


# ----------------------------------------------------------------------------- locating modules


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the largest `nn.ModuleList` under `model.get_decoder()` (no family table)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    lists = [m for m in decoder.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of decoder layers under get_decoder() "
            f"({type(decoder).__name__}); ProFS needs a stack of transformer blocks."
        )
    return max(lists, key=len)


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    hidden = getattr(config, "hidden_size", None)
    if hidden is None:
        hidden = model.get_input_embeddings().weight.shape[1]
    return int(hidden)


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a dense projection; GPT-2's Conv1D stores its weight as (in, out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def _value_candidates(modules: list[tuple[str, nn.Module]], hidden: int) -> list[tuple[str, nn.Module]]:
    """Projections intermediate -> hidden that are fed by some hidden -> intermediate projection."""
    dense = [(name, mod, dims) for name, mod in modules if (dims := _linear_dims(mod)) is not None]
    found = [
        (name, mod, d_in)
        for name, mod, (d_in, d_out) in dense
        if d_out == hidden and any(o2 == d_in and i2 == hidden for _, m2, (i2, o2) in dense if m2 is not mod)
    ]
    # When intermediate == hidden the in-projections qualify too; prefer a true up/down pair, then
    # the last registered module (registration order follows the forward pass in HF models).
    proper = [c for c in found if c[2] != hidden]
    return [(name, mod) for name, mod, _ in (proper or found)]


def find_value_projection(layer: nn.Module, hidden_size: int) -> tuple[str, nn.Module]:
    """The MLP output ("value") projection of one decoder block, as (name inside the block, module).

    Searched in order: children named like mlp/ffn/feed_forward (e.g. `mlp.down_proj`, GPT-2's
    `mlp.c_proj`), dense children of the block itself (OPT's `fc2`), then any non-attention child.
    """
    children = list(layer.named_children())
    mlp_like = [(n, c) for n, c in children if any(p in n.lower() for p in _MLP_NAME_PARTS)]
    other = [
        (n, c) for n, c in children if (n, c) not in mlp_like and not any(p in n.lower() for p in _ATTENTION_NAME_PARTS)
    ]
    scopes = [[(f"{n}.{s}" if s else n, m) for s, m in c.named_modules()] for n, c in mlp_like]
    scopes.append(children)
    scopes += [[(f"{n}.{s}" if s else n, m) for s, m in c.named_modules()] for n, c in other]
    for scope in scopes:
        experts = [n for n, _ in scope if "expert" in n.lower()]
        if experts:
            raise NotImplementedError(
                f"{type(layer).__name__} has a mixture-of-experts MLP ({experts[0]}); ProFS here edits dense MLPs only."
            )
        candidates = _value_candidates(scope, hidden_size)
        if candidates:
            return candidates[-1]
    listing = ", ".join(f"{n} ({type(c).__name__})" for n, c in children) or "none"
    raise ValueError(
        f"No MLP output projection found in {type(layer).__name__}: expected an nn.Linear or Conv1D "
        f"mapping the intermediate size to hidden_size={hidden_size}, fed by one mapping hidden_size to "
        f"it, inside a child named like {'/'.join(_MLP_NAME_PARTS)} or on the block itself. "
        f"The block's submodules: {listing}."
    )


def _targets(model: nn.Module, layers: Sequence[int]) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the value projection of each selected layer."""
    blocks = decoder_layers(model)
    hidden = _hidden_size(model)
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for idx in layers:
        local, module = find_value_projection(blocks[idx], hidden)
        out.append((names.get(id(module), f"layers.{idx}.{local}"), module))
    return out


# ----------------------------------------------------------------------------- embeddings


def _check_layer_ids(layers: Sequence[int], num_layers: int) -> list[int]:
    ids = sorted({int(i) for i in layers})
    bad = [i for i in ids if not 0 <= i < num_layers]
    if not ids or bad:
        raise ValueError(
            f"layers={list(layers)!r} is invalid: give a non-empty list of indices in [0, {num_layers}) "
            f"(this model has {num_layers} decoder layers), or 'auto'."
        )
    return ids


@torch.inference_mode()
def layer_sentence_embeddings(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 8,
    layers: Sequence[int] | None = None,
    show_progress: bool = True,
    max_length: int | None = None,
) -> torch.Tensor:
    """Mean over real tokens of each decoder layer's output, as float32 (num_layers, N, H) on CPU.

    Outputs are read with forward hooks on the blocks: they equal `hidden_states[1:]` of
    `output_hidden_states=True`, except the last, which HF returns after the final norm (the ProFS
    reference recomputes that layer to get it pre-norm too). Texts are tokenized unpadded and
    right-padded here, so the tokenizer needs no pad token and is never modified, and each text gets
    the positions it would have alone; the attention mask excludes the padding from the mean.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    texts = list(texts)
    blocks = decoder_layers(model)
    layer_ids = list(range(len(blocks))) if layers is None else _check_layer_ids(layers, len(blocks))
    encoded = tokenizer(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]
    empty = [i for i, ids in enumerate(encoded) if len(ids) == 0]
    if empty:
        raise ValueError(f"Texts at positions {empty[:5]} tokenize to no tokens; drop or fill them.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model.get_input_embeddings().weight.device
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model

    pooled: dict[int, list[torch.Tensor]] = {i: [] for i in layer_ids}
    state: dict[str, torch.Tensor] = {}

    def make_hook(idx: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            hs = output[0] if isinstance(output, (tuple, list)) else output  # (B, T, H)
            mask = state["mask"].to(hs.device, torch.float32).unsqueeze(-1)  # (B, T, 1)
            pooled[idx].append(((hs.float() * mask).sum(1) / mask.sum(1)).cpu())  # (B, H)

        return hook

    handles = [blocks[i].register_forward_hook(make_hook(i)) for i in layer_ids]
    was_training = model.training
    model.eval()  # dropout would make the embeddings random
    try:
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="ProFS embeddings", disable=not show_progress):
            batch = encoded[start : start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.as_tensor(ids)
                mask[row, : len(ids)] = 1
            state["mask"] = mask
            decoder(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return torch.stack([torch.cat(pooled[i]) for i in layer_ids])  # (num_layers, N, H)


# ----------------------------------------------------------------------------- subspace and edit


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


# ----------------------------------------------------------------------------- config and record


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


# ----------------------------------------------------------------------------- entry points


def _resolve(config: ProFSConfig, model: nn.Module, num_pairs: int) -> tuple[int, list[int]]:
    num_layers = len(decoder_layers(model))
    layers = default_layers(num_layers) if config.layers == "auto" else _check_layer_ids(config.layers, num_layers)
    hidden = _hidden_size(model)
    k = default_k(hidden, num_pairs) if config.k == "auto" else int(config.k)
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
            model, tokenizer, texts, config.batch_size, layers, show_progress, config.max_length
        )  # (len(layers), N, H)

    return apply_profs_from_embeddings(model, embed(preferred_texts), embed(non_preferred_texts), config)


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


# ----------------------------------------------------------------------------- preference pairs

PreferencePair = tuple[str, str, str]  # (prompt, preferred text, non-preferred text)


def preference_pairs_from_cache(
    workdir_or_cache: str | Path | Any, split: str = "train", max_pairs: int | None = None
) -> list[PreferencePair]:
    """(prompt, prompt + non-toxic continuation, prompt + toxic continuation) from a labelled pipeline cache.

    `workdir_or_cache`: a pipeline work folder (uses its `features/`), a feature-cache folder, or a
    `FeatureCache`. Only sequences of `split` (default the training split: never pair held-out prompts)
    with a label are used; label >= 0.5 is toxic. Each prompt with both kinds of samples gives one pair
    per toxic sample, paired with its safe samples in turn, all in sample order. `max_pairs` keeps the
    first pairs round-robin across prompts (every prompt's first pair, then every second pair, ...).
    Prompt and generation text come from the cache index, else from its `generations.jsonl`.
    """
    from vsteer_hf.train.features import FeatureCache

    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs={max_pairs} must be >= 1 (or None for all pairs).")
    if isinstance(workdir_or_cache, FeatureCache):
        cache = workdir_or_cache
    else:
        folder = Path(workdir_or_cache)
        if (folder / "features").is_dir():
            folder = folder / "features"
        if not folder.is_dir():
            raise FileNotFoundError(f"{workdir_or_cache}: no such pipeline work folder or feature cache.")
        cache = FeatureCache(folder)
    texts: dict[tuple[Any, int], tuple[str, str]] = {}
    generations_file = cache.directory / "generations.jsonl"
    if generations_file.is_file():
        for line in generations_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                item = json.loads(line)
                texts[(item["prompt_id"], int(item["sample"]))] = (item["prompt"], item["generation"])
    by_prompt: dict[Any, dict[str, list[tuple[int, str]]]] = {}
    prompt_of: dict[Any, str] = {}
    labelled = 0
    for record in cache.records:
        if record.get("split") != split or record.get("label") is None:
            continue
        labelled += 1
        key = (record["prompt_id"], int(record["sample"]))
        if "prompt" in record and "generation" in record:
            prompt, generation = record["prompt"], record["generation"]
        elif key in texts:
            prompt, generation = texts[key]
        else:
            raise ValueError(
                f"{cache.directory}: sequence {key} has no prompt/generation text in the index or in "
                "generations.jsonl; re-run `vsteer extract`."
            )
        prompt_of.setdefault(key[0], prompt)
        kind = "toxic" if float(record["label"]) >= 0.5 else "safe"
        by_prompt.setdefault(key[0], {"safe": [], "toxic": []})[kind].append((key[1], generation))
    if labelled == 0:
        raise ValueError(
            f"{cache.directory}: no labelled sequences in split {split!r} (splits: {cache.splits}); "
            "run `vsteer label` first."
        )
    rounds: list[list[PreferencePair]] = []
    for prompt_id, groups in by_prompt.items():
        safe, toxic = sorted(groups["safe"]), sorted(groups["toxic"])
        if not safe or not toxic:
            continue
        prompt = prompt_of[prompt_id]
        for i, (_, bad) in enumerate(toxic):
            good = safe[i % len(safe)][1]
            if len(rounds) <= i:
                rounds.append([])
            rounds[i].append((prompt, prompt + good, prompt + bad))
    pairs = [pair for round_pairs in rounds for pair in round_pairs]
    return pairs if max_pairs is None else pairs[:max_pairs]


def read_pairs_jsonl(path: str | Path) -> list[PreferencePair]:
    """Preference pairs from a JSON-lines file: one ``{"prompt", "preferred", "non_preferred"}`` object a line.

    ``preferred`` / ``non_preferred`` are continuations of ``prompt`` (which may be empty or absent, for
    pairs of whole texts); returns (prompt, prompt + preferred, prompt + non_preferred) like
    `preference_pairs_from_cache`.
    """
    from vsteer_hf.eval.prompts import iter_jsonl

    path = Path(path)
    pairs = []
    for lineno, item in iter_jsonl(path):
        prompt = item.get("prompt", "") if isinstance(item, dict) else None
        good = item.get("preferred") if isinstance(item, dict) else None
        bad = item.get("non_preferred") if isinstance(item, dict) else None
        if not all(isinstance(x, str) for x in (prompt, good, bad)):
            raise ValueError(
                f"{path}:{lineno}: expected an object with string 'preferred' and 'non_preferred' (and an "
                f"optional string 'prompt'), got {json.dumps(item)[:200]}"
            )
        pairs.append((prompt, prompt + good, prompt + bad))
    if not pairs:
        raise ValueError(f"{path}: no preference pairs in the file.")
    return pairs
