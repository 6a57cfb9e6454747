"""Host-memory tier: chunk caches as tensors in process memory, LRU within a byte budget."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from ragcache.kv import ChunkKey, KVChunk
from ragcache.storage.base import TierUsage


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    rejected: int = 0


class CpuTier:
    """Least-recently-used chunks go first when a put would pass max_bytes.

    The OrderedDict is the recency list: a get moves its key to the end, eviction pops
    from the front.
    """

    def __init__(self, max_bytes: int, name: str = "cpu") -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.name = name
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self.stats = TierStats()
        self._entries: OrderedDict[ChunkKey, KVChunk] = OrderedDict()

    def get(self, key: ChunkKey) -> KVChunk | None:
        chunk = self._entries.get(key)
        if chunk is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return chunk

    def put(self, key: ChunkKey, chunk: KVChunk) -> bool:
        if chunk.nbytes > self.max_bytes:
            self.stats.rejected += 1
            return False
        self.delete(key)
        while self.used_bytes + chunk.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.used_bytes -= evicted.nbytes
            self.stats.evictions += 1
        self._entries[key] = chunk
        self.used_bytes += chunk.nbytes
        return True

    def contains(self, key: ChunkKey) -> bool:
        return key in self._entries

    def delete(self, key: ChunkKey) -> bool:
        chunk = self._entries.pop(key, None)
        if chunk is None:
            return False
        self.used_bytes -= chunk.nbytes
        return True

    def usage(self) -> TierUsage:
        return TierUsage(self.name, len(self._entries), self.used_bytes, self.max_bytes)

    def get_many(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        return [self.get(key) for key in keys]

    def put_many(self, items: Sequence[tuple[ChunkKey, KVChunk]]) -> list[bool]:
        return [self.put(key, chunk) for key, chunk in items]
