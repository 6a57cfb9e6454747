"""Client and AsyncClient: ragcache's HTTP API as typed Python calls.

    from ragcache.sdk import Client

    with Client("http://127.0.0.1:8000", api_key=None) as client:
        client.add_documents([("amazon.txt", "The Amazon river ...")])
        answer = client.rag("Which river ...?", document_ids=["amazon.txt"])
        print(answer.answer, answer.ragcache.chunk_hits)

Both classes are thin: each method asks ragcache.sdk.calls for a Call (path, body, how to
parse the answer) and sends it through `_send`, the only code that differs between them,
which retries as RetryPolicy says. Results are the msgspec structs of ragcache.schemas.
Nothing here imports torch or the engine, so a client install stays light.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, overload

import httpx
import msgspec

from ragcache import __version__
from ragcache.schemas import ChatCompletion, DocumentRecord, ModelList, RagResponse
from ragcache.sdk import calls
from ragcache.sdk.calls import Call, ChatOptions, Document, Messages, RagOptions
from ragcache.sdk.programs import AsyncProgram, Program
from ragcache.sdk.retry import RetryPolicy
from ragcache.sdk.stream import AsyncChatStream, ChatStream

if TYPE_CHECKING:
    from typing_extensions import Unpack

DEFAULT_URL = "http://127.0.0.1:8000"


class _BaseClient:
    """Settings and request building common to both clients."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout_s: float,
        max_retries: int,
        backoff_s: float,
        admin_key: str | None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = RetryPolicy(max_retries, backoff_s)
        self.timeout_s = timeout_s
        self._api_key = api_key
        self._admin_key = admin_key or api_key  # with no admin key, admin calls try the API key (no-auth servers)

    def _http_options(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "timeout": httpx.Timeout(self.timeout_s),
            "headers": {"user-agent": f"ragcache-sdk/{__version__}"},
        }

    def _request(self, http: httpx.Client | httpx.AsyncClient, call: Call) -> httpx.Request:
        key = self._admin_key if call.admin else self._api_key
        headers = {"authorization": f"Bearer {key}"} if key else {}
        headers.update(call.headers or {})
        content = None
        if call.body is not None:
            content, headers["content-type"] = msgspec.json.encode(call.body), "application/json"
        return http.build_request(call.method, call.path, params=call.params, content=content, headers=headers)


class Client(_BaseClient):
    """Blocking client over httpx.Client. Close it (or use `with`) to release its connections.

    api_key: the tenant's key, sent as `Authorization: Bearer`; None for a server without keys.
    admin_key: for stats() and flush(); defaults to api_key. Calls that meet a full queue (429),
    a 503 or no connection are retried max_retries times, backoff_s doubling (or as the
    server's Retry-After says); other errors raise at once (see ragcache.sdk.errors).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        admin_key: str | None = None,
    ) -> None:
        super().__init__(
            base_url, api_key, timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s, admin_key=admin_key
        )
        self._http = httpx.Client(**self._http_options())

    def rag(
        self, question: str, documents: Iterable[Document] | None = None, **options: Unpack[RagOptions]
    ) -> RagResponse:
        """Answer question over documents (inline, and/or `document_ids` added before).
        A document is a text, an (id, text) pair or {"text", "id"}; options: see RagOptions."""
        return self._call(calls.rag(question, documents, options))

    @overload
    def chat(
        self,
        messages: Messages,
        documents: Iterable[Document] | None = None,
        *,
        stream: Literal[False] = False,
        **options: Unpack[ChatOptions],
    ) -> ChatCompletion: ...

    @overload
    def chat(
        self,
        messages: Messages,
        documents: Iterable[Document] | None = None,
        *,
        stream: Literal[True],
        **options: Unpack[ChatOptions],
    ) -> ChatStream: ...

    def chat(self, messages, documents=None, *, stream=False, **options):
        """OpenAI-style chat with RAG documents. messages: a text (one user message) or a list
        of {"role", "content"}. stream=True returns a ChatStream: iterate it for the text,
        then read its `report` and `usage`."""
        call = calls.chat(messages, documents, stream, options)
        return ChatStream(self._send(call)) if stream else self._call(call)

    def program(self, program_id: str | None = None, *, system_prompt: str | None = None) -> Program:
        """A handle on one agent program (a fresh id unless given): its chat() turns reuse the
        program's KV turn by turn, its tool_call(name) tells the server while a tool runs."""
        return Program(self, program_id, system_prompt=system_prompt)

    def add_documents(self, documents: Iterable[Document], system_prompt: str | None = None) -> list[DocumentRecord]:
        """Compute and store each document's KV now, so later questions reuse it. Documents
        given as plain text get an id derived from their content (see the returned records)."""
        return self._call(calls.add_documents(documents, system_prompt))

    def delete_document(self, doc_id: str) -> None:
        """Forget a document and drop its KV; NotFoundError if the tenant has no such id."""
        self._call(calls.delete_document(doc_id))

    def models(self) -> ModelList:
        return self._call(calls.models())

    def stats(self) -> dict:
        """/admin/stats: per-tier and per-tenant figures (needs the admin key on a keyed server)."""
        return self._call(calls.stats())

    def flush(self, tier: str | None = None, tenant: str | None = None) -> dict:
        """Drop cached KV, in one tier and/or of one tenant's documents (admin)."""
        return self._call(calls.flush(tier, tenant))

    def health(self) -> dict:
        return self._call(calls.health())

    def ready(self) -> dict:
        return self._call(calls.ready())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _call(self, call: Call) -> Any:
        return call.parse(self._send(call).content)

    def _send(self, call: Call) -> httpx.Response:
        """The first successful response (left open for a stream); raises once retries are spent."""
        attempt = 0
        while True:
            try:
                response = self._http.send(self._request(self._http, call), stream=call.stream)
            except httpx.TransportError as exc:
                delay_s = self.retry.after_error(attempt, self.base_url, exc)
            else:
                if response.is_success:
                    return response
                response.read()
                response.close()
                delay_s = self.retry.after_status(attempt, response)
            time.sleep(delay_s)
            attempt += 1


