"""CacheBlend: fuse cached chunk KV into one prompt and recompute only the tokens that deviate.

Modes (the project's vocabulary):
    full    no reuse: every prompt token computed at every layer.
    prefix  what prefix caching gives: the prefix and the leading chunk reused, the rest computed.
    reuse   every chunk reused as cached, only the question computed.
    blend   every chunk reused, then selective recomputation (Yao et al., CacheBlend, 2024):
            layers [0, check_layer] recompute all reused tokens; at check_layer the fraction r
            whose K or V deviates most from the cache is kept, and from there on only those
            tokens and the question are recomputed, their fresh K/V written into the fused
            buffer. r=0 is `reuse`, r=1 recomputes every chunk token (full prefill's KV).

Buffer layout of a prompt with prefix P, chunks L1..Ln and question Q:

    slots  [0, P)        prefix   cached, exact (it is a true prefix)
           [P, P+L1)     chunk 1  cached, exact: computed after this very prefix at these positions
           [P+L1, C)     chunks 2..n  cached, deviate (they never saw the chunks before them)
           [C, T)        question computed in every mode

Only chunks 2..n are blend candidates: chunk 1's KV already equals full prefill's, so
recomputing it would be work for nothing. Which candidates are recomputed is selection.py's
job (top-r by deviation, optionally EPIC's sink tokens of every candidate chunk first).
Attention masks are exact causal: a recomputed token sees slots up to its own, never the
later chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ragcache.engine.forward import Selector, TokenRun, run_tokens
from ragcache.engine.kvbuffer import KVBuffer, SharedPrefix
from ragcache.engine.prompt import PromptParts
from ragcache.engine.request import MODES
from ragcache.engine.selection import DEVIATION_NAMES, choose_candidates, recompute_count
from ragcache.engine.stack import DecoderStack
from ragcache.kv import KVChunk

DEVIATIONS = DEVIATION_NAMES


@dataclass(frozen=True)
class BlendConfig:
    """How blending picks the tokens to recompute.

    check_layer: the layer whose deviation picks the tokens (the paper and its code use 1).
    deviation: what ranks the reused tokens there:
        'value'      squared distance of fresh and cached V (the paper's code; the default)
        'key'        the same on K
        'attention'  value deviation weighted by the attention the question pays the token
                     at the check layer: a deviating token matters only if it is looked at.
    sink_tokens: EPIC's k: the first k tokens of every candidate chunk are recomputed before
        the ranking, out of the same budget (selection.py); 0 turns it off.
    """

    check_layer: int = 1
    deviation: str = "value"
    sink_tokens: int = 0

    def __post_init__(self) -> None:
        if self.check_layer < 0:
            raise ValueError(f"check_layer must be >= 0, got {self.check_layer}")
        if self.deviation not in DEVIATIONS:
            raise ValueError(f"deviation must be one of {DEVIATIONS}, got {self.deviation!r}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")


@dataclass(frozen=True)
class BlendResult:
    buffer: KVBuffer  # the fused KV, length = prompt tokens, room for decoding after
    last_logits: torch.Tensor  # (vocab,) float32: the first generated token's distribution
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV was taken from cache
    recomputed_tokens: int  # cached tokens recomputed past the check layer
    recomputed_fraction: float  # (token, layer) K/V entries computed / full prefill's


class DeviationSelector:
    """Keeps the chosen candidates (selection.py) by KV deviation at one layer, plus every non-candidate.

    The run's first num_candidates tokens are the candidates (reused chunk tokens, the
    chunks of chunk_lens in order); the rest (the question) are always kept. The run's
    slots are contiguous, ending the prompt.
    """

    def __init__(self, config: BlendConfig, ratio: float, chunk_lens: Sequence[int]) -> None:
        self.layer = config.check_layer
        self.ratio = ratio
        self.deviation = config.deviation
        self.sink_tokens = config.sink_tokens
        self.chunk_lens = tuple(chunk_lens)
        self.num_candidates = sum(self.chunk_lens)
        self.chosen_slots: torch.Tensor | None = None

    def select(
        self,
        layer: int,
        buffer: KVBuffer,
        slots: torch.Tensor,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor | None:
        if layer != self.layer:
            return None
        n = self.num_candidates
        scores = kv_deviation(buffer, layer, slots[:n], keys[:, :n], values[:, :n], self.deviation)
        if self.deviation == "attention":
            scores = scores * _question_attention(buffer, layer, slots, queries, keys, n)
        chosen = choose_candidates(scores, recompute_count(self.ratio, n), self.chunk_lens, self.sink_tokens)
        self.chosen_slots = slots[chosen]
        return torch.cat([chosen, torch.arange(n, slots.shape[0], device=slots.device)])


if TYPE_CHECKING:  # the type checker holds DeviationSelector to the Selector contract (forward.py)
    _deviation_selector: type[Selector] = DeviationSelector


def kv_deviation(
    buffer: KVBuffer, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, deviation: str
) -> torch.Tensor:
    """(tokens,) squared distance of the fresh K (deviation 'key') or V (otherwise) from the cached KV at slots."""
    on_keys = deviation == "key"
    cached = (buffer.keys_at if on_keys else buffer.values_at)(layer, slots)  # (kv_heads, tokens, dim), as reused
    fresh = keys if on_keys else values
    return (fresh.float() - cached.float()).square().sum(dim=(0, 2))


def _question_attention(
    buffer: KVBuffer,
    layer: int,
    slots: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    num_candidates: int,
) -> torch.Tensor:
    """Attention the question's tokens pay each candidate at this layer (the run's keys are fresh)."""
    all_keys = torch.cat([buffer.layer(layer, int(slots[0]))[0], keys], dim=1)  # (kv_heads, T, dim)
    return question_attention(all_keys, queries[:, num_candidates:], slots[num_candidates:], slots[:num_candidates])


def question_attention(
    keys: torch.Tensor, question: torch.Tensor, question_slots: torch.Tensor, candidate_slots: torch.Tensor
) -> torch.Tensor:
    """Attention question queries (heads, Q, dim) pay each candidate slot over keys (kv_heads, T, dim),
    summed over heads and queries, each query seeing slots up to its own."""
    keys, question = keys.float(), question.float()
    grouped = keys.repeat_interleave(question.shape[0] // keys.shape[0], dim=0)
    scores = question @ grouped.transpose(1, 2) / question.shape[-1] ** 0.5  # (heads, Q, T)
    later = torch.arange(keys.shape[1], device=keys.device)[None] > question_slots[:, None]
    probs = scores.masked_fill(later, float("-inf")).softmax(-1)
    return probs.sum(dim=(0, 1))[candidate_slots]


@dataclass
class Prefill:
    """A prompt's KV as placed before any computation: reused KV in the buffer, the rest still to compute.

    Slots [0, start) are final; the run ids[start:] computes the rest: in one pass here
    (blend()), or in pieces on the engine (prefill.py).
    """

    buffer: KVBuffer
    ids: torch.Tensor  # (prompt tokens,) int64
    start: int
    cached_tokens: int  # prompt tokens whose KV was placed from cache
    selector: DeviationSelector | None = None

    def recomputed_tokens(self) -> int:
        """Cached tokens recomputed past the check layer (known once the run is done)."""
        if self.selector is not None:
            return int(self.selector.chosen_slots.shape[0]) if self.selector.chosen_slots is not None else 0
        return max(0, self.cached_tokens - self.start)


def place_prompt(
    stack: DecoderStack,
    parts: PromptParts,
    prefix_kv: KVChunk | None,
    chunk_kvs: Sequence[KVChunk],
    *,
    mode: str = "blend",
    ratio: float = 0.15,
    config: BlendConfig = BlendConfig(),
    capacity: int | None = None,
    shared: SharedPrefix | None = None,
) -> Prefill:
    """Lay out the prompt's KV by the given mode: cached KV placed, the computation left to run.

    shared: the system prefix's KV held once for every sequence (not in full mode, which
    computes its prefix); then only the chunks are placed into the buffer's own slots."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"blend ratio must be in [0, 1], got {ratio}")
    layout = prompt_layout(parts, mode, ratio)
    ids = torch.tensor(parts.all_ids, device=stack.device)
    total = ids.shape[0]
    buffer = KVBuffer(stack, max(total, capacity or total), shared if mode != "full" else None)
    placed = [] if mode == "full" else [prefix_kv, *(chunk_kvs[:1] if mode == "prefix" else chunk_kvs)]
    if buffer.shared is not None:
        placed = placed[1:]  # slots [0, P) are the shared prefix's
    cos, sin = stack.rope_tables(torch.arange(layout.cached_tokens, device=stack.device))
    for kv in placed:
        assert kv is not None  # a mode that places cached KV is given its prefix's (full mode places none)
        start = buffer.length
        buffer.place(kv, start, cos[start : start + kv.num_tokens], sin[start : start + kv.num_tokens])
        buffer.length += kv.num_tokens
    if layout.selective:  # pieces attend (masked) over question slots not yet written: never garbage, which can be NaN
        buffer.clear(layout.cached_tokens, total)
    selector = None
    if layout.selective:
        selector = DeviationSelector(config, ratio, [len(chunk) for chunk in parts.chunk_ids[1:]])
        assert selector.num_candidates == layout.cached_tokens - layout.start  # the candidates are chunks 2..n
    return Prefill(buffer, ids, layout.start, layout.cached_tokens, selector)


