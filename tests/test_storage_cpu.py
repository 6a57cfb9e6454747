"""The CPU tier: byte budget, LRU order, refusal of what cannot fit."""

import torch

from ragcache.kv import ChunkKey, KVChunk
from ragcache.storage.cpu import CpuTier


def chunk(tokens: int) -> KVChunk:
    return KVChunk(tuple(range(tokens)), torch.zeros(1, 1, tokens, 2), torch.zeros(1, 1, tokens, 2), "fp")


def test_least_recently_used_goes_first():
    tier = CpuTier(max_bytes=3 * chunk(4).nbytes)
    for name in "abc":
        assert tier.put(ChunkKey(name), chunk(4))
    tier.get(ChunkKey("a"))  # a is now the most recent
    tier.put(ChunkKey("d"), chunk(4))
    assert [tier.contains(ChunkKey(n)) for n in "abcd"] == [True, False, True, True]
    assert tier.usage().used_bytes == 3 * chunk(4).nbytes and tier.stats().evictions == 1


def test_too_large_is_refused_without_evicting():
    tier = CpuTier(max_bytes=chunk(4).nbytes)
    tier.put(ChunkKey("a"), chunk(4))
    assert not tier.put(ChunkKey("big"), chunk(5))
    assert tier.contains(ChunkKey("a")) and tier.stats().rejected == 1


def test_replacing_a_key_keeps_bytes_right():
    tier = CpuTier(max_bytes=1 << 20)
    tier.put(ChunkKey("a"), chunk(4))
    tier.put(ChunkKey("a"), chunk(6))
    assert tier.usage().entries == 1 and tier.usage().used_bytes == chunk(6).nbytes
    assert tier.delete(ChunkKey("a")) and not tier.delete(ChunkKey("a"))
    assert tier.usage().used_bytes == 0
