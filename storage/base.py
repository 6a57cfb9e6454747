"""The two storage contracts: KVTier, what one tier does (GPU, CPU, Redis), and KVStore,
what the engine and the service call (TieredStore composes tiers into one)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from ragcache.kv import ChunkKey, KVChunk


class TierUsage(NamedTuple):
    name: str
    entries: int
    used_bytes: int
    max_bytes: int


@dataclass(frozen=True)
class PinHandle:
    """Proof of one pin: pass it to unpin(). expires_s is on the store's clock."""

    id: int
    key: ChunkKey
    tier: str
    expires_s: float


class KVTier(Protocol):
    """A place chunk caches live, with a byte budget.

    A local tier (a MemoryTier: device or host memory) is called by one thread at a time;
    the store serialises access. A remote tier (anything else, e.g. Redis) must be safe to
    call from many threads at once: the store calls it without holding its lock.
    A failing tier reports a miss, never an exception: callers fall back to recomputing.
    """

    name: str

    def get(self, key: ChunkKey) -> KVChunk | None:
        """The chunk under key, or None. Counts as a use for the eviction policy."""

    def put(self, key: ChunkKey, chunk: KVChunk) -> bool:
        """Store chunk, evicting others to fit; False if it cannot fit at all (nothing is evicted then)."""

    def contains(self, key: ChunkKey) -> bool:
        """Whether key is held; not a use."""

    def delete(self, key: ChunkKey) -> bool:
        """Drop key; False if it was not there."""

    def keys(self) -> list[ChunkKey]:
        """The keys held now (a remote tier's list may be approximate); how flushes find entries."""

    def usage(self) -> TierUsage: ...

    def stats(self) -> object:
        """A frozen snapshot of the tier's counters; never does I/O."""

    def get_many(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        """get() for each key, in order."""

    def put_many(self, items: Sequence[tuple[ChunkKey, KVChunk]]) -> list[bool]:
        """put() for each item, in order."""

    def close(self) -> None:
        """Release connections and threads; the tier is unusable afterwards. A no-op for memory tiers."""


class KVStore(Protocol):
    """The chunk-cache store the engine and the service use: tiers behind one face.

    Safe to call from any thread. Reads fall back to misses and writes to False when a tier
    fails; no method raises for a failing tier. Chunk keys are content hashes, so any copy
    found under a key is the right KV for it.
    """

    def get(self, key: ChunkKey) -> KVChunk | None:
        """get_many([key])[0]."""

    def get_many(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        """Each key's chunk from the fastest tier holding it, None for a miss, in order.
        A hit below the top tier is promoted to the top (it mutates placement, never content)."""

    def put(self, key: ChunkKey, chunk: KVChunk) -> bool:
        """put_many([(key, chunk)])[0]."""

    def put_many(self, items: Sequence[tuple[ChunkKey, KVChunk]]) -> list[bool]:
        """Store each chunk; per item, False if no tier took it."""

    def contains(self, key: ChunkKey) -> bool:
        """Whether any tier holds key; not a use, no promotion."""

    def delete(self, key: ChunkKey) -> bool:
        """Drop key from every tier, its pins included; False if no tier held it."""

    def prefetch(self, keys: Sequence[ChunkKey]) -> Future[list[KVChunk | None]]:
        """get_many(keys) started in the background; the future never fails. The caller computes
        meanwhile (the prefix, say) and may call the store: a slow remote read delays nobody else."""

    def pin(self, key: ChunkKey, ttl_s: float) -> PinHandle | None:
        """Keep key from eviction in the fastest local tier holding it, until unpin() or ttl_s
        (on the store's clock) passes; None if no local tier holds it. ttl_s <= 0 is a ValueError.
        Pins are counted: two pins on one key need two unpins."""

    def unpin(self, handle: PinHandle) -> bool:
        """Release one pin; False if it was already released, expired or its entry deleted."""

    def usage(self) -> TierUsage:
        """Entries and bytes summed over every tier (a key held in two tiers counts twice)."""

    def stats(self) -> dict:
        """A snapshot for admin endpoints: {"tiers": [each tier's stats(), fastest first],
        "store": the store's counters, "active_pins": int}."""

    @property
    def tier_names(self) -> list[str]:
        """The tiers' names, fastest first: what flush(tier=...) accepts."""

    def flush(self, tier: str | None = None, keys: Sequence[ChunkKey] | None = None) -> int:
        """Drop entries from every tier, or only the one named tier; every key, or only the given
        keys. Pins on dropped entries go with them. Returns the entries dropped, one per tier
        copy (a key in two flushed tiers counts 2). An unknown tier name is a ValueError naming
        the valid ones; keys=[] drops nothing."""

    def write_back(self) -> int:
        """Retry the remote writes that failed before (a TieredStore's write backlog), then copy
        local entries the remote tiers lack into them; returns how many were written. 0 with no
        remote tier."""

    def close(self) -> None:
        """Shut down: stop background work, then, with a remote tier, write_back() so hot local
        entries outlive the process, then close every tier. Calling it again is a no-op; the
        store is unusable afterwards."""
