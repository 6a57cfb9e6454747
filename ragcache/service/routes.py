"""Handlers: each translates HTTP to one Runtime call. OpenAI-compatible chat, RAG, documents."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.params import FromPath, JSONBody
from litestar.response import ServerSentEvent
from litestar.status_codes import HTTP_204_NO_CONTENT

from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.request import Generation, RagRequest
from ragcache.engine.toolformat import CallStream, parses_tool_calls
from ragcache.schemas import (
    AddDocumentsRequest,
    AddDocumentsResponse,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Delta,
    DocumentIn,
    DocumentRecord,
    FunctionDelta,
    ModelCard,
    ModelList,
    ProgramEvent,
    RagRequestBody,
    RagResponse,
    ToolCallDelta,
)
from ragcache.service import convert, semantic
from ragcache.service.auth import TENANT
from ragcache.service.deps import RuntimeDep, SettingsDep, TenantDep
from ragcache.service.errors import responses
from ragcache.service.runtime import CachedAnswer, QueueFullError, Runtime, SemanticQueryIn

log = logging.getLogger("ragcache.service")


async def documents_for(
    runtime: Runtime, tenant: str, inline: list[DocumentIn] | None, ids: list[str] | None
) -> list[str]:
    texts = [doc.text for doc in inline or []]
    return texts + (await runtime.resolve_documents(tenant, ids) if ids else [])


@get(
    "/v1/models",
    operation_id="listModels",
    summary="The model this server runs",
    guards=TENANT,
    responses=responses(401),
)
async def list_models(runtime: RuntimeDep) -> ModelList:
    return ModelList([ModelCard(runtime.model_name, created=int(runtime.started_s))])


@post(
    "/v1/chat/completions",
    operation_id="createChatCompletion",
    summary="OpenAI-compatible chat, with RAG documents",
    description="With `stream: true` the answer comes as server-sent `chat.completion.chunk` events ending in `[DONE]`. "
    "Tool calling (`tools`, `tool_choice`, `parallel_tool_calls`), `response_format`, `n`, `logprobs` "
    "and `top_logprobs` follow OpenAI; see the README's OpenAI compatibility section.",
    status_code=200,
    guards=TENANT,
    responses=responses(400, 401, 404, 413, 429, 503),
)
async def chat_completions(
    data: JSONBody[ChatCompletionRequest],
    request: Request,
    runtime: RuntimeDep,
    settings: SettingsDep,
    tenant: TenantDep,
) -> Response[ChatCompletion]:
    documents = await documents_for(runtime, tenant, data.documents, data.document_ids)
    program_id = data.program_id or request.headers.get("x-session-id")
    rag = convert.chat_request(data, documents, tenant, settings.max_new_tokens, program_id)
    n = data.n or 1
    if n > 1 and program_id is not None:
        raise InvalidRequestError(
            "n must be 1 for a program's turn (program_id or X-Session-ID): n answers cannot all continue one program"
        )
    messages = [{"role": m.role, "content": convert.message_text(m, i)} for i, m in enumerate(data.messages)]
    query = SemanticQueryIn(messages, data.category, data.cache, data.cache_sampled) if n == 1 else None
    answers = [
        runtime.answer(tenant, convert.choice_request(rag, i), query, data.is_last_step, conversation=n == 1)
        for i in range(n)
    ]
    token_texts = runtime.engine.token_texts if data.logprobs else None
    include_usage = bool(data.stream_options and data.stream_options.include_usage)
    if data.stream:
        try:  # a full queue or a bad request is a 4xx, not an error inside a 200
            firsts = [await _first_item(answer) for answer in answers]
        except BaseException:
            for answer in answers:
                await answer.aclose()
            raise
        calls = parses_tool_calls(rag)
        events = ServerSentEvent(_sse(runtime.model_name, firsts, answers, include_usage, calls, token_texts))
        return events  # type: ignore[return-value]  # stream: true answers events; the annotation is the spec's 200
    results = await asyncio.gather(*(_last_item(answer) for answer in answers))
    if isinstance(results[0], CachedAnswer):
        report = semantic.hit_report(results[0])
        return Response(
            convert.cached_completion(results[0].text, report, runtime.model_name),
            headers=convert.report_headers(report),
        )
    body = convert.chat_completion(list(results), runtime.model_name, token_texts)
    return Response(body, headers=convert.report_headers(body.ragcache))


async def _first_item(answer):
    """Accepted or the whole cached answer: bad input and a full queue surface here, as 4xx."""
    return await anext(answer)


async def _last_item(answer):
    """The Generation or the CachedAnswer."""
    last = None
    async for item in answer:
        last = item
    return last


class _Chunks:
    """Serialises the chunks of one streamed completion."""

    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = convert.completion_id(), int(time.time()), model

    def delta(self, delta: Delta, finish: str | None = None, index: int = 0, logprobs=None, **extra) -> str:
        body = ChatCompletionChunk(
            self.id,
            "chat.completion.chunk",
            self.created,
            self.model,
            [ChunkChoice(index, delta, finish, logprobs)],
            **extra,
        )
        return msgspec.json.encode(body).decode()

    def usage(self, usage) -> str:
        body = ChatCompletionChunk(self.id, "chat.completion.chunk", self.created, self.model, [], usage=usage)
        return msgspec.json.encode(body).decode()


def _deltas(events: list[tuple]) -> list[Delta]:
    """CallStream events as OpenAI's deltas: content, or tool_calls[i] (id and name first, then arguments)."""
    deltas = []
    for event in events:
        if event[0] == "text":
            deltas.append(Delta(content=event[1]))
        elif event[0] == "call":
            function = FunctionDelta(name=event[2], arguments="")
            deltas.append(Delta(tool_calls=[ToolCallDelta(event[1], convert.call_id(), "function", function)]))
        else:
            deltas.append(Delta(tool_calls=[ToolCallDelta(event[1], function=FunctionDelta(arguments=event[2]))]))
    return deltas


