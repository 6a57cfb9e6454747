"""The Redis tier and the Redis answer store against a real 3-master Redis Cluster: entries spread
over the masters, every operation works, and a killed master costs misses, never exceptions.

One cluster serves the module; the last test kills a master, so it stays last."""

from __future__ import annotations

import uuid
import zlib

import numpy as np
import pytest
import torch

from conftest import kv_chunk
from ragcache.kv import ChunkKey, KVChunk
from ragcache.registry.documents import DocumentRegistry, StoredDocument
from ragcache.registry.redis import RedisRegistry
from ragcache.semantic.answers.base import AnswerRecord
from ragcache.semantic.answers.redis import RedisAnswerStore
from ragcache.storage.cpu import CpuTier
from ragcache.storage.prefix import RadixPrefixCache
from ragcache.storage.tiered import TieredStore
from ragcache.storage.base import TierUsage
from ragcache.storage.codec import encode_chunk
from ragcache.storage.connect import hash_tag
from ragcache.storage.redis import RedisTier
from redis_server import wait_until
from semantic_fixtures import embedder, make_cache, query, replica_caches  # noqa: F401  (fixtures)

NUM_KEYS = 24


def key(i: int) -> ChunkKey:
    return ChunkKey(f"{i:032x}")


def chunk(i: int) -> KVChunk:
    base = kv_chunk(4 + i % 5)
    return KVChunk(base.token_ids, base.keys + i, base.values - i, base.model_fingerprint)


def same(a: KVChunk | None, b: KVChunk) -> bool:
    return a is not None and a.token_ids == b.token_ids and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def meta_name(namespace: str, k: ChunkKey) -> str:
    """As storage/redis.py's key table says: the entry's bucket is crc32(key) mod 256, its hash tag {N.B}."""
    return f"ragcache:{namespace}:{hash_tag(f'{namespace}.{zlib.crc32(k.encode()) % 256:02x}')}:meta:{k}"


def names_per_master(cluster, pattern: str) -> dict[int, set[bytes]]:
    """Each live master's keys matching pattern, asked of the master itself."""
    found = {}
    for master in cluster.masters:
        with master.client() as client:
            found[master.port] = set(client.scan_iter(match=pattern, count=1000))
    return found


@pytest.fixture
def namespace():
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
def make_tier(redis_cluster, namespace):
    tiers = []

    def make(**options) -> RedisTier:
        tiers.append(RedisTier(redis_cluster.url, namespace=namespace, model_fingerprint="fp", timeout_s=2.0, **options))
        return tiers[-1]

    yield make
    for tier in tiers:
        tier.close()


@pytest.fixture
def answers(redis_cluster, namespace):
    store = RedisAnswerStore(redis_cluster.url, namespace=namespace, timeout_s=2.0)
    yield store
    store.close()


def record(i: int, tenant: str = "acme") -> AnswerRecord:
    return AnswerRecord(
        entry_id=f"e{i}", tenant=tenant, category="factual", text=f"question {i}", history=(), answer=f"answer {i}",
        model="m", documents_hash="d", system_hash="s", created_s=1.0, expires_s=4e9, embedder="emb",
        text_vector=np.full(4, i, dtype=np.float32), context_vector=None,
    )


def test_the_tier_spreads_entries_over_the_masters_and_reads_them_back(make_tier, redis_cluster, namespace):
    tier = make_tier(part_bytes=64)  # several parts per entry: all in the entry's slot
    written = [chunk(i) for i in range(NUM_KEYS)]
    assert tier.put_many([(key(i), c) for i, c in enumerate(written)]) == [True] * NUM_KEYS
    metas = names_per_master(redis_cluster, f"ragcache:{namespace}:*:meta:*")
    assert sum(len(names) for names in metas.values()) == NUM_KEYS
    assert sum(bool(names) for names in metas.values()) > 1
    parts = names_per_master(redis_cluster, f"ragcache:{namespace}:*:part:*")
    for port, names in parts.items():  # each entry's parts sit on its meta's master
        assert {n.split(b":part:")[1].split(b":")[0] for n in names} == {m.split(b":meta:")[1] for m in metas[port]}
    read = tier.get_many([key(i) for i in range(NUM_KEYS)] + [key(99)])
    assert all(same(got, c) for got, c in zip(read, written)) and read[-1] is None
    assert tier.usage() == TierUsage("redis", NUM_KEYS, sum(len(encode_chunk(c)) for c in written), 0)
    assert sorted(tier.keys()) == [key(i) for i in range(NUM_KEYS)]
    stats = tier.stats()
    assert (stats.hits, stats.misses, stats.errors, stats.corrupt) == (NUM_KEYS, 1, 0, 0)