@dataclass(frozen=True)
class PromptLayout:
    """Where a prompt's computation starts under a mode, known from token counts alone."""

    start: int  # first slot computed
    cached_tokens: int  # slots [0, cached_tokens) placed from cache
    selective: bool  # blend selection narrows the run at the check layer (the run cannot be split)


def prompt_layout(parts: PromptParts, mode: str, ratio: float) -> PromptLayout:
    if mode == "full":
        return PromptLayout(0, 0, False)
    chunk_lens = [len(chunk) for chunk in parts.chunk_ids]
    placed = sum(chunk_lens[:1] if mode == "prefix" else chunk_lens)
    end = len(parts.prefix_ids) + placed
    exact_end = len(parts.prefix_ids) + (chunk_lens[0] if chunk_lens else 0)
    if mode != "blend" or ratio == 0.0 or end == exact_end:
        return PromptLayout(end, end, False)  # compute only what follows the reused KV
    return PromptLayout(exact_end, end, ratio < 1.0)


def blend(
    stack: DecoderStack,
    parts: PromptParts,
    prefix_kv: KVChunk | None,
    chunk_kvs: Sequence[KVChunk],
    *,
    mode: str = "blend",
    ratio: float = 0.15,
    config: BlendConfig = BlendConfig(),
    extra_capacity: int = 0,
) -> BlendResult:
    """Build the prompt's KV in one pass by the given mode; return it with the last token's logits."""
    total = parts.num_tokens
    prefill = place_prompt(
        stack, parts, prefix_kv, chunk_kvs, mode=mode, ratio=ratio, config=config, capacity=total + extra_capacity
    )
    prefill.buffer.length = total
    run = TokenRun.contiguous(prefill.ids[prefill.start :], prefill.start)
    out = run_tokens(stack, prefill.buffer, run, selector=prefill.selector)
    return blend_result(
        stack, prefill.buffer, out.hidden, out.token_layers, total, prefill.cached_tokens, prefill.recomputed_tokens()
    )


def blend_result(
    stack: DecoderStack,
    buffer: KVBuffer,
    hidden: torch.Tensor,
    token_layers: int,
    total: int,
    cached: int,
    recomputed: int,
) -> BlendResult:
    """The BlendResult of a finished prompt: the last token's logits and the work done."""
    return BlendResult(
        buffer=buffer,
        last_logits=stack.logits(hidden[-1:])[0],
        prompt_tokens=total,
        cached_tokens=cached,
        recomputed_tokens=recomputed,
        recomputed_fraction=token_layers / (total * stack.num_layers),
    )
