"""A streamed chat answer: the text as it comes, then the usage and the ragcache report at its end.

Iterating a ChatStream (`async for` an AsyncChatStream) yields the answer's text pieces;
once it is exhausted, `report`, `usage` and `finish_reason` hold what the last events said
and `chunks` every ChatCompletionChunk received, for callers who want the raw events.
The server-sent events are parsed once, by StreamState; the two stream classes only read
lines from their transport.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import msgspec

from ragcache.schemas import (
    CacheReport,
    ChatCompletionChunk,
    FunctionCall,
    FunctionDelta,
    ToolCallDelta,
    ToolCallOut,
    Usage,
)
from ragcache.sdk.errors import RagcacheConnectionError, RagcacheTimeoutError, error_from_event


class StreamState:
    """What a chat stream has delivered so far, fed one SSE line at a time."""

    def __init__(self) -> None:
        self.chunks: list[ChatCompletionChunk] = []
        self.pieces: list[str] = []
        self.report: CacheReport | None = None
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.tool_calls: list[ToolCallOut] = []  # assembled from the tool_calls deltas of choice 0
        self.done = False  # `[DONE]` arrived
        self._data: list[str] = []  # data lines of the event being read

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def feed(self, line: str) -> str | None:
        """The text piece of the event this line completes, if any. An event ends at a blank
        line; only its `data:` lines matter here. Raises APIError for an `{"error": ...}` event."""
        if line.startswith("data:"):
            self._data.append(line[5:].removeprefix(" "))
            return None
        if line or not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return self._event(data)

    def end(self) -> str | None:
        """The transport closed: finish a last event left without its blank line; raise if
        `[DONE]` never came, since the answer may then be cut short."""
        piece = self.feed("") if self._data else None
        if not self.done:
            raise RagcacheConnectionError("the stream ended before [DONE]: the answer may be incomplete")
        return piece

    def _event(self, data: str) -> str | None:
        if data == "[DONE]":
            self.done = True
            return None
        event = msgspec.json.decode(data)
        if isinstance(event, dict) and "error" in event:
            raise error_from_event(event["error"])
        chunk = msgspec.convert(event, ChatCompletionChunk)
        self.chunks.append(chunk)
        self.report = chunk.ragcache or self.report
        self.usage = chunk.usage or self.usage
        piece = None
        for choice in chunk.choices:
            if choice.index != 0:
                continue  # n > 1 streams are read raw, from chunks
            self.finish_reason = choice.finish_reason or self.finish_reason
            piece = choice.delta.content or piece
            for delta in choice.delta.tool_calls or ():
                self._tool_delta(delta)
        if piece:
            self.pieces.append(piece)
        return piece or None

    def _tool_delta(self, delta: ToolCallDelta) -> None:
        """A call's first delta brings its id and name; the following ones pieces of its arguments."""
        while len(self.tool_calls) <= delta.index:
            self.tool_calls.append(ToolCallOut("", FunctionCall("", "")))
        call = self.tool_calls[delta.index]
        function = delta.function or FunctionDelta()
        self.tool_calls[delta.index] = ToolCallOut(
            delta.id or call.id,
            FunctionCall(function.name or call.function.name, call.function.arguments + (function.arguments or "")),
        )


def _broken(exc: httpx.TransportError) -> RagcacheConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return RagcacheTimeoutError(f"the stream stalled for longer than the timeout: {exc!r}")
    return RagcacheConnectionError(f"the stream broke off: {exc!r}")


class _StreamResults:
    """Read-only views of a StreamState, shared by both stream classes."""

    _state: StreamState

    @property
    def text(self) -> str:
        """The answer so far (all of it once the stream is exhausted)."""
        return self._state.text

    @property
    def report(self) -> CacheReport | None:
        """The ragcache report: set by the last event, None until then."""
        return self._state.report

    @property
    def usage(self) -> Usage | None:
        return self._state.usage

    @property
    def finish_reason(self) -> str | None:
        return self._state.finish_reason

    @property
    def tool_calls(self) -> list[ToolCallOut]:
        """The calls the answer made (finish_reason "tool_calls"), assembled from their deltas."""
        return self._state.tool_calls

    @property
    def chunks(self) -> list[ChatCompletionChunk]:
        return self._state.chunks


class ChatStream(_StreamResults):
    """Iterate for the text pieces; use as a context manager to close the connection early."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._state = StreamState()

    def __iter__(self) -> Iterator[str]:
        try:
            for line in self._response.iter_lines():
                if (piece := self._state.feed(line)) is not None:
                    yield piece
                if self._state.done:
                    return
            if (piece := self._state.end()) is not None:
                yield piece
        except httpx.TransportError as exc:
            raise _broken(exc) from exc
        finally:
            self._response.close()

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *_) -> None:
        self.close()


class AsyncChatStream(_StreamResults):
    """`async for` the text pieces; use as an async context manager to close the connection early."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._state = StreamState()

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for line in self._response.aiter_lines():
                if (piece := self._state.feed(line)) is not None:
                    yield piece
                if self._state.done:
                    return
            if (piece := self._state.end()) is not None:
                yield piece
        except httpx.TransportError as exc:
            raise _broken(exc) from exc
        finally:
            await self._response.aclose()

    async def aclose(self) -> None:
        await self._response.aclose()

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *_) -> None:
        await self.aclose()
