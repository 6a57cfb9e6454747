"""Translate between the wire schemas and the engine's request and result objects."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

from ragcache.engine.chat import ChatTurn, OutputConstraint, ToolCall, ToolSpec
from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.generate import SamplingParams
from ragcache.engine.request import Generation, RagRequest
from ragcache.schemas import (
    UNSUPPORTED,
    AssistantMessage,
    CacheReport,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    FunctionCall,
    NamedToolChoice,
    PromptTokensDetails,
    ResponseFormat,
    Timings,
    TokenLogprobOut,
    ToolCallOut,
    TopLogprob,
    Usage,
)

MAX_CHOICES = 8  # n: each choice is a sequence of its own in the batch
# A temperature or top_p this small samples as greedy: softmax(logits / T) is already argmax to float32
# precision for any logit gap over 1e-4, and a nucleus under 1e-6 holds only the top token (which has at
# least 1 / vocab_size); the sampler itself fails on them (logits / T overflows below T ~ 1e-37, a top_p
# under float32's smallest value masks every token).
GREEDY_BELOW = 1e-6
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def message_text(message: ChatMessage, index: int) -> str:
    if isinstance(message.content, str):
        return message.content
    if isinstance(message.content, list):
        texts = [part.text for part in message.content if part.type == "text" and part.text]
        if texts:
            return "\n".join(texts)
    if message.content is None and (message.tool_calls or message.role == "tool"):
        return ""
    raise InvalidRequestError(f"messages[{index}].content must be text")


def sampling_from(
    max_tokens,
    temperature,
    top_p,
    seed,
    stop,
    limit: int,
    logprobs: bool = False,
    top_logprobs: int | None = None,
    default_max_tokens: int = 256,
) -> SamplingParams:
    """max_tokens None: default_max_tokens, or limit (max_new_tokens) if that is less."""
    if max_tokens is not None and not 1 <= max_tokens <= limit:
        raise InvalidRequestError(f"max_tokens must be in [1, {limit}], got {max_tokens}")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if top_logprobs is not None and not logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true")
    temperature, top_p = 1.0 if temperature is None else temperature, 1.0 if top_p is None else top_p
    if 0.0 < temperature < GREEDY_BELOW or 0.0 < top_p < GREEDY_BELOW:
        temperature, top_p = 0.0, 1.0
    try:
        return SamplingParams(
            max_tokens=max_tokens or min(default_max_tokens, limit),
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stops,
            logprobs=logprobs,
            top_logprobs=top_logprobs or 0,
        )
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None


def refuse_unsupported(body: ChatCompletionRequest) -> None:
    """Fields that would change the answer and are not implemented: a 400 naming them, never ignored."""
    for name in UNSUPPORTED:
        value = getattr(body, name)
        harmless = (
            value is None
            or (name in ("frequency_penalty", "presence_penalty") and value == 0)
            or (name == "logit_bias" and not value)
        )
        if not harmless:
            hint = "; use tools and tool_choice" if name in ("functions", "function_call") else ""
            raise InvalidRequestError(f"{name} is not supported{hint}")
    if body.n is not None and not 1 <= body.n <= MAX_CHOICES:
        raise InvalidRequestError(f"n must be in [1, {MAX_CHOICES}], got {body.n}")


def chat_request(
    body: ChatCompletionRequest, documents: list[str], tenant: str, max_new_tokens: int, program_id: str | None = None
) -> RagRequest:
    """OpenAI messages -> RagRequest: system messages form the system prompt, the last user message is
    the question (none after a tool result: the model answers the result), the rest is history."""
    if not body.messages:
        raise InvalidRequestError("messages must not be empty")
    refuse_unsupported(body)
    tools = tool_specs(body)
    system, turns = [], []
    for index, message in enumerate(body.messages):
        if message.role not in ("system", "developer", "user", "assistant", "tool"):
            raise InvalidRequestError(f"messages[{index}].role {message.role!r} is not supported")
        text = message_text(message, index)
        if message.role in ("system", "developer"):
            system.append(text)
        else:
            turns.append(chat_turn(message, text, index))
    if not turns or turns[-1].role not in ("user", "tool"):
        raise InvalidRequestError("the last message must come from the user or a tool")
    question = turns.pop().content if turns[-1].role == "user" else ""
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return RagRequest(
        question=question,
        documents=tuple(documents),
        mode=body.mode or "blend",
        blend_ratio=body.blend_ratio,
        sampling=sampling_from(
            max_tokens,
            body.temperature,
            body.top_p,
            body.seed,
            body.stop,
            max_new_tokens,
            bool(body.logprobs),
            body.top_logprobs,
        ),
        system_prompt="\n\n".join(system) or None,
        namespace=tenant,
        history=tuple(turns),
        program_id=program_id,
        tools=tools,  # listed even with tool_choice "none": the prompt, and its reusable prefix, stay the same
        constraint=output_constraint(body, tools),
    )


def chat_turn(message: ChatMessage, text: str, index: int) -> ChatTurn:
    """One non-system message as the engine's ChatTurn; tool calls' arguments must be JSON objects."""
    role = message.role
    assert role in ("user", "assistant", "tool")  # chat_request keeps system and developer messages out
    calls = []
    for number, call in enumerate(message.tool_calls or ()):
        if message.role != "assistant":
            raise InvalidRequestError(f"messages[{index}].tool_calls: only assistant messages carry tool calls")
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise InvalidRequestError(
                f"messages[{index}].tool_calls[{number}].function.arguments must be a JSON object"
            )
        calls.append(ToolCall(call.id, call.function.name, call.function.arguments))
    if message.role == "tool" and not message.tool_call_id:
        raise InvalidRequestError(f"messages[{index}].tool_call_id is required for a tool message")
    if message.role != "tool" and not text.strip() and not calls:
        raise InvalidRequestError(f"messages[{index}].content must not be empty")
    return ChatTurn(
        role,
        text,
        tuple(calls),
        message.tool_call_id if message.role == "tool" else None,
        message.name if message.role == "tool" else None,
    )


def tool_specs(body: ChatCompletionRequest) -> tuple[ToolSpec, ...]:
    specs, seen = [], set()
    for index, tool in enumerate(body.tools or ()):
        if tool.type != "function":
            raise InvalidRequestError(f"tools[{index}].type must be 'function', got {tool.type!r}")
        name = tool.function.name
        if not _TOOL_NAME.match(name):
            raise InvalidRequestError(f"tools[{index}].function.name must be 1-64 letters, digits, '_' or '-'")
        if name in seen:
            raise InvalidRequestError(f"tools[{index}].function.name {name!r} is listed twice")
        seen.add(name)
        parameters = tool.function.parameters or {"type": "object", "properties": {}}
        if parameters.get("type", "object") != "object":
            raise InvalidRequestError(f"tools[{index}].function.parameters must be a JSON schema of an object")
        specs.append(ToolSpec(name, tool.function.description or "", parameters))
    return tuple(specs)


def output_constraint(body: ChatCompletionRequest, tools: tuple[ToolSpec, ...]) -> OutputConstraint | None:
    """tool_choice and response_format as the grammar the sampler keeps to (grammar.py)."""
    choice, parallel = body.tool_choice, body.parallel_tool_calls is not False
    if choice not in (None, "none", "auto") and not tools:
        raise InvalidRequestError("tool_choice needs tools")
    if isinstance(choice, NamedToolChoice):
        named = [tool for tool in tools if tool.name == choice.function.name]
        if not named:
            raise InvalidRequestError(f"tool_choice.function.name {choice.function.name!r} is not one of the tools")
        return OutputConstraint("tool_calls", tuple(named), require_call=True, parallel=False)
    if choice is not None and choice not in ("none", "auto", "required"):
        raise InvalidRequestError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}")
    if tools and choice == "required":
        return OutputConstraint("tool_calls", tools, require_call=True, parallel=parallel)
    if tools and choice != "none":
        if body.response_format is not None and body.response_format.type != "text":
            raise InvalidRequestError("response_format with tools needs tool_choice 'none'")
        return OutputConstraint("tool_calls", tools, require_call=False, parallel=parallel)
    return _response_format(body.response_format)


def _response_format(fmt: ResponseFormat | None) -> OutputConstraint | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return OutputConstraint("json")
    if fmt.type == "json_schema":
        if fmt.json_schema is None or not isinstance(fmt.json_schema.schema, dict):
            raise InvalidRequestError("response_format.json_schema.schema must be a JSON schema object")
        return OutputConstraint("json", schema=json.dumps(fmt.json_schema.schema))
    raise InvalidRequestError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {fmt.type!r}")


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
        timings=Timings(
            t.lookup_s * 1e3,
            t.chunk_compute_s * 1e3,
            t.blend_s * 1e3,
            t.ttft_s * 1e3,
            t.decode_s * 1e3,
            t.queue_s * 1e3,
        ),
        prefix_cached_tokens=result.prefix_cached_tokens,
        program_reused_tokens=result.prefix_cached_tokens,
    )


def usage(result: Generation, choices: list[Generation] | None = None) -> Usage:
    """The prompt counted once, every choice's completion tokens (OpenAI's usage for n choices)."""
    completion = sum(len(r.token_ids) for r in choices) if choices else len(result.token_ids)
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
        id=completion_id(),
        object="chat.completion",
        created=int(time.time()),
        model=model,
        choices=[Choice(0, AssistantMessage("assistant", answer), "stop")],
        usage=no_usage(),
        ragcache=report,
    )


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def choice_request(request: RagRequest, index: int) -> RagRequest:
    """The request of choice `index` of n: its own seed (seed + index) so sampled choices differ but repeat."""
    seed = request.sampling.seed
    if index == 0 or seed is None:
        return request
    return replace(request, sampling=replace(request.sampling, seed=seed + index))


def assistant_message(result: Generation) -> AssistantMessage:
    """The answer as OpenAI's message: tool calls with fresh ids (content null when there is only calls)."""
    if result.tool_calls:
        calls = [ToolCallOut(call_id(), FunctionCall(call.name, call.arguments)) for call in result.tool_calls]
        return AssistantMessage("assistant", result.content, calls)
    return AssistantMessage("assistant", result.content if result.content is not None else result.text)


