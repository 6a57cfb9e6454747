"""The contract every KV tier meets (GPU, CPU, Redis)."""

from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

from ragcache.kv import ChunkKey, KVChunk


class TierUsage(NamedTuple):
    name: str
    entries: int
    used_bytes: int
    max_bytes: int


class KVTier(Protocol):
    """A place chunk caches live, with a byte budget.

    Tiers are safe to call from one thread at a time; the caller serialises access.
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

    def usage(self) -> TierUsage: ...

    def get_many(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        """get() for each key, in order."""

    def put_many(self, items: Sequence[tuple[ChunkKey, KVChunk]]) -> list[bool]:
        """put() for each item, in order."""
