"""Real agent clients against a live server on the real model, through OpenAI tool calling alone:
the official `openai` client's loop, LangChain's bind_tools, LangGraph's prebuilt ReAct agent and an
OpenAI Agents SDK agent (examples/agent_frameworks.py, which these run). None sends a program id:
each conversation is found by its prefix, and the model's own tool calls start the pins.

The server pins every call for a fixed 60 s (pin_policy fixed_ttl) so that a pin's existence does
not hinge on whether the tool-aware TTL finds these instant tools worth pinning; what is tested is
that a call starts a pin for the conversation and the next turn finds it."""

import json
import sys
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from ragcache.agents.coordinator import AgentConfig
from ragcache.agents.pins import PinConfig
from ragcache.engine.runner import BlendEngine
from ragcache.storage.cpu import CpuTier
from ragcache.storage.gpu import GpuTier
from ragcache.storage.tiered import TieredStore

from service_server import running_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import agent_frameworks as frameworks  # noqa: E402


@pytest.fixture(scope="module")
def server(real_model):
    engine = BlendEngine(real_model, TieredStore([GpuTier(512 << 20, device="cpu"), CpuTier(512 << 20)]))
    agents = AgentConfig(pins=PinConfig(policy="fixed_ttl", fixed_ttl_s=60.0))
    with running_server(engine, agents=agents) as (url, runtime):
        yield url, runtime


def pins(url):
    return httpx.get(f"{url}/admin/programs").json()["pins"]


def new_pins(url, before):
    """Active pins of conversations the run created (implicit programs: conv-...)."""
    return [p for p in pins(url)["active_pins"] if p["program_id"] not in before]


def test_required_gives_a_call_whose_arguments_match_the_schema_and_its_result_is_answered(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": frameworks.TASK}]
    reply = client.chat.completions.create(model="m", messages=messages, tools=[frameworks.WEATHER],
                                           tool_choice="required", temperature=0, max_tokens=64)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), frameworks.WEATHER["function"]["parameters"])
    messages += [choice.message.model_dump(exclude_none=True, include={"role", "content", "tool_calls"}),
                 {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C."}]
    answer = client.chat.completions.create(model="m", messages=messages, tools=[frameworks.WEATHER],
                                            temperature=0, max_tokens=16)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.model_extra["ragcache"]["prefix_cached_tokens"] >= reply.usage.prompt_tokens // 16 * 16  # whole blocks


def test_a_streamed_call_arrives_as_argument_deltas_that_add_up_to_the_call(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    body = dict(model="m", messages=[{"role": "user", "content": frameworks.TASK}], tools=[frameworks.WEATHER],
                tool_choice="required", temperature=0, max_tokens=64)
    whole = client.chat.completions.create(**body).choices[0].message.tool_calls[0].function
    names, arguments, finish = [], "", None
    for chunk in client.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or ():
                names += [delta.function.name] if delta.function.name else []
                arguments += delta.function.arguments or ""
    assert finish == "tool_calls" and names == ["get_weather"] and arguments == whole.arguments


def test_the_openai_client_tool_loop_runs_to_the_end_and_its_pins_hold_between_turns(server):
    url, _ = server
    before = pins(url)["counters"]
    run = frameworks.openai_tool_loop(url)
    after = pins(url)["counters"]
    assert {"get_weather", "get_time"} <= set(run["tools"]) and run["reused_tokens"] > 0
    assert after["created"] > before["created"] and after["returned_held"] > before["returned_held"]


def test_langchain_bind_tools_with_any_gets_tool_calls(server):
    url, _ = server
    held = {p["program_id"] for p in pins(url)["active_pins"]}
    calls = frameworks.langchain_calls(url)
    assert calls and {c["name"] for c in calls} <= {"get_weather", "get_time"}
    assert all(isinstance(c["args"].get("city"), str) for c in calls)
    assert [p["tool"] for p in new_pins(url, held)] == [calls[0]["name"]]  # the call pinned its conversation


def test_a_langgraph_react_agent_runs_a_two_tool_task_to_the_end(server):
    url, _ = server
    held = {p["program_id"] for p in pins(url)["active_pins"]}
    ran = frameworks.langgraph_agent(url)
    assert set(ran) == {"get_weather", "get_time"}
    pinned = new_pins(url, held)
    assert len(pinned) == 1 and pinned[0]["program_id"].startswith("conv-")


def test_an_openai_agents_sdk_agent_runs_a_two_tool_task_to_the_end(server):
    url, _ = server
    held = {p["program_id"] for p in pins(url)["active_pins"]}
    ran, output = frameworks.agents_sdk_agent(url)
    assert "get_time" in ran and "get_weather" in ran and "14:05" in output
    assert len(new_pins(url, held)) == 1
