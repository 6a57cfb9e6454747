"""OpenAI tool calling and parity over a real server (tiny model): the wire, the refusals, conversations
found by prefix. Constrained output itself is tested in test_grammar.py; real clients in test_clients.py."""

import json

import httpx
import openai
import pytest

from ragcache.storage.cpu import CpuTier
from ragcache.storage.gpu import GpuTier
from ragcache.storage.prefix import DEFAULT_BLOCK_TOKENS
from ragcache.storage.tiered import TieredStore

from service_server import running_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}
ASK = {"role": "user", "content": "What is the weather in Paris?"}
CALLED = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}


@pytest.fixture(scope="module")
def server(tokenizer):
    from conftest import loaded, tiny_model
    from ragcache.engine.runner import BlendEngine

    engine = BlendEngine(loaded(tiny_model(), tokenizer), TieredStore([GpuTier(64 << 20, device="cpu"), CpuTier(64 << 20)]))
    with running_server(engine) as (url, runtime):
        yield url, runtime


def post(url, **body):
    return httpx.post(f"{url}/v1/chat/completions", json={"max_tokens": 4, "temperature": 0, **body}, timeout=60)


def test_the_turn_after_a_tool_call_is_answered(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="m", messages=[ASK, CALLED, RESULT], tools=[WEATHER], max_tokens=4,
                                           temperature=0, tool_choice="none")
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.choices[0].message.tool_calls is None
    assert reply.usage.prompt_tokens > post(url, messages=[ASK]).json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize("field, value", [("presence_penalty", 0.5), ("frequency_penalty", 1.0),
                                          ("logit_bias", {"42": 5}), ("functions", [{"name": "f"}]),
                                          ("modalities", ["text", "audio"]), ("reasoning_effort", "high")])
def test_fields_that_would_change_the_answer_are_refused_by_name(server, field, value):
    response = post(server[0], messages=[ASK], **{field: value})
    assert response.status_code == 400 and field in response.json()["error"]["message"]


def test_harmless_fields_are_accepted(server):
    response = post(server[0], messages=[ASK], user="u1", metadata={"a": "b"}, store=False, presence_penalty=0,
                    logit_bias={}, modalities=["text"], service_tier="auto")
    assert response.status_code == 200


@pytest.mark.parametrize("body, field", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"n": 9}, "n"),
    ({"n": 2, "program_id": "p1"}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
])
def test_bad_tool_and_parity_fields_are_a_400_naming_them(server, body, field):
    response = post(server[0], messages=[ASK], **body)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["message"]


@pytest.mark.parametrize("messages, field", [
    ([ASK, {**CALLED, "tool_calls": [{**CALLED["tool_calls"][0], "function": {"name": "get_weather", "arguments": "{x"}}]}, RESULT],
     "messages[1].tool_calls[0].function.arguments"),
    ([ASK, CALLED, {"role": "tool", "content": "sunny"}], "messages[2].tool_call_id"),
    ([ASK, CALLED], "the last message"),
    ([{**ASK, "tool_calls": CALLED["tool_calls"]}], "messages[0].tool_calls"),
])
def test_malformed_tool_turns_are_a_400_naming_the_message(server, messages, field):
    response = post(server[0], messages=messages, tools=[WEATHER])
    assert response.status_code == 400 and field in response.json()["error"]["message"]


def test_n_choices_each_answer_and_usage_counts_them_all(server):
    body = post(server[0], messages=[ASK], n=3, temperature=1.0, seed=7).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == sum(4 if c["finish_reason"] == "length" else 0 for c in body["choices"]) \
        or body["usage"]["completion_tokens"] >= 3
    again = post(server[0], messages=[ASK], n=3, temperature=1.0, seed=7).json()
    assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in body["choices"]]


def test_n_choices_stream_with_their_indexes(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="m", messages=[ASK], n=2, max_tokens=4, temperature=0, stream=True)
    finished = {choice.index: choice.finish_reason for chunk in stream for choice in chunk.choices if choice.finish_reason}
    assert set(finished) == {0, 1}


