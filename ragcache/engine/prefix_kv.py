"""The engine's side of the prefix cache (storage/prefix.py): which tree a request's KV belongs
to, placing a hit into a working buffer, and cutting a finished buffer into blocks.

A prefix never moves: a block of it is always at the positions it was computed at. So unlike
chunks (kv.py: pre-RoPE keys, rotated to wherever a chunk lands), prefix-cache blocks keep their
keys as the buffer held them, rotated to their positions (start_pos on): saving is a copy out of
the buffer and a hit is a copy into one, bit for bit the KV the first request attended to, with
no rotation either way (rotating a 3,600-token prefix back cost 0.3 s of a 0.6 s repeat here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ragcache.engine.blend import BlendConfig, Prefill
from ragcache.engine.kvbuffer import KVBuffer
from ragcache.engine.stack import DecoderStack
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
    """The prompt's KV: the hit's first `reused` tokens copied in as they were computed, the rest left to compute."""
    buffer = KVBuffer(stack, max(len(ids), capacity))
    at = 0
    for block in hit.blocks:
        n = min(block.num_tokens, reused - at)
        if n <= 0:
            break
        buffer.copy_in(at, block.keys[:, :, :n], block.values[:, :, :n])
        at += n
    buffer.length = reused
    return Prefill(buffer, torch.tensor(list(ids), device=stack.device), reused, reused)


def buffer_blocks(
    buffer: KVBuffer, ids: Sequence[int], start_block: int, block_tokens: int, fingerprint: str
) -> list[KVChunk]:
    """The buffer's blocks of ids from start_block on (the part block at the end too), keys as rotated there."""
    begin, end = start_block * block_tokens, len(ids)
    if end <= begin:
        return []
    keys, values = buffer.slots_kv(end)
    return [
        KVChunk(
            tuple(ids[at : at + block_tokens]),
            keys[:, :, at : at + block_tokens].contiguous(),
            values[:, :, at : at + block_tokens].contiguous(),
            fingerprint,
            start_pos=at,
        )
        for at in range(begin, end, block_tokens)
    ]
