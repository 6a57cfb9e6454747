"""Handlers: each translates HTTP to one Runtime call. OpenAI-compatible chat, RAG, documents."""

from __future__ import annotations

import logging
import time

import msgspec
from litestar.params import FromPath, JSONBody
from litestar import Request, Response, delete, get, post
from litestar.response import ServerSentEvent
from litestar.status_codes import HTTP_204_NO_CONTENT

from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.runner import Generation, RagRequest
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
    ModelCard,
    ModelList,
    ProgramEvent,
    RagRequestBody,
    RagResponse,
)
from ragcache.service import convert, semantic
from ragcache.service.auth import tenant_of
from ragcache.service.errors import ERRORS
from ragcache.service.deps import RuntimeDep, SettingsDep
from ragcache.service.runtime import CachedAnswer, QueueFullError, Runtime, SemanticQueryIn


log = logging.getLogger("ragcache.service")


def documents_for(runtime: Runtime, tenant: str, inline: list[DocumentIn] | None, ids: list[str] | None) -> list[str]:
    texts = [doc.text for doc in inline or []]
    return texts + runtime.resolve_documents(tenant, ids or [])


@get("/v1/models", operation_id="listModels", summary="The model this server runs", responses=ERRORS)
async def list_models(runtime: RuntimeDep, request: Request, settings: SettingsDep) -> ModelList:
    tenant_of(request, settings)
    return ModelList([ModelCard(runtime.model_name, created=int(runtime.started_s))])


@post("/v1/chat/completions", operation_id="createChatCompletion", summary="OpenAI-compatible chat, with RAG documents",
      description="With `stream: true` the answer comes as server-sent `chat.completion.chunk` events ending in `[DONE]`.",
      status_code=200, responses=ERRORS)
async def chat_completions(
    data: JSONBody[ChatCompletionRequest], request: Request, runtime: RuntimeDep, settings: SettingsDep
) -> Response[ChatCompletion]:
    tenant = tenant_of(request, settings)
    documents = documents_for(runtime, tenant, data.documents, data.document_ids)
    program_id = data.program_id or request.headers.get("x-session-id")
    rag = convert.chat_request(data, documents, tenant, settings.max_new_tokens, program_id)
    messages = [{"role": m.role, "content": convert.message_text(m, i)} for i, m in enumerate(data.messages)]
    query = SemanticQueryIn(messages, data.category, data.cache, data.cache_sampled)
    answer = runtime.answer(tenant, rag, query, data.is_last_step)
    include_usage = bool(data.stream_options and data.stream_options.include_usage)
    if data.stream:
        first = await _first_item(answer)  # a full queue or a bad request is a 4xx, not an error inside a 200
        return ServerSentEvent(_sse(runtime.model_name, first, answer, include_usage))
    result = await _last_item(answer)
    if isinstance(result, CachedAnswer):
        report = semantic.hit_report(result)
        return Response(convert.cached_completion(result.text, report, runtime.model_name),
                        headers=convert.report_headers(report))
    body = convert.chat_completion(result, runtime.model_name)
    return Response(body, headers=convert.report_headers(body.ragcache))


async def _first_item(answer):
    """Accepted or the whole cached answer: bad input and a full queue surface here, as 4xx."""
    return await anext(answer)


async def _last_item(answer):
    """The Generation or the CachedAnswer."""
    item = None
    async for item in answer:
        pass
    return item


class _Chunks:
    """Serialises the chunks of one streamed completion."""

    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = convert.completion_id(), int(time.time()), model

    def delta(self, delta: Delta, finish: str | None = None, **extra) -> str:
        body = ChatCompletionChunk(self.id, "chat.completion.chunk", self.created, self.model,
                                   [ChunkChoice(0, delta, finish)], **extra)
        return msgspec.json.encode(body).decode()

    def usage(self, usage) -> str:
        body = ChatCompletionChunk(self.id, "chat.completion.chunk", self.created, self.model, [], usage=usage)
        return msgspec.json.encode(body).decode()


