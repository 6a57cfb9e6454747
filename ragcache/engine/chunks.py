"""Chunk KV computation with prepacking.

Each chunk's KV is computed as the chunk would be seen right after the system prefix:
it attends to the prefix and to itself, at positions starting where the prefix ends. The
prefix is the attention sink every real prompt has, so a chunk's cached KV is far closer
to its in-context KV than if it were computed alone from position 0; the price is that the
key names the prefix the chunk was computed after (ragcache.kv.chunk_key's context).

Several missing chunks go through one forward pass (Prepacking, Zhao et al. 2024): they
are packed into one sequence after the prefix's KV, with a block-diagonal causal mask and
positions restarting at the prefix's end for every chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ragcache.engine.forward import TokenRun, run_tokens
from ragcache.engine.kvbuffer import KVBuffer
from ragcache.engine.stack import DecoderStack
from ragcache.kv import KVChunk


def pack_first_fit(lengths: Sequence[int], max_pack_tokens: int) -> list[list[int]]:
    """Group chunk indices into packs of at most max_pack_tokens (first-fit decreasing).

    A chunk longer than max_pack_tokens gets a pack of its own. Within a pack, chunks keep
    their input order.
    """
    packs: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for slot, free in enumerate(room):
            if lengths[index] <= free:
                packs[slot].append(index)
                room[slot] -= lengths[index]
                break
        else:
            packs.append([index])
            room.append(max_pack_tokens - lengths[index])
    return [sorted(pack) for pack in packs]


def prepacked_mask(segments: torch.Tensor, positions: torch.Tensor):
    """Mask for a packed buffer: prefix slots (segment -1) are seen by all; a chunk sees only itself, causally."""

    def mask(q_slots: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
        key_segments = segments[:length][None]
        key_slots = torch.arange(length, device=q_slots.device)[None]
        same_chunk = (key_segments == segments[q_slots][:, None]) & (key_slots <= q_slots[:, None])
        allowed = (key_segments == -1) | same_chunk
        if window is not None:
            allowed &= positions[:length][None] > positions[q_slots][:, None] - window
        return allowed

    return mask


def compute_chunks(
    stack: DecoderStack,
    chunk_ids: Sequence[Sequence[int]],
    prefix: KVChunk | None,
    model_fingerprint: str,
    max_pack_tokens: int = 4096,
) -> list[KVChunk]:
    """KV of each chunk as seen right after prefix (from position 0 when prefix is None)."""
    lengths = [len(ids) for ids in chunk_ids]
    results: list[KVChunk | None] = [None] * len(chunk_ids)
    for pack in pack_first_fit(lengths, max_pack_tokens):
        for index, chunk in zip(pack, _compute_pack(stack, [chunk_ids[i] for i in pack], prefix, model_fingerprint)):
            results[index] = chunk
    return results  # type: ignore[return-value]  # the packs cover every index: no None is left


def _compute_pack(
    stack: DecoderStack, chunk_ids: Sequence[Sequence[int]], prefix: KVChunk | None, fingerprint: str
) -> list[KVChunk]:
    prefix_len = prefix.num_tokens if prefix is not None else 0
    lengths = [len(ids) for ids in chunk_ids]
    total = prefix_len + sum(lengths)
    device = stack.device
    # slot ->   [0, prefix_len): prefix | then each chunk in turn
    segments = torch.cat([torch.full((prefix_len,), -1)] + [torch.full((n,), i) for i, n in enumerate(lengths)]).to(
        device
    )
    positions = torch.cat([torch.arange(prefix_len)] + [torch.arange(prefix_len, prefix_len + n) for n in lengths]).to(
        device
    )
    buffer = KVBuffer(stack, total)
    buffer.length = total
    if prefix is not None:
        cos, sin = stack.rope_tables(positions[:prefix_len])
        buffer.place(prefix, 0, cos, sin)
    ids = torch.tensor([t for chunk in chunk_ids for t in chunk], device=device)
    run = TokenRun(ids, torch.arange(prefix_len, total, device=device), positions[prefix_len:])
    out = run_tokens(stack, buffer, run, mask_fn=prepacked_mask(segments, positions), capture=True)
    assert out.captured_keys is not None and out.captured_values is not None  # capture=True
    chunks, start = [], 0
    for ids_of_chunk, n in zip(chunk_ids, lengths):
        chunks.append(
            KVChunk(
                token_ids=tuple(int(t) for t in ids_of_chunk),
                keys=out.captured_keys[:, :, start : start + n].contiguous(),
                values=out.captured_values[:, :, start : start + n].contiguous(),
                model_fingerprint=fingerprint,
                start_pos=prefix_len,
            )
        )
        start += n
    return chunks
