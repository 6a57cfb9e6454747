"""TieredStore: reads go down the tiers and promote what they find; writes go to the top and spill down.

    tiers       fastest first, e.g. [gpu, cpu, redis]. Local tiers (device, host memory)
                are MemoryTiers; a remote tier (Redis) is anything else with the KVTier contract.
    read        gpu -> cpu -> redis; a hit below the top is promoted to the top tier.
    write       into the top local tier; what it evicts to make room is demoted to the next
                tier, and so on. With write_through (the default) every new chunk also goes to
                the remote tier at once, so other replicas can reuse it.
    pins        reference-counted handles with an expiry stored as data. A pinned entry is never
                evicted from its tier; release_expired() (run on every store call and by the
                optional sweeper thread) demotes entries whose last pin expired, never drops them.

A failing remote tier reports misses: reads fall back to recomputation, never to errors.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

from ragcache.kv import ChunkKey, KVChunk
from ragcache.storage.base import KVTier, PinHandle, TierUsage
from ragcache.storage.memory import MemoryTier

__all__ = ["PinHandle", "StoreCounters", "TieredStore"]


@dataclass
class StoreCounters:
    promotions: int = 0
    demotions: int = 0
    pins: int = 0
    pins_expired: int = 0
    write_through_failures: int = 0


class TieredStore:
    def __init__(
        self,
        tiers: Sequence[KVTier],
        *,
        write_through: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        names = [tier.name for tier in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self.tiers = list(tiers)
        self.local = [tier for tier in self.tiers if isinstance(tier, MemoryTier)]
        self.remote = [tier for tier in self.tiers if not isinstance(tier, MemoryTier)]
        if self.tiers[: len(self.local)] != self.local:
            raise ValueError("local (memory) tiers must come before remote ones")
        self.write_through = write_through
        self.clock = clock
        self.counters = StoreCounters()
        self._pins: dict[int, PinHandle] = {}
        self._pin_ids = itertools.count(1)
        self._lock = threading.RLock()
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragcache-prefetch")
        self._sweeper: threading.Thread | None = None
        self._closed = threading.Event()
        for depth, tier in enumerate(self.local):
            tier.on_evict = partial(self._demote, depth + 1)

    # reads

    def get(self, key: ChunkKey) -> KVChunk | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        """Look each key up tier by tier (one batched call per tier); promote hits below the top."""
        with self._lock:
            self.release_expired()
            results: list[KVChunk | None] = [None] * len(keys)
            missing = list(range(len(keys)))
            for depth, tier in enumerate(self.tiers):
                if not missing:
                    break
                found = tier.get_many([keys[i] for i in missing])
                for index, chunk in zip(missing, found):
                    results[index] = chunk
                    if chunk is not None and depth > 0:
                        self._promote(keys[index], chunk)
                missing = [i for i, chunk in zip(missing, found) if chunk is None]
            return results

    def prefetch(self, keys: Sequence[ChunkKey]) -> Future:
        """Start get_many(keys) in the background; the caller computes meanwhile and waits on the future."""
        return self._prefetcher.submit(self.get_many, list(keys))

    def contains(self, key: ChunkKey) -> bool:
        with self._lock:
            return any(tier.contains(key) for tier in self.tiers)

    # writes

    def put(self, key: ChunkKey, chunk: KVChunk) -> bool:
        return self.put_many([(key, chunk)])[0]

    def put_many(self, items: Sequence[tuple[ChunkKey, KVChunk]]) -> list[bool]:
        """Store each chunk in the fastest local tier that takes it; write through to the remote tiers."""
        with self._lock:
            self.release_expired()
            stored = [self._put_local(0, key, chunk) for key, chunk in items]
            for tier in self.remote:
                pending = [(k, c) for (k, c), done in zip(items, stored) if self.write_through or not done]
                if not pending:
                    continue
                written = tier.put_many(pending)
                self.counters.write_through_failures += written.count(False)
                written_keys = {k for (k, _), ok in zip(pending, written) if ok}
                stored = [done or key in written_keys for (key, _), done in zip(items, stored)]
            return stored

    def delete(self, key: ChunkKey) -> bool:
        """Remove key from every tier, pins included."""
        with self._lock:
            for handle in [h for h in self._pins.values() if h.key == key]:
                del self._pins[handle.id]
            return any([tier.delete(key) for tier in self.tiers])

    # pins

    def pin(self, key: ChunkKey, ttl_s: float) -> PinHandle | None:
        """Pin key in the fastest local tier holding it until unpin() or ttl_s; None if no local tier has it."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        with self._lock:
            for tier in self.local:
                if tier.pin(key):
                    handle = PinHandle(next(self._pin_ids), key, tier.name, self.clock() + ttl_s)
                    self._pins[handle.id] = handle
                    self.counters.pins += 1
                    return handle
            return None

    def unpin(self, handle: PinHandle) -> bool:
        """Release one pin; False if it was already released or expired."""
        with self._lock:
            if self._pins.pop(handle.id, None) is None:
                return False
            self._tier(handle.tier).unpin(handle.key)
            return True

    def release_expired(self) -> int:
        """Release pins past their expiry; an entry left with no pin is demoted one tier down."""
        with self._lock:
            now = self.clock()
            expired = [h for h in self._pins.values() if h.expires_s <= now]
            for handle in expired:
                del self._pins[handle.id]
                tier = self._tier(handle.tier)
                tier.unpin(handle.key)
                self.counters.pins_expired += 1
                if not tier.is_pinned(handle.key):
                    chunk = tier.pop(handle.key)
                    if chunk is not None:
                        self._demote(self.tiers.index(tier) + 1, handle.key, chunk)
            return len(expired)

    def start_sweeper(self, interval_s: float = 1.0) -> None:
        """Release expired pins every interval_s even when no request touches the store."""

        def sweep() -> None:
            while not self._closed.wait(interval_s):
                self.release_expired()

        if self._sweeper is None:
            self._sweeper = threading.Thread(target=sweep, name="ragcache-pin-sweeper", daemon=True)
            self._sweeper.start()

    def write_back(self) -> int:
        """Copy local entries the remote tiers lack into them (at shutdown: hot entries outlive the process)."""
        written = 0
        with self._lock:
            for remote in self.remote:
                for tier in self.local:
                    pending = [(key, tier.get(key)) for key in tier.keys() if not remote.contains(key)]
                    written += sum(remote.put_many(pending)) if pending else 0
        return written

    def close(self) -> None:
        self._closed.set()
        self._prefetcher.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()

    # accounting

    def usage(self) -> TierUsage:
        usages = [tier.usage() for tier in self.tiers]
        return TierUsage("tiered", sum(u.entries for u in usages), sum(u.used_bytes for u in usages),
                         sum(u.max_bytes for u in usages))

    def stats(self) -> dict:
        """A snapshot for admin endpoints: each tier's own stats plus the store's counters."""
        with self._lock:
            return {
                "tiers": [tier.stats() for tier in self.tiers],
                "store": StoreCounters(**vars(self.counters)),
                "active_pins": len(self._pins),
            }

    # internals

    def _put_local(self, depth: int, key: ChunkKey, chunk: KVChunk) -> bool:
        return any(tier.put(key, chunk) for tier in self.local[depth:])

    def _promote(self, key: ChunkKey, chunk: KVChunk) -> None:
        if self.local and self.local[0].put(key, chunk):
            self.counters.promotions += 1

    def _demote(self, depth: int, key: ChunkKey, chunk: KVChunk) -> None:
        """An entry leaves tier depth-1: keep it in the next tier down (unless it is already there)."""
        if depth >= len(self.tiers):
            return
        lower = self.tiers[depth]
        if lower.contains(key) or lower.put(key, chunk):
            self.counters.demotions += 1

    def _tier(self, name: str) -> KVTier:
        return next(tier for tier in self.tiers if tier.name == name)
