"""The storage contracts: KVTier, what one tier does (GPU, CPU, Redis); KVStore, what the engine
and the service call (TieredStore composes tiers into one); PrefixCache, every request's KV as
paths of blocks in a KVStore (prefix.py), what the engine, the agents layer and admin use."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from ragcache.kv import ChunkKey, KVChunk

if TYPE_CHECKING:
    from ragcache.storage.prefix import CachedPath, PathPin, PrefixHit


class TierUsage(NamedTuple):
    name: str
    entries: int
    used_bytes: int
    max_bytes: int


class TierRoom(NamedTuple):
    """A local tier's byte budget and what pins hold of it: what pin budgets are computed from."""

    name: str
    max_bytes: int
    pinned_bytes: int


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

    def pin(self, key: ChunkKey, ttl_s: float, tier: str | None = None) -> PinHandle | None:
        """Keep key from eviction in the fastest local tier holding it (or in the named local tier,
        copied there from the one holding it), until unpin() or ttl_s (on the store's clock) passes;
        None if no local tier holds it, or the named one has no room. ttl_s <= 0, or a tier that is
        not local, is a ValueError. Pins are counted: two pins on one key need two unpins."""

    def unpin(self, handle: PinHandle) -> bool:
        """Release one pin; False if it was already released, expired or its entry deleted."""

    def release_expired(self) -> int:
        """Release pins past their expiry (an entry left unpinned is demoted one tier down, where there is
        one); how many."""

    @property
    def clock(self) -> Callable[[], float]:
        """The clock pin expiries are on."""

    def below_top(self, keys: Sequence[ChunkKey]) -> list[ChunkKey]:
        """The keys the top tier does not hold (what a prefetch would move); not a use."""

    def held_locally(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Per key, whether a local tier holds it (no remote call); not a use."""

    def touch(self, keys: Sequence[ChunkKey]) -> None:
        """Count each key as used now in the fastest local tier holding it, in order (the last one most
        recent), as a read would, without promoting it or asking a remote tier."""

    def local_room(self) -> list[TierRoom]:
        """Each local tier, fastest first: its byte budget and the bytes pins hold in it."""

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


class PrefixCache(Protocol):
    """Every request's KV as a path of blocks in a per-tenant radix tree over token ids (prefix.py).

    Thread-safe. Lookups and writes do store I/O (off the step loop); the rest is bookkeeping.
    variant names what produced the KV ("exact" for full prefill's): paths of different variants
    never share blocks."""

    block_tokens: int
    reclaimer: Callable[[int, str], int] | None  # set by the agents layer: reclaim(nbytes, tier) -> pins released

    @property
    def clock(self) -> Callable[[], float]:
        """The clock pin expiries are on."""

    def block_keys(self, namespace: str, variant: str, ids: Sequence[int], tail: bool = False) -> list[ChunkKey]:
        """The chained keys of ids' whole blocks (and with tail, of the part block after them)."""

    def match(self, namespace: str, variant: str, ids: Sequence[int]) -> PrefixHit:
        """The longest prefix of ids whose KV the store holds: whole blocks found by key anywhere (another
        replica's included), then the tokens a known block after them shares with ids."""

    def known(self, keys: Sequence[ChunkKey]) -> int:
        """Leading blocks of a path (its block_keys with tail) stored: in this process's tree and, with local
        tiers, still held there (no remote call); they count as used now."""

    def insert(
        self,
        namespace: str,
        variant: str,
        keys: Sequence[ChunkKey],
        num_tokens: int,
        start_block: int,
        blocks: Sequence[KVChunk],
    ) -> CachedPath:
        """Store the KV of a path's blocks from start_block on (keys: its block_keys with tail); the path."""

    def tenant_blocks(self, namespace: str) -> list[ChunkKey]:
        """The tenant's blocks this process knows of."""

    def label(self, namespace: str, program_id: str, path: CachedPath) -> None:
        """path is the program's latest."""

    def label_prompt(self, namespace: str, program_id: str, prompt_ids: Sequence[int]) -> list[tuple[str, str]]:
        """An implicit program's latest prompt; the (tenant, program) pairs forgotten to make room."""

    def continued(self, namespace: str, ids: Sequence[int]) -> str | None:
        """The implicit program whose latest prompt ids wholly extends, if any."""

    def program_path(self, namespace: str, program_id: str) -> CachedPath | None: ...

    def forget(self, namespace: str, program_id: str) -> bool:
        """The program ended: drop its label and conversation; its blocks age out."""

    def programs(self) -> list[tuple[str, str, int]]:
        """(tenant, program id, tokens of its latest path)."""

    def pin_path(self, path: CachedPath, ttl_s: float, tier: str | None = None) -> PathPin | None:
        """Every block pinned for ttl_s in the named local tier (the top one by default), brought there
        first; None when a block is gone or the tier has no room for it."""

    def unpin_path(self, pin: PathPin) -> bool:
        """Release; True if every block's pin still held."""

    def extend_pin(self, pin: PathPin, ttl_s: float) -> PathPin | None:
        """The path pinned again for ttl_s from now, the old pin released; None if it cannot be."""

    def promote(self, path: CachedPath) -> int:
        """Prefetch the path's blocks to the top tier; the tokens that moved."""

    def release_expired(self) -> int:
        """Let the store release pins past their expiry."""

    def room(self) -> list[TierRoom]:
        """Each local tier, fastest first: bytes and pinned bytes."""

    def stats(self) -> dict:
        """nodes, cached tokens and bytes, lookups, hit tokens, hit rate, evictions, pins, prefetches."""
