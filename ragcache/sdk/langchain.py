"""LangChain / LangGraph callbacks that report the tools an agent runs to its ragcache program.

    program = client.program()
    agent.invoke(inputs, config={"callbacks": [ProgramToolCallbacks(program)]})

Each tool run becomes a tool_start event when it begins and a tool_end event when it returns
or fails, so ragcache keeps the program's KV pinned for as long as its tools are likely to
take. Needs langchain-core (`pip install langchain-core`); the rest of the SDK does not.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler

from ragcache.sdk.programs import AsyncProgram, Program


def _tool_name(serialized: dict[str, Any] | None, kwargs: dict[str, Any]) -> str:
    return (serialized or {}).get("name") or kwargs.get("name") or "tool"


class ProgramToolCallbacks(BaseCallbackHandler):
    """Tool starts and ends of a LangChain run, reported through a (blocking) Program."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self._running: dict[UUID, str] = {}  # run id -> tool name, so ends match their starts

    def on_tool_start(self, serialized: dict[str, Any], input_str: str, *, run_id: UUID, **kwargs: Any) -> None:
        name = _tool_name(serialized, kwargs)
        self._running[run_id] = name
        self.program.tool_started(name)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._ended(run_id)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._ended(run_id)

    def _ended(self, run_id: UUID) -> None:
        name = self._running.pop(run_id, None)
        if name is not None:
            self.program.tool_ended(name)


class AsyncProgramToolCallbacks(AsyncCallbackHandler):
    """ProgramToolCallbacks for async runs (`ainvoke`, `astream`), through an AsyncProgram."""

    def __init__(self, program: AsyncProgram) -> None:
        self.program = program
        self._running: dict[UUID, str] = {}

    async def on_tool_start(self, serialized: dict[str, Any], input_str: str, *, run_id: UUID, **kwargs: Any) -> None:
        name = _tool_name(serialized, kwargs)
        self._running[run_id] = name
        await self.program.tool_started(name)

    async def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        await self._ended(run_id)

    async def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        await self._ended(run_id)

    async def _ended(self, run_id: UUID) -> None:
        name = self._running.pop(run_id, None)
        if name is not None:
            await self.program.tool_ended(name)
