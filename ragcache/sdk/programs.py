"""Agent programs in the SDK: a handle whose turns share one program id, and tool-call reporting.

    with client.program(system_prompt="You are an agent.") as program:   # `end` sent on exit
        reply = program.chat(messages)                 # program_id + X-Session-ID: the KV grows turn by turn
        with program.tool_call("search"):              # tool_start ... tool_end: the KV stays pinned meanwhile
            result = search(...)
        reply = program.chat(messages + [...], is_last_step=True)

Tool events go to `POST /v1/programs/{id}/events` as {"type": "tool_start" | "tool_end" |
"end", "tool": name}. They are hints: against a server without that endpoint (404) the
handle warns once and stops sending them, and the agent runs on unchanged.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

from ragcache.sdk import calls
from ragcache.sdk.calls import Document, Messages, ProgramEventType
from ragcache.sdk.errors import NotFoundError
from ragcache.sdk.stream import AsyncChatStream, ChatStream

if TYPE_CHECKING:
    from ragcache.sdk.client import AsyncClient, Client


def new_program_id() -> str:
    return f"prog-{uuid.uuid4().hex}"


class _ProgramBase:
    """What both handles share: the id, the system prompt, and whether events still go out."""

    def __init__(self, program_id: str | None, system_prompt: str | None) -> None:
        if program_id is not None and not program_id.strip():
            raise ValueError("program_id must not be blank")
        self.id = program_id or new_program_id()
        self.system_prompt = system_prompt
        self.ended = False
        self._events = True

    def _turn(self, messages: Messages, documents, stream: bool, is_last_step: bool, options) -> calls.Call:
        return calls.program_chat(self.id, messages, documents, stream, options, self.system_prompt, is_last_step)

    def _no_events(self) -> None:
        self._events = False
        warnings.warn(
            f"the server has no /v1/programs/{{id}}/events; tool calls of program {self.id} are not reported",
            RuntimeWarning,
            stacklevel=4,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r})"


class Program(_ProgramBase):
    """One agent program over a blocking Client. Use it with `with` to send `end` when done."""

    def __init__(self, client: Client, program_id: str | None = None, *, system_prompt: str | None = None) -> None:
        super().__init__(program_id, system_prompt)
        self.client = client

    def chat(
        self,
        messages: Messages,
        documents: Iterable[Document] | None = None,
        *,
        stream: bool = False,
        is_last_step: bool = False,
        **options,
    ):
        """Client.chat as this program's next turn (options as ChatOptions). is_last_step: the
        program ends with this answer, so the server keeps nothing for a next turn."""
        call = self._turn(messages, documents, stream, is_last_step, options)
        return ChatStream(self.client._send(call)) if stream else self.client._call(call)

    @contextmanager
    def tool_call(self, name: str) -> Iterator[None]:
        """Report tool `name` running for the body of the `with` (tool_end is sent on errors too)."""
        self.tool_started(name)
        try:
            yield
        finally:
            self.tool_ended(name)

    def tool_started(self, name: str) -> None:
        self._event("tool_start", name)

    def tool_ended(self, name: str | None = None) -> None:
        self._event("tool_end", name)

    def end(self) -> None:
        """The program is over: the server releases what it kept for it. Sent once."""
        if not self.ended:
            self.ended = True
            self._event("end")

    def __enter__(self) -> Program:
        return self

    def __exit__(self, *_) -> None:
        self.end()

    def _event(self, type: ProgramEventType, tool: str | None = None) -> None:
        if not self._events:
            return
        try:
            self.client._call(calls.program_event(self.id, type, tool))
        except NotFoundError:
            self._no_events()


class AsyncProgram(_ProgramBase):
    """Program's twin over an AsyncClient: `await chat(...)`, `async with tool_call(name)`, `async with program`."""

    def __init__(self, client: AsyncClient, program_id: str | None = None, *, system_prompt: str | None = None) -> None:
        super().__init__(program_id, system_prompt)
        self.client = client

    async def chat(
        self,
        messages: Messages,
        documents: Iterable[Document] | None = None,
        *,
        stream: bool = False,
        is_last_step: bool = False,
        **options,
    ):
        call = self._turn(messages, documents, stream, is_last_step, options)
        return AsyncChatStream(await self.client._send(call)) if stream else await self.client._call(call)

    @asynccontextmanager
    async def tool_call(self, name: str) -> AsyncIterator[None]:
        await self.tool_started(name)
        try:
            yield
        finally:
            await self.tool_ended(name)

    async def tool_started(self, name: str) -> None:
        await self._event("tool_start", name)

    async def tool_ended(self, name: str | None = None) -> None:
        await self._event("tool_end", name)

    async def end(self) -> None:
        if not self.ended:
            self.ended = True
            await self._event("end")

    async def __aenter__(self) -> AsyncProgram:
        return self

    async def __aexit__(self, *_) -> None:
        await self.end()

    async def _event(self, type: ProgramEventType, tool: str | None = None) -> None:
        if not self._events:
            return
        try:
            await self.client._call(calls.program_event(self.id, type, tool))
        except NotFoundError:
            self._no_events()
