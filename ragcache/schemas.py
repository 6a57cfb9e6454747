"""Wire schemas of the HTTP API, shared by the service and the SDK (msgspec structs, no torch).

Chat completions follow OpenAI's schema, so the official `openai` client works unchanged;
ragcache's own fields ride along as extensions (`documents`, `blend_ratio`, `category`,
`program_id`), which `openai` sends through `extra_body`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

# Bounds the server enforces whatever its settings. Settings-dependent ones (max_tokens <= max_new_tokens,
# documents <= max_documents) are checked by the engine and stated in the served OpenAPI spec (service/limits.py).
NonEmptyList = Meta(min_length=1)
Ratio = Annotated[float, Meta(ge=0.0, le=1.0)]
Temperature = Annotated[float, Meta(ge=0.0, le=10.0)]  # SamplingParams' range
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Seed = Annotated[
    int, Meta(ge=-(2**63), le=2**63 - 1)
]  # torch.Generator.manual_seed takes int64 (seed + choice index too)
PositiveInt = Annotated[int, Meta(ge=1, le=2**63 - 1)]  # msgspec's int is 64-bit
StopText = Annotated[str, Meta(min_length=1)]
Stops = Annotated[list[StopText], Meta(max_length=16)]  # SamplingParams: at most 16 non-empty strings
Mode = Literal["full", "prefix", "reuse", "blend"]  # engine.request.MODES
Role = Literal["system", "developer", "user", "assistant", "tool"]
NON_BLANK = r"\S"  # a character that is not whitespace: the engine refuses blank questions and documents
NonBlank = Annotated[str, Meta(pattern=NON_BLANK)]
DOCUMENT_ID = r"^[^/]*[^/\s][^/]*$"  # not blank, no '/': a document's id is a path segment


class DocumentIn(msgspec.Struct, forbid_unknown_fields=True):
    text: NonBlank
    id: Annotated[str, Meta(pattern=DOCUMENT_ID, max_length=200)] | None = None


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
    role: Role
    content: str | list[ContentPart] | None = None
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

    messages: Annotated[list[ChatMessage], NonEmptyList]
    model: str | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: StopText | Stops | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1, le=8)] | None = None  # convert.MAX_CHOICES
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None  # generate.MAX_TOP_LOGPROBS
    tools: list[ToolDefinition] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # accepted, no effect on the answer
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    modalities: list[Literal["text"]] | None = None  # text is all ragcache answers; [] and ["text"] say so
    # refused when set (they change the answer and ragcache does not implement them)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    audio: dict | None = None
    prediction: dict | None = None
    web_search_options: dict | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    # ragcache extensions
    documents: list[DocumentIn] | None = None
    document_ids: list[str] | None = None
    blend_ratio: Ratio | None = None
    mode: Mode | None = None
    category: str | None = None
    program_id: str | None = None
    is_last_step: bool = False  # the program ends with this turn: its KV is released
    cache: bool = True  # false: bypass the semantic cache
    cache_sampled: bool = False  # true: let a temperature > 0 request use the semantic cache


class ToolStart(msgspec.Struct, forbid_unknown_fields=True, tag_field="type", tag="tool_start"):
    """The agent's tool started: the program's KV is pinned for the tool's expected duration."""

    tool: Annotated[str, Meta(min_length=1)]


class ToolEnd(msgspec.Struct, forbid_unknown_fields=True, tag_field="type", tag="tool_end"):
    tool: str | None = None


class ProgramEnd(msgspec.Struct, forbid_unknown_fields=True, tag_field="type", tag="end"):
    """The program is over: its KV is released."""

    tool: str | None = None


# A client telling ragcache where its agent is: a tool started, ended, or the program is over.
ProgramEvent = ToolStart | ToolEnd | ProgramEnd


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


UNSUPPORTED = (
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "functions",
    "function_call",
    "audio",
    "prediction",
    "web_search_options",
    "reasoning_effort",
    "verbosity",
)


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
    prefix_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (an earlier request's)
    program_reused_tokens: int = 0  # the same figure, under its earlier name (agent programs' previous turns)
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
    documents: Annotated[list[DocumentIn], NonEmptyList]
    system_prompt: str | None = None


class DocumentRecord(msgspec.Struct):
    id: str
    num_tokens: int
    cached: bool  # its KV was already stored before this call


class AddDocumentsResponse(msgspec.Struct):
    documents: list[DocumentRecord]


class RagRequestBody(msgspec.Struct, forbid_unknown_fields=True):
    question: NonBlank
    documents: list[DocumentIn] | None = None
    document_ids: list[str] | None = None
    system_prompt: str | None = None
    max_tokens: PositiveInt | None = None  # None: 128, or max_new_tokens if that is less
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: Stops | None = None
    blend_ratio: Ratio | None = None
    mode: Mode | None = None
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


Similarity = Annotated[float, Meta(gt=0.0, le=1.0)]
PositiveSeconds = Annotated[float, Meta(gt=0.0)]


class CategoryPolicyIn(msgspec.Struct, forbid_unknown_fields=True):
    """Also checked together: min_threshold <= threshold <= max_threshold, ttl_s <= max_ttl_s (a 400 otherwise)."""

    threshold: Similarity
    ttl_s: PositiveSeconds
    max_entries: PositiveInt
    enabled: bool = True
    min_threshold: Similarity | None = None
    max_threshold: Similarity | None = None
    max_ttl_s: PositiveSeconds | None = None
    delta: Annotated[float, Meta(gt=0.0, lt=1.0)] = 0.05  # the largest wrong-answer rate learned thresholds may allow


class BlendEpsilonIn(msgspec.Struct, forbid_unknown_fields=True):
    epsilon: Annotated[float, Meta(gt=0.0, lt=1.0)]  # the largest first-token disagreement rate blending may have
