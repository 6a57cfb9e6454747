"""TieredStore over local tiers: exact placement, promotion, demotion, pins and budgets."""

import random

import pytest

from ragcache.kv import ChunkKey
from ragcache.storage.cpu import CpuTier
from ragcache.storage.gpu import GpuTier
from ragcache.storage.tiered import TieredStore
from ragcache.storage.eviction import CostAware, LFU, LRU, EntryInfo


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 0.001  # every reading is a distinct, later instant
        return self.now


from conftest import kv_chunk as chunk


SIZE = chunk().nbytes


def make_store(device_entries=2, cpu_entries=4, clock=None):
    clock = clock or Clock()
    device = GpuTier(device_entries * SIZE, device="cpu")
    cpu = CpuTier(cpu_entries * SIZE)
    device.clock = cpu.clock = clock
    return TieredStore([device, cpu], clock=clock), device, cpu, clock


def held(tier, names="abcdefg"):
    return "".join(n for n in names if tier.contains(ChunkKey(n)))


def test_device_tier_is_named_for_what_it_is_on_cpu():
    assert GpuTier(SIZE, device="cpu").name == "device"


def test_writes_fill_the_top_and_evictions_are_demoted():
    store, device, cpu, _ = make_store()
    for name in "abc":
        store.put(ChunkKey(name), chunk())
    assert (held(device), held(cpu)) == ("bc", "a")
    assert store.stats()["store"].demotions == 1


def test_read_through_promotes_to_the_top():
    store, device, cpu, _ = make_store()
    for name in "abc":
        store.put(ChunkKey(name), chunk())
    assert store.get(ChunkKey("a")) is not None
    assert (held(device), held(cpu)) == ("ac", "ab")  # b made room for a and went down
    assert store.stats()["store"].promotions == 1
    assert store.get_many([ChunkKey("z"), ChunkKey("c")])[0] is None


def test_pinned_entries_are_never_evicted():
    store, device, cpu, _ = make_store()
    store.put(ChunkKey("a"), chunk())
    handle = store.pin(ChunkKey("a"), ttl_s=60)
    for name in "bcd":
        store.put(ChunkKey(name), chunk())
    assert held(device) == "ad" and handle.tier == "device"
    store.unpin(handle)
    store.put(ChunkKey("e"), chunk())
    assert held(device) == "de"


def test_a_full_pinned_tier_spills_new_entries_down():
    store, device, cpu, _ = make_store()
    for name in "ab":
        store.put(ChunkKey(name), chunk())
        store.pin(ChunkKey(name), ttl_s=60)
    assert store.put(ChunkKey("c"), chunk())
    assert (held(device), held(cpu)) == ("ab", "c")
    assert device.stats().rejected == 1 and device.stats().evictions == 0


def test_expired_pin_demotes_the_entry_instead_of_dropping_it():
    store, device, cpu, clock = make_store()
    store.put(ChunkKey("a"), chunk())
    store.pin(ChunkKey("a"), ttl_s=10)
    clock.now += 9
    assert store.release_expired() == 0 and held(device) == "a"
    clock.now += 2
    assert store.release_expired() == 1
    assert (held(device), held(cpu)) == ("", "a")
    assert store.stats()["store"].pins_expired == 1 and store.stats()["active_pins"] == 0


def test_two_pins_on_one_entry_are_counted():
    store, device, _, clock = make_store()
    store.put(ChunkKey("a"), chunk())
    first, second = store.pin(ChunkKey("a"), ttl_s=5), store.pin(ChunkKey("a"), ttl_s=50)
    clock.now += 10
    store.release_expired()
    assert device.is_pinned(ChunkKey("a")) and held(device) == "a"
    assert store.unpin(second) and not store.unpin(first)
    assert not device.is_pinned(ChunkKey("a"))


def test_pin_of_an_absent_key_and_bad_ttl():
    store, *_ = make_store()
    assert store.pin(ChunkKey("nope"), ttl_s=1) is None
    with pytest.raises(ValueError, match="ttl_s"):
        store.pin(ChunkKey("nope"), ttl_s=0)


def test_delete_removes_every_copy():
    store, device, cpu, _ = make_store()
    for name in "abc":
        store.put(ChunkKey(name), chunk())
    store.get(ChunkKey("a"))  # now in both tiers
    assert store.delete(ChunkKey("a")) and not store.contains(ChunkKey("a"))
    assert not store.delete(ChunkKey("a"))


def test_budgets_hold_under_load():
    store, device, cpu, _ = make_store(device_entries=3, cpu_entries=5)
    rng = random.Random(0)
    for step in range(2000):
        key = ChunkKey(str(rng.randrange(20)))
        if rng.random() < 0.5:
            store.put(key, chunk(rng.choice([2, 4, 6])))
        else:
            store.get(key)
        if step % 50 == 0 and store.contains(key):
            store.pin(key, ttl_s=0.01)
        for tier in (device, cpu):
            assert tier.used_bytes <= tier.max_bytes
            assert tier.used_bytes == sum(c.nbytes for c in tier._chunks.values())


def test_prefetch_returns_what_get_many_returns():
    store, *_ = make_store()
    store.put(ChunkKey("a"), chunk())
    keys = [ChunkKey("a"), ChunkKey("b")]
    prefetched = store.prefetch(keys).result(timeout=5)
    assert [c is not None for c in prefetched] == [True, False]
    store.close()


def info(name, uses, last_used, tokens=4, bytes_per_token=16):
    entry = EntryInfo(ChunkKey(name), tokens * bytes_per_token, tokens, 0.0, 0.0)
    for t in range(uses):
        entry.touch(last_used - (uses - 1 - t), half_life_s=600)
    return entry


def test_policies_rank_entries():
    now = 100.0
    old_popular, fresh_once = info("old", uses=5, last_used=50), info("new", uses=1, last_used=99)
    assert LRU().priority(old_popular, now) < LRU().priority(fresh_once, now)  # LRU evicts the old one
    assert LFU().priority(fresh_once, now) < LFU().priority(old_popular, now)  # LFU keeps the popular one
    assert CostAware().priority(fresh_once, now) < CostAware().priority(old_popular, now)
    # Same reuse, half the bytes per token (a bfloat16 model beside a float32 one): more prefill saved per byte.
    compact = info("compact", uses=1, last_used=99, bytes_per_token=8)
    assert CostAware().priority(fresh_once, now) < CostAware().priority(compact, now)
