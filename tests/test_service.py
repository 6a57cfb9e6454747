"""The HTTP service over a real server: OpenAI compatibility, RAG endpoints, auth, errors, admin."""

import asyncio
import threading

import httpx
import openai
import pytest

from ragcache.engine.runner import RagRequest
from ragcache.engine.generate import SamplingParams
from ragcache.service.runtime import QueueFullError, Runtime
from ragcache.storage.cpu import CpuTier
from ragcache.storage.gpu import GpuTier
from ragcache.storage.tiered import TieredStore

from conftest import DOCUMENTS, QUESTION
from service_server import running_server

KEYS = {"k-alpha": "alpha", "k-beta": "beta"}
DOCS = [{"text": d} for d in DOCUMENTS]


@pytest.fixture(scope="module")
def open_server(tokenizer):
    from conftest import loaded, tiny_model
    from ragcache.engine.runner import BlendEngine

    engine = BlendEngine(loaded(tiny_model(), tokenizer), TieredStore([GpuTier(64 << 20, device="cpu"), CpuTier(64 << 20)]))
    with running_server(engine) as (url, runtime):
        yield url, runtime


@pytest.fixture(scope="module")
def keyed_server(tokenizer):
    from conftest import loaded, tiny_model
    from ragcache.engine.runner import BlendEngine

    engine = BlendEngine(loaded(tiny_model(), tokenizer), TieredStore([GpuTier(64 << 20, device="cpu"), CpuTier(64 << 20)]))
    with running_server(engine, api_keys=KEYS, admin_key="admin-key") as (url, runtime):
        yield url, runtime


def client(url, key="unused"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def chat(url, **extra):
    return client(url).chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": QUESTION}], max_tokens=6, temperature=0,
        extra_body={"documents": DOCS, **extra},
    )


def test_openai_client_chat_with_documents(open_server):
    url, _ = open_server
    first, second = chat(url), chat(url)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.choices[0].finish_reason in ("stop", "length")
    report = second.model_extra["ragcache"]
    assert first.model_extra["ragcache"]["chunk_misses"] == 4
    # the same prompt again: the prefix cache gives all of it but the last token's block, no chunk is looked up
    assert report["chunk_hits"] == 0 and report["prefix_cached_tokens"] == report["cached_tokens"] > 0
    assert 0 < second.usage.prompt_tokens_details.cached_tokens == report["cached_tokens"] < second.usage.prompt_tokens
    assert 1 <= second.usage.completion_tokens <= 6


def test_openai_client_streaming_matches_the_plain_answer(open_server):
    url, _ = open_server
    plain = chat(url).choices[0].message.content
    stream = client(url).chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": QUESTION}], max_tokens=6, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"documents": DOCS},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_models_and_openapi(open_server):
    url, _ = open_server
    assert [m.id for m in client(url).models.list()] == ["tiny-llama"]
    spec = httpx.get(f"{url}/schema/openapi.json").json()
    operations = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    assert {"createChatCompletion", "listModels", "rag", "addDocuments", "deleteDocument", "adminStats"} <= operations
    responses = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


def test_documents_ahead_then_rag_by_id_then_delete(open_server):
    url, _ = open_server
    docs = [{"id": f"geo-{i}", "text": d} for i, d in enumerate(DOCUMENTS)]
    added = httpx.post(f"{url}/v1/documents", json={"documents": docs}).json()["documents"]
    assert [d["id"] for d in added] == ["geo-0", "geo-1", "geo-2", "geo-3"] and all(d["num_tokens"] > 5 for d in added)
    again = httpx.post(f"{url}/v1/documents", json={"documents": docs[:1]}).json()["documents"]
    assert again[0]["cached"] is True
    answer = httpx.post(f"{url}/v1/rag", json={"question": QUESTION, "document_ids": ["geo-1", "geo-0"], "max_tokens": 3})
    assert answer.status_code == 200 and answer.headers["x-ragcache-chunk-hits"] == "2"
    assert answer.json()["ragcache"]["chunk_misses"] == 0
    assert httpx.delete(f"{url}/v1/documents/geo-1").status_code == 204
    gone = httpx.post(f"{url}/v1/rag", json={"question": QUESTION, "document_ids": ["geo-1"]})
    assert gone.status_code == 404 and "geo-1" in gone.json()["error"]["message"]


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"messages": "hello"}, "messages"),
        ({"messages": []}, "messages: Expected `array` of length >= 1"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "last message"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "blend_ratio": 2}, "blend_ratio"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "documents": [{"text": "a", "url": "x"}]}, "url"),
        ({"messages": [{"role": "user", "content": "hi"}], "documents": [{"text": "  "}]}, "documents[0].text: must not be blank"),
        ({"messages": [{"role": "user", "content": "hi"}], "documents": [{"text": "w " * 5000}]}, "documents[0] has"),
        ({"messages": [{"role": "user", "content": "hi"}], "documents": DOCS * 20}, "at most 64"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"messages": [{"role": "user", "content": "hi"}], "mode": "fast"}, "mode"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(open_server, body, needle):
    url, runtime = open_server
    entries = runtime.engine.store.usage().entries
    response = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]
    assert runtime.engine.store.usage().entries >= entries  # a bad request never costs a cache entry


