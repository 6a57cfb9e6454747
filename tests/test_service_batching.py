"""The service batches concurrent requests on one engine, and a client that goes away frees its slot."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ragcache.storage.cpu import CpuTier
from ragcache.storage.gpu import GpuTier
from ragcache.storage.tiered import TieredStore

from conftest import DOCUMENTS, QUESTION, loaded, tiny_model
from service_server import running_server


@pytest.fixture
def server(tokenizer):
    from ragcache.engine.runner import BlendEngine

    engine = BlendEngine(loaded(tiny_model(), tokenizer), TieredStore([GpuTier(64 << 20, device="cpu"),
                                                                        CpuTier(64 << 20)]))
    with running_server(engine, semantic_cache=False) as (url, runtime):
        yield url, runtime


def wait_for(condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not come true in time")
        time.sleep(0.02)


def test_concurrent_requests_share_batched_steps(server):
    url, runtime = server
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24, "temperature": 0,
            "documents": [{"text": text} for text in DOCUMENTS[:2]], "stop": ["never-appears"]}
    alone = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    steps_before = runtime.engine.stats()["steps"]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60), range(4)))
    assert all(reply.status_code == 200 for reply in replies)
    texts = {reply.json()["choices"][0]["message"]["content"] for reply in replies}
    assert texts == {alone["choices"][0]["message"]["content"]}  # batching never changes an answer
    tokens = sum(reply.json()["usage"]["completion_tokens"] for reply in replies)
    assert runtime.engine.stats()["steps"] - steps_before < tokens  # decodes of several requests share steps


def test_a_client_that_disconnects_mid_stream_frees_its_working_kv(server):
    url, runtime = server
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1000, "temperature": 0,
            "stream": True, "stop": ["never-appears"]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        while '"content":""' in (line := next(lines)) or not line.startswith("data:"):
            pass  # skip the role chunk: read one real piece of text
        assert runtime.engine.stats()["running"] == 1
    wait_for(lambda: runtime.engine.stats()["cancelled"] == 1)
    stats = httpx.get(f"{url}/admin/stats").json()["engine"]
    assert stats["running"] == 0 and stats["working_kv_bytes"] == 0


def test_engine_figures_are_in_admin_stats_and_metrics(server):
    url, _ = server
    httpx.post(f"{url}/v1/rag", json={"question": QUESTION, "max_tokens": 2}, timeout=60)
    engine = httpx.get(f"{url}/admin/stats").json()["engine"]
    assert engine["steps"] >= 2 and engine["admitted"] == 1 and engine["tokens_per_step"] > 1
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("ragcache_engine_running 0", "ragcache_engine_waiting 0", "ragcache_engine_working_kv_bytes 0",
                 "ragcache_engine_preemptions_total 0", "ragcache_engine_tokens_per_step"):
        assert name in metrics


def test_a_stream_is_accepted_before_its_first_token(server):
    """The 200 goes out once the request passed every check, not when the (busy) engine gets to it."""
    import threading

    url, runtime = server
    release = threading.Event()
    holder = threading.Thread(target=runtime.engine.call, args=(release.wait,))
    holder.start()  # the step loop is busy until release
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
            assert response.status_code == 200 and runtime.engine.stats()["waiting"] == 1
            release.set()
            text = "".join(response.iter_text())
    finally:
        release.set()
        holder.join()
    assert text.rstrip().endswith("data: [DONE]") and '"finish_reason":' in text


def test_shadow_checks_run_after_the_answer_and_show_in_admin_stats_and_metrics(tokenizer):
    from ragcache.engine.runner import BlendEngine

    engine = BlendEngine(loaded(tiny_model(), tokenizer), TieredStore([CpuTier(64 << 20)]))
    with running_server(engine, semantic_cache=False, shadow_fraction=1.0) as (url, runtime):
        body = {"question": QUESTION, "documents": [{"text": text} for text in DOCUMENTS[:3]], "max_tokens": 4}
        reply = httpx.post(f"{url}/v1/rag", json=body, timeout=60)
        assert reply.status_code == 200
        wait_for(lambda: runtime.shadow.stats()["counts"].get("blend_done") == 1)
        budget = httpx.get(f"{url}/admin/stats").json()["blend_budget"]
        assert [(row["tenant"], row["category"], row["setting"]) for row in budget] == [
            ("default", "default", "blend@0.15")]
        assert budget[0]["estimates"]["blend@0.15"]["n"] == 1
        metrics = httpx.get(f"{url}/metrics").text
        assert 'ragcache_blend_checks{tenant="default",category="default",setting="blend@0.15"} 1' in metrics
        assert 'ragcache_shadow_checks_total{outcome="blend_done"} 1' in metrics
        stated = httpx.post(f"{url}/v1/rag", json=body | {"blend_ratio": 0.5}, timeout=60)  # asked for: not steered
        assert stated.status_code == 200 and stated.json()["ragcache"]["blend_ratio"] == 0.5
        assert runtime.shadow.stats()["counts"]["blend_sampled"] == 1
