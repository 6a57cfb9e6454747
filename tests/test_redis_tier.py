"""The Redis tier against real Redis servers: round trips, parts, expiry, damage, faults, concurrency, replicas."""

from __future__ import annotations

import threading
import time
import zlib

import pytest
import redis
import torch

from conftest import tiny_model
from ragcache.engine.chunks import compute_chunks
from ragcache.engine.stack import DecoderStack
from ragcache.kv import ChunkKey, KVChunk
from ragcache.storage.base import TierUsage
from ragcache.storage.codec import decode_chunk, encode_chunk
from ragcache.storage.connect import hash_tag
from ragcache.storage.redis import RedisTier
from redis_server import wait_until

FINGERPRINT = "tiny-llama-fp"


def key(i: int) -> ChunkKey:
    return ChunkKey(f"{i:032x}")


@pytest.fixture(scope="module")
def chunks() -> list[KVChunk]:
    """Four chunks as the engine computes them, after a 9-token prefix."""
    stack = DecoderStack(tiny_model())
    ids = torch.randint(0, 49152, (112,), generator=torch.Generator().manual_seed(0)).tolist()
    prefix = compute_chunks(stack, [ids[:9]], None, FINGERPRINT)[0]
    return compute_chunks(stack, [ids[9:29], ids[29:60], ids[60:72], ids[72:]], prefix, FINGERPRINT)


@pytest.fixture
def make_tier(redis_url, redis_namespace):
    """RedisTier on the shared server in the test's namespace unless told otherwise; closed afterwards."""
    tiers = []

    def make(url: str | None = None, **options) -> RedisTier:
        options = {"namespace": redis_namespace, "model_fingerprint": FINGERPRINT, **options}
        tiers.append(RedisTier(url or redis_url, **options))
        return tiers[-1]

    yield make
    for tier in tiers:
        tier.close()


@pytest.fixture
def admin(redis_url):
    with redis.Redis.from_url(redis_url) as client:
        yield client


def same(a: KVChunk | None, b: KVChunk) -> bool:
    return (
        a is not None and a.token_ids == b.token_ids and a.start_pos == b.start_pos
        and a.model_fingerprint == b.model_fingerprint
        and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    )


def synthetic(tokens: int, seed: int, layers: int = 4, heads: int = 2, head_dim: int = 16) -> KVChunk:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(layers, heads, tokens, head_dim, generator=generator)  # (layers, kv_heads, tokens, head_dim)
    values = torch.randn(layers, heads, tokens, head_dim, generator=generator)
    return KVChunk(tuple(range(tokens)), keys, values, FINGERPRINT, 9)


def meta_name(namespace: str, k: ChunkKey) -> str:
    """As storage/redis.py's key table says: the entry's bucket is crc32(key) mod 256, its hash tag {N.B}."""
    return f"ragcache:{namespace}:{hash_tag(f'{namespace}.{zlib.crc32(k.encode()) % 256:02x}')}:meta:{k}"


def part_names(client: redis.Redis, namespace: str, k: ChunkKey) -> list[bytes]:
    """The entry's part keys in Redis, of every nonce, in part order."""
    names = client.scan_iter(match=f"ragcache:{namespace}:*:part:{k}:*")
    return sorted(names, key=lambda n: int(n.rsplit(b":", 1)[1]))


@pytest.mark.parametrize("codec", ["raw", "int8"])
def test_real_chunks_round_trip(make_tier, chunks, codec):
    tier = make_tier(codec=codec)
    assert tier.put_many([(key(i), chunk) for i, chunk in enumerate(chunks)]) == [True] * 4
    got = tier.get_many([key(i) for i in range(4)])
    for chunk, read in zip(chunks, got):  # exactly what the codec gives: raw is lossless
        assert same(read, decode_chunk(encode_chunk(chunk, codec)))
        assert codec != "raw" or same(read, chunk)
    stats = tier.stats()
    encoded = sum(len(encode_chunk(chunk, codec)) for chunk in chunks)
    assert (stats.name, stats.hits, stats.misses, stats.errors, stats.corrupt) == ("redis", 4, 0, 0, 0)
    assert stats.bytes_written == stats.bytes_read == stats.encoded_bytes == encoded
    assert stats.raw_bytes == sum(chunk.nbytes for chunk in chunks)
    assert stats.available and stats.last_error is None and 0 < stats.latency_p50_ms <= stats.latency_p99_ms
    assert 0.9 < stats.compression_ratio < 1.0 if codec == "raw" else 3 < stats.compression_ratio < 4


def test_absent_key_is_a_miss(make_tier):
    tier = make_tier()
    assert tier.get(key(99)) is None and not tier.contains(key(99)) and not tier.delete(key(99))
    stats = tier.stats()
    assert (stats.hits, stats.misses, stats.errors, stats.corrupt) == (0, 1, 0, 0)


