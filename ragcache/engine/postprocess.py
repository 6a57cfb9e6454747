"""After a sequence's last token: its Generation, and the program KV an agent's next turn will reuse."""

from __future__ import annotations

import time

from ragcache.engine.blend import BlendConfig
from ragcache.engine.programs import program_key, program_kv
from ragcache.engine.request import Generation, PhaseTimings
from ragcache.engine.sequence import Sequence
from ragcache.engine.stack import DecoderStack
from ragcache.kv import ChunkKey, KVChunk


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
    looked_up = request.mode != "full" and lookup.program is None
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
        program_reused_tokens=lookup.program.reused_tokens if lookup.program is not None else 0,
        mode=request.mode,
        blend_ratio=blend_ratio if blended else 0.0,
        blend_deviation=blend.deviation if blended else "",
        blend_sink_tokens=blend.sink_tokens if blended else 0,
    )


def program_entry(stack: DecoderStack, seq: Sequence, fingerprint: str) -> tuple[ChunkKey, tuple[int, ...], KVChunk]:
    """(key, token ids, KV) of the prompt + the answer tokens that went through the model."""
    assert seq.prefill is not None  # called before the finished sequence's working KV is released
    buffer = seq.prefill.buffer
    fed = buffer.length - seq.prompt_len
    token_ids = (*seq.parts.all_ids, *seq.stream.tokens[:fed])
    key = program_key(fingerprint, token_ids, seq.request.namespace)
    return key, token_ids, program_kv(stack, buffer, token_ids, fingerprint)