def test_the_tier_deletes_replaces_and_flushes_on_a_cluster(make_tier, redis_cluster, namespace):
    tier = make_tier()
    tier.put_many([(key(i), chunk(i)) for i in range(NUM_KEYS)])
    assert tier.put(key(0), chunk(50)) and same(tier.get(key(0)), chunk(50))
    assert tier.delete(key(1)) and not tier.delete(key(1)) and tier.get(key(1)) is None
    assert tier.usage().entries == NUM_KEYS - 1 and tier.contains(key(2)) and not tier.contains(key(1))
    store = TieredStore([CpuTier(1 << 20), tier])
    assert store.flush(tier="redis") == NUM_KEYS - 1
    assert tier.usage() == TierUsage("redis", 0, 0, 0) and tier.keys() == []
    left = set().union(*names_per_master(redis_cluster, f"ragcache:{namespace}:*").values())
    assert all(f":part:{key(0)}:".encode() in name for name in left)  # only the replaced entry's, expiring
    with redis_cluster.client() as client:
        assert all(0 < client.pttl(name) <= 10_000 for name in left)


def test_the_answer_store_works_on_a_cluster(answers, redis_cluster, namespace):
    for i in range(NUM_KEYS):
        assert answers.put(record(i, tenant="acme" if i % 2 else "glob:ex"))
    held = names_per_master(redis_cluster, f"ragcache:{namespace}:*")
    assert sum(len(names) for names in held.values()) == NUM_KEYS and sum(bool(n) for n in held.values()) > 1
    assert answers.answer("acme", "e1") == "answer 1" and answers.answer("glob:ex", "e2") == "answer 2"
    assert answers.answer("acme", "e2") is None  # e2 is glob:ex's
    records = {(r.tenant, r.entry_id): r for r in answers.records(now_s=2.0)}
    assert len(records) == NUM_KEYS and records[("acme", "e1")].hits == 1 and records[("acme", "e3")].hits == 0
    assert answers.delete("acme", [f"e{i}" for i in range(1, NUM_KEYS, 2)]) == NUM_KEYS // 2
    assert sorted(r.entry_id for r in answers.records(now_s=2.0)) == sorted(f"e{i}" for i in range(0, NUM_KEYS, 2))
    assert answers.stats().errors == 0 and answers.stats().available


def test_registries_work_on_a_cluster(redis_cluster, namespace):
    registry = RedisRegistry(redis_cluster.url, prefix=f"ragcache:{namespace}:registry", timeout_s=2.0)
    documents = DocumentRegistry(registry)
    tenants = [f"tenant-{i}" for i in range(12)]
    for tenant in tenants:
        assert documents.put(tenant, StoredDocument("guide", f"{tenant}'s guide", ChunkKey("k"), 3)) is None
    held = names_per_master(redis_cluster, f"ragcache:{namespace}:registry:*")
    assert sum(bool(names) for names in held.values()) > 1  # tenants spread over the masters
    replica = DocumentRegistry(RedisRegistry(redis_cluster.url, prefix=f"ragcache:{namespace}:registry"))
    assert [d.text for d in replica.get_many("tenant-3", ["guide", "nope"]) if d] == ["tenant-3's guide"]
    assert replica.delete("tenant-3", "guide").text == "tenant-3's guide" and documents.count("tenant-3") == 0
    assert sorted(t for t, _, _ in registry.rows("documents")) == sorted(set(tenants) - {"tenant-3"})
    registry.close()


