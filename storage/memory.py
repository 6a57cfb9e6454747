"""An in-process tier on one torch device: byte budget, eviction policy, pins.

The GPU tier (gpu.py) and the CPU tier (cpu.py) are this class on different devices.
Eviction never touches a pinned entry; when the unpinned entries cannot make room, the
put is refused and nothing is evicted, so a refused put never costs the tier an entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ragcache.kv import ChunkKey, KVChunk
from ragcache.storage.base import KVTier, TierUsage
from ragcache.storage.eviction import LRU, EntryInfo, EvictionPolicy

EvictSink = Callable[[ChunkKey, KVChunk], None]


@dataclass
class TierCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    rejected: int = 0  # puts refused: bigger than the budget, or only pinned entries left to evict


@dataclass(frozen=True)
class MemoryTierStats:
    name: str
    entries: int
    used_bytes: int
    max_bytes: int
    pinned_entries: int
    pinned_bytes: int
    hits: int
    misses: int
    evictions: int
    rejected: int


class MemoryTier:
    def __init__(
        self,
        name: str,
        max_bytes: int,
        device: str | torch.device = "cpu",
        policy: EvictionPolicy | None = None,
        pin_memory: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"{name} tier: max_bytes must be positive, got {max_bytes}")
        self.name = name
        self.max_bytes = max_bytes
        self.device = torch.device(device)
        self.policy = policy or LRU()
        self.pin_memory = pin_memory
        self.clock = clock
        self.used_bytes = 0
        self.counters = TierCounters()
        self.on_evict: EvictSink | None = None  # set by TieredStore: where evicted entries go
        self._chunks: dict[ChunkKey, KVChunk] = {}
        self._info: dict[ChunkKey, EntryInfo] = {}
        self._pins: dict[ChunkKey, int] = {}  # key -> pin count

    def get(self, key: ChunkKey) -> KVChunk | None:
        chunk = self._chunks.get(key)
        if chunk is None:
            self.counters.misses += 1
            return None
        self.touch(key)
        self.counters.hits += 1
        return chunk

    def touch(self, key: ChunkKey) -> bool:
        """A use of key that is not a read (the eviction policy sees it; hit counters do not); False if absent."""
        info = self._info.get(key)
        if info is None:
            return False
        info.touch(self.clock(), getattr(self.policy, "half_life_s", 600.0))
        return True

    def put(self, key: ChunkKey, chunk: KVChunk) -> bool:
        previous = self._chunks.get(key)
        needed = chunk.nbytes - (previous.nbytes if previous is not None else 0)
        victims = self._victims(needed, exclude=key)
        if victims is None:
            self.counters.rejected += 1
            return False
        for victim in victims:
            evicted = self._remove(victim)
            self.counters.evictions += 1
            if self.on_evict is not None:
                self.on_evict(victim, evicted)
        now = self.clock()
        info = self._info.get(key) or EntryInfo(key, chunk.nbytes, chunk.num_tokens, now, now, uses=1, score=1.0)
        info.nbytes = chunk.nbytes
        if previous is not None:
            self.used_bytes -= previous.nbytes
        self._chunks[key] = self._to_device(chunk)
        self._info[key] = info
        self.used_bytes += chunk.nbytes
        return True

    def contains(self, key: ChunkKey) -> bool:
        return key in self._chunks

    def keys(self) -> list[ChunkKey]:
        return list(self._chunks)

    def delete(self, key: ChunkKey) -> bool:
        if key not in self._chunks:
            return False
        self._remove(key)
        self._pins.pop(key, None)
        return True

    def pop(self, key: ChunkKey) -> KVChunk | None:
        """Remove and return an entry (pinned or not): how the store demotes it."""
        if key not in self._chunks:
            return None
        self._pins.pop(key, None)
        return self._remove(key)

    def pin(self, key: ChunkKey) -> bool:
        """Protect key from eviction until unpin(); False if it is not here."""
        if key not in self._chunks:
            return False
        self._pins[key] = self._pins.get(key, 0) + 1
        return True

    def unpin(self, key: ChunkKey) -> None:
        count = self._pins.get(key, 0) - 1
        if count > 0:
            self._pins[key] = count
        else:
            self._pins.pop(key, None)

    def is_pinned(self, key: ChunkKey) -> bool:
        return key in self._pins

    def usage(self) -> TierUsage:
        return TierUsage(self.name, len(self._chunks), self.used_bytes, self.max_bytes)

    def get_many(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        return [self.get(key) for key in keys]

    def put_many(self, items: Sequence[tuple[ChunkKey, KVChunk]]) -> list[bool]:
        return [self.put(key, chunk) for key, chunk in items]

    def close(self) -> None:
        """Nothing to release: the entries go with the tier."""

    def stats(self) -> MemoryTierStats:
        c = self.counters
        pinned_bytes = sum(self._chunks[key].nbytes for key in self._pins)
        return MemoryTierStats(
            self.name,
            len(self._chunks),
            self.used_bytes,
            self.max_bytes,
            len(self._pins),
            pinned_bytes,
            c.hits,
            c.misses,
            c.evictions,
            c.rejected,
        )

    def _victims(self, needed: int, exclude: ChunkKey) -> list[ChunkKey] | None:
        """Unpinned keys to evict, lowest priority first, so that needed more bytes fit; None if impossible."""
        free = self.max_bytes - self.used_bytes
        if needed <= free:
            return []
        now = self.clock()
        candidates = sorted(
            (k for k in self._chunks if k not in self._pins and k != exclude),
            key=lambda k: self.policy.priority(self._info[k], now),
        )
        victims = []
        for key in candidates:
            if needed <= free:
                break
            victims.append(key)
            free += self._chunks[key].nbytes
        return victims if needed <= free else None

    def _remove(self, key: ChunkKey) -> KVChunk:
        chunk = self._chunks.pop(key)
        del self._info[key]
        self.used_bytes -= chunk.nbytes
        return chunk

    def _to_device(self, chunk: KVChunk) -> KVChunk:
        if chunk.keys.device == self.device and not self.pin_memory:
            return chunk
        keys, values = chunk.keys.to(self.device), chunk.values.to(self.device)
        if self.pin_memory:
            keys, values = keys.pin_memory(), values.pin_memory()
        return KVChunk(chunk.token_ids, keys, values, chunk.model_fingerprint, chunk.start_pos)


if TYPE_CHECKING:  # the type checker holds MemoryTier to the KVTier contract
    _tier: type[KVTier] = MemoryTier
