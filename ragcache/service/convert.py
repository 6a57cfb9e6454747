"""Translate between the wire schemas and the engine's request and result objects."""

from __future__ import annotations

import time
import uuid

from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.generate import SamplingParams
from ragcache.engine.runner import Generation, RagRequest
from ragcache.schemas import (
    AssistantMessage,
    CacheReport,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    PromptTokensDetails,
    Timings,
    Usage,
)


def message_text(message: ChatMessage, index: int) -> str:
    if isinstance(message.content, str):
        return message.content
    if isinstance(message.content, list):
        texts = [part.text for part in message.content if part.type == "text" and part.text]
        if texts:
            return "\n".join(texts)
    raise InvalidRequestError(f"messages[{index}].content must be text")


def sampling_from(max_tokens, temperature, top_p, seed, stop, limit: int) -> SamplingParams:
    if max_tokens is not None and not 1 <= max_tokens <= limit:
        raise InvalidRequestError(f"max_tokens must be in [1, {limit}], got {max_tokens}")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    try:
        return SamplingParams(
            max_tokens=max_tokens or min(256, limit),
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            seed=seed,
            stop=stops,
        )
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None


def chat_request(
    body: ChatCompletionRequest, documents: list[str], tenant: str, max_new_tokens: int, program_id: str | None = None
) -> RagRequest:
    """OpenAI messages -> RagRequest: system messages form the system prompt, the last user message is the question."""
    if not body.messages:
        raise InvalidRequestError("messages must not be empty")
    system, turns = [], []
    for index, message in enumerate(body.messages):
        if message.role not in ("system", "developer", "user", "assistant"):
            raise InvalidRequestError(f"messages[{index}].role {message.role!r} is not supported")
        text = message_text(message, index)
        if message.role in ("system", "developer"):
            system.append(text)
        else:
            turns.append((message.role, text))
    if not turns or turns[-1][0] != "user":
        raise InvalidRequestError("the last message must come from the user")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return RagRequest(
        question=turns[-1][1],
        documents=tuple(documents),
        mode=body.mode or "blend",
        blend_ratio=body.blend_ratio,
        sampling=sampling_from(max_tokens, body.temperature, body.top_p, body.seed, body.stop, max_new_tokens),
        system_prompt="\n\n".join(system) or None,
        namespace=tenant,
        history=tuple(turns[:-1]),
        program_id=program_id,
    )


def cache_report(result: Generation) -> CacheReport:
    t = result.timings
    return CacheReport(
        mode=result.mode,
        blend_ratio=result.blend_ratio,
        chunk_hits=result.chunk_hits,
        chunk_misses=result.chunk_misses,
        cached_tokens=result.cached_tokens,
        recomputed_tokens=result.recomputed_tokens,
        recomputed_fraction=result.recomputed_fraction,
        timings=Timings(t.lookup_s * 1e3, t.chunk_compute_s * 1e3, t.blend_s * 1e3, t.ttft_s * 1e3, t.decode_s * 1e3),
        program_reused_tokens=result.program_reused_tokens,
    )


def usage(result: Generation) -> Usage:
    completion = len(result.token_ids)
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=completion,
        total_tokens=result.prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=result.cached_tokens),
        recomputed_tokens=result.recomputed_tokens,
    )


def no_usage() -> Usage:
    """Usage of an answer served from the semantic cache: the model processed nothing."""
    return Usage(0, 0, 0, PromptTokensDetails(cached_tokens=0))


def cached_completion(answer: str, report: CacheReport, model: str) -> ChatCompletion:
    return ChatCompletion(
        id=completion_id(), object="chat.completion", created=int(time.time()), model=model,
        choices=[Choice(0, AssistantMessage("assistant", answer), "stop")], usage=no_usage(), ragcache=report,
    )


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chat_completion(result: Generation, model: str) -> ChatCompletion:
    return ChatCompletion(
        id=completion_id(),
        object="chat.completion",
        created=int(time.time()),
        model=model,
        choices=[Choice(0, AssistantMessage("assistant", result.text), result.finish_reason)],
        usage=usage(result),
        ragcache=cache_report(result),
    )


def report_headers(report: CacheReport) -> dict[str, str]:
    """The same facts as the `ragcache` object, for clients that only look at headers."""
    return {
        "x-ragcache-mode": report.mode,
        "x-ragcache-chunk-hits": str(report.chunk_hits),
        "x-ragcache-chunk-misses": str(report.chunk_misses),
        "x-ragcache-cached-tokens": str(report.cached_tokens),
        "x-ragcache-ttft-ms": f"{report.timings.ttft_ms:.1f}",
        "x-ragcache-semantic-hit": str(report.semantic_hit).lower(),
        **({"x-ragcache-semantic-similarity": f"{report.semantic_similarity:.4f}"} if report.semantic_hit else {}),
    }
