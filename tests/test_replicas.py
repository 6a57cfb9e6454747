"""Two `ragcache serve` replicas sharing one real Redis, and restarts: what users registered is
durable and shared, KV computed on one replica is reused by the other, semantic entries propagate."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import DOCUMENTS, QUESTION
from redis_server import redis_namespace, redis_url, wait_until  # noqa: F401  (fixtures)
from replicas import Replica, start_all

GUIDE = ("The Tunely music service lets a subscriber reset a forgotten password from the sign-in page: "
         "choose 'Forgot password', enter the account e-mail, and follow the link that arrives within five minutes.")


@pytest.mark.real_model
def test_documents_programs_and_answers_are_shared_by_replicas_and_survive_restarts(redis_url, redis_namespace):
    tenant = redis_namespace  # a tenant of this run's own: its keys are new to the shared Redis
    one, two = (Replica(tenant, "--redis-url", redis_url) for _ in range(2))
    start_all(one, two)
    try:
        added = one.post("/v1/documents", {"documents": [{"id": "guide", "text": GUIDE}]})
        assert added.status_code == 201, added.text

        # any replica resolves any document id, and reuses the chunk KV the other computed
        rag = two.post("/v1/rag", {"question": "How do I reset my Tunely password?", "document_ids": ["guide"],
                                   "max_tokens": 4})
        assert rag.status_code == 200, rag.text
        report = rag.json()["ragcache"]
        assert report["chunk_hits"] == 1 and report["chunk_misses"] == 0

        # a semantic entry stored on one replica is a hit on the other within a second
        chat = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 48,
                "temperature": 0}
        first = one.post("/v1/chat/completions", chat)
        assert first.status_code == 200 and first.json()["choices"][0]["finish_reason"] == "stop", first.text
        stored_s = time.monotonic()
        hit = wait_until(lambda: _semantic_hit(two, chat), timeout_s=1.0, poll_s=0.05)
        assert time.monotonic() - stored_s < 1.0
        assert hit["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]

        # an agent program's next turn on the other replica reuses its KV from Redis
        turn = [{"role": "user", "content": "List three colours."}]
        answer = one.post("/v1/chat/completions", {"messages": turn, "max_tokens": 12, "program_id": "p1"}).json()
        turn += [answer["choices"][0]["message"], {"role": "user", "content": "And three more."}]
        follow = two.post("/v1/chat/completions", {"messages": turn, "max_tokens": 4, "program_id": "p1"})
        assert follow.status_code == 200, follow.text
        assert follow.json()["ragcache"]["program_reused_tokens"] > 0

        # flushing KV never forgets documents; a restarted replica still resolves them, with chunk hits
        flushed = one.admin("POST", "/admin/flush", tenant=tenant, tier="device")
        assert flushed.status_code == 200 and flushed.json()["dropped"] >= 1, flushed.text
        one.stop()
        one.start()
        again = one.post("/v1/rag", {"question": "How do I reset my Tunely password?", "document_ids": ["guide"],
                                     "max_tokens": 4})
        assert again.status_code == 200, again.text
        assert again.json()["ragcache"]["cached_tokens"] > 0  # the chunk's KV, or the prefix cache's, from Redis
    finally:
        one.stop()
        two.stop()


def _semantic_hit(replica: Replica, chat: dict) -> dict | None:
    response = replica.post("/v1/chat/completions", chat).json()
    return response if response.get("ragcache", {}).get("semantic_hit") else None


def test_the_embedded_registry_keeps_documents_across_a_restart(tiny_model_dir, tmp_path):
    server = Replica("acme", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path),
                     RAGCACHE_SEMANTIC_CACHE="false")
    server.start()
    try:
        added = server.post("/v1/documents", {"documents": [{"id": f"d{i}", "text": d} for i, d in enumerate(DOCUMENTS[:2])]})
        assert added.status_code == 201, added.text
        server.stop()
        assert (tmp_path / "registry.sqlite3").exists()
        server.start()
        rag = server.post("/v1/rag", {"question": QUESTION, "document_ids": ["d0", "d1"],
                                      "max_tokens": 2})
        assert rag.status_code == 200, rag.text
        assert server.delete("/v1/documents/d0").status_code == 204
        server.stop()
        server.start()  # the deletion is durable too
        gone = server.post("/v1/rag", {"question": QUESTION, "document_ids": ["d0"], "max_tokens": 2})
        assert gone.status_code == 404, gone.text
    finally:
        server.stop()


def test_redis_killed_mid_load_fails_no_request_and_the_write_backlog_drains(tiny_model_dir, throwaway_redis):
    server = Replica("acme", "--model", str(tiny_model_dir), "--redis-url", throwaway_redis.url,
                     RAGCACHE_SEMANTIC_CACHE="false", RAGCACHE_CPU_CACHE_GB="0.5")
    server.start()
    questions = [{"question": f"Question {i}?", "documents": [{"text": f"Passage {i}: {d}"} for d in DOCUMENTS[:2]],
                  "max_tokens": 2} for i in range(24)]
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = [pool.submit(server.post, "/v1/rag", body) for body in questions]
            wait_until(lambda: sum(a.done() for a in answers) >= 4, timeout_s=120)
            throwaway_redis.kill()  # mid-load: new chunks can no longer be written through
            wait_until(lambda: sum(a.done() for a in answers) >= 12, timeout_s=120)
            throwaway_redis.start()
            statuses = [answer.result().status_code for answer in answers]
        assert statuses == [200] * len(questions)
        store = wait_until(lambda: _drained(server), timeout_s=30)
        assert store["written_after_retry"] > 0 and store["backlog_dropped"] == 0
        redis_tier = next(t for t in server.admin("GET", "/admin/stats").json()["tiers"] if t["name"] == "redis")
        assert redis_tier["available"] and redis_tier["last_error"] is None
    finally:
        server.stop()


def _drained(server: Replica) -> dict | None:
    store = server.admin("GET", "/admin/stats").json()["store"]
    return store if store["backlog_entries"] == 0 and store["written_after_retry"] > 0 else None
