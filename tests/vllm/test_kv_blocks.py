"""VFD's extra KV blocks and whole-block copies in every KV layout vLLM 0.32 can resolve (GPU backends included).

No engine: vLLM's own config builder and allocator (`allocate_kv_cache`) run on CPU tensors, so the
layouts only GPU backends pick (e.g. head-outside-block LHBNC, block-outermost BLHNC) are checked here.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

BLOCK, HEADS, HEAD_DIM, OLD_BLOCKS, EXTRA = 4, 2, 8, 5, 3


def _config(layout):
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, UniformTypeKVCacheSpecs

    # two specs in one group (as for models whose layers differ in head count): two KVCacheTensors with offsets
    wide = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=torch.float32)
    narrow = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=HEAD_DIM, dtype=torch.float32)
    specs = {"model.layers.0.attn": wide, "model.layers.1.attn": wide, "model.layers.2.attn": narrow}
    if not layout.is_block_compact:
        specs = {name: wide for name in specs}  # mixed page sizes need a block-compact layout
    group_spec = UniformTypeKVCacheSpecs(block_size=BLOCK, kv_cache_specs=specs)
    vllm_config = SimpleNamespace(
        attention_config=SimpleNamespace(hisparse_config=None),
        cache_config=SimpleNamespace(
            num_gpu_blocks_override=OLD_BLOCKS, prefix_cache_retention_interval=None,
            get_resolved_kv_cache_layout=lambda: layout,
        ),
    )
    groups = [KVCacheGroupSpec(layer_names=list(specs), kv_cache_spec=group_spec)]
    return vllm_config, get_kv_cache_config_from_groups(vllm_config, groups, available_memory=0)


# vLLM 0.32's KVCacheLayout members, named here so collection never imports vLLM (the conftest skips
# these tests where vLLM is missing); the first test checks the list is still complete.
LAYOUT_NAMES = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")


def _layout(name):
    from vllm.v1.kv_cache_layout import KVCacheLayout

    return KVCacheLayout[name]


def test_every_layout_of_this_vllm_is_checked():
    from vllm.v1.kv_cache_layout import KVCacheLayout

    assert sorted(layout.name for layout in KVCacheLayout) == sorted(LAYOUT_NAMES)


@pytest.mark.parametrize("layout_name", LAYOUT_NAMES)
def test_grown_cache_has_disjoint_blocks_and_copies_whole_blocks(layout_name):
    layout = _layout(layout_name)
    from vllm.v1.worker.utils import allocate_kv_cache

    from vsteer_hf.vllm.kv_blocks import check_block_views, copy_blocks, grow_kv_cache_config, zero_blocks

    vllm_config, config = _config(layout)
    grown = grow_kv_cache_config(vllm_config, config, EXTRA)
    assert vllm_config.cache_config.num_gpu_blocks_override == OLD_BLOCKS  # restored
    new = OLD_BLOCKS + EXTRA
    views = list(allocate_kv_cache(grown, torch.device("cpu"), layout).values())
    check_block_views(views, new)
    # every (layer, block) page gets its own value: any overlap between layers or blocks would overwrite one
    for layer, view in enumerate(views):
        for block in range(new):
            view[block] = 1000 * layer + block
    for layer, view in enumerate(views):
        assert [int(view[b].unique().item()) for b in range(new)] == [1000 * layer + b for b in range(new)]

    copy_blocks(views, src=[1, OLD_BLOCKS + 2], dst=[OLD_BLOCKS, 0])  # into scratch, and back into a real block
    zero_blocks(views, [3])
    for layer, view in enumerate(views):
        expected = [1000 * layer + b for b in range(new)]
        expected[OLD_BLOCKS], expected[0], expected[3] = 1000 * layer + 1, 1000 * layer + OLD_BLOCKS + 2, 0
        assert [int(view[b].unique().item()) for b in range(new)] == expected


def test_block_copy_is_exact_inside_a_block():
    """Slot order inside a block is untouched: each element lands where it was, whatever the layout."""
    from vsteer_hf.vllm.kv_blocks import copy_blocks

    cache = torch.randn(6, HEADS, BLOCK, 2 * HEAD_DIM).transpose(2, 3)  # a strided (transposed) view
    before = cache.clone()
    copy_blocks([cache], src=[2], dst=[5])
    assert torch.equal(cache[5], before[2]) and torch.equal(cache[:5], before[:5])


def test_views_whose_dim_0_is_not_the_block_are_refused():
    from vsteer_hf.vllm.kv_blocks import check_block_views

    with pytest.raises(ValueError, match="--block-size"):
        check_block_views([torch.zeros(16, 2, 16, 8)], num_blocks=8)  # kernel blocks of half the size
