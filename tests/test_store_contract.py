"""The KVStore contract on a TieredStore over real Redis: flush, write-back at close, and a lock
never held across remote I/O (a local hit does not wait behind a stalled Redis)."""

from __future__ import annotations

import inspect
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from conftest import kv_chunk
from ragcache.kv import ChunkKey
from ragcache.storage.base import KVStore, KVTier
from ragcache.storage.cpu import CpuTier
from ragcache.storage.gpu import GpuTier
from ragcache.storage.memory import MemoryTier
from ragcache.storage.tiered import TieredStore
from ragcache.storage.redis import RedisTier

SIZE = kv_chunk().nbytes


class SteppingClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 0.001  # every reading is a distinct, later instant: LRU order is exact
        return self.now


class ObservedRedisTier(RedisTier):
    """A real RedisTier that says when a read or a write has begun, so a test can stall it there."""

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        self.reading, self.writing = threading.Event(), threading.Event()

    def get_many(self, keys):
        self.reading.set()
        return super().get_many(keys)

    def put_many(self, items):
        self.writing.set()
        return super().put_many(items)


@pytest.fixture
def make_store():
    """TieredStore(device of device_entries chunks, cpu of cpu_entries, *remote); closed afterwards."""
    stores = []

    def make(*remote, device_entries=2, cpu_entries=4, write_through=True):
        clock = SteppingClock()
        device, cpu = GpuTier(device_entries * SIZE, device="cpu"), CpuTier(cpu_entries * SIZE)
        device.clock = cpu.clock = clock
        stores.append(TieredStore([device, cpu, *remote], write_through=write_through, clock=clock))
        return stores[-1]

    yield make
    for store in stores:
        store.close()


@contextmanager
def paused(server):
    """The server process stopped (SIGSTOP): every request to it hangs until the block ends."""
    with server.client() as client:
        pid = int(client.info("server")["process_id"])
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def held(tier, names="abcz"):
    return "".join(n for n in names if tier.contains(ChunkKey(n)))


@pytest.mark.parametrize("contract, implementation", [(KVStore, TieredStore), (KVTier, MemoryTier), (KVTier, RedisTier)])
def test_implementations_have_their_contracts_methods(contract, implementation):
    for name, member in vars(contract).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            assert isinstance(inspect.getattr_static(implementation, name), property), name
            continue
        declared = list(inspect.signature(member).parameters)
        assert list(inspect.signature(getattr(implementation, name)).parameters) == declared, name


def test_a_local_hit_returns_while_a_remote_prefetch_is_stalled(make_store, throwaway_redis):
    remote = ObservedRedisTier(throwaway_redis.url, namespace="stall", timeout_s=10)
    store = make_store(remote)
    prefix, doc = kv_chunk(4), kv_chunk(6)
    store.put(ChunkKey("prefix"), prefix)
    assert remote.put(ChunkKey("doc"), doc)  # in Redis only
    with paused(throwaway_redis):
        loading = store.prefetch([ChunkKey("doc")])
        assert remote.reading.wait(timeout=5)  # the prefetch is inside Redis's read now
        started = time.perf_counter()
        found = store.get(ChunkKey("prefix"))
        elapsed_s = time.perf_counter() - started
        assert found is not None and found.token_ids == prefix.token_ids
        assert elapsed_s < 0.5 and not loading.done()
    (loaded,) = loading.result(timeout=5)
    assert loaded is not None and loaded.token_ids == doc.token_ids
    assert held(store.local[0], names=["doc"]) == "doc"  # promoted once Redis answered
    assert store.stats()["store"].promotions == 1


def test_a_local_hit_returns_while_a_write_through_is_stalled(make_store, throwaway_redis):
    remote = ObservedRedisTier(throwaway_redis.url, namespace="stall", timeout_s=10)
    store = make_store(remote)
    store.put(ChunkKey("prefix"), kv_chunk(4))
    remote.writing.clear()
    with ThreadPoolExecutor(max_workers=1) as pool:
        with paused(throwaway_redis):
            writing = pool.submit(store.put, ChunkKey("doc"), kv_chunk(6))
            assert remote.writing.wait(timeout=5)
            started = time.perf_counter()
            assert store.get(ChunkKey("doc")) is not None  # stored locally before the write-through began
            assert store.get(ChunkKey("prefix")) is not None
            assert time.perf_counter() - started < 0.5 and not writing.done()
        assert writing.result(timeout=5) is True
    assert remote.contains(ChunkKey("doc")) and store.stats()["store"].write_through_failures == 0


