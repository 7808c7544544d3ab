"""The KV-cache side of in-engine VFD: extra blocks past the scheduler's, and whole-block copies.

vLLM 0.32 keeps one backing allocation for all layers and views it, per layer, as a logical
`[blocks, heads, slots, bytes]` tensor whatever the backend (RFC #42082: the backend picks only the
stride order, `KVCacheLayout`). So block `b` is index `b` of dim 0 of every runner cache view, on CPU
and GPU alike; a whole-block copy needs no knowledge of the slot layout (the CPU fp32 path stores
keys transposed inside a block, which only single-slot copies would have to know).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from copy import deepcopy
from typing import Any

import torch


def grow_kv_cache_config(vllm_config: Any, kv_cache_config: Any, extra_blocks: int) -> Any:
    """A copy of vLLM's `KVCacheConfig` with `extra_blocks` more blocks, laid out by vLLM's own builder.

    Strides and offsets depend on the block count in layouts where the layer (or head) dim is
    physically outside the block dim, so they are rebuilt with `get_kv_cache_config_from_groups`
    (the function vLLM itself uses to resize a config) rather than patched.
    """
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups

    if getattr(vllm_config.attention_config, "hisparse_config", None) is not None or any(
        tensor.host_resident for tensor in kv_cache_config.kv_cache_tensors
    ):
        raise ValueError("VFD scratch blocks do not support host-resident KV caches; turn hisparse off.")
    new = kv_cache_config.num_blocks + extra_blocks
    with _block_count(vllm_config.cache_config, new):
        rebuilt = get_kv_cache_config_from_groups(vllm_config, kv_cache_config.kv_cache_groups, available_memory=0)
    old_layers = [tensor.layers for tensor in kv_cache_config.kv_cache_tensors]
    if rebuilt.num_blocks != new or [tensor.layers for tensor in rebuilt.kv_cache_tensors] != old_layers:
        raise RuntimeError("vLLM rebuilt a different KV cache layout for the VFD scratch blocks; use vLLM 0.32.")
    grown = deepcopy(kv_cache_config)
    grown.num_blocks = new
    grown.kv_cache_tensors = rebuilt.kv_cache_tensors
    return grown


@contextmanager
def _block_count(cache_config: Any, num_blocks: int) -> Iterator[None]:
    """`num_gpu_blocks_override` set to `num_blocks` for one builder call, then restored."""
    saved = cache_config.num_gpu_blocks_override
    cache_config.num_gpu_blocks_override = num_blocks
    try:
        yield
    finally:
        cache_config.num_gpu_blocks_override = saved


def check_block_views(kv_caches: Sequence[torch.Tensor], num_blocks: int) -> None:
    """Refuse cache views whose dim 0 is not the scheduler's block (kernel-block splitting, raw pages)."""
    for cache in kv_caches:
        if cache.dim() < 2 or cache.shape[0] != num_blocks:
            raise ValueError(
                f"VFD copies whole KV blocks along dim 0, but this cache view has shape {tuple(cache.shape)} for "
                f"{num_blocks} blocks (kernel blocks smaller than the manager's, or a non-attention cache); "
                "pick a --block-size the attention backend takes as is."
            )


def _distinct_views(kv_caches: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Each layer's cache view once (layers may share one view)."""
    seen: set[tuple[torch.device, int]] = set()
    for cache in kv_caches:
        key = (cache.device, cache.data_ptr())
        if key not in seen:
            seen.add(key)
            yield cache


def _block_index(blocks: Sequence[int], device: torch.device, made: dict[torch.device, torch.Tensor]) -> torch.Tensor:
    """`blocks` as a long tensor on `device`, built once per device for one call."""
    if device not in made:
        made[device] = torch.as_tensor(list(blocks), dtype=torch.long).to(device)
    return made[device]


def copy_blocks(kv_caches: Sequence[torch.Tensor], src: Sequence[int], dst: Sequence[int]) -> None:
    """Block `dst[i]` := block `src[i]` in every layer's cache (each shared view once)."""
    if not len(src):
        return
    sources: dict[torch.device, torch.Tensor] = {}
    targets: dict[torch.device, torch.Tensor] = {}
    for cache in _distinct_views(kv_caches):
        cache[_block_index(dst, cache.device, targets)] = cache[_block_index(src, cache.device, sources)]


def zero_blocks(kv_caches: Sequence[torch.Tensor], blocks: Sequence[int]) -> None:
    """Zero `blocks` in every layer's cache, as vLLM zeroes freshly allocated blocks."""
    if not len(blocks):
        return
    made: dict[torch.device, torch.Tensor] = {}
    for cache in _distinct_views(kv_caches):
        cache[_block_index(blocks, cache.device, made)] = 0
