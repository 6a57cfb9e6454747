"""An agent loop against a running ragcache server: one program, tools that take time, KV kept between turns.

    ragcache serve                                   # in another shell: http://127.0.0.1:8000
    python examples/agent_program.py [--url URL] [--api-key KEY] [--turns 4] [--tool-s 0.5]

The agent asks the model, "runs" a tool (a sleep standing in for a web search or a shell
command), appends the tool's result to the conversation and asks again. Every turn carries
the program's id, so the server extends the program's KV instead of prefilling the whole
growing conversation again; while a tool runs, `tool_call()` tells the server, which keeps
the program's KV pinned for as long as that tool is likely to take. Each turn prints how
many prompt tokens came from the previous turn's KV.
"""

import argparse
import random
import sys
import time

from ragcache.sdk import Client, RagcacheError

TASK = ("Plan a three-day trip to Lisbon. Use the tools: search for sights, check the weather, "
        "then give a short day-by-day plan.")


def search(query: str, seconds: float) -> str:
    time.sleep(seconds)
    return f"Top results for {query!r}: Belém Tower, Jerónimos Monastery, Alfama, LX Factory."


def weather(city: str, seconds: float) -> str:
    time.sleep(seconds)
    return f"{city}: sunny, 24°C, light wind for the next three days."


TOOLS = [("search", lambda s: search("Lisbon sights", s)), ("weather", lambda s: weather("Lisbon", s))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--tool-s", type=float, default=0.5, help="mean seconds a tool takes")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    with Client(args.url, args.api_key) as client:
        try:
            run_agent(client, args)
        except RagcacheError as exc:
            sys.exit(f"ragcache: {exc} (is `ragcache serve` running at {args.url}?)")


def run_agent(client: Client, args: argparse.Namespace) -> None:
    rng = random.Random(0)
    messages = [{"role": "user", "content": TASK}]
    with client.program(system_prompt="You are a travel agent that uses tools.") as program:
        print(f"program {program.id}")
        for turn in range(1, args.turns + 1):
            last = turn == args.turns
            reply = program.chat(messages, max_tokens=args.max_tokens, temperature=0, is_last_step=last)
            report = reply.ragcache
            print(f"turn {turn}: {reply.usage.prompt_tokens} prompt tokens, {report.program_reused_tokens} reused "
                  f"from the last turn, TTFT {report.timings.ttft_ms:.0f} ms")
            messages.append({"role": "assistant", "content": reply.choices[0].message.content})
            if last:
                print(f"answer: {reply.choices[0].message.content.strip()}")
                break
            name, tool = TOOLS[(turn - 1) % len(TOOLS)]
            with program.tool_call(name):
                result = tool(rng.expovariate(1 / args.tool_s))
            messages.append({"role": "user", "content": f"Tool {name} returned: {result}"})


if __name__ == "__main__":
    main()