async def _merged(answers: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, item) from n answers as they come; the answers run as tasks, cancelled if we stop early."""
    if len(answers) == 1:
        async for item in answers[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, answer):
        try:
            async for item in answer:
                await queue.put((index, item))
            await queue.put((index, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, answer)) for i, answer in enumerate(answers)]
    try:
        left = len(answers)
        while left:
            index, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _sse(model: str, firsts: list, answers: list, include_usage: bool, calls: bool, token_texts):
    chunks = _Chunks(model)
    if isinstance(firsts[0], CachedAnswer):
        first = firsts[0]
        yield chunks.delta(Delta(role="assistant", content=first.text))
        yield chunks.delta(Delta(), "stop", ragcache=semantic.hit_report(first))
        if include_usage:
            yield chunks.usage(convert.no_usage())
        yield "[DONE]"
        return
    streams = [CallStream() if calls else None for _ in answers]
    results: list[Generation] = []
    for index in range(len(answers)):
        yield chunks.delta(Delta(role="assistant", content=""), index=index)
    try:
        async for index, item in _merged(answers):
            stream = streams[index]
            if isinstance(item, Generation):
                for delta in _deltas(stream.flush() if stream is not None else []):
                    yield chunks.delta(delta, index=index)
                logprobs = convert.choice_logprobs(item, token_texts) if token_texts is not None else None
                yield chunks.delta(Delta(), item.finish_reason, index, logprobs, ragcache=convert.cache_report(item))
                results.append(item)
            elif stream is None:
                yield chunks.delta(Delta(content=item), index=index)
            else:
                for delta in _deltas(stream.push(item)):
                    yield chunks.delta(delta, index=index)
        if include_usage and results:
            yield chunks.usage(convert.usage(results[0], results))
    except Exception as exc:  # the 200 is out: report in the stream, never drop it silently
        yield msgspec.json.encode({"error": _stream_error(exc)}).decode()
    finally:
        for answer in answers:
            await answer.aclose()  # a client that went away frees its sequence at the next step
    yield "[DONE]"


def _stream_error(exc: Exception) -> dict:
    if isinstance(exc, InvalidRequestError):
        return {"message": str(exc), "type": "invalid_request_error"}
    if isinstance(exc, QueueFullError):
        return {"message": str(exc), "type": "rate_limit_error"}
    log.exception("generation failed mid-stream")
    return {"message": "internal error; the server log has the details", "type": "server_error"}


@post(
    "/v1/rag",
    operation_id="rag",
    summary="Question + documents (inline or by id) -> answer",
    status_code=200,
    guards=TENANT,
    responses=responses(400, 401, 404, 413, 429, 503),
)
async def rag_answer(
    data: JSONBody[RagRequestBody], runtime: RuntimeDep, settings: SettingsDep, tenant: TenantDep
) -> Response[RagResponse]:
    documents = await documents_for(runtime, tenant, data.documents, data.document_ids)
    sampling = convert.sampling_from(
        data.max_tokens,
        data.temperature,
        data.top_p,
        data.seed,
        data.stop,
        settings.max_new_tokens,
        default_max_tokens=128,
    )
    rag = RagRequest(
        data.question,
        tuple(documents),
        mode=data.mode or "blend",
        blend_ratio=data.blend_ratio,
        sampling=sampling,
        system_prompt=data.system_prompt,
        namespace=tenant,
    )
    messages = [
        *([{"role": "system", "content": data.system_prompt}] if data.system_prompt else []),
        {"role": "user", "content": data.question},
    ]
    result = await _last_item(runtime.answer(tenant, rag, SemanticQueryIn(messages, data.category, data.cache)))
    if isinstance(result, CachedAnswer):
        report = semantic.hit_report(result)
        return Response(
            RagResponse(result.text, "stop", convert.no_usage(), report), headers=convert.report_headers(report)
        )
    report = convert.cache_report(result)
    body = RagResponse(result.text, result.finish_reason, convert.usage(result), report)
    return Response(body, headers=convert.report_headers(report))


@post(
    "/v1/documents",
    operation_id="addDocuments",
    summary="Precompute and store the KV of documents",
    guards=TENANT,
    responses=responses(400, 401, 413, 503),
)
async def add_documents(
    data: JSONBody[AddDocumentsRequest], runtime: RuntimeDep, tenant: TenantDep
) -> AddDocumentsResponse:
    stored = await runtime.add_documents(tenant, [(d.id, d.text) for d in data.documents], data.system_prompt)
    return AddDocumentsResponse([DocumentRecord(r.id, r.num_tokens, cached) for r, cached in stored])


@delete(
    "/v1/documents/{doc_id:str}",
    operation_id="deleteDocument",
    summary="Forget a document and drop its KV",
    status_code=HTTP_204_NO_CONTENT,
    guards=TENANT,
    responses=responses(401, 404, 503),
)
async def delete_document(doc_id: FromPath[str], runtime: RuntimeDep, tenant: TenantDep) -> None:
    await runtime.delete_document(tenant, doc_id)


@post(
    "/v1/programs/{program_id:str}/events",
    operation_id="programEvent",
    status_code=HTTP_204_NO_CONTENT,
    summary="An agent's tool started or ended, or its program is over",
    guards=TENANT,
    responses=responses(400, 401, 413),
)
async def program_event(
    program_id: FromPath[str], data: JSONBody[ProgramEvent], runtime: RuntimeDep, tenant: TenantDep
) -> None:
    kind = type(data).__struct_config__.tag
    assert isinstance(kind, str)  # every ProgramEvent struct is tagged with a string
    runtime.program_event(tenant, program_id, kind, data.tool)


ROUTES = [list_models, chat_completions, rag_answer, add_documents, delete_document, program_event]
