"""Each API call as data: what to send (a `Call`) and how to read the answer, written once for both clients.

The clients only move bytes: they send a Call's method, path and body with the right key,
retry as the policy says, and hand the response body to `Call.parse`. Bodies are built
from the wire structs of ragcache.schemas, so defaults (max_tokens=128, temperature=0.0
for /v1/rag) are the server's own; fields left None are not sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple, TypedDict
from urllib.parse import quote

import msgspec

from ragcache.schemas import (
    AddDocumentsRequest,
    AddDocumentsResponse,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    DocumentIn,
    ModelList,
    RagRequestBody,
    RagResponse,
    StreamOptions,
)

# A document: its text; (id, text); {"text": ..., "id": ...}; or a DocumentIn.
Document = str | tuple[str, str] | Mapping[str, Any] | DocumentIn
# A conversation: one user message as text, or OpenAI-style messages (dicts or ChatMessage).
Messages = str | Iterable[Mapping[str, Any] | ChatMessage]
# The header alias of the program_id extension; a program's turns send both.
PROGRAM_HEADER = "X-Session-ID"
# What POST /v1/programs/{id}/events says happened.
ProgramEventType = Literal["tool_start", "tool_end", "end"]


class RagOptions(TypedDict, total=False):
    """Keyword options of rag(); unset ones take RagRequestBody's defaults."""

    document_ids: list[str]  # documents added before with add_documents(), used after the inline ones
    max_tokens: int  # 128
    temperature: float  # 0.0: greedy
    top_p: float
    seed: int
    stop: str | list[str]
    blend_ratio: float  # share of reused tokens recomputed; the server's default when unset
    mode: Literal["blend", "full", "prefix", "reuse"]
    system_prompt: str
    category: str


class ChatOptions(TypedDict, total=False):
    """Keyword options of chat(); unset ones take the server's (OpenAI's) defaults."""

    document_ids: list[str]
    max_tokens: int
    temperature: float  # 1.0 when unset, as OpenAI
    top_p: float
    seed: int
    stop: str | list[str]
    blend_ratio: float
    mode: Literal["blend", "full", "prefix", "reuse"]
    model: str
    category: str
    program_id: str
    # OpenAI tool calling and output formats (as dicts in OpenAI's shape)
    tools: list[dict]
    tool_choice: str | dict  # "none", "auto", "required" or {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool
    response_format: dict  # {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}
    n: int
    logprobs: bool
    top_logprobs: int


class Call(NamedTuple):
    """One HTTP call. admin: authenticate with the admin key rather than the API key."""

    method: str
    path: str
    parse: Callable[[bytes], Any]
    body: dict | None = None
    params: dict | None = None
    admin: bool = False
    stream: bool = False
    headers: dict | None = None  # extra request headers (X-Session-ID for a program's turns)


def _decoder(kind: type) -> Callable[[bytes], Any]:
    return msgspec.json.Decoder(kind).decode


def _nothing(_: bytes) -> None:
    return None


def _compact(struct: msgspec.Struct) -> dict:
    """The struct as JSON-ready builtins, without the fields left None."""
    return {name: value for name, value in msgspec.to_builtins(struct).items() if value is not None}


def document_in(document: Document) -> DocumentIn:
    if isinstance(document, DocumentIn):
        return document
    if isinstance(document, str):
        return DocumentIn(document)
    if isinstance(document, tuple):
        doc_id, text = document
        return DocumentIn(text, doc_id)
    return msgspec.convert(document, DocumentIn)


def documents_in(documents: Iterable[Document] | None) -> list[DocumentIn] | None:
    if documents is None:
        return None
    if isinstance(documents, (str, bytes)):
        raise TypeError("documents must be a list of documents; wrap a single text as [text]")
    return [document_in(document) for document in documents]


def messages_in(messages: Messages) -> list[ChatMessage]:
    if isinstance(messages, str):
        return [ChatMessage("user", messages)]
    return [m if isinstance(m, ChatMessage) else msgspec.convert(m, ChatMessage) for m in messages]


def _stops(options: dict) -> dict:
    stop = options.get("stop")
    return {**options, "stop": [stop]} if isinstance(stop, str) else options


def rag(question: str, documents: Iterable[Document] | None, options: RagOptions) -> Call:
    body = RagRequestBody(question=question, documents=documents_in(documents), **_stops(dict(options)))
    return Call("POST", "/v1/rag", _decoder(RagResponse), _compact(body))


def chat(messages: Messages, documents: Iterable[Document] | None, stream: bool, options: ChatOptions) -> Call:
    """stream: ask for usage in the last event too, so a stream ends with everything a plain answer has."""
    body = ChatCompletionRequest(
        messages=messages_in(messages),
        documents=documents_in(documents),
        stream=stream,
        stream_options=StreamOptions(include_usage=True) if stream else None,
        # tools, tool_choice and response_format stay the caller's dicts: _compact sends them as given
        **options,  # type: ignore[arg-type]  # OpenAI-shaped dicts, not converted to structs; the server validates them
    )
    return Call("POST", "/v1/chat/completions", _decoder(ChatCompletion), _compact(body), stream=stream)


def program_chat(
    program_id: str,
    messages: Messages,
    documents: Iterable[Document] | None,
    stream: bool,
    options: ChatOptions,
    system_prompt: str | None = None,
    is_last_step: bool = False,
) -> Call:
    """chat() as a turn of an agent program: the id rides as the `program_id` extension and as the
    X-Session-ID header; system_prompt leads the messages unless they start with a system message;
    is_last_step (an extension) tells the server the program ends with this answer."""
    turn = messages_in(messages)
    if system_prompt is not None and not (turn and turn[0].role == "system"):
        turn = [ChatMessage("system", system_prompt), *turn]
    call = chat(turn, documents, stream, {**options, "program_id": program_id})
    assert call.body is not None  # chat() always sends a body
    body = {**call.body, "is_last_step": True} if is_last_step else call.body
    return call._replace(body=body, headers={PROGRAM_HEADER: program_id})


def program_event(program_id: str, type: ProgramEventType, tool: str | None = None) -> Call:
    """POST /v1/programs/{id}/events with {"type", "tool"}: a tool started or ended, or the program ended (204)."""
    body = {"type": type} if tool is None else {"type": type, "tool": tool}
    return Call("POST", f"/v1/programs/{quote(program_id, safe='')}/events", _nothing, body)


def add_documents(documents: Iterable[Document], system_prompt: str | None) -> Call:
    body = AddDocumentsRequest(documents_in(documents) or [], system_prompt)
    decode = _decoder(AddDocumentsResponse)
    return Call("POST", "/v1/documents", lambda content: decode(content).documents, _compact(body))


def delete_document(doc_id: str) -> Call:
    return Call("DELETE", f"/v1/documents/{quote(doc_id, safe='')}", _nothing)


def models() -> Call:
    return Call("GET", "/v1/models", _decoder(ModelList))


def stats() -> Call:
    return Call("GET", "/admin/stats", msgspec.json.decode, admin=True)


def flush(tier: str | None, tenant: str | None) -> Call:
    params = {name: value for name, value in (("tier", tier), ("tenant", tenant)) if value is not None}
    return Call("POST", "/admin/flush", msgspec.json.decode, params=params, admin=True)


def health() -> Call:
    return Call("GET", "/health", msgspec.json.decode)


def ready() -> Call:
    return Call("GET", "/ready", msgspec.json.decode)