def test_malformed_json_and_prompt_over_context(open_server):
    url, _ = open_server
    broken = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
    long_docs = [{"text": "word " * 3000}, {"text": "other " * 3000}]
    body = {"messages": [{"role": "user", "content": "hi"}], "documents": long_docs, "max_tokens": 8}
    over = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert over.status_code == 400 and "context" in over.json()["error"]["message"]


def test_full_queue_is_a_429(open_server):
    url, runtime = open_server
    saved, runtime._in_flight = runtime._in_flight, runtime.max_queue
    try:
        response = httpx.post(f"{url}/v1/rag", json={"question": QUESTION})
    finally:
        runtime._in_flight = saved
    assert response.status_code == 429 and response.headers["retry-after"] == "1"


def test_full_queue_is_a_429_for_streams_too(open_server):
    url, runtime = open_server
    body = {"messages": [{"role": "user", "content": QUESTION}], "stream": True}
    saved, runtime._in_flight = runtime._in_flight, runtime.max_queue
    try:
        response = httpx.post(f"{url}/v1/chat/completions", json=body)
    finally:
        runtime._in_flight = saved
    assert response.status_code == 429 and response.json()["error"]["type"] == "rate_limit_error"


def test_document_ids_with_a_slash_are_refused(open_server):
    url, _ = open_server
    response = httpx.post(f"{url}/v1/documents", json={"documents": [{"id": "a/b", "text": "text"}]})
    assert response.status_code == 400 and "documents[0].id" in response.json()["error"]["message"]


def test_queue_bound_is_enforced_while_the_engine_is_busy(make_engine):
    engine = make_engine()
    runtime = Runtime(engine, max_queue=1)
    runtime.start()
    release = threading.Event()
    request = RagRequest(QUESTION, sampling=SamplingParams(max_tokens=1))

    async def answer():
        return [item async for item in runtime.answer("default", request)][-1]

    async def scenario():
        busy = asyncio.ensure_future(asyncio.to_thread(engine.call, release.wait))  # the engine thread is held
        waiting = asyncio.ensure_future(answer())
        while runtime.engine.stats()["waiting"] < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError, match="max_queue=1"):
            await answer()
        release.set()
        await busy
        assert (await waiting).token_ids
        return await answer()

    assert asyncio.run(scenario()).token_ids
    runtime.close()


def test_keys_map_to_tenants_and_tenants_are_isolated(keyed_server):
    url, _ = keyed_server
    question = {"question": QUESTION, "max_tokens": 2}
    assert httpx.post(f"{url}/v1/rag", json=question).status_code == 401
    assert httpx.post(f"{url}/v1/rag", json=question, headers={"authorization": "Bearer nope"}).status_code == 401
    alpha, beta = {"authorization": "Bearer k-alpha"}, {"authorization": "Bearer k-beta"}
    added = httpx.post(f"{url}/v1/documents", json={"documents": [{"id": "secret", "text": DOCUMENTS[0]}]}, headers=alpha)
    assert added.status_code == 201
    stolen = httpx.post(f"{url}/v1/rag", json={**question, "document_ids": ["secret"]}, headers=beta)
    assert stolen.status_code == 404 and "error" in stolen.json()
    assert httpx.delete(f"{url}/v1/documents/secret", headers=beta).status_code == 404
    own = httpx.post(f"{url}/v1/rag", json={**question, "document_ids": ["secret"]}, headers=alpha)
    assert own.status_code == 200 and own.json()["ragcache"]["chunk_hits"] == 1
    # the same text under beta's namespace is beta's own chunk: a miss, never alpha's entry
    mine = httpx.post(f"{url}/v1/rag", json={**question, "documents": [{"text": DOCUMENTS[0]}]}, headers=beta)
    assert mine.json()["ragcache"]["chunk_misses"] == 1


def test_admin_endpoints_need_the_admin_key(keyed_server):
    url, _ = keyed_server
    assert httpx.get(f"{url}/admin/stats").status_code == 401
    assert httpx.get(f"{url}/admin/stats", headers={"authorization": "Bearer k-alpha"}).status_code == 403
    admin = {"authorization": "Bearer admin-key"}
    httpx.post(f"{url}/v1/rag", json={"question": QUESTION, "max_tokens": 1}, headers={"authorization": "Bearer k-beta"})
    stats = httpx.get(f"{url}/admin/stats", headers=admin).json()
    assert [t["name"] for t in stats["tiers"]] == ["device", "cpu"]
    assert stats["tenants"]["beta"]["requests"]["blend"] >= 1 and "p50" in stats["tenants"]["beta"]["ttft_s"]
    metrics = httpx.get(f"{url}/metrics", headers=admin).text
    assert 'ragcache_tier_entries{tier="device"}' in metrics and 'ragcache_requests_total{tenant="beta",mode="blend"}' in metrics