class AsyncClient(_BaseClient):
    """Client's twin for asyncio, over httpx.AsyncClient: the same methods, awaited.
    chat(stream=True) returns an AsyncChatStream to `async for`."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        admin_key: str | None = None,
    ) -> None:
        super().__init__(
            base_url, api_key, timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s, admin_key=admin_key
        )
        self._http = httpx.AsyncClient(**self._http_options())

    async def rag(
        self, question: str, documents: Iterable[Document] | None = None, **options: Unpack[RagOptions]
    ) -> RagResponse:
        return await self._call(calls.rag(question, documents, options))

    @overload
    async def chat(
        self,
        messages: Messages,
        documents: Iterable[Document] | None = None,
        *,
        stream: Literal[False] = False,
        **options: Unpack[ChatOptions],
    ) -> ChatCompletion: ...

    @overload
    async def chat(
        self,
        messages: Messages,
        documents: Iterable[Document] | None = None,
        *,
        stream: Literal[True],
        **options: Unpack[ChatOptions],
    ) -> AsyncChatStream: ...

    async def chat(self, messages, documents=None, *, stream=False, **options):
        call = calls.chat(messages, documents, stream, options)
        return AsyncChatStream(await self._send(call)) if stream else await self._call(call)

    def program(self, program_id: str | None = None, *, system_prompt: str | None = None) -> AsyncProgram:
        """Client.program's twin: `await program.chat(...)`, `async with program.tool_call(name)`."""
        return AsyncProgram(self, program_id, system_prompt=system_prompt)

    async def add_documents(
        self, documents: Iterable[Document], system_prompt: str | None = None
    ) -> list[DocumentRecord]:
        return await self._call(calls.add_documents(documents, system_prompt))

    async def delete_document(self, doc_id: str) -> None:
        await self._call(calls.delete_document(doc_id))

    async def models(self) -> ModelList:
        return await self._call(calls.models())

    async def stats(self) -> dict:
        return await self._call(calls.stats())

    async def flush(self, tier: str | None = None, tenant: str | None = None) -> dict:
        return await self._call(calls.flush(tier, tenant))

    async def health(self) -> dict:
        return await self._call(calls.health())

    async def ready(self) -> dict:
        return await self._call(calls.ready())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_) -> None:
        await self.aclose()

    async def _call(self, call: Call) -> Any:
        return call.parse((await self._send(call)).content)

    async def _send(self, call: Call) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.send(self._request(self._http, call), stream=call.stream)
            except httpx.TransportError as exc:
                delay_s = self.retry.after_error(attempt, self.base_url, exc)
            else:
                if response.is_success:
                    return response
                await response.aread()
                await response.aclose()
                delay_s = self.retry.after_status(attempt, response)
            await asyncio.sleep(delay_s)
            attempt += 1