def test_a_replica_finds_the_prefix_blocks_another_stored_on_a_cluster(make_tier):
    """Prefix-cache paths need no registry: block keys come from the tokens, the blocks from Redis."""
    one, two = (RadixPrefixCache(TieredStore([CpuTier(1 << 20), make_tier()]), "fp", block_tokens=4) for _ in "12")
    ids = list(range(100, 114))  # three whole blocks and a part block of two tokens
    blocks = [kv_chunk(4), kv_chunk(4), kv_chunk(4), kv_chunk(2)]
    path = one.insert("tenant-1", "exact", one.block_keys("tenant-1", "exact", ids, tail=True), len(ids), 0, blocks)
    assert path.num_tokens == 14 and len(path.keys) == 4
    hit = two.match("tenant-1", "exact", ids[:-1])
    assert hit.num_tokens == 12 and hit.keys == path.keys[:3]  # whole blocks by key; the part block is one's
    assert two.match("tenant-2", "exact", ids[:-1]).num_tokens == 0


def test_semantic_entries_propagate_between_replicas_on_a_cluster(redis_cluster, namespace, embedder):
    with replica_caches(embedder, redis_cluster.url, namespace, follow=(False, True)) as (one, two):
        assert one.store(query("How do I reset my password?"), "Use the reset link.")
        hit = wait_until(lambda: two.lookup(query("How do I reset my password?")), timeout_s=1.0)
        assert hit.answer == "Use the reset link."


def test_a_killed_master_costs_misses_and_the_others_keep_serving(make_tier, answers, redis_cluster, namespace, embedder):
    tier = make_tier()
    written = {key(i): chunk(i) for i in range(NUM_KEYS)}
    tier.put_many(list(written.items()))
    cache = make_cache(embedder, answers=answers)
    questions = [f"What is the capital of country number {i}?" for i in range(NUM_KEYS)]
    for i, text in enumerate(questions):
        assert cache.store(query(text), f"capital {i}")
    entry_ids = [cache.lookup(query(text)).entry_id for text in questions]
    held = names_per_master(redis_cluster, f"ragcache:{namespace}:*")
    victim = next(m for m in redis_cluster.masters
                  if any(b":meta:" in n for n in held[m.port]) and any(b":semantic:" in n for n in held[m.port]))
    lost_chunks = {k for k in written if any(n.endswith(f":meta:{k}".encode()) for n in held[victim.port])}
    lost_answers = {i for i, e in enumerate(entry_ids) if any(n.endswith(f":{e}".encode()) for n in held[victim.port])}
    assert 0 < len(lost_chunks) < NUM_KEYS and 0 < len(lost_answers) < NUM_KEYS
    redis_cluster.kill(victim)

    read = tier.get_many(list(written))  # no exception: the victim's entries miss, the others are served
    assert all(got is None if k in lost_chunks else same(got, written[k]) for k, got in zip(written, read))
    stats = tier.stats()
    assert stats.errors >= 1 and not stats.available and stats.last_error
    survivor = next(k for k in written if k not in lost_chunks)
    assert same(wait_until(lambda: tier.get(survivor), timeout_s=15), written[survivor])
    new_key = next(ChunkKey(f"new-{i}") for i in range(1000)
                   if redis_cluster.master_of(meta_name(namespace, ChunkKey(f"new-{i}"))) is not victim)
    assert wait_until(lambda: tier.put(new_key, chunk(7)), timeout_s=15) and same(tier.get(new_key), chunk(7))
    assert tier.stats().available and tier.stats().last_error is None

    assert cache.lookup(query(questions[min(lost_answers)])) is None  # its answer was on the victim
    assert cache.stats().answers.errors >= 1
    kept = [i for i in range(NUM_KEYS) if i not in lost_answers]
    assert wait_until(lambda: all(cache.lookup(query(questions[i])) is not None for i in kept), timeout_s=15)
    assert cache.lookup(query(questions[kept[0]])).answer == f"capital {kept[0]}"