def test_a_30mb_chunk_is_split_into_parts_and_read_back_exactly(make_tier, admin, redis_namespace):
    chunk = synthetic(tokens=1920, seed=1, heads=8, head_dim=64)  # 2 x 15 MiB of float32
    tier = make_tier(part_bytes=1 << 20)
    assert tier.put(key(0), chunk)
    entry_len = len(encode_chunk(chunk))
    parts = part_names(admin, redis_namespace, key(0))
    assert len(parts) == -(-entry_len // (1 << 20)) == 31
    assert [admin.strlen(name) for name in parts] == [1 << 20] * 30 + [entry_len - 30 * (1 << 20)]
    assert same(tier.get(key(0)), chunk)


def test_entry_expires_after_its_ttl(make_tier, admin, redis_namespace, chunks):
    tier = make_tier(ttl_s=0.2)
    assert tier.put(key(0), chunks[0])
    assert same(tier.get(key(0)), chunks[0])
    assert all(0 < admin.pttl(name) <= 10_200 for name in part_names(admin, redis_namespace, key(0)))
    wait_until(lambda: not admin.exists(meta_name(redis_namespace, key(0))))
    assert tier.get(key(0)) is None and tier.stats().corrupt == 0


def flip_a_part_byte(client: redis.Redis, namespace: str, k: ChunkKey) -> None:
    name = part_names(client, namespace, k)[0]
    data = bytearray(client.get(name))
    data[len(data) // 2] ^= 0x40
    client.set(name, bytes(data))


def delete_a_part(client: redis.Redis, namespace: str, k: ChunkKey) -> None:
    client.delete(part_names(client, namespace, k)[-1])


def garbage_meta(client: redis.Redis, namespace: str, k: ChunkKey) -> None:
    client.set(meta_name(namespace, k), b"\x00\xffnot a meta")


@pytest.mark.parametrize("damage", [flip_a_part_byte, delete_a_part, garbage_meta], ids=lambda f: f.__name__)
def test_damaged_entry_is_a_miss_deleted_and_counted(make_tier, admin, redis_namespace, chunks, damage):
    tier = make_tier(part_bytes=4096)
    assert tier.put(key(0), chunks[3])  # 40 tokens: 40 KiB in 11 parts
    damage(admin, redis_namespace, key(0))
    assert tier.get(key(0)) is None
    assert not admin.exists(meta_name(redis_namespace, key(0)))
    assert (tier.stats().corrupt, tier.stats().misses) == (1, 1) and tier.usage().entries == 0
    if damage is not garbage_meta:  # the meta said which parts were its own
        assert part_names(admin, redis_namespace, key(0)) == []


def test_entry_of_another_model_is_a_miss_deleted_and_counted(make_tier, admin, redis_namespace, chunks):
    foreign = chunks[0]
    foreign = KVChunk(foreign.token_ids, foreign.keys, foreign.values, "another-model", foreign.start_pos)
    assert make_tier(model_fingerprint=None).put(key(0), foreign)
    tier = make_tier()
    assert tier.get(key(0)) is None and tier.stats().corrupt == 1
    assert not admin.exists(meta_name(redis_namespace, key(0)))


def test_killed_redis_is_a_fast_miss_and_the_same_tier_recovers(make_tier, throwaway_redis, chunks):
    tier = make_tier(throwaway_redis.url, timeout_s=0.3)
    assert tier.put(key(0), chunks[0])
    throwaway_redis.kill()
    start = time.monotonic()
    assert tier.get(key(0)) is None
    failed_s = time.monotonic() - start
    start = time.monotonic()  # within the 0.5 s back-off Redis is not even tried
    assert tier.put(key(1), chunks[1]) is False and tier.contains(key(0)) is False
    skipped_s = time.monotonic() - start
    assert failed_s < 0.5 and skipped_s < 0.05
    stats = tier.stats()
    assert not stats.available and stats.errors == 1 and stats.misses == 1 and "Error" in stats.last_error
    throwaway_redis.start()  # same port, empty
    wait_until(lambda: tier.put(key(1), chunks[1]))
    assert same(tier.get(key(1)), chunks[1]) and tier.get(key(0)) is None and tier.stats().available


def test_slow_redis_is_a_miss_within_the_timeout(make_tier, throwaway_redis, chunks):
    tier = make_tier(throwaway_redis.url, timeout_s=0.3)
    assert tier.put(key(0), chunks[0])
    with throwaway_redis.client() as pauser:
        pauser.execute_command("CLIENT", "PAUSE", 1000, "ALL")
    start = time.monotonic()
    assert tier.get(key(0)) is None
    assert time.monotonic() - start < 0.6  # timeout_s, with room for a loaded machine
    stats = tier.stats()
    assert not stats.available and stats.errors == 1 and "Timeout" in stats.last_error
    assert same(wait_until(lambda: tier.get(key(0))), chunks[0])  # once the pause is over


def test_redis_evicting_parts_gives_exact_chunks_or_misses(make_tier, throwaway_redis):
    """Redis's LRU clock ticks once a second, so keys written together go in random order:
    metas, parts, or both; an entry that lost a part is dropped, never returned."""
    with throwaway_redis.client() as client:
        client.config_set("maxmemory-policy", "allkeys-lru")
        client.config_set("maxmemory", "3mb")
        tier = make_tier(throwaway_redis.url, namespace="test", part_bytes=16 << 10)
        written = [synthetic(tokens=256, seed=i) for i in range(30)]  # 30 x 256 KiB in 16 parts each, through 3 MB
        tier.put_many([(key(i), chunk) for i, chunk in enumerate(written)])
        assert client.info("stats")["evicted_keys"] > 0
        read = tier.get_many([key(i) for i in range(30)])
        assert all(got is None or same(got, chunk) for got, chunk in zip(read, written))
        stats = tier.stats()
        assert stats.hits == sum(got is not None for got in read) and stats.hits + stats.misses == 30
        assert stats.corrupt > 0 and stats.errors == 0
        assert not any(client.exists(meta_name("test", key(i))) for i, got in enumerate(read) if got is None)


def test_concurrent_writers_of_one_key_leave_one_intact_chunk(make_tier, admin, redis_namespace, chunks):
    tier = make_tier(part_bytes=4096)
    base = chunks[3]
    variants = [KVChunk(base.token_ids, base.keys + i, base.values - i, FINGERPRINT, base.start_pos) for i in range(4)]
    writes: list[bool] = []
    reads: list[KVChunk | None] = []
    writing = threading.Event()

    def write(chunk: KVChunk) -> None:
        writing.set()
        writes.extend(tier.put(key(0), chunk) for _ in range(15))

    def read() -> None:
        writing.wait()
        while any(thread.is_alive() for thread in writers) or not reads:
            reads.append(tier.get(key(0)))

    writers = [threading.Thread(target=write, args=(chunk,)) for chunk in variants]
    reader = threading.Thread(target=read)
    for thread in [reader, *writers]:
        thread.start()
    for thread in [*writers, reader]:
        thread.join()
    assert writes == [True] * 60
    first_hit = next(i for i, got in enumerate(reads) if got is not None)
    assert all(any(same(got, v) for v in variants) for got in reads[first_hit:])  # never a miss once written
    assert any(same(tier.get(key(0)), v) for v in variants) and tier.stats().corrupt == 0
    live_parts = [n for n in part_names(admin, redis_namespace, key(0)) if admin.pttl(n) == -1]
    assert len(live_parts) == 11  # the winner's; the replaced entries' parts are expiring


def test_two_replicas_share_entries_and_namespaces_do_not(make_tier, chunks):
    a, b = make_tier(name="redis"), make_tier(name="redis")
    assert a.put(key(0), chunks[0]) and same(b.get(key(0)), chunks[0])
    assert b.put(key(1), chunks[1]) and same(a.get(key(1)), chunks[1])
    entry_bytes = len(encode_chunk(chunks[0])) + len(encode_chunk(chunks[1]))
    assert a.usage() == b.usage() == TierUsage("redis", 2, entry_bytes, 0)
    assert b.delete(key(0)) and a.get(key(0)) is None
    other_tenant = make_tier(namespace=f"other-{id(a)}")
    assert other_tenant.get(key(1)) is None


def test_usage_follows_puts_replacements_and_deletes(make_tier, chunks):
    tier = make_tier()
    tier.put_many([(key(0), chunks[0]), (key(1), chunks[1])])
    assert tier.put(key(0), chunks[2])
    sizes = [len(encode_chunk(chunk)) for chunk in chunks]
    assert tier.usage() == TierUsage("redis", 2, sizes[2] + sizes[1], 0)
    assert tier.delete(key(1)) and tier.usage() == TierUsage("redis", 1, sizes[2], 0)


def test_get_many_async_returns_what_get_many_does(make_tier, chunks):
    tier = make_tier()
    tier.put_many([(key(0), chunks[0]), (key(2), chunks[2]), (key(3), chunks[3])])
    keys = [key(0), key(1), key(2), key(3)]
    pending = tier.get_many_async(keys)
    direct = tier.get_many(keys)
    prefetched = pending.result(timeout=5)
    assert [got is None for got in prefetched] == [False, True, False, False]
    assert all(a is b is None or same(a, b) for a, b in zip(prefetched, direct))
