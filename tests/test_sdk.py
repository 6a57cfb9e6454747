"""The Python SDK against a real server over real HTTP: typed results, streaming, errors, retries."""

import asyncio
import subprocess
import sys
import threading
import time

import pytest

from ragcache.schemas import ChatCompletion, ModelList, RagResponse
from ragcache.sdk import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    NotFoundError,
    PermissionDeniedError,
    RagcacheConnectionError,
    RateLimitError,
)
from ragcache.sdk.retry import RetryPolicy
from ragcache.storage.cpu import CpuTier
from ragcache.storage.gpu import GpuTier
from ragcache.storage.tiered import TieredStore

from conftest import DOCUMENTS, QUESTION
from service_server import free_port, running_server

KEYS = {"k-alpha": "alpha"}
OVER_CONTEXT = [("long-a", "word " * 3000), ("long-b", "other " * 3000)]  # > the tiny model's 4096 positions


def make_engine(tokenizer):
    from conftest import loaded, tiny_model
    from ragcache.engine.runner import BlendEngine

    store = TieredStore([GpuTier(64 << 20, device="cpu"), CpuTier(64 << 20)])
    return BlendEngine(loaded(tiny_model(), tokenizer), store)


@pytest.fixture(scope="module")
def open_server(tokenizer):
    with running_server(make_engine(tokenizer)) as served:
        yield served


@pytest.fixture(scope="module")
def keyed_server(tokenizer):
    with running_server(make_engine(tokenizer), api_keys=KEYS, admin_key="admin-key") as served:
        yield served


@pytest.fixture(scope="module")
def one_slot_server(tokenizer):
    with running_server(make_engine(tokenizer), max_queue=1) as served:
        yield served


def documents(tag: str) -> list[str]:
    """The test documents made unique to one test, so its cache hits and misses are its own."""
    return [f"{text} ({tag})" for text in DOCUMENTS]


def test_importing_the_sdk_does_not_load_torch_or_the_server():
    code = ("import ragcache.sdk, sys; "
            "assert not {'torch', 'ragcache.engine', 'litestar'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rag_inline_then_by_id_after_add_documents(open_server):
    url, _ = open_server
    docs = documents("rag")
    with Client(url) as client:
        inline = client.rag(QUESTION, docs, max_tokens=4)
        records = client.add_documents([(f"geo-{i}", text) for i, text in enumerate(docs)])
        by_id = client.rag(QUESTION, document_ids=["geo-1", "geo-0"], max_tokens=4)
    assert isinstance(inline, RagResponse) and inline.finish_reason in ("stop", "length")
    assert (inline.ragcache.chunk_hits, inline.ragcache.chunk_misses) == (0, 4)
    assert [(r.id, r.cached) for r in records] == [("geo-0", True), ("geo-1", True), ("geo-2", True), ("geo-3", True)]
    assert (by_id.ragcache.chunk_hits, by_id.ragcache.chunk_misses) == (2, 0)
    assert 0 < by_id.usage.prompt_tokens_details.cached_tokens == by_id.ragcache.cached_tokens
    assert 1 <= by_id.usage.completion_tokens <= 4


def test_add_documents_takes_texts_pairs_and_dicts_and_delete_forgets(open_server):
    url, _ = open_server
    text, pair, mapping = documents("forms")[:3]
    with Client(url) as client:
        records = client.add_documents([text, ("pair", pair), {"id": "mapping", "text": mapping}])
        client.delete_document("pair")
        with pytest.raises(NotFoundError, match="pair"):
            client.rag(QUESTION, document_ids=["pair"])
        kept = client.rag(QUESTION, document_ids=["mapping", records[0].id], max_tokens=1)
    assert len(records[0].id) == 16 and [r.id for r in records[1:]] == ["pair", "mapping"]
    assert not any(r.cached for r in records) and all(r.num_tokens > 5 for r in records)
    assert kept.ragcache.chunk_hits == 2


def test_chat_plain_and_streamed_give_the_same_answer_and_report(open_server):
    url, _ = open_server
    docs = documents("chat")
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}]
    with Client(url) as client:
        plain = client.chat(messages, docs, max_tokens=6, temperature=0)
        with client.chat(messages, docs, stream=True, max_tokens=6, temperature=0) as stream:
            pieces = list(stream)
    assert isinstance(plain, ChatCompletion) and plain.ragcache.chunk_misses == 4
    assert "".join(pieces) == stream.text == plain.choices[0].message.content
    assert stream.finish_reason == plain.choices[0].finish_reason
    # the same prompt again: served from the prefix cache, no chunk looked up
    assert stream.report is not None and (stream.report.chunk_hits, stream.report.chunk_misses) == (0, 0)
    assert stream.report.prefix_cached_tokens == stream.report.cached_tokens > 0
    assert stream.usage is not None and stream.usage.completion_tokens == plain.usage.completion_tokens
    assert stream.chunks[0].choices[0].delta.role == "assistant"


def test_an_over_context_stream_is_refused_before_it_starts(open_server):
    url, _ = open_server
    with Client(url) as client:
        with pytest.raises(BadRequestError, match="exceeds the model's context") as caught:
            list(client.chat(QUESTION, OVER_CONTEXT, stream=True, max_tokens=8))  # a 400, not a 200 with an error
    assert caught.value.type == "invalid_request_error"


