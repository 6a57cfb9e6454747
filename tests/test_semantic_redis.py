"""The semantic cache over a real Redis: answers apart from the index, restart rebuild, TTLs, faults."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from ragcache.semantic import CategoryPolicy, Message
from ragcache.semantic.answers.redis import RedisAnswerStore
from redis_server import redis_namespace, redis_url, throwaway_redis  # noqa: F401  (fixtures)
from semantic_fixtures import Clock, embedder, make_cache, query  # noqa: F401

QUESTION = "How do I reset my password?"
HISTORY = (
    Message("user", "I need to update the card for my Tunely music subscription"),
    Message("assistant", "Sure. I can send you a secure link to update it now."),
)


@pytest.fixture
def store(redis_url, redis_namespace):
    stores = []

    def make(url: str = redis_url) -> RedisAnswerStore:
        stores.append(RedisAnswerStore(url, namespace=redis_namespace))
        return stores[-1]

    yield make
    for made in stores:
        made.close()


def test_a_restart_rebuilds_the_index_from_redis(embedder, store, redis_url, redis_namespace):
    first = make_cache(embedder, answers=store())
    assert first.store(query(QUESTION, tenant="acme"), "Use the reset link.")
    assert first.store(query("send me the link", tenant="acme", history=HISTORY), "Here is your Tunely link.")
    assert first.store(query(QUESTION, tenant="glob:ex"), "Globex's answer.")
    with redis.Redis.from_url(redis_url) as client:
        keys = sorted(k.decode() for k in client.scan_iter(match=f"ragcache:{redis_namespace}:*"))
        assert len(keys) == 3 and any(":glob%3Aex:" in k for k in keys)
        fields = client.hgetall(keys[0])
        assert {b"answer", b"text", b"model", b"documents_hash", b"created_s", b"expires_s", b"hits"} <= set(fields)
        assert 0 < client.pttl(keys[0]) <= 7 * 24 * 3600 * 1000

    restarted = make_cache(embedder, answers=store())
    assert restarted.rebuilt == 3
    assert restarted.lookup(query("how do I reset my password", tenant="acme")).answer == "Use the reset link."
    assert restarted.lookup(query("Send me the link.", tenant="acme", history=HISTORY)).answer == "Here is your Tunely link."
    assert restarted.lookup(query(QUESTION, tenant="glob:ex")).answer == "Globex's answer."


def test_hits_are_counted_in_redis_and_survive_a_restart(embedder, store):
    first = make_cache(embedder, answers=store())
    first.store(query(QUESTION), "answer")
    for _ in range(3):
        assert first.lookup(query(QUESTION)) is not None
    (record,) = list(store().records(now_s=0.0))
    assert record.hits == 3 and record.text == QUESTION and record.embedder == embedder.name
    assert record.text_vector.shape == (embedder.dim,) and record.text_vector.dtype == np.float32


def test_expired_entries_are_not_rebuilt_nor_served(embedder, store):
    clock = Clock()
    first = make_cache(embedder, answers=store(), clock=clock)
    first.set_policy("factual", CategoryPolicy(0.55, ttl_s=30.0, max_entries=10))
    first.store(query(QUESTION), "answer")
    clock.advance(31.0)
    assert first.lookup(query(QUESTION)) is None
    assert make_cache(embedder, answers=store(), clock=clock).rebuilt == 0


def test_a_reported_false_hit_is_deleted_from_redis(embedder, store):
    answers = store()
    cache = make_cache(embedder, answers=answers)
    cache.store(query(QUESTION), "answer")
    hit = cache.lookup(query(QUESTION))
    assert cache.report_false_hit("acme", hit.entry_id)
    assert list(answers.records(now_s=0.0)) == []
    assert make_cache(embedder, answers=store()).rebuilt == 0


def test_an_entry_deleted_behind_the_cache_is_a_miss(embedder, store, redis_url, redis_namespace):
    cache = make_cache(embedder, answers=store())
    cache.store(query(QUESTION), "answer")
    with redis.Redis.from_url(redis_url) as client:
        for key in client.scan_iter(match=f"ragcache:{redis_namespace}:*"):
            client.delete(key)
    assert cache.lookup(query(QUESTION)) is None
    assert cache.stats().categories[0].entries == 0


def test_records_of_another_embedder_are_re_embedded(embedder, store):
    class Renamed:
        name, dim = "renamed-minilm", embedder.dim

        def embed(self, texts):
            return embedder.embed(texts)

    make_cache(embedder, answers=store()).store(query(QUESTION), "answer")
    cache = make_cache(Renamed(), answers=store())
    assert cache.rebuilt == 1 and cache.lookup(query(QUESTION)).answer == "answer"


def test_redis_down_is_a_miss_not_an_error(embedder, throwaway_redis, redis_namespace):
    answers = RedisAnswerStore(throwaway_redis.url, namespace=redis_namespace, timeout_s=0.2)
    cache = make_cache(embedder, answers=answers)
    assert cache.store(query(QUESTION), "answer")
    throwaway_redis.kill()
    assert cache.lookup(query(QUESTION)) is None
    assert not cache.store(query("How much does delivery cost?"), "x")
    stats = cache.stats()
    assert stats.answers.errors >= 1 and not stats.answers.available
    answers.close()


def test_document_digests_persist_and_invalidation_reaches_redis(embedder, store, redis_url, redis_namespace):
    from ragcache.semantic.types import document_digest

    amazon, danube = document_digest("The Amazon..."), document_digest("The Danube...")
    first = make_cache(embedder, answers=store())
    first.store(query("Which river flows into the Atlantic?", document_digests=(amazon, danube)), "The Amazon.")
    first.store(query("Which river flows into the Black Sea?", document_digests=(danube,)), "The Danube.")
    assert {r.document_digests for r in store().records(now_s=0.0)} == {(amazon, danube), (danube,)}
    restarted = make_cache(embedder, answers=store())  # digests come back with the rebuilt index
    assert restarted.invalidate_documents("acme", [amazon]) == 1
    (left,) = list(store().records(now_s=0.0))
    assert left.document_digests == (danube,) and left.answer == "The Danube."
    with redis.Redis.from_url(redis_url) as client:  # a record written before digests existed
        (key,) = list(client.scan_iter(match=f"ragcache:{redis_namespace}:*"))
        client.hdel(key, "document_digests")
    (old,) = list(store().records(now_s=0.0))
    assert old.document_digests == () and old.answer == "The Danube."
    assert make_cache(embedder, answers=store()).invalidate_documents("acme", [danube]) == 0
