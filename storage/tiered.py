"""TieredStore: reads go down the tiers and promote what they find; writes go to the top and spill down.

    tiers       fastest first, e.g. [gpu, cpu, redis]. Local tiers (device, host memory)
                are MemoryTiers; a remote tier (Redis) is anything else with the KVTier contract.
    read        gpu -> cpu -> redis; a hit below the top is promoted to the top tier.
    write       into the top local tier; what it evicts to make room is demoted to the next
                tier, and so on. With write_through (the default) every new chunk also goes to
                the remote tier at once, so other replicas can reuse it.
    pins        reference-counted handles with an expiry stored as data. A pinned entry is never
                evicted from its tier; release_expired() (run on every store call and by the
                optional sweeper thread) demotes entries whose last pin expired, never drops them
                (the bottom local tier keeps them when nothing is below it).
    locking     one lock guards the local tiers, the pins and the counters, and is never held
                across a remote call: a read looks in the local tiers under it, asks the remote
                tiers without it, then takes it again to promote. Entries the local tiers evict
                into a remote tier wait in a spill list and are written once the lock is released.
                So a local hit (the prefix, say) never waits behind a slow remote prefetch.
    backlog     a remote write that fails (Redis down) is kept in a write backlog, oldest first, and
                retried by retry_backlog(): from the sweeper thread every interval and by write_back()
                at close, never on the request path, so a dead Redis costs requests nothing more. An
                entry whose chunk is still in a local tier holds no bytes (the retry reads it there);
                one that left every local tier holds its chunk, and those bytes are bounded: past
                write_backlog_bytes the oldest are dropped (counted). Deleting or flushing a key
                forgets it. The remote tier's own back-off paces the retries: while it skips Redis
                a retry is one refused write of the oldest entry.

A failing remote tier reports misses: reads fall back to recomputation, never to errors.
Since remote writes happen outside the lock, a delete racing another thread's write of the
same key may leave that copy in the remote tier; keys are content hashes, so it is stale
space, never wrong KV.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from ragcache.kv import ChunkKey, KVChunk
from ragcache.storage.backlog import WriteBacklog
from ragcache.storage.base import KVStore, KVTier, PinHandle, TierRoom, TierUsage
from ragcache.storage.memory import MemoryTier

__all__ = ["PinHandle", "StoreCounters", "TieredStore"]


_RETRY_BATCH_BYTES = 32 << 20  # chunk bytes per put_many a retry sends
DEFAULT_WRITE_BACKLOG_BYTES = 256 << 20


@dataclass
class StoreCounters:
    promotions: int = 0
    demotions: int = 0
    pins: int = 0
    pins_expired: int = 0
    write_through_failures: int = 0  # new chunks the remote tier did not take at once
    backlog_entries: int = 0  # remote writes waiting for a retry, now
    backlog_bytes: int = 0  # chunk bytes the backlog holds now (entries still local hold none)
    written_after_retry: int = 0
    backlog_dropped: int = 0  # oldest entries dropped to keep the backlog within its bytes


class TieredStore:
    """A KVStore over tiers; see the module docstring for reads, writes, pins and locking."""

    def __init__(
        self,
        tiers: Sequence[KVTier],
        *,
        write_through: bool = True,
        clock: Callable[[], float] = time.monotonic,
        write_backlog_bytes: int = DEFAULT_WRITE_BACKLOG_BYTES,
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
        self._clock = clock
        self.counters = StoreCounters()
        self._pins: dict[int, PinHandle] = {}
        self._pin_ids = itertools.count(1)
        self._lock = threading.Lock()  # not reentrant: public methods take it once, helpers assume it
        self._spill: list[tuple[ChunkKey, KVChunk]] = []  # evicted from the last local tier, for remote[0]
        self._backlog = WriteBacklog(write_backlog_bytes)
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragcache-prefetch")
        self._sweeper: threading.Thread | None = None
        self._closed = threading.Event()
        for depth, tier in enumerate(self.local):
            tier.on_evict = partial(self._demote, depth + 1)

    @property
    def clock(self) -> Callable[[], float]:
        """The clock pin expiries are on (given at construction)."""
        return self._clock

    @property
    def tier_names(self) -> list[str]:
        return [tier.name for tier in self.tiers]

    # reads

    def get(self, key: ChunkKey) -> KVChunk | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        """Local tiers under the lock, remote tiers without it (one batched call per tier), then promote."""
        results: list[KVChunk | None] = [None] * len(keys)
        with self._locked():
            self._release_expired()
            not_on_top = _read(self.local[:1], keys, results, list(range(len(keys))))
            missing = _read(self.local[1:], keys, results, not_on_top)
            self._promote([(keys[i], chunk) for i in not_on_top if (chunk := results[i]) is not None])
        if missing and self.remote:
            _read(self.remote, keys, results, missing)
            with self._locked():
                self._promote([(keys[i], chunk) for i in missing if (chunk := results[i]) is not None])
        return results

    def prefetch(self, keys: Sequence[ChunkKey]) -> Future[list[KVChunk | None]]:
        """Start get_many(keys) in the background; the caller computes meanwhile and waits on the future."""
        return self._prefetcher.submit(self.get_many, list(keys))

    def contains(self, key: ChunkKey) -> bool:
        with self._lock:
            if any(tier.contains(key) for tier in self.local):
                return True
        return any(tier.contains(key) for tier in self.remote)

    # writes

    def put(self, key: ChunkKey, chunk: KVChunk) -> bool:
        return self.put_many([(key, chunk)])[0]

    def put_many(self, items: Sequence[tuple[ChunkKey, KVChunk]]) -> list[bool]:
        """Store each chunk in the fastest local tier that takes it (under the lock); then, without
        the lock, write through to the remote tiers (or only what no local tier took, without write_through)."""
        with self._locked():
            self._release_expired()
            stored = [any(tier.put(key, chunk) for tier in self.local) for key, chunk in items]
        local = list(stored)
        for tier in self.remote:
            pending = [(k, c, here) for (k, c), here in zip(items, local) if self.write_through or not here]
            if not pending:
                continue
            written = tier.put_many([(k, c) for k, c, _ in pending])
            if self._backlog or not all(written):
                with self._lock:
                    for (key, chunk, here), ok in zip(pending, written):
                        if ok:
                            self._backlog.forget(tier.name, key)
                        else:
                            self._backlog.add(tier.name, key, None if here else chunk)
                            self.counters.write_through_failures += 1
            written_keys = {k for (k, _, _), ok in zip(pending, written) if ok}
            stored = [done or key in written_keys for (key, _), done in zip(items, stored)]
        return stored

    def delete(self, key: ChunkKey) -> bool:
        """Remove key from every tier, pins included."""
        with self._lock:
            self._drop_pins(lambda handle: handle.key == key)
            self._backlog.forget(key=key)
            deleted = [tier.delete(key) for tier in self.local]
        deleted += [tier.delete(key) for tier in self.remote]
        return any(deleted)

    def flush(self, tier: str | None = None, keys: Sequence[ChunkKey] | None = None) -> int:
        """Drop every key (or the given ones) from every tier (or the named one); entries dropped, per tier copy."""
        if tier is not None and tier not in self.tier_names:
            raise ValueError(f"tier must be one of {self.tier_names}, got {tier!r}")
        chosen = [t for t in self.tiers if tier in (None, t.name)]
        wanted = None if keys is None else list(dict.fromkeys(keys))
        dropped = 0
        with self._lock:
            for remote in (t for t in chosen if t in self.remote):
                for key in [None] if wanted is None else wanted:
                    self._backlog.forget(remote.name, key)
            for local in (t for t in chosen if t in self.local):
                doomed = set(local.keys() if wanted is None else [k for k in wanted if local.contains(k)])
                # called at once, within this iteration: the loop variables are the ones meant
                self._drop_pins(lambda handle: handle.tier == local.name and handle.key in doomed)  # noqa: B023
                dropped += sum(local.delete(k) for k in doomed)
        for remote in (t for t in chosen if t in self.remote):
            dropped += sum(remote.delete(k) for k in (remote.keys() if wanted is None else wanted))
        return dropped

    def write_back(self) -> int:
        """Retry the backlog, then copy local entries the remote tiers lack into them (at shutdown: hot
        entries outlive the process). The local entries are read under the lock, the remote tiers
        written without it."""
        if not self.remote:
            return 0
        retried = self.retry_backlog()
        with self._lock:
            snapshot: dict[ChunkKey, KVChunk] = {}
            for tier in reversed(self.local):  # the fastest tier's copy wins
                snapshot.update((key, chunk) for key in tier.keys() if (chunk := tier.get(key)) is not None)
        written = 0
        for remote in self.remote:
            pending = [(key, chunk) for key, chunk in snapshot.items() if not remote.contains(key)]
            written += sum(remote.put_many(pending)) if pending else 0
        return retried + written

    def retry_backlog(self) -> int:
        """Write the backlog into its remote tiers, oldest first: the oldest entry alone, then batches
        of about 32 MiB, until a tier refuses one (its back-off then decides when a retry reaches
        Redis again). Entries whose chunk has left every local tier since are forgotten. Returns
        the entries written. The lock is held to pick and to settle a batch, never across the write."""
        written = 0
        for tier in self.remote:
            limit_bytes = 0  # the first batch is the oldest entry alone: a cheap probe
            while batch := self._backlog_batch(tier.name, limit_bytes):
                results = tier.put_many(batch)
                with self._lock:
                    for (key, _), ok in zip(batch, results):
                        if ok:
                            self._backlog.forget(tier.name, key)
                    self.counters.written_after_retry += sum(results)
                written += sum(results)
                if not all(results):
                    break
                limit_bytes = _RETRY_BATCH_BYTES
        return written

    # pins

    def pin(self, key: ChunkKey, ttl_s: float, tier: str | None = None) -> PinHandle | None:
        """Pin key in the fastest local tier holding it (or in tier, copied there) until unpin() or ttl_s;
        None if no local tier has it, or tier cannot take it."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        if tier is not None and tier not in {local.name for local in self.local}:
            raise ValueError(f"no local tier named {tier!r}; local tiers: {[local.name for local in self.local]}")
        with self._locked():  # copying into tier may evict into Redis: the spill
            for local in self.local if tier is None else [self._local(tier)]:
                if not local.contains(key) and tier is not None:
                    chunk = self._peek_local(key)
                    if chunk is None or not local.put(key, chunk):
                        return None
                if local.pin(key):
                    handle = PinHandle(next(self._pin_ids), key, local.name, self._clock() + ttl_s)
                    self._pins[handle.id] = handle
                    self.counters.pins += 1
                    return handle
            return None

    def unpin(self, handle: PinHandle) -> bool:
        """Release one pin; False if it was already released or expired."""
        with self._lock:
            if self._pins.pop(handle.id, None) is None:
                return False
            self._local(handle.tier).unpin(handle.key)
            return True

    def release_expired(self) -> int:
        """Release pins past their expiry; an entry left with no pin is demoted one tier down."""
        with self._locked():
            return self._release_expired()

    def start_sweeper(self, interval_s: float = 1.0) -> None:
        """Release expired pins and retry the write backlog every interval_s, even when no request
        touches the store."""

        def sweep() -> None:
            while not self._closed.wait(interval_s):
                self.release_expired()
                self.retry_backlog()

        if self._sweeper is None:
            self._sweeper = threading.Thread(target=sweep, name="ragcache-pin-sweeper", daemon=True)
            self._sweeper.start()

    def close(self) -> None:
        """Stop the sweeper and the prefetcher, write back what the remote tiers lack, close every tier."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._sweeper is not None:
            self._sweeper.join()
        self._prefetcher.shutdown(wait=True)
        self.write_back()
        for tier in self.tiers:
            tier.close()

    def below_top(self, keys: Sequence[ChunkKey]) -> list[ChunkKey]:
        """The keys the top tier does not hold (a prefetch's work); not a use."""
        with self._lock:
            return [key for key in keys if not self.local[0].contains(key)] if self.local else list(keys)

    def held_locally(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [any(tier.contains(key) for tier in self.local) for key in keys]

    def touch(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                for tier in self.local:
                    if tier.touch(key):
                        break

    def local_room(self) -> list[TierRoom]:
        """Each local tier, fastest first: its byte budget and the bytes pins hold in it."""
        with self._lock:
            return [TierRoom(tier.name, tier.max_bytes, tier.stats().pinned_bytes) for tier in self.local]

    # accounting

    def usage(self) -> TierUsage:
        with self._lock:
            usages = [tier.usage() for tier in self.local]
        usages += [tier.usage() for tier in self.remote]
        return TierUsage(
            "tiered",
            sum(u.entries for u in usages),
            sum(u.used_bytes for u in usages),
            sum(u.max_bytes for u in usages),
        )

    def stats(self) -> dict:
        """A snapshot for admin endpoints: each tier's own stats plus the store's counters."""
        with self._lock:
            local = [tier.stats() for tier in self.local]
            counters = StoreCounters(
                **{
                    **vars(self.counters),
                    "backlog_entries": len(self._backlog),
                    "backlog_bytes": self._backlog.held_bytes,
                    "backlog_dropped": self._backlog.dropped,
                }
            )
            active_pins = len(self._pins)
        return {"tiers": local + [tier.stats() for tier in self.remote], "store": counters, "active_pins": active_pins}

    # internals (the lock held unless said otherwise)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The lock, and after its release (not on an error) the spill written to the remote tier."""
        with self._lock:
            yield
            spill, self._spill = self._spill, []
        if spill:
            self._write_spill(spill)

    def _write_spill(self, spill: list[tuple[ChunkKey, KVChunk]]) -> None:
        """Without the lock: demote entries evicted from the last local tier into the first remote one;
        the backlog keeps what it refuses (with the chunk: no local tier has it any more)."""
        lower, unique = self.remote[0], dict(spill)
        pending = [(key, chunk) for key, chunk in unique.items() if not lower.contains(key)]
        written = lower.put_many(pending) if pending else []
        with self._lock:
            self.counters.demotions += len(unique) - len(pending) + sum(written)
            for (key, chunk), ok in zip(pending, written):
                if ok:
                    self._backlog.forget(lower.name, key)
                else:
                    self._backlog.add(lower.name, key, chunk)

    def _backlog_batch(self, tier: str, limit_bytes: int) -> list[tuple[ChunkKey, KVChunk]]:
        """The tier's oldest waiting writes, about limit_bytes of chunks (at least one), each read from
        a local tier when the backlog does not hold it; those no tier holds any more are forgotten."""
        batch: list[tuple[ChunkKey, KVChunk]] = []
        with self._lock:
            for key, held in self._backlog.oldest(tier):
                chunk = held if held is not None else self._peek_local(key)
                if chunk is None:
                    self._backlog.forget(tier, key)
                    continue
                batch.append((key, chunk))
                limit_bytes -= chunk.nbytes
                if limit_bytes <= 0:
                    break
        return batch

    def _peek_local(self, key: ChunkKey) -> KVChunk | None:
        """The fastest local copy of key (a get: it counts as a use, as write_back's reads do)."""
        tier = next((tier for tier in self.local if tier.contains(key)), None)
        return tier.get(key) if tier is not None else None

    def _release_expired(self) -> int:
        now = self._clock()
        expired = [h for h in self._pins.values() if h.expires_s <= now]
        for handle in expired:
            del self._pins[handle.id]
            tier = self._local(handle.tier)
            tier.unpin(handle.key)
            self.counters.pins_expired += 1
            depth = self.local.index(tier) + 1
            if not tier.is_pinned(handle.key) and (depth < len(self.local) or self.remote):
                chunk = tier.pop(handle.key)  # the bottom local tier keeps it when nothing is below
                if chunk is not None:
                    self._demote(depth, handle.key, chunk)
        return len(expired)

    def _promote(self, found: list[tuple[ChunkKey, KVChunk]]) -> None:
        for key, chunk in found:
            if self.local and self.local[0].put(key, chunk):
                self.counters.promotions += 1

    def _demote(self, depth: int, key: ChunkKey, chunk: KVChunk) -> None:
        """An entry leaves local tier depth-1: keep it in the next tier down (unless it is already there).
        Into a local tier at once; into the remote tier through the spill, once the lock is released."""
        if depth < len(self.local):
            lower = self.local[depth]
            if lower.contains(key) or lower.put(key, chunk):
                self.counters.demotions += 1
        elif self.remote:
            self._spill.append((key, chunk))

    def _drop_pins(self, matches: Callable[[PinHandle], bool]) -> None:
        for handle in [h for h in self._pins.values() if matches(h)]:
            del self._pins[handle.id]

    def _local(self, name: str) -> MemoryTier:
        return next(tier for tier in self.local if tier.name == name)


def _read(
    tiers: Sequence[KVTier], keys: Sequence[ChunkKey], results: list[KVChunk | None], missing: list[int]
) -> list[int]:
    """Fill results[i] for each index in missing from tiers in order (one batched call per tier);
    returns the indexes still missing."""
    for tier in tiers:
        if not missing:
            break
        for index, chunk in zip(missing, tier.get_many([keys[i] for i in missing])):
            results[index] = chunk
        missing = [i for i in missing if results[i] is None]
    return missing


if TYPE_CHECKING:  # the type checker holds TieredStore to the KVStore contract
    _store: type[KVStore] = TieredStore
