"""Wire schemas of the HTTP API, shared by the service and the SDK (msgspec structs, no torch).

Chat completions follow OpenAI's schema, so the official `openai` client works unchanged;
ragcache's own fields ride along as extensions (`documents`, `blend_ratio`, `category`,
`program_id`), which `openai` sends through `extra_body`.
"""

from __future__ import annotations

from typing import Literal, Union

import msgspec


class DocumentIn(msgspec.Struct, forbid_unknown_fields=True):
    text: str
    id: str | None = None


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it


class ToolCallOut(msgspec.Struct):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(msgspec.Struct):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCallOut] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class FunctionDefinition(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class ToolDefinition(msgspec.Struct):
    function: FunctionDefinition
    type: str = "function"


class FunctionName(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    function: FunctionName
    type: str = "function"


class JsonSchemaFormat(msgspec.Struct):
    name: str | None = None
    schema: dict | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct):
    type: str  # "text", "json_object" or "json_schema"
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct):
    """OpenAI's request plus extensions. The fields policy (README, "OpenAI compatibility"): what is
    declared here is honoured; `UNSUPPORTED` fields that would change the answer are refused
    (400 naming them) when set; other unknown fields are ignored."""

    messages: list[ChatMessage]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Union[str, NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # accepted, no effect on the answer
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    # refused when set (they change the answer and ragcache does not implement them)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None
    functions: list | None = None
    function_call: Union[str, dict, None] = None
    audio: dict | None = None
    modalities: list[str] | None = None
    prediction: dict | None = None
    web_search_options: dict | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    # ragcache extensions
    documents: list[DocumentIn] | None = None
    document_ids: list[str] | None = None
    blend_ratio: float | None = None
    mode: str | None = None
    category: str | None = None
    program_id: str | None = None
    is_last_step: bool = False  # the program ends with this turn: its KV is released
    cache: bool = True  # false: bypass the semantic cache
    cache_sampled: bool = False  # true: let a temperature > 0 request use the semantic cache


class ProgramEvent(msgspec.Struct, forbid_unknown_fields=True):
    """A client telling ragcache where its agent is: a tool started, ended, or the program is over."""

    type: Literal["tool_start", "tool_end", "end"]
    tool: str | None = None


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    recomputed_tokens: int = 0  # extension: cached tokens recomputed by blending


class Timings(msgspec.Struct):
    lookup_ms: float
    chunk_compute_ms: float
    blend_ms: float
    ttft_ms: float
    decode_ms: float
    queue_ms: float = 0.0  # waiting for admission (working-KV budget, program-level order)


UNSUPPORTED = ("frequency_penalty", "presence_penalty", "logit_bias", "functions", "function_call", "audio",
               "modalities", "prediction", "web_search_options", "reasoning_effort", "verbosity")


class CacheReport(msgspec.Struct):
    """What was reused for this answer (the `ragcache` extension object)."""

    mode: str
    blend_ratio: float
    chunk_hits: int
    chunk_misses: int
    cached_tokens: int
    recomputed_tokens: int
    recomputed_fraction: float
    timings: Timings
    semantic_hit: bool = False
    program_reused_tokens: int = 0  # agent programs: prompt tokens reused from the program's previous turn
    semantic_similarity: float | None = None  # set on a semantic hit
    semantic_entry_id: str | None = None  # the entry served (report a bad one to /v1/feedback)


class AssistantMessage(msgspec.Struct):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct):
    content: list[TokenLogprobOut]


class Choice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(msgspec.Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    ragcache: CacheReport


class FunctionDelta(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    index: int
    id: str | None = None
    type: str | None = None
    function: FunctionDelta | None = None


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct, omit_defaults=True):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    ragcache: CacheReport | None = None


class ModelCard(msgspec.Struct):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "ragcache"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"


class AddDocumentsRequest(msgspec.Struct, forbid_unknown_fields=True):
    documents: list[DocumentIn]
    system_prompt: str | None = None


class DocumentRecord(msgspec.Struct):
    id: str
    num_tokens: int
    cached: bool  # its KV was already stored before this call


class AddDocumentsResponse(msgspec.Struct):
    documents: list[DocumentRecord]


class RagRequestBody(msgspec.Struct, forbid_unknown_fields=True):
    question: str
    documents: list[DocumentIn] | None = None
    document_ids: list[str] | None = None
    system_prompt: str | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    blend_ratio: float | None = None
    mode: str | None = None
    category: str | None = None
    cache: bool = True


class RagResponse(msgspec.Struct):
    answer: str
    finish_reason: str
    usage: Usage
    ragcache: CacheReport


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


class Feedback(msgspec.Struct, forbid_unknown_fields=True):
    """A client saying a semantic-cache answer was wrong for its question."""

    entry_id: str


class CategoryPolicyIn(msgspec.Struct, forbid_unknown_fields=True):
    threshold: float
    ttl_s: float
    max_entries: int
    enabled: bool = True
    min_threshold: float | None = None
    max_threshold: float | None = None
    max_ttl_s: float | None = None
    delta: float = 0.05  # the largest wrong-answer rate learned thresholds may allow


class BlendEpsilonIn(msgspec.Struct, forbid_unknown_fields=True):
    epsilon: float  # the largest first-token disagreement rate blending may have in this category
