"""Registries (documents, programs) and shared semantic answers over memory, SQLite and real Redis."""

from __future__ import annotations

import time

import httpx
import pytest

from ragcache.kv import ChunkKey
from ragcache.registry import MemoryRegistry, RegistryUnavailableError, make_registry
from ragcache.registry.documents import DocumentRegistry, StoredDocument
from ragcache.registry.redis import RedisRegistry
from ragcache.registry.sqlite import SqliteRegistry
from ragcache.semantic.answers.sqlite import SqliteAnswerStore
from conftest import DOCUMENTS, QUESTION
from service_server import running_server
from redis_server import redis_namespace, redis_url, throwaway_redis, wait_until  # noqa: F401  (fixtures)
from semantic_fixtures import embedder, make_cache, query, replica_caches  # noqa: F401


@pytest.fixture(params=["memory", "sqlite", "redis"])
def registry(request, tmp_path, redis_url, redis_namespace):
    if request.param == "memory":
        made = MemoryRegistry()
    elif request.param == "sqlite":
        made = SqliteRegistry(tmp_path / "registry.sqlite3")
    else:
        made = RedisRegistry(redis_url, prefix=f"ragcache:{redis_namespace}:registry")
    yield made
    made.close()


def doc(doc_id: str, text: str = "text") -> StoredDocument:
    return StoredDocument(doc_id, text, ChunkKey(f"key-{text}"), len(text))


def test_put_returns_what_it_replaced_and_delete_what_it_removed(registry):
    assert registry.put("documents", "acme", "a", b"one") is None
    assert registry.put("documents", "acme", "a", b"two") == b"one"
    assert registry.get_many("documents", "acme", ["a", "nope"]) == [b"two", None]
    assert registry.delete("documents", "acme", "a") == b"two"
    assert registry.delete("documents", "acme", "a") is None
    assert registry.count("documents", "acme") == 0


def test_tenants_and_tables_never_see_each_other(registry):
    registry.put("documents", "acme", "a", b"acme's")
    registry.put("documents", "ac", "me:a", b"a look-alike")
    registry.put("programs", "acme", "a", b"a program")
    assert registry.items("documents", "acme") == {"a": b"acme's"}
    assert registry.items("documents", "ac") == {"me:a": b"a look-alike"}
    assert registry.get("documents", "globex", "a") is None
    assert sorted(registry.rows("documents")) == [("ac", "me:a", b"a look-alike"), ("acme", "a", b"acme's")]


def test_sqlite_rows_survive_reopening(tmp_path):
    first = make_registry("sqlite", data_path=tmp_path)
    DocumentRegistry(first).put("acme", doc("a", "alpha"))
    first.close()
    again = DocumentRegistry(make_registry("sqlite", data_path=tmp_path))
    assert again.get_many("acme", ["a"]) == [doc("a", "alpha")]


def test_a_document_registered_on_one_replica_resolves_on_another(redis_url, redis_namespace):
    prefix = f"ragcache:{redis_namespace}:registry"
    one, two = (DocumentRegistry(RedisRegistry(redis_url, prefix=prefix)) for _ in range(2))
    one.put("acme", doc("a", "alpha"))
    assert two.get_many("acme", ["a", "b"]) == [doc("a", "alpha"), None]
    assert two.put("acme", doc("a", "beta")) == doc("a", "alpha")  # replaced: the caller invalidates alpha's KV
    assert one.get_many("acme", ["a"]) == [doc("a", "beta")]
    assert one.count("acme") == 1 and [d.id for d in two.all("acme")] == ["a"]


def test_an_outage_serves_documents_already_seen_and_refuses_the_rest(throwaway_redis, redis_namespace):
    documents = DocumentRegistry(RedisRegistry(throwaway_redis.url, prefix=f"ragcache:{redis_namespace}:registry"))
    documents.put("acme", doc("a", "alpha"))
    throwaway_redis.kill()
    assert documents.get_many("acme", ["a"]) == [doc("a", "alpha")]
    assert documents.served_from_last_seen == 1
    with pytest.raises(RegistryUnavailableError):
        documents.get_many("acme", ["a", "never-seen"])
    with pytest.raises(RegistryUnavailableError):
        documents.put("acme", doc("b", "beta"))  # a registration is stored or refused
    assert documents.count("acme") is None
    assert documents.registry.stats().available is False
    throwaway_redis.start()
    wait_until(lambda: _reachable(documents), timeout_s=5)
    assert documents.registry.stats().available and documents.registry.stats().last_error is None