def test_async_client_does_what_the_client_does(open_server):
    url, _ = open_server
    docs = documents("async")

    async def scenario():
        async with AsyncClient(url) as client:
            records = await client.add_documents([(f"a-{i}", text) for i, text in enumerate(docs)])
            answer = await client.rag(QUESTION, document_ids=["a-0", "a-2"], max_tokens=3)
            plain = await client.chat(QUESTION, document_ids=["a-0"], max_tokens=5, temperature=0)
            stream = await client.chat(QUESTION, document_ids=["a-0"], stream=True, max_tokens=5, temperature=0)
            streamed = [piece async for piece in stream]
            await client.delete_document("a-2")
            with pytest.raises(NotFoundError, match="a-2"):
                await client.rag(QUESTION, document_ids=["a-2"])
            return records, answer, plain, stream, streamed, await client.models(), await client.ready()

    records, answer, plain, stream, streamed, models, ready = asyncio.run(scenario())
    assert [r.id for r in records] == ["a-0", "a-1", "a-2", "a-3"]
    assert (answer.ragcache.chunk_hits, answer.ragcache.chunk_misses) == (2, 0)
    assert "".join(streamed) == plain.choices[0].message.content
    assert stream.report is not None and stream.report.prefix_cached_tokens > 0  # the plain request's prefix
    assert isinstance(models, ModelList) and [m.id for m in models.data] == ["tiny-llama"]
    assert ready["status"] == "ready"


def test_bad_requests_raise_bad_request_with_the_server_message(open_server):
    url, _ = open_server
    with Client(url) as client:
        with pytest.raises(BadRequestError, match=r"max_tokens must be in \[1, 1024\]") as too_many:
            client.rag(QUESTION, max_tokens=10**9)
        with pytest.raises(BadRequestError) as not_an_int:
            client.rag(QUESTION, max_tokens="many")
        with pytest.raises(NotFoundError, match="nope"):
            client.delete_document("nope")
    assert (too_many.value.status, too_many.value.type) == (400, "invalid_request_error")
    assert not_an_int.value.param == "max_tokens"


def test_keys_and_admin_errors(keyed_server):
    url, _ = keyed_server
    with pytest.raises(AuthenticationError, match="missing API key") as missing:
        Client(url).rag(QUESTION, max_tokens=1)
    with pytest.raises(AuthenticationError, match="invalid API key"):
        Client(url, "k-wrong").models()
    with pytest.raises(PermissionDeniedError, match="not the admin key") as denied:
        Client(url, "k-alpha").stats()
    tenant = Client(url, "k-alpha", admin_key="admin-key")
    assert tenant.rag(QUESTION, max_tokens=1).usage.completion_tokens == 1
    stats = tenant.stats()
    assert missing.value.status == 401 and denied.value.status == 403
    assert [t["name"] for t in stats["tiers"]] == ["device", "cpu"] and stats["tenants"]["alpha"]["requests"]


def occupy_queue(runtime, seconds: float) -> threading.Timer:
    """Fill the server's queue now and free it after `seconds`, from a timer thread."""
    runtime._in_flight = runtime.max_queue
    timer = threading.Timer(seconds, lambda: setattr(runtime, "_in_flight", 0))
    timer.start()
    return timer


def test_a_full_queue_is_retried_after_retry_after_then_succeeds(one_slot_server):
    url, runtime = one_slot_server
    client = Client(url, backoff_s=0.01)
    refused_before = client.stats()["tenants"].get("default", {}).get("errors", {}).get("QueueFullError", 0)
    timer = occupy_queue(runtime, 0.3)
    started = time.monotonic()
    try:
        answer = client.rag(QUESTION, max_tokens=1)
    finally:
        timer.join()
    assert answer.usage.completion_tokens == 1
    assert time.monotonic() - started >= 1.0  # the server's Retry-After: 1 wins over backoff_s
    assert client.stats()["tenants"]["default"]["errors"]["QueueFullError"] == refused_before + 1


def test_a_full_queue_without_retries_raises_rate_limit(one_slot_server):
    url, runtime = one_slot_server
    timer = occupy_queue(runtime, 0.3)
    try:
        with pytest.raises(RateLimitError, match="max_queue=1") as caught:
            Client(url, max_retries=0).rag(QUESTION, max_tokens=1)
    finally:
        timer.join()
    assert (caught.value.status, caught.value.type) == (429, "rate_limit_error")


def test_connection_refused_raises_after_the_retries():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RagcacheConnectionError, match="3 attempts") as caught:
        Client(url, max_retries=2, backoff_s=0.01).health()
    assert isinstance(caught.value, ConnectionError)

    async def scenario():
        async with AsyncClient(url, max_retries=1, backoff_s=0.01) as client:
            await client.rag(QUESTION)

    with pytest.raises(RagcacheConnectionError, match="2 attempts"):
        asyncio.run(scenario())


def test_retry_delay_doubles_unless_the_server_says():
    policy = RetryPolicy(max_retries=3, backoff_s=0.5)
    assert [policy.delay_s(attempt) for attempt in range(3)] == [0.5, 1.0, 2.0]
    assert policy.delay_s(2, "1") == 1.0
    assert policy.delay_s(0, "Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: now
    assert policy.delay_s(0, "soon") == 0.5 and policy.delay_s(0, "86400") == 60.0
