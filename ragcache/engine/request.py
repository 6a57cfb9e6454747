"""What crosses the engine's seam (base.py): a request, the finished generation, a document's info.

The bottom of ragcache/engine/: value types only, importing nothing of the engine's machinery (no
blending, scheduling or model code), so every Engine implementation and every caller of the seam
(service, checks, agents, benchmarks) shares them without pulling in BlendEngine's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ragcache.engine.chat import ChatTurn, OutputConstraint, ToolSpec
from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.generate import SamplingParams
from ragcache.engine.selection import DEVIATION_NAMES as DEVIATIONS
from ragcache.engine.toolformat import ParsedCall
from ragcache.kv import DEFAULT_NAMESPACE, ChunkKey

if TYPE_CHECKING:
    from ragcache.storage.prefix import CachedPath

MODES = ("full", "prefix", "reuse", "blend")  # how a request's prompt KV is obtained (blend.py)


@dataclass(frozen=True)
class RagRequest:
    question: str
    documents: tuple[str, ...] = ()
    mode: str = "blend"
    blend_ratio: float | None = None  # None: the engine's default_ratio
    blend_deviation: str | None = None  # what ranks tokens to recompute (BlendConfig.deviation); None: the engine's
    blend_sink_tokens: int | None = None  # EPIC's k (BlendConfig.sink_tokens); None: the engine's, 0: off
    sampling: SamplingParams = SamplingParams()
    system_prompt: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    history: tuple[tuple[str, str] | ChatTurn, ...] = ()  # earlier turns of a chat, oldest first
    program_id: str | None = None  # an agent program: its conversation KV is kept and extended turn by turn
    tools: tuple[ToolSpec, ...] = ()  # functions the model may call, listed in the prompt
    constraint: OutputConstraint | None = None  # what the output must be (grammar.py); None: free text
    prefix_cache: bool = True  # reuse and keep KV in the prefix cache; benchmarks of the modes turn it off
    implicit_program: bool = False  # program_id was found from the prompt's prefix (the conversation labels)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidRequestError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.blend_ratio is not None and not 0.0 <= self.blend_ratio <= 1.0:
            raise InvalidRequestError(f"blend_ratio must be in [0, 1], got {self.blend_ratio}")
        if self.blend_deviation is not None and self.blend_deviation not in DEVIATIONS:
            raise InvalidRequestError(
                f"blend_deviation must be one of {list(DEVIATIONS)}, got {self.blend_deviation!r}"
            )
        sinks = self.blend_sink_tokens
        if sinks is not None and (not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0):
            raise InvalidRequestError(f"blend_sink_tokens must be an integer >= 0, got {sinks!r}")


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model, and the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class PhaseTimings:
    lookup_s: float = 0.0  # store lookups at submit
    chunk_compute_s: float = 0.0  # missing prefix / chunks computed at admission
    blend_s: float = 0.0  # admission to first token: placing the KV and the prompt's steps
    ttft_s: float = 0.0  # request start to first token, all phases above and queueing included
    decode_s: float = 0.0
    queue_s: float = 0.0  # waiting for admission (working-KV budget, admission order)


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    recomputed_tokens: int
    recomputed_fraction: float
    chunk_hits: int
    chunk_misses: int
    timings: PhaseTimings
    first_token_logprobs: torch.Tensor | None = field(default=None, repr=False)
    prefix_path: CachedPath | None = None  # where the prefix cache keeps this request's KV (agents pin it)
    prefix_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (an earlier request's)
    program_tokens: int = 0  # tokens of prefix_path
    mode: str = "blend"
    blend_ratio: float = 0.0  # the ratio blending used (the engine's default when the request gave none)
    blend_deviation: str = ""  # the deviation that ranked the tokens (as blend_ratio: resolved; "" unless mode blend)
    blend_sink_tokens: int = 0  # EPIC's k the selection used (resolved; 0 unless mode blend)
    token_logprobs: tuple[TokenLogprob, ...] = ()  # per generated token, when sampling.logprobs asked
    tool_calls: tuple[ParsedCall, ...] = ()  # calls of the request's tools in the answer (finish_reason "tool_calls")
    content: str | None = None  # the answer's text outside its tool calls (None: nothing but calls)


class SequenceCancelled(Exception):
    """The sequence was cancelled (its client went away) before it finished."""


@dataclass(frozen=True)
class DocumentInfo:
    key: ChunkKey
    num_tokens: int
    cached: bool  # already in the store before this call
