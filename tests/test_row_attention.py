"""Attention of concurrent rows, each over its own cache (RowCaches): every row gets exactly what the
one-token attention gives it alone, the caches hold exactly what a span write puts there, and a
released cache frees its memory and cannot be stepped on."""
from __future__ import annotations

import pytest
import torch

from chatglm.config import ChatGLMConfig
from chatglm.model.attention import row_token_attention, token_attention
from chatglm.model.cache import KVCache, RowCaches, cache_usage

CFG = ChatGLMConfig(num_layers=2, num_attention_heads=8, multi_query_group_num=2, kv_channels=32)


def _pair(capacities, dtype, gen):
    """Two sets of one-row caches holding the same random contents."""
    a = [KVCache(CFG, 1, c, "cpu", dtype) for c in capacities]
    b = [KVCache(CFG, 1, c, "cpu", dtype) for c in capacities]
    for x, y in zip(a, b):
        for name in ("k", "v"):
            values = torch.randn(getattr(x, name).shape, generator=gen).to(dtype)
            getattr(x, name).copy_(values)
            getattr(y, name).copy_(values)
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_equals_its_own_one_token_attention_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(3)
    lengths, capacities = [0, 5, 17, 39], [4, 9, 40, 40]
    batched, alone = _pair(capacities, dtype, gen)
    B, H, G, D = len(lengths), CFG.num_attention_heads, CFG.multi_query_group_num, CFG.kv_channels
    for layer in range(CFG.num_layers):
        q = torch.randn(B, H, 1, D, generator=gen).to(dtype)
        k = torch.randn(B, G, 1, D, generator=gen).to(dtype)
        v = torch.randn(B, 1, G, D, generator=gen).to(dtype).transpose(1, 2)  # strided, as the model's
        got = row_token_attention(q, k, v, RowCaches(batched, lengths), layer)
        for b, n in enumerate(lengths):
            keys, values = alone[b].write_span(layer, n, k[b:b + 1], v[b:b + 1])
            want = token_attention(q[b:b + 1], keys, values, torch.ones(1, n + 1, dtype=torch.bool))
            assert torch.equal(got[b:b + 1], want), f"row {b} differs from its attention alone"
    for x, y in zip(batched, alone):
        assert torch.equal(x.k, y.k) and torch.equal(x.v, y.v)
        x.release()
        y.release()


def test_a_row_sees_only_its_own_positions():
    """Garbage beyond a row's length (a longer neighbour's positions, stale values) changes nothing."""
    gen = torch.Generator().manual_seed(5)
    caches, _ = _pair([16, 16], torch.float32, gen)
    q = torch.randn(2, 8, 1, 32, generator=gen)
    k, v = torch.randn(2, 2, 1, 32, generator=gen), torch.randn(2, 2, 1, 32, generator=gen)
    first = row_token_attention(q, k, v, RowCaches(caches, [3, 9]), 0)
    caches[0].k[:, :, :, 4:] = 1e4  # positions after row 0's token
    second = row_token_attention(q, k, v, RowCaches(caches, [3, 9]), 0)
    assert torch.equal(first[0], second[0])
    for c in caches:
        c.release()


def test_a_released_cache_frees_its_layer_views_and_is_refused():
    before = cache_usage()
    cache = KVCache(CFG, 1, 8, "cpu", torch.float32)
    cache.append(0, 0, torch.ones(1, 2, 1, 32), torch.ones(1, 2, 1, 32))
    storage = cache.k.untyped_storage()
    cache.release()
    assert cache_usage().live == before.live and "_layers" not in cache.__dict__
    assert torch._C._storage_Use_Count(storage._cdata) == 1, "per-layer views kept the released keys alive"
    with pytest.raises(RuntimeError, match="used after release"):
        RowCaches([cache], [0])
    with pytest.raises(ValueError, match="room at position 8"):
        RowCaches([KVCache(CFG, 1, 8, "cpu", torch.float32)], [8])
