"""One pass of tokens through the decoder layers, over a KV buffer that may already hold reused KV.

Every prefill in ragcache is this loop with different inputs: full prefill (all tokens,
empty buffer), prepacked chunk computation (a block-diagonal mask), blending (reused
chunks in the buffer, a selector that narrows the recomputed tokens at the check layer)
and decoding (one token). Masks are exact: a token attends to slots up to its own, even
when it is recomputed out of order among reused ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from ragcache.engine.kvbuffer import KVBuffer
from ragcache.engine.stack import DecoderStack

# (query slots (tokens,), attended length, sliding window or None) -> bool mask (tokens, length) or None for "all".
MaskFn = Callable[[torch.Tensor, int, "int | None"], "torch.Tensor | None"]


@dataclass(frozen=True)
class TokenRun:
    """Tokens to compute: their ids, the buffer slots their KV goes to, and their RoPE positions."""

    ids: torch.Tensor  # (tokens,) int64
    slots: torch.Tensor  # (tokens,) int64
    positions: torch.Tensor  # (tokens,) int64

    @classmethod
    def contiguous(cls, ids: torch.Tensor, start: int) -> "TokenRun":
        span = torch.arange(start, start + ids.shape[0], device=ids.device)
        return cls(ids, span, span)


@dataclass(frozen=True)
class RunOutput:
    hidden: torch.Tensor  # (tokens left after selection, hidden) at the last layer
    slots: torch.Tensor  # their slots
    token_layers: int  # (token, layer) K/V entries computed: the work done, for recomputed_fraction
    captured_keys: torch.Tensor | None  # (layers, kv_heads, tokens, dim), pre-RoPE, when capture=True
    captured_values: torch.Tensor | None


class Selector(Protocol):
    def select(self, layer: int, buffer: KVBuffer, slots: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """Indices (into the run) of the tokens to keep computing from this layer on, or None to keep all.

        Called before the layer's fresh K/V are written, so the buffer still holds the reused ones.
        """


def causal_mask(q_slots: torch.Tensor, length: int, window: int | None) -> torch.Tensor | None:
    """Exact causal mask for slots that are positions: a token sees slots <= its own (within the window)."""
    keys = torch.arange(length, device=q_slots.device)[None]
    queries = q_slots[:, None]
    if window is None and q_slots.shape[0] == 1 and int(q_slots[0]) == length - 1:
        return None  # the newest token sees everything: let attention skip the mask
    mask = keys <= queries
    if window is not None:
        mask &= keys > queries - window
    return mask


@dataclass(frozen=True)
class BatchItem:
    """One sequence's share of a batched pass: its tokens, its own KV buffer and mask, optionally a selector."""

    buffer: KVBuffer
    run: TokenRun
    mask_fn: MaskFn = causal_mask
    selector: Selector | None = None
    capture: bool = False


def run_tokens(
    stack: DecoderStack,
    buffer: KVBuffer,
    run: TokenRun,
    *,
    mask_fn: MaskFn = causal_mask,
    selector: Selector | None = None,
    capture: bool = False,
) -> RunOutput:
    """Compute run's tokens through every layer, writing their K/V into buffer at their slots.

    buffer.length must already cover every slot attended to. With a selector, tokens
    dropped at a layer keep the K/V written so far and are not computed further.
    """
    return run_batch(stack, [BatchItem(buffer, run, mask_fn, selector, capture)])[0]


def run_batch(stack: DecoderStack, items: Sequence[BatchItem]) -> list[RunOutput]:
    """run_tokens for several sequences at once: one pass, each sequence over its own KV.

    Row-wise work (norms, QKV and output projections, MLP) runs over the concatenated rows
    of every item; attention runs per item over its own buffer under its own mask, so an
    item's result does not depend on its batch-mates beyond float rounding of the shared
    matrix products. Each item's selector narrows only that item's rows.

        rows  [0, n0)        item 0's tokens still computed at this layer
              [n0, n0+n1)    item 1's ...
    """
    hidden = stack.embed(torch.cat([item.run.ids for item in items]))  # (rows, hidden)
    cos, sin = stack.rope_tables(torch.cat([item.run.positions for item in items]))  # (rows, dim) each
    slots = [item.run.slots for item in items]
    masks: list[dict[int | None, torch.Tensor | None]] = [{} for _ in items]
    captured: list[tuple[list, list]] = [([], []) for _ in items]
    token_layers = [0] * len(items)
    for layer in range(stack.num_layers):
        q, k_raw, k, v = stack.project_qkv(layer, hidden, cos, sin)  # (heads | kv_heads, rows, dim)
        window = stack.windows[layer]
        attended, kept, narrowed, offset = [], [], False, 0
        for index, item in enumerate(items):
            rows = slice(offset, offset + slots[index].shape[0])
            offset = rows.stop
            q_item, k_item, v_item = q[:, rows], k[:, rows], v[:, rows]
            if item.capture:
                captured[index][0].append(k_raw[:, rows])
                captured[index][1].append(v_item)
            keep = item.selector.select(layer, item.buffer, slots[index], q_item, k_item, v_item) if item.selector else None
            item.buffer.write(layer, slots[index], k_item, v_item)
            token_layers[index] += k_item.shape[1]
            row_ids = torch.arange(rows.start, rows.stop, device=hidden.device)
            if keep is not None:
                q_item, slots[index], row_ids, narrowed = q_item[:, keep], slots[index][keep], row_ids[keep], True
                masks[index].clear()
            if window not in masks[index]:
                masks[index][window] = item.mask_fn(slots[index], item.buffer.length, window)
            keys, values = item.buffer.layer(layer)
            attended.append(stack.attend(layer, q_item, keys, values, masks[index][window]))
            kept.append(row_ids)
        if narrowed:
            rows_kept = torch.cat(kept)
            hidden, cos, sin = hidden[rows_kept], cos[rows_kept], sin[rows_kept]
        hidden = stack.output_and_mlp(layer, hidden, torch.cat(attended))
    outputs, offset = [], 0
    for index, item in enumerate(items):
        rows = slice(offset, offset + slots[index].shape[0])
        offset = rows.stop
        keys_of, values_of = captured[index]
        outputs.append(RunOutput(
            hidden[rows], slots[index], token_layers[index],
            torch.stack(keys_of) if item.capture else None,
            torch.stack(values_of) if item.capture else None,
        ))
    return outputs