def _reachable(documents: DocumentRegistry) -> bool:
    try:
        return documents.put("acme", doc("b", "beta")) is None
    except RegistryUnavailableError:
        return False


def test_sqlite_answers_survive_a_restart(embedder, tmp_path):
    first = make_cache(embedder, answers=SqliteAnswerStore(tmp_path / "semantic.sqlite3"))
    assert first.store(query("How do I reset my password?"), "Use the reset link.")
    first.answers.close()
    again = make_cache(embedder, answers=SqliteAnswerStore(tmp_path / "semantic.sqlite3"))
    assert again.rebuilt == 1
    hit = again.lookup(query("How do I reset my password?"))
    assert hit is not None and hit.answer == "Use the reset link."


def test_an_entry_stored_on_one_replica_is_a_hit_on_another_within_a_second(embedder, redis_url, redis_namespace):
    with replica_caches(embedder, redis_url, redis_namespace) as (one, two):
        assert one.store(query("How do I reset my password?"), "Use the reset link.")
        stored_s = time.monotonic()
        hit = wait_until(lambda: two.lookup(query("How do I reset my password?")), timeout_s=1.0)
        assert hit.answer == "Use the reset link." and time.monotonic() - stored_s < 1.0
        assert one.invalidate("acme") == 1
        wait_until(lambda: two.lookup(query("How do I reset my password?")) is None, timeout_s=1.0)
        assert one.answers.events.received == 0  # its own messages are not applied twice


def test_a_replica_that_lost_the_channel_rebuilds_what_it_missed(embedder, throwaway_redis, redis_namespace):
    with replica_caches(embedder, throwaway_redis.url, redis_namespace, follow=(False, True)) as (one, two):
        throwaway_redis.kill()
        throwaway_redis.start()  # an empty Redis (no persistence): two's subscription is gone
        assert one.store(query("How do I reset my password?"), "Use the reset link.")
        hit = wait_until(lambda: two.lookup(query("How do I reset my password?")), timeout_s=10)
        assert hit.answer == "Use the reset link."


def test_a_registry_outage_is_a_503_to_register_and_served_documents_keep_answering(make_engine, throwaway_redis,
                                                                                    redis_namespace):
    documents = DocumentRegistry(RedisRegistry(throwaway_redis.url, prefix=f"ragcache:{redis_namespace}:registry"))
    with running_server(make_engine(), documents=documents) as (url, _):
        body = {"documents": [{"id": "amazon", "text": DOCUMENTS[0]}]}
        assert httpx.post(f"{url}/v1/documents", json=body, timeout=30).status_code == 201
        throwaway_redis.kill()
        refused = httpx.post(f"{url}/v1/documents", json={"documents": [{"id": "k2", "text": DOCUMENTS[1]}]}, timeout=30)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "registry" in refused.json()["error"]["message"]
        ready = httpx.get(f"{url}/ready", timeout=30)
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert ready.json()["registry"] == "redis unreachable"
        question = {"question": QUESTION, "document_ids": ["amazon"], "max_tokens": 2}
        assert httpx.post(f"{url}/v1/rag", json=question, timeout=30).status_code == 200  # seen before the outage
        unseen = httpx.post(f"{url}/v1/rag", json={**question, "document_ids": ["k2"]}, timeout=30)
        assert unseen.status_code == 503


def test_flushing_a_tenants_kv_keeps_its_documents_registered(make_engine):
    with running_server(make_engine()) as (url, runtime):
        body = {"documents": [{"id": "amazon", "text": DOCUMENTS[0]}]}
        assert httpx.post(f"{url}/v1/documents", json=body, timeout=30).status_code == 201
        flushed = httpx.post(f"{url}/admin/flush", params={"tenant": "default"}, timeout=30).json()
        assert flushed["dropped"] >= 1  # the document's chunk KV
        answer = httpx.post(f"{url}/v1/rag", json={"question": QUESTION, "document_ids": ["amazon"], "max_tokens": 2},
                            timeout=30)
        assert answer.status_code == 200 and answer.json()["ragcache"]["chunk_misses"] == 1  # recomputed, not lost
        assert runtime.stats()["tenants"]["default"]["documents"] == 1
