"""The SDK's program handle over real HTTP, against a small Litestar app that records what it receives.

The app speaks the two endpoints a program uses: chat completions (answering with a canned
reply) and `POST /v1/programs/{id}/events` with the ProgramEvent body the service accepts.
"""

import asyncio
import threading
from contextlib import contextmanager
from typing import Any, Literal

import msgspec
import pytest
from litestar import Litestar, Request, post
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, JSONBody

from ragcache.schemas import AssistantMessage, CacheReport, ChatCompletion, Choice, PromptTokensDetails, Timings, Usage
from ragcache.sdk import AsyncClient, AsyncProgram, Client, Program

from service_server import free_port, serving


class ProgramEvent(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["tool_start", "tool_end", "end"]
    tool: str | None = None


class Recorder:
    """What the app received, in order: ("chat", program_id, header, body) and ("event", program_id, type, tool)."""

    def __init__(self):
        self.received: list[tuple] = []
        self._lock = threading.Lock()

    def add(self, entry: tuple) -> None:
        with self._lock:
            self.received.append(entry)

    def of(self, kind: str) -> list[tuple]:
        return [entry[1:] for entry in self.received if entry[0] == kind]


def reply(reused_tokens: int) -> ChatCompletion:
    report = CacheReport("blend", 0.15, 0, 0, reused_tokens, 0, 0.0, Timings(0, 0, 0, 1.0, 0),
                         program_reused_tokens=reused_tokens)
    return ChatCompletion("chatcmpl-test", "chat.completion", 0, "test", [Choice(0, AssistantMessage("assistant", "ok"), "stop")],
                          Usage(12, 1, 13, PromptTokensDetails(reused_tokens)), report)


def recording_app(recorder: Recorder) -> Litestar:
    @post("/v1/chat/completions", status_code=200)
    async def chat(data: JSONBody[dict[str, Any]], request: Request) -> ChatCompletion:
        program_id = data.get("program_id")
        earlier = sum(1 for entry in recorder.of("chat") if entry[0] == program_id)
        recorder.add(("chat", program_id, request.headers.get("x-session-id"), data))
        return reply(10 * earlier)

    @post("/v1/programs/{program_id:str}/events", status_code=204)
    async def events(program_id: FromPath[str], data: JSONBody[ProgramEvent]) -> None:
        if program_id.startswith("old-server"):
            raise NotFoundException("no such route")
        recorder.add(("event", program_id, data.type, data.tool))

    return Litestar(route_handlers=[chat, events])


@contextmanager
def recording_server():
    recorder = Recorder()
    with serving(recording_app(recorder), free_port()) as url:
        yield url, recorder


@pytest.fixture(scope="module")
def server():
    with recording_server() as served:
        yield served


def test_a_programs_turns_carry_its_id_and_its_tool_calls_are_reported(server):
    url, recorder = server
    with Client(url) as client:
        with client.program(system_prompt="You are an agent.") as program:
            first = program.chat("List the files.", max_tokens=4)
            with program.tool_call("ls"):
                pass
            second = program.chat([{"role": "user", "content": "Read a.txt."}], is_last_step=True)
    assert isinstance(program, Program) and program.id.startswith("prog-") and program.ended
    chats = [entry for entry in recorder.of("chat") if entry[0] == program.id]
    assert [(pid, header) for pid, header, _ in chats] == [(program.id, program.id)] * 2
    bodies = [body for _, _, body in chats]
    assert [(m["role"], m["content"]) for m in bodies[0]["messages"]] == [
        ("system", "You are an agent."), ("user", "List the files.")]
    assert bodies[0]["max_tokens"] == 4 and bodies[0].get("is_last_step", False) is False and bodies[1]["is_last_step"] is True
    assert [e for e in recorder.of("event") if e[0] == program.id] == [
        (program.id, "tool_start", "ls"), (program.id, "tool_end", "ls"), (program.id, "end", None)]
    assert (first.ragcache.program_reused_tokens, second.ragcache.program_reused_tokens) == (0, 10)


def test_tool_end_is_sent_when_the_tool_fails_and_end_only_once(server):
    url, recorder = server
    with Client(url) as client:
        program = client.program("agent-7")
        with pytest.raises(TimeoutError):
            with program.tool_call("shell"):
                raise TimeoutError("the tool hung")
        program.end()
        program.end()
    assert [e for e in recorder.of("event") if e[0] == "agent-7"] == [
        ("agent-7", "tool_start", "shell"), ("agent-7", "tool_end", "shell"), ("agent-7", "end", None)]


def test_the_async_program_does_the_same(server):
    url, recorder = server

    async def agent():
        async with AsyncClient(url) as client:
            async with client.program("async-1", system_prompt="Be brief.") as program:
                await program.chat("Search for rivers.")
                async with program.tool_call("search"):
                    await asyncio.sleep(0)
                return program, await program.chat("Summarise.")

    program, answer = asyncio.run(agent())
    assert isinstance(program, AsyncProgram) and answer.ragcache.program_reused_tokens == 10
    assert [(pid, header) for pid, header, _ in recorder.of("chat") if pid == "async-1"] == [("async-1", "async-1")] * 2
    assert [e for e in recorder.of("event") if e[0] == "async-1"] == [
        ("async-1", "tool_start", "search"), ("async-1", "tool_end", "search"), ("async-1", "end", None)]


def test_a_server_without_the_events_endpoint_warns_once_and_the_agent_runs_on(server):
    url, _ = server
    with Client(url) as client:
        program = client.program("old-server-1")
        with pytest.warns(RuntimeWarning, match="not reported"):
            with program.tool_call("search"):
                pass
        with program.tool_call("search"):  # no second warning, no error
            pass
        assert program.chat("Still works.").choices[0].message.content == "ok"


def test_a_blank_program_id_is_refused():
    with Client("http://127.0.0.1:1") as client:
        with pytest.raises(ValueError, match="blank"):
            client.program("  ")


def test_langchain_tool_runs_are_reported_as_tool_events(server):
    pytest.importorskip("langchain_core")
    from langchain_core.tools import tool

    from ragcache.sdk.langchain import AsyncProgramToolCallbacks, ProgramToolCallbacks

    @tool
    def word_count(text: str) -> int:
        """Count the words in text."""
        return len(text.split())

    @tool
    def broken(text: str) -> str:
        """Always fails."""
        raise RuntimeError("tool failure")

    url, recorder = server
    with Client(url) as client:
        program = client.program("lc-sync")
        callbacks = ProgramToolCallbacks(program)
        assert word_count.invoke({"text": "a b c"}, config={"callbacks": [callbacks]}) == 3
        with pytest.raises(RuntimeError):
            broken.invoke({"text": "x"}, config={"callbacks": [callbacks]})

    async def run_async():
        async with AsyncClient(url) as client:
            program = client.program("lc-async")
            return await word_count.ainvoke({"text": "a b"}, config={"callbacks": [AsyncProgramToolCallbacks(program)]})

    assert asyncio.run(run_async()) == 2
    assert [e for e in recorder.of("event") if e[0] == "lc-sync"] == [
        ("lc-sync", "tool_start", "word_count"), ("lc-sync", "tool_end", "word_count"),
        ("lc-sync", "tool_start", "broken"), ("lc-sync", "tool_end", "broken")]
    assert [e for e in recorder.of("event") if e[0] == "lc-async"] == [
        ("lc-async", "tool_start", "word_count"), ("lc-async", "tool_end", "word_count")]


@pytest.mark.filterwarnings("ignore:the server has no /v1/programs")  # until the service has the events endpoint
def test_an_agent_runs_end_to_end_against_a_live_ragcache_server(tokenizer):
    from conftest import loaded, tiny_model
    from ragcache.engine.runner import BlendEngine
    from ragcache.storage.cpu import CpuTier
    from ragcache.storage.gpu import GpuTier
    from ragcache.storage.tiered import TieredStore
    from service_server import running_server

    engine = BlendEngine(loaded(tiny_model(), tokenizer), TieredStore([GpuTier(64 << 20, device="cpu"),
                                                                      CpuTier(64 << 20)]))
    with running_server(engine) as (url, _), Client(url) as client:
        messages = [{"role": "user", "content": "List the files in /tmp."}]
        reused = []
        with client.program(system_prompt="You are an agent.") as program:
            for turn in range(3):
                answer = program.chat(messages, max_tokens=4, temperature=0, is_last_step=turn == 2)
                reused.append((answer.usage.prompt_tokens, answer.ragcache.program_reused_tokens))
                messages.append({"role": "assistant", "content": answer.choices[0].message.content.strip() or "ok"})
                with program.tool_call("ls"):
                    messages.append({"role": "user", "content": f"Tool ls returned: a{turn}.txt"})
    assert reused[0][1] == 0
    for (previous_prompt, _), (_, now_reused) in zip(reused, reused[1:]):
        assert now_reused >= previous_prompt // 16 * 16  # the previous prompt's whole blocks came from the prefix cache
