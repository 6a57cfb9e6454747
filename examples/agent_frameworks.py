"""Agent frameworks against a running ragcache server through OpenAI tool calling, nothing ragcache-specific.

    ragcache serve                                         # in another shell: http://127.0.0.1:8000
    python examples/agent_frameworks.py [--url URL] [--api-key KEY] [openai|langchain|langgraph|agents ...]

Each runs the same two-tool task — the weather and the local time in a city — with the
framework's own client: the official `openai` client's tool loop, LangChain's
`ChatOpenAI.bind_tools`, LangGraph's prebuilt ReAct agent and an OpenAI Agents SDK agent
on its chat-completions model. None of them sends a program id: the server finds each
conversation by its token prefix, reuses its KV on the next turn and pins it while the
tools run (see /admin/programs). The default model is a 135M one: `tool_choice`
"required" makes it call tools (constrained decoding keeps every call valid), and the
task ends when the time tool has answered.
"""

from __future__ import annotations

import argparse
import json
import sys

TASK = "What is the weather in Paris, and what time is it there?"
SYSTEM = "You are a helpful assistant. Call the tools you need."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"Sunny and 21 C in {city}."


def get_time(city: str) -> str:
    """Get the local time in a city."""
    return f"It is 14:05 in {city}."


TOOLS = {"get_weather": get_weather, "get_time": get_time}


def openai_tool_loop(url: str, api_key: str = "unused", max_turns: int = 4) -> dict:
    """The official client's loop: call, run the tools the model asked for, send their results back, until
    both tools have answered; then one last turn (tool_choice "none") for the answer in words."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}]
    called: list[str] = []
    for _ in range(max_turns):
        if {"get_weather", "get_time"} <= set(called):
            break
        reply = client.chat.completions.create(model="ragcache", messages=messages, tools=[WEATHER, TIME],
                                               tool_choice="required", temperature=0, max_tokens=96)
        message = reply.choices[0].message
        messages.append(message.model_dump(exclude_none=True, include={"role", "content", "tool_calls"}))
        for call in message.tool_calls or ():
            called.append(call.function.name)
            result = TOOLS[call.function.name](**json.loads(call.function.arguments))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    final = client.chat.completions.create(model="ragcache", messages=messages, tools=[WEATHER, TIME],
                                           tool_choice="none", temperature=0, max_tokens=32)
    return {"tools": called, "answer": final.choices[0].message.content,
            "reused_tokens": final.model_extra["ragcache"]["program_reused_tokens"]}


def langchain_calls(url: str, api_key: str = "unused") -> list[dict]:
    """LangChain's bind_tools with tool_choice "any" (sent as "required"): the calls the model made."""
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(base_url=f"{url}/v1", api_key=api_key, model="ragcache", temperature=0, max_tokens=96,
                       max_retries=0)
    reply = model.bind_tools([get_weather, get_time], tool_choice="any").invoke(TASK)
    return reply.tool_calls


def langgraph_agent(url: str, api_key: str = "unused") -> list[str]:
    """LangGraph's prebuilt ReAct agent; get_time returns directly, so the run ends once it has answered.
    Returns the names of the tools that ran, in order."""
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from langgraph.prebuilt import create_react_agent

    tools = [tool(get_weather), tool(get_time, return_direct=True)]
    model = ChatOpenAI(base_url=f"{url}/v1", api_key=api_key, model="ragcache", temperature=0, max_tokens=96,
                       max_retries=0).bind_tools(tools, tool_choice="any")
    agent = create_react_agent(model, tools, prompt=SYSTEM)
    state = agent.invoke({"messages": [("user", TASK)]}, {"recursion_limit": 8})
    return [m.name for m in state["messages"] if m.type == "tool"]


def agents_sdk_agent(url: str, api_key: str = "unused") -> tuple[list[str], str]:
    """An OpenAI Agents SDK agent on its chat-completions model; it stops when get_time has answered.
    Returns the tools that ran and the final output."""
    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, StopAtTools, function_tool,
                        set_tracing_disabled)
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # traces would go to OpenAI's servers
    model = OpenAIChatCompletionsModel(model="ragcache", openai_client=AsyncOpenAI(base_url=f"{url}/v1",
                                                                                    api_key=api_key, max_retries=0))
    agent = Agent(name="assistant", instructions=SYSTEM, model=model,
                  tools=[function_tool(get_weather), function_tool(get_time)],
                  model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=96),
                  tool_use_behavior=StopAtTools(stop_at_tool_names=["get_time"]))
    result = Runner.run_sync(agent, TASK, max_turns=4)
    ran = [item.raw_item.name for item in result.new_items if item.type == "tool_call_item"]
    return ran, str(result.final_output)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("frameworks", nargs="*", default=["openai", "langchain", "langgraph", "agents"],
                        choices=["openai", "langchain", "langgraph", "agents"])
    args = parser.parse_args()
    runs = {"openai": openai_tool_loop, "langchain": langchain_calls, "langgraph": langgraph_agent,
            "agents": agents_sdk_agent}
    for name in args.frameworks:
        try:
            print(f"{name}: {runs[name](args.url, args.api_key)}")
        except Exception as exc:  # a framework's error names what went wrong; say which run it was
            print(f"{name}: failed: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
