"""The write backlog against a real Redis that a test kills and restarts: chunks written while it
is dead wait in the backlog, reach another replica once it is back, within a bound in bytes."""

from __future__ import annotations

import pytest
import torch

from conftest import kv_chunk
from ragcache.kv import ChunkKey, KVChunk
from ragcache.storage.cpu import CpuTier
from ragcache.storage.gpu import GpuTier
from ragcache.storage.tiered import TieredStore
from ragcache.storage.redis import RedisTier
from redis_server import wait_until

SIZE = kv_chunk().nbytes
NAMES = "abcdefgh"


def chunk(i: int) -> KVChunk:
    base = kv_chunk()
    return KVChunk(base.token_ids, base.keys + i, base.values - i, base.model_fingerprint)


def same(a: KVChunk | None, b: KVChunk) -> bool:
    return a is not None and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.fixture
def make_store(throwaway_redis):
    """A replica: device and cpu tiers of `entries` chunks each over the throwaway Redis; closed afterwards."""
    stores = []

    def make(entries: int = 64, backlog_entries: int = 64) -> TieredStore:
        redis = RedisTier(throwaway_redis.url, namespace="backlog", model_fingerprint="fp", timeout_s=2.0)
        tiers = [GpuTier(entries * SIZE, device="cpu"), CpuTier(entries * SIZE), redis]
        stores.append(TieredStore(tiers, write_backlog_bytes=backlog_entries * SIZE))
        return stores[-1]

    yield make
    for store in stores:
        store.close()


def backlog(store: TieredStore) -> tuple[int, int]:
    counters = store.stats()["store"]
    return counters.backlog_entries, counters.backlog_bytes


def reachable(tier: RedisTier) -> bool:
    """True once a call has gone through to Redis (the tier's back-off closed again)."""
    tier.keys()
    return tier.stats().available


def test_chunks_put_while_redis_is_dead_reach_another_replica_after_it_restarts(make_store, throwaway_redis):
    writer = make_store()
    throwaway_redis.kill()
    assert writer.put_many([(ChunkKey(n), chunk(i)) for i, n in enumerate(NAMES)]) == [True] * 8  # locally
    assert writer.delete(ChunkKey("h"))  # deleted while waiting: never written
    counters = writer.stats()["store"]
    assert counters.write_through_failures == 8 and backlog(writer) == (7, 0)  # all still local: no bytes held
    redis_stats = writer.stats()["tiers"][2]
    assert not redis_stats.available and redis_stats.errors >= 1 and redis_stats.last_error

    throwaway_redis.start()  # same port, empty
    writer.start_sweeper(interval_s=0.05)
    wait_until(lambda: backlog(writer) == (0, 0), timeout_s=15)
    assert writer.stats()["store"].written_after_retry == 7 and writer.stats()["store"].backlog_dropped == 0
    redis_stats = writer.stats()["tiers"][2]
    assert redis_stats.available and redis_stats.last_error is None

    reader = make_store()  # another replica: its first connection may be slow on a loaded machine
    got = wait_until(lambda: (found := reader.get_many([ChunkKey(n) for n in NAMES]))[:7].count(None) == 0 and found,
                     timeout_s=15)
    assert all(same(g, chunk(i)) for i, g in enumerate(got[:7])) and got[7] is None
    assert reader.stats()["tiers"][2].hits >= 7


def test_the_backlog_keeps_evicted_chunks_within_its_bound_dropping_the_oldest(make_store, throwaway_redis):
    writer = make_store(entries=2, backlog_entries=3)  # 2 + 2 local chunks; 3 chunks' bytes of backlog
    throwaway_redis.kill()
    for i, name in enumerate(NAMES):
        assert writer.put(ChunkKey(name), chunk(i))
    # a-d left both local tiers (their write to Redis failed too): the backlog holds their chunks,
    # up to 3, so a, the oldest, was dropped; e-h are still local and cost it nothing
    counters = writer.stats()["store"]
    assert backlog(writer) == (7, 3 * SIZE) and counters.backlog_dropped == 1

    throwaway_redis.start()
    wait_until(lambda: reachable(writer.tiers[2]), timeout_s=15)
    assert writer.retry_backlog() == 7 and backlog(writer) == (0, 0)
    reader = make_store()  # another replica: its first connection may be slow on a loaded machine
    got = wait_until(lambda: (found := reader.get_many([ChunkKey(n) for n in NAMES]))[1:].count(None) == 0 and found,
                     timeout_s=15)
    assert got[0] is None and all(same(g, chunk(i)) for i, g in enumerate(got) if i > 0)


def test_close_writes_the_backlog_back(make_store, throwaway_redis):
    writer = make_store(entries=2)
    throwaway_redis.kill()
    for i, name in enumerate(NAMES):
        writer.put(ChunkKey(name), chunk(i))
    assert backlog(writer) == (8, 4 * SIZE)  # a-d held (evicted), e-h local
    throwaway_redis.start()
    wait_until(lambda: reachable(writer.tiers[2]), timeout_s=15)
    writer.close()  # no sweeper ran: write_back retries the backlog, then copies the local entries
    got = make_store().get_many([ChunkKey(n) for n in NAMES])
    assert all(same(g, chunk(i)) for i, g in enumerate(got))


def test_a_zero_backlog_keeps_nothing_and_counts_the_drops(make_store, throwaway_redis):
    writer = make_store(entries=1, backlog_entries=0)
    throwaway_redis.kill()
    for i, name in enumerate("abc"):
        writer.put(ChunkKey(name), chunk(i))
    assert backlog(writer) == (2, 0) and writer.stats()["store"].backlog_dropped == 1  # a, evicted, dropped
