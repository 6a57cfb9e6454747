"""The engine's side of the prefix cache (storage/prefix.py): which tree a request's KV belongs
to, placing a hit into a working buffer, and cutting a finished buffer into blocks.

A hit is placed exactly as it was computed: a true prefix at the very positions it was
computed at, its pre-RoPE keys rotated back to them. Blocks are stored pre-RoPE like chunks
(kv.py), un-rotated from the buffer; un-rotating divides by cos² + sin² as well, which is 1
except under YaRN-style attention scaling, so it is exact up to float rounding for every
supported rope type.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ragcache.engine.blend import BlendConfig, Prefill
from ragcache.engine.kvbuffer import KVBuffer
from ragcache.engine.stack import DecoderStack
from ragcache.kernels.rope import apply_rope
from ragcache.kv import KVChunk
from ragcache.storage.prefix import EXACT, PrefixHit


def kv_variant(mode: str, num_chunks: int, ratio: float, blend: BlendConfig) -> str:
    """What produced a request's KV, as the prefix cache keys it: full prefill's ("exact") unless
    two or more documents were fused (reuse, or blend at this ratio and selection)."""
    if mode in ("full", "prefix") or num_chunks <= 1:
        return EXACT  # prefix mode computes everything after the leading chunk; one chunk is exact
    if mode == "reuse" or ratio == 0.0:
        return "reuse"
    return f"blend:{ratio:g}:{blend.check_layer}:{blend.deviation}:{blend.sink_tokens}"


def place_hit(stack: DecoderStack, hit: PrefixHit, reused: int, ids: Sequence[int], capacity: int) -> Prefill:
    """The prompt's KV: the hit's first `reused` tokens placed as they were computed, the rest left to compute."""
    buffer = KVBuffer(stack, max(len(ids), capacity))
    keys = torch.cat([block.keys for block in hit.blocks], dim=2)[:, :, :reused]
    values = torch.cat([block.values for block in hit.blocks], dim=2)[:, :, :reused]
    fingerprint = hit.blocks[0].model_fingerprint
    cos, sin = stack.rope_tables(torch.arange(reused, device=stack.device))
    buffer.place(KVChunk(tuple(ids[:reused]), keys, values, fingerprint), 0, cos, sin)
    buffer.length = reused
    return Prefill(buffer, torch.tensor(list(ids), device=stack.device), reused, reused)


def buffer_blocks(
    stack: DecoderStack, buffer: KVBuffer, ids: Sequence[int], start_block: int, block_tokens: int, fingerprint: str
) -> list[KVChunk]:
    """The buffer's blocks of ids from start_block on (the part block at the end too), each a KVChunk with
    pre-RoPE keys."""
    begin, end = start_block * block_tokens, len(ids)
    if end <= begin:
        return []
    cos, sin = stack.rope_tables(torch.arange(begin, end, device=stack.device))
    rotated, values = buffer.slots_kv(end)
    rotated, values = rotated[:, :, begin:end], values[:, :, begin:end]
    keys = apply_rope(rotated, cos, -sin) / (cos * cos + sin * sin)
    return [
        KVChunk(
            tuple(ids[at : at + block_tokens]),
            keys[:, :, at - begin : at - begin + block_tokens].contiguous(),
            values[:, :, at - begin : at - begin + block_tokens].contiguous(),
            fingerprint,
            start_pos=at,
        )
        for at in range(begin, end, block_tokens)
    ]
