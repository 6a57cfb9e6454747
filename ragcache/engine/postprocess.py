"""After a sequence's last token: its Generation, and the blocks of its KV the prefix cache lacks."""

from __future__ import annotations

import time
from typing import NamedTuple

from ragcache.engine.blend import BlendConfig
from ragcache.engine.prefix_kv import buffer_blocks
from ragcache.engine.request import Generation, PhaseTimings
from ragcache.engine.sequence import Sequence
from ragcache.kv import ChunkKey, KVChunk
from ragcache.storage.base import PrefixCache


def generation_of(seq: Sequence, num_layers: int, blend_ratio: float, blend: BlendConfig = BlendConfig()) -> Generation:
    """The finished sequence as its caller sees it: text, usage of the cache, phase timings."""
    prefill, lookup, request = seq.prefill, seq.lookup, seq.request
    assert prefill is not None and seq.admitted_s is not None  # finished: it was admitted, its KV not yet released
    now = time.perf_counter()
    first = seq.first_token_s or now
    timings = PhaseTimings(
        lookup.lookup_s,
        seq.chunk_compute_s,
        first - seq.admitted_s,
        first - seq.arrived_s,
        now - first,
        seq.admitted_s - seq.arrived_s,
    )
    looked_up = request.mode != "full" and lookup.cached is None
    blended = request.mode == "blend"
    return Generation(
        text=seq.stream.text,
        token_ids=list(seq.stream.tokens),
        finish_reason=seq.finish_reason or "stop",
        prompt_tokens=seq.prompt_len,
        cached_tokens=prefill.cached_tokens,
        recomputed_tokens=prefill.recomputed_tokens(),
        recomputed_fraction=seq.token_layers / (seq.prompt_len * num_layers),
        chunk_hits=lookup.hits if looked_up else 0,
        chunk_misses=len(lookup.chunk_kvs) - lookup.hits if looked_up else 0,
        timings=timings,
        first_token_logprobs=seq.first_logprobs,
        token_logprobs=tuple(seq.token_logprobs[: len(seq.stream.tokens)]),  # an ending eos is no answer token
        prefix_cached_tokens=lookup.cached_tokens,
        mode=request.mode,
        blend_ratio=blend_ratio if blended else 0.0,
        blend_deviation=blend.deviation if blended else "",
        blend_sink_tokens=blend.sink_tokens if blended else 0,
    )


class SavedPath(NamedTuple):
    """A finished sequence's token path (prompt + answer tokens fed) and the KV of its blocks from start on."""

    ids: tuple[int, ...]
    keys: list[ChunkKey]  # the prefix cache's block_keys of ids, the part block at the end included
    start: int
    blocks: list[KVChunk]


def saved_path(seq: Sequence, cache: PrefixCache, fingerprint: str) -> SavedPath:
    """The path to store: the blocks this process already knows are skipped (an identical prompt copies nothing)."""
    assert seq.prefill is not None  # called before the finished sequence's working KV is released
    buffer = seq.prefill.buffer
    fed = buffer.length - seq.prompt_len
    ids = (*seq.parts.all_ids, *seq.stream.tokens[:fed])
    keys = cache.block_keys(seq.request.namespace, seq.lookup.variant, ids, tail=True)
    start = cache.known(keys)
    return SavedPath(ids, keys, start, buffer_blocks(buffer, ids, start, cache.block_tokens, fingerprint))