def test_flush_by_tenant_drops_its_documents(keyed_server):
    url, _ = keyed_server
    alpha, admin = {"authorization": "Bearer k-alpha"}, {"authorization": "Bearer admin-key"}
    httpx.post(f"{url}/v1/documents", json={"documents": [{"id": "a1", "text": DOCUMENTS[1]}]}, headers=alpha)
    flushed = httpx.post(f"{url}/admin/flush", params={"tenant": "alpha"}, headers=admin).json()
    assert flushed["dropped"] >= 1
    again = httpx.post(f"{url}/v1/rag", json={"question": QUESTION, "documents": [{"text": DOCUMENTS[1]}], "max_tokens": 1},
                       headers=alpha)
    assert again.json()["ragcache"]["chunk_misses"] == 1
    assert httpx.post(f"{url}/admin/flush", params={"tier": "nvme"}, headers=admin).status_code == 400


def test_health_and_ready(open_server):
    url, _ = open_server
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").json()["status"] == "ready"


def test_program_turns_reuse_the_previous_turns_kv(open_server):
    url, _ = open_server
    messages = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "List /tmp."}]
    first = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 3, "temperature": 0},
                       headers={"x-session-id": "agent-7"}).json()
    answer = first["choices"][0]["message"]["content"].strip() or "ok"
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Tool result: a.txt"}]
    second = httpx.post(f"{url}/v1/chat/completions",
                        json={"messages": messages, "max_tokens": 3, "temperature": 0, "program_id": "agent-7"}).json()
    assert first["ragcache"]["program_reused_tokens"] == 0
    assert second["ragcache"]["program_reused_tokens"] >= first["usage"]["prompt_tokens"] // 16 * 16  # whole blocks


def test_a_tool_call_pins_the_programs_kv_until_the_next_turn(open_server):
    url, _ = open_server
    messages = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "Search the web."}]
    body = {"messages": messages, "max_tokens": 2, "temperature": 0, "program_id": "agent-pin"}
    httpx.post(f"{url}/v1/chat/completions", json=body)
    assert httpx.post(f"{url}/v1/programs/agent-pin/events", json={"type": "tool_start", "tool": "search"}).status_code == 204
    programs = httpx.get(f"{url}/admin/programs").json()
    assert any(p["program_id"] == "agent-pin" for p in programs["programs"])
    assert "default/search" not in programs["pins"]["predictor"]["tools"]
    messages += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "Result: 3 pages."}]
    second = httpx.post(f"{url}/v1/chat/completions", json={**body, "messages": messages, "is_last_step": True}).json()
    assert second["ragcache"]["program_reused_tokens"] > 0
    after = httpx.get(f"{url}/admin/programs").json()
    # the next turn's arrival ended the tool call: its duration is the predictor's first sample
    assert after["pins"]["predictor"]["tools"]["default/search"]["samples"] == 1
    assert after["pins"]["active_pins"] == []
    bad = httpx.post(f"{url}/v1/programs/agent-pin/events", json={"type": "tool_start"})
    assert bad.status_code == 400 and "tool" in bad.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/programs/agent-pin/events", json={"type": "nap"}).status_code == 400


def test_admin_stats_and_metrics_show_the_prefix_cache(keyed_server):
    url, _ = keyed_server
    admin, beta = {"authorization": "Bearer admin-key"}, {"authorization": "Bearer k-beta"}
    body = {"question": "Which rivers are named here?", "documents": [{"text": d} for d in DOCUMENTS[:2]],
            "max_tokens": 2}
    before = httpx.get(f"{url}/admin/stats", headers=admin).json()["prefix_cache"]
    first = httpx.post(f"{url}/v1/rag", json=body, headers=beta).json()
    again = httpx.post(f"{url}/v1/rag", json=body, headers=beta).json()
    after = httpx.get(f"{url}/admin/stats", headers=admin).json()["prefix_cache"]
    assert again["ragcache"]["prefix_cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    assert after["hit_tokens"] - before["hit_tokens"] == again["ragcache"]["prefix_cached_tokens"]
    assert after["lookups"] - before["lookups"] == 2 and after["nodes"] > before["nodes"]
    assert after["cached_tokens"] >= first["usage"]["prompt_tokens"]
    metrics = httpx.get(f"{url}/metrics", headers=admin).text
    assert f"ragcache_prefix_hit_tokens_total {after['hit_tokens']}" in metrics
    assert "ragcache_prefix_nodes " in metrics and "ragcache_prefix_evictions_total " in metrics