def choice_logprobs(result: Generation, token_texts: Callable[[list[int]], list[str]]) -> ChoiceLogprobs:
    """OpenAI's logprobs.content: each answer token, its logprob and the top alternatives asked for."""
    entries = result.token_logprobs
    ids = [e.token_id for e in entries] + [token for e in entries for token, _ in e.top]
    texts = dict(zip(ids, token_texts(ids)))
    return ChoiceLogprobs(
        [
            TokenLogprobOut(
                texts[e.token_id],
                e.logprob,
                list(texts[e.token_id].encode()),
                [TopLogprob(texts[t], lp, list(texts[t].encode())) for t, lp in e.top],
            )
            for e in entries
        ]
    )


def chat_completion(
    results: list[Generation], model: str, token_texts: Callable[[list[int]], list[str]] | None = None
) -> ChatCompletion:
    """n Generations (one per choice) as one completion; token_texts given: with logprobs."""
    first = results[0]
    choices = [
        Choice(
            index,
            assistant_message(result),
            result.finish_reason,
            choice_logprobs(result, token_texts) if token_texts is not None else None,
        )
        for index, result in enumerate(results)
    ]
    return ChatCompletion(
        id=completion_id(),
        object="chat.completion",
        created=int(time.time()),
        model=model,
        choices=choices,
        usage=usage(first, results),
        ragcache=cache_report(first),
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
