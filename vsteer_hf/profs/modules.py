"""Where ProFS edits: the decoder blocks and each block's MLP value projection, found by inspection.

No table of model families: the blocks are the longest ModuleList under the decoder, the value
projection the dense intermediate -> hidden map fed by a hidden -> intermediate one.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

_MLP_NAME_PARTS = ("mlp", "ffn", "feed_forward", "feedforward")
_ATTENTION_NAME_PARTS = ("attn", "attention")


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