async def _sse(model: str, first, answer, include_usage: bool):
    chunks = _Chunks(model)
    if isinstance(first, CachedAnswer):
        yield chunks.delta(Delta(role="assistant", content=first.text))
        yield chunks.delta(Delta(), "stop", ragcache=semantic.hit_report(first))
        if include_usage:
            yield chunks.usage(convert.no_usage())
        yield "[DONE]"
        return
    yield chunks.delta(Delta(role="assistant", content=""))
    try:
        async for item in answer:
            if isinstance(item, Generation):
                yield chunks.delta(Delta(), item.finish_reason, ragcache=convert.cache_report(item))
                if include_usage:
                    yield chunks.usage(convert.usage(item))
            else:
                yield chunks.delta(Delta(content=item))
    except Exception as exc:  # the 200 is out: report in the stream, never drop it silently
        yield msgspec.json.encode({"error": _stream_error(exc)}).decode()
    finally:
        await answer.aclose()  # a client that went away frees its sequence at the next step
    yield "[DONE]"


def _stream_error(exc: Exception) -> dict:
    if isinstance(exc, InvalidRequestError):
        return {"message": str(exc), "type": "invalid_request_error"}
    if isinstance(exc, QueueFullError):
        return {"message": str(exc), "type": "rate_limit_error"}
    log.exception("generation failed mid-stream")
    return {"message": "internal error; the server log has the details", "type": "server_error"}


@post("/v1/rag", operation_id="rag", summary="Question + documents (inline or by id) -> answer", status_code=200,
      responses=ERRORS)
async def rag_answer(data: JSONBody[RagRequestBody], request: Request, runtime: RuntimeDep, settings: SettingsDep) -> Response[RagResponse]:
    tenant = tenant_of(request, settings)
    documents = documents_for(runtime, tenant, data.documents, data.document_ids)
    sampling = convert.sampling_from(data.max_tokens, data.temperature, data.top_p, data.seed, data.stop,
                                     settings.max_new_tokens)
    rag = RagRequest(data.question, tuple(documents), mode=data.mode or "blend", blend_ratio=data.blend_ratio,
                     sampling=sampling, system_prompt=data.system_prompt, namespace=tenant)
    messages = [*([{"role": "system", "content": data.system_prompt}] if data.system_prompt else []),
                {"role": "user", "content": data.question}]
    result = await _last_item(runtime.answer(tenant, rag, SemanticQueryIn(messages, data.category, data.cache)))
    if isinstance(result, CachedAnswer):
        report = semantic.hit_report(result)
        return Response(RagResponse(result.text, "stop", convert.no_usage(), report),
                        headers=convert.report_headers(report))
    report = convert.cache_report(result)
    body = RagResponse(result.text, result.finish_reason, convert.usage(result), report)
    return Response(body, headers=convert.report_headers(report))


@post("/v1/documents", operation_id="addDocuments", summary="Precompute and store the KV of documents",
      responses=ERRORS)
async def add_documents(data: JSONBody[AddDocumentsRequest], request: Request, runtime: RuntimeDep, settings: SettingsDep) -> AddDocumentsResponse:
    tenant = tenant_of(request, settings)
    if not data.documents:
        raise InvalidRequestError("documents must not be empty")
    stored = await runtime.add_documents(tenant, [(d.id, d.text) for d in data.documents], data.system_prompt)
    return AddDocumentsResponse([DocumentRecord(r.id, r.num_tokens, cached) for r, cached in stored])


@delete("/v1/documents/{doc_id:str}", operation_id="deleteDocument", summary="Forget a document and drop its KV",
        status_code=HTTP_204_NO_CONTENT, responses=ERRORS)
async def delete_document(doc_id: FromPath[str], request: Request, runtime: RuntimeDep, settings: SettingsDep) -> None:
    await runtime.delete_document(tenant_of(request, settings), doc_id)


@post("/v1/programs/{program_id:str}/events", operation_id="programEvent", status_code=HTTP_204_NO_CONTENT,
      summary="An agent's tool started or ended, or its program is over", responses=ERRORS)
async def program_event(program_id: FromPath[str], data: JSONBody[ProgramEvent], request: Request,
                        runtime: RuntimeDep, settings: SettingsDep) -> None:
    runtime.program_event(tenant_of(request, settings), program_id, data.type, data.tool)


ROUTES = [list_models, chat_completions, rag_answer, add_documents, delete_document, program_event]