def test_flush_by_tier_and_keys_counts_each_copy(make_store, redis_url, redis_namespace):
    redis = RedisTier(redis_url, namespace=redis_namespace)
    store = make_store(redis)
    device, cpu = store.local
    for name in "abc":
        store.put(ChunkKey(name), kv_chunk())
    store.get(ChunkKey("a"))  # promoted to the device tier; b makes room and goes down
    assert (held(device), held(cpu), held(redis)) == ("ac", "ab", "abc")

    assert store.flush(tier="cpu", keys=[ChunkKey("a"), ChunkKey("z")]) == 1
    assert (held(device), held(cpu), held(redis)) == ("ac", "b", "abc")
    assert store.flush(keys=[ChunkKey("c"), ChunkKey("c")]) == 2  # the device copy and the Redis copy
    assert (held(device), held(cpu), held(redis)) == ("a", "b", "ab")
    assert store.flush(keys=[]) == 0
    assert store.flush(tier="redis") == 2
    assert (held(device), held(cpu), held(redis)) == ("a", "b", "")
    assert store.flush() == 2 and store.flush() == 0
    assert store.usage().entries == 0
    with pytest.raises(ValueError, match=r"tier must be one of \['device', 'cpu', 'redis'\], got 'disk'"):
        store.flush(tier="disk")


def test_flush_drops_the_pins_of_what_it_drops_and_no_others(make_store):
    store = make_store()
    for name in "abc":
        store.put(ChunkKey(name), kv_chunk())  # device: b c, cpu: a
    on_device, on_cpu = store.pin(ChunkKey("b"), ttl_s=60), store.pin(ChunkKey("a"), ttl_s=60)
    assert (on_device.tier, on_cpu.tier) == ("device", "cpu")
    assert store.flush(tier="cpu") == 1
    assert store.stats()["active_pins"] == 1
    assert not store.unpin(on_cpu) and store.unpin(on_device)


def test_write_back_copies_what_redis_lacks_once(make_store, redis_url, redis_namespace):
    redis = RedisTier(redis_url, namespace=redis_namespace)
    store = make_store(redis, write_through=False)
    for name in "abc":
        store.put(ChunkKey(name), kv_chunk())  # local only: device b c, cpu a
    assert redis.put(ChunkKey("z"), kv_chunk())
    assert held(redis) == "z"
    assert store.write_back() == 3 and held(redis) == "abcz"
    assert store.write_back() == 0


def test_close_writes_local_entries_back_to_redis(make_store, redis_url, redis_namespace):
    store = make_store(RedisTier(redis_url, namespace=redis_namespace), write_through=False)
    for name in "abc":
        store.put(ChunkKey(name), kv_chunk(len(name) + 3))
    reader = RedisTier(redis_url, namespace=redis_namespace)
    try:
        assert reader.keys() == []
        store.close()
        store.close()  # a second close is a no-op
        assert sorted(reader.keys()) == [ChunkKey(n) for n in "abc"]
        assert reader.get(ChunkKey("a")).token_ids == kv_chunk(4).token_ids
    finally:
        reader.close()


def test_a_local_only_store_writes_nothing_back_and_closes(make_store):
    store = make_store()
    store.put(ChunkKey("a"), kv_chunk())
    assert store.tier_names == ["device", "cpu"]
    assert store.write_back() == 0
    store.close()


def test_budgets_and_pins_hold_with_threads_reading_and_writing_through_redis(make_store, redis_url, redis_namespace):
    store = make_store(RedisTier(redis_url, namespace=redis_namespace), device_entries=3, cpu_entries=5)

    def work(seed):
        rng = random.Random(seed)
        for step in range(300):
            key = ChunkKey(str(rng.randrange(20)))
            if rng.random() < 0.4:
                store.put(key, kv_chunk(rng.choice([2, 4, 6])))
            elif step % 7 == 0:
                store.prefetch([key, ChunkKey(str(rng.randrange(20)))]).result()
            elif rng.random() < 0.85:
                store.get(key)
            elif (handle := store.pin(key, ttl_s=60)) is not None:
                assert store.unpin(handle)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(work, range(4)))
    for tier in store.local:
        assert tier.used_bytes <= tier.max_bytes
        assert tier.used_bytes == sum(c.nbytes for c in tier._chunks.values()) and not tier._pins
    assert store.stats()["active_pins"] == 0 and store.stats()["store"].write_through_failures == 0
