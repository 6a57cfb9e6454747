"""The semantic cache in front of the engine, over a real server: hits marked, feedback, admin."""

import time

import httpx
import pytest

from ragcache.engine.runner import BlendEngine
from ragcache.semantic import SemanticCache, SemanticQuery, documents_hash
from ragcache.semantic.answers import make_answer_store
from ragcache.storage.cpu import CpuTier
from ragcache.storage.gpu import GpuTier
from ragcache.storage.tiered import TieredStore

from conftest import DOCUMENTS, QUESTION, loaded, tiny_model
from semantic_fixtures import embedder  # noqa: F401  the real MiniLM, once per session
from service_server import running_server

DOCS = [{"text": d} for d in DOCUMENTS]


@pytest.fixture(scope="module")
def server(tokenizer, embedder):  # noqa: F811
    engine = BlendEngine(loaded(tiny_model(), tokenizer), TieredStore([GpuTier(64 << 20, device="cpu"), CpuTier(64 << 20)]))
    with running_server(engine, SemanticCache(embedder, make_answer_store(None))) as (url, runtime):
        yield url, runtime


def chat(url, question, documents=DOCS, **extra):
    """A sampled request that asks to be cached: the tiny random model says something other than newlines then."""
    body = {"messages": [{"role": "user", "content": question}], "documents": documents, "max_tokens": 8,
            "temperature": 2.0, "seed": 7, "cache_sampled": True, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def generate_and_store(url, question):
    """A complete answer (cut by a stop string, so finish_reason is "stop") is stored; a truncated one is not."""
    free = chat(url, question).json()
    assert free["choices"][0]["finish_reason"] == "length" and not free["ragcache"]["semantic_hit"]
    text = free["choices"][0]["message"]["content"]
    stop = next(text[i : i + 2] for i in range(1, len(text) - 1) if text[:i].strip() and text[i : i + 2].strip())
    complete = chat(url, question, stop=[stop]).json()
    assert complete["choices"][0]["finish_reason"] == "stop" and complete["choices"][0]["message"]["content"].strip()
    return complete["choices"][0]["message"]["content"]


def test_a_repeated_question_is_answered_from_the_semantic_cache(server):
    url, _ = server
    answer = generate_and_store(url, QUESTION)
    again = chat(url, QUESTION)
    report = again.json()["ragcache"]
    assert again.headers["x-ragcache-semantic-hit"] == "true" and report["mode"] == "semantic"
    assert again.json()["choices"][0]["message"]["content"] == answer and report["semantic_similarity"] > 0.99
    assert again.json()["usage"]["prompt_tokens"] == 0  # the model did no work
    assert not chat(url, QUESTION, documents=DOCS[:2]).json()["ragcache"]["semantic_hit"]  # other documents
    assert not chat(url, QUESTION, cache=False).json()["ragcache"]["semantic_hit"]
    assert not chat(url, QUESTION, cache_sampled=False).json()["ragcache"]["semantic_hit"]  # sampled: bypass


def test_rag_endpoint_serves_and_streams_cached_answers(server):
    url, runtime = server
    question = "Which mountain is the highest in Africa?"
    query = SemanticQuery.from_messages("default", [{"role": "user", "content": question}], model="tiny-llama",
                                        documents_hash=documents_hash(DOCUMENTS))
    assert runtime.semantic.store(query, "Mount Kilimanjaro.")
    rag = httpx.post(f"{url}/v1/rag", json={"question": question, "documents": DOCS}).json()
    assert rag["answer"] == "Mount Kilimanjaro." and rag["ragcache"]["semantic_hit"]
    body = {"messages": [{"role": "user", "content": question}], "documents": DOCS, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "Mount Kilimanjaro." in events[0] and '"semantic_hit":true' in events[1]


def test_feedback_removes_a_wrong_answer(server):
    url, _ = server
    question = "How many countries does the Danube pass through?"
    generate_and_store(url, question)
    hit = chat(url, question).json()["ragcache"]
    assert hit["semantic_hit"]
    assert httpx.post(f"{url}/v1/feedback", json={"entry_id": hit["semantic_entry_id"]}).status_code == 204
    assert not chat(url, question).json()["ragcache"]["semantic_hit"]
    unknown = httpx.post(f"{url}/v1/feedback", json={"entry_id": "nope"})
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]["message"]


def test_admin_sees_and_changes_the_semantic_cache(server):
    url, _ = server
    generate_and_store(url, "Where is Lake Baikal?")
    stats = httpx.get(f"{url}/admin/semantic").json()
    assert any(c["tenant"] == "default" and c["entries"] >= 1 for c in stats["categories"])
    policy = {"threshold": 0.97, "ttl_s": 60, "max_entries": 100}
    changed = httpx.put(f"{url}/admin/semantic/categories/factual", json=policy)
    assert changed.status_code == 200 and changed.json()["policy"]["threshold"] == 0.97
    assert httpx.get(f"{url}/admin/semantic").json()["thresholds"]["factual"] == 0.97
    assert httpx.put(f"{url}/admin/semantic/categories/factual", json={**policy, "threshold": 1.5}).status_code == 400
    bad_delta = httpx.put(f"{url}/admin/semantic/categories/factual", json={**policy, "delta": 0})
    assert bad_delta.status_code == 400 and "delta" in bad_delta.json()["error"]["message"]
    assert httpx.put(f"{url}/admin/semantic/categories/factual", json={**policy, "delta": 0.02}).json()[
        "policy"]["delta"] == 0.02
    assert httpx.put(f"{url}/admin/blend/categories/factual", json={"epsilon": 0.05}).json()["epsilon"] == 0.05
    bad_epsilon = httpx.put(f"{url}/admin/blend/categories/factual", json={"epsilon": 1.5})
    assert bad_epsilon.status_code == 400 and "epsilon" in bad_epsilon.json()["error"]["message"]
    assert httpx.put(f"{url}/admin/blend/categories/factual", json={}).status_code == 400
    metrics = httpx.get(f"{url}/metrics").text
    assert 'ragcache_semantic_hits_total{tenant="default",category=' in metrics
    assert httpx.delete(f"{url}/admin/semantic", params={"tenant": "default"}).json()["dropped"] >= 1
    assert not chat(url, "Where is Lake Baikal?").json()["ragcache"]["semantic_hit"]


def test_answers_and_chunk_kv_built_on_a_document_go_when_it_changes_or_is_deleted(server):
    url, runtime = server
    river, other = "The Thames flows through London to the North Sea.", "The Seine flows through Paris."

    def register(text):
        reply = httpx.post(f"{url}/v1/documents", json={"documents": [{"id": "river", "text": text},
                                                                       {"id": "other", "text": other}]})
        assert reply.status_code == 201

    def ask(**extra):
        body = {"messages": [{"role": "user", "content": "Where does the Thames reach the sea?"}],
                "document_ids": ["river", "other"], "max_tokens": 8, "temperature": 2.0, "seed": 7,
                "cache_sampled": True, **extra}
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()

    def store_an_answer():
        text = ask()["choices"][0]["message"]["content"]
        stop = next(text[i : i + 2] for i in range(1, len(text) - 1) if text[:i].strip() and text[i : i + 2].strip())
        assert ask(stop=[stop])["choices"][0]["finish_reason"] == "stop" and ask()["ragcache"]["semantic_hit"]

    register(river)
    (old,) = runtime.documents.get_many("default", ["river"])
    old_key = old.key
    store_an_answer()
    register(river + " Slowly.")  # re-registered with other text
    assert runtime.engine.store.get(old_key) is None  # the old text's chunk KV is gone
    register(river)  # back to the text the cached answer was built on: that answer must not come back
    assert not ask()["ragcache"]["semantic_hit"]
    store_an_answer()
    assert httpx.delete(f"{url}/v1/documents/other").status_code == 204
    register(river)  # "other" registered again with the same text: the answer built on it was dropped at delete
    assert not ask()["ragcache"]["semantic_hit"]


def test_a_sampled_semantic_hit_is_checked_against_a_fresh_engine_answer(tokenizer, embedder):  # noqa: F811
    engine = BlendEngine(loaded(tiny_model(), tokenizer), TieredStore([CpuTier(64 << 20)]))
    with running_server(engine, SemanticCache(embedder, make_answer_store(None)),
                        semantic_shadow_fraction=1.0) as (url, runtime):
        question = "Which river is the longest in South America?"
        query = SemanticQuery.from_messages("default", [{"role": "user", "content": question}], model="tiny-llama",
                                            documents_hash=documents_hash(DOCUMENTS))
        assert runtime.semantic.store(query, "The Amazon, at about 6,400 km.")
        hit = httpx.post(f"{url}/v1/rag", json={"question": question, "documents": DOCS, "max_tokens": 6}).json()
        assert hit["ragcache"]["semantic_hit"] and hit["answer"] == "The Amazon, at about 6,400 km."
        deadline = time.monotonic() + 30
        while runtime.shadow.stats()["pending"] and time.monotonic() < deadline:
            time.sleep(0.02)
        counts = runtime.shadow.stats()["counts"]
        assert counts["semantic_sampled"] == 1
        # the tiny random model cannot say "The Amazon, at about 6,400 km.": the check finds a disagreement
        assert counts == {"semantic_sampled": 1, "semantic_disagreed": 1}
        row = next(c for c in runtime.semantic.stats().categories if c.tenant == "default" and c.checks)
        assert (row.checks, row.checks_wrong) == (1, 1)
        assert runtime.engine.stats()["background"]["steps"] > 0  # it ran as background work


def test_the_served_spec_names_the_categories_and_other_names_are_refused(server):
    url, runtime = server
    known = sorted(runtime.semantic.policies())
    spec = httpx.get(f"{url}/schema/openapi.json").json()
    for schema in ("RagRequestBody", "ChatCompletionRequest"):
        arms = spec["components"]["schemas"][schema]["properties"]["category"]["anyOf"]
        assert {"type": "string", "enum": known} in arms
    empty = httpx.post(f"{url}/v1/rag", json={"question": "Where is Lake Baikal?", "category": ""}, timeout=30)
    assert empty.status_code == 400 and "unknown category ''" in empty.text
    assert httpx.put(f"{url}/admin/semantic/categories/made-up", json={"threshold": 0.9, "ttl_s": 60,
                                                                        "max_entries": 10}).status_code == 404
    assert httpx.delete(f"{url}/admin/semantic", params={"tenant": "default", "category": ""}).status_code == 400


def test_text_only_modalities_are_taken_and_others_refused(server):
    url, _ = server
    for modalities in ([], ["text"]):
        assert chat(url, "Where is the Danube?", modalities=modalities, cache=False).status_code == 200
    refused = chat(url, "Where is the Danube?", modalities=["audio"], cache=False)
    assert refused.status_code == 400 and "modalities" in refused.text