def test_a_plain_agent_loop_is_found_by_its_prefix_and_reuses_its_kv(server):
    url, runtime = server
    first = post(url, messages=[ASK], tools=[WEATHER], tool_choice="none").json()
    answer = first["choices"][0]["message"]["content"].strip() or "It is sunny."  # a random model may say nothing
    programs = {p["program_id"] for p in httpx.get(f"{url}/admin/programs").json()["programs"]}
    follow = [ASK, {"role": "assistant", "content": answer}, {"role": "user", "content": "And tomorrow?"}]
    second = post(url, messages=follow, tools=[WEATHER], tool_choice="none").json()
    whole_blocks = first["usage"]["prompt_tokens"] // DEFAULT_BLOCK_TOKENS * DEFAULT_BLOCK_TOKENS
    assert second["ragcache"]["prefix_cached_tokens"] >= whole_blocks  # the first prompt's whole blocks
    after = {p["program_id"] for p in httpx.get(f"{url}/admin/programs").json()["programs"]}
    assert len(after - programs) == 0 and any(p.startswith("conv-") for p in after)  # the same program, moved on
    unrelated = post(url, messages=[{"role": "user", "content": "Tell me a joke."}], tools=[WEATHER],
                     tool_choice="none").json()
    # only the system prompt and tool list it shares with the others: a new conversation
    assert unrelated["ragcache"]["prefix_cached_tokens"] < whole_blocks
    latest = {p["program_id"] for p in httpx.get(f"{url}/admin/programs").json()["programs"]}
    assert len(latest - after) == 1


def test_a_single_question_without_tools_is_not_kept_as_a_conversation(server):
    url, _ = server
    before = len(httpx.get(f"{url}/admin/programs").json()["programs"])
    post(url, messages=[{"role": "user", "content": "Just one question."}])
    assert len(httpx.get(f"{url}/admin/programs").json()["programs"]) == before


PICK = {"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "properties": {"color": {"enum": ["red", "green"]}}, "required": ["color"],
    "additionalProperties": False}}}


def test_a_named_tool_choice_gives_a_valid_call_of_that_tool_even_from_a_random_model(server):
    body = post(server[0], messages=[ASK], tools=[WEATHER, PICK], max_tokens=96,
                tool_choice={"type": "function", "function": {"name": "pick"}}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "pick" and json.loads(call["function"]["arguments"])["color"] in ("red", "green")


def test_the_sdk_gets_tool_calls_plain_and_streamed(server):
    from ragcache.sdk import Client

    options = dict(tools=[PICK], tool_choice="required", parallel_tool_calls=False, max_tokens=96, temperature=0)
    with Client(server[0]) as client:
        reply = client.chat([ASK], **options)
        stream = client.chat([ASK], stream=True, **options)
        list(stream)
    plain = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == stream.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in stream.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in plain]
    assert stream.tool_calls[0].id.startswith("call_")


def test_response_format_json_schema_is_kept_to(server):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    body = post(server[0], messages=[ASK], max_tokens=60,
                response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}).json()
    assert json.loads(body["choices"][0]["message"]["content"])["answer"] in ("yes", "no")


def test_a_bad_json_schema_is_a_400_naming_response_format(server):
    response = post(server[0], messages=[ASK], response_format={"type": "json_schema", "json_schema": {
        "name": "a", "schema": {"type": "nonsense"}}})
    assert response.status_code == 400 and "response_format" in response.json()["error"]["message"]


def test_logprobs_come_per_token_with_their_alternatives(server):
    body = post(server[0], messages=[ASK], logprobs=True, top_logprobs=3, max_tokens=5).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and entry["logprob"] <= tops[0] + 1e-6
        assert entry["bytes"] == list(entry["token"].encode())
    assert post(server[0], messages=[ASK]).json()["choices"][0]["logprobs"] is None
