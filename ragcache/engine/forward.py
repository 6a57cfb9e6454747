"""One pass of tokens through the decoder layers, over a KV buffer that may already hold reused KV.

Every prefill in ragcache is this loop with different inputs: full prefill (all tokens,
empty buffer), prepacked chunk computation (a block-diagonal mask), blending (reused
chunks in the buffer, a selector that narrows the recomputed tokens at the check layer)
and decoding (one token). Masks are exact: a token attends to slots up to its own, even
when it is recomputed out of order among reused ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

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
    def contiguous(cls, ids: torch.Tensor, start: int) -> TokenRun:
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
    def select(
        self,
        layer: int,
        buffer: KVBuffer,
        slots: torch.Tensor,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor | None:
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
    """One sequence's share of a batched pass: its tokens, its own KV buffer and mask, optionally a selector.

    layers: the range [first, stop) this item goes through (default: all). An item starting
    past layer 0 brings the hidden states entering its first layer. write_only_last: at
    layer stop - 1 only project and write K/V (selector included), no attention or MLP; the
    item's output hidden is then what entered that layer (a blend piece before selection).
    """

    buffer: KVBuffer
    run: TokenRun
    mask_fn: MaskFn = causal_mask
    selector: Selector | None = None
    capture: bool = False
    layers: tuple[int, int] | None = None
    hidden: torch.Tensor | None = None  # (tokens, hidden) entering layers[0], when it is not 0
    write_only_last: bool = False


@dataclass
class _ItemState:
    hidden: torch.Tensor
    slots: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    first: int
    stop: int
    masks: dict = field(default_factory=dict)
    captured_keys: list = field(default_factory=list)
    captured_values: list = field(default_factory=list)
    token_layers: int = 0


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
    of every item active at a layer; attention runs per item over its own buffer under its
    own mask, so an item's result does not depend on its batch-mates beyond float rounding
    of the shared matrix products. Each item's selector narrows only that item's rows.

        rows  [0, n0)        item 0's tokens still computed at this layer
              [n0, n0+n1)    item 1's ...
    """
    states = _initial_states(stack, items)
    for layer in range(min(s.first for s in states), max(s.stop for s in states)):
        active = [i for i, s in enumerate(states) if s.first <= layer < s.stop]
        if active:
            _run_layer(stack, layer, [items[i] for i in active], [states[i] for i in active])
    return [
        RunOutput(
            s.hidden,
            s.slots,
            s.token_layers,
            torch.stack(s.captured_keys) if item.capture else None,
            torch.stack(s.captured_values) if item.capture else None,
        )
        for item, s in zip(items, states)
    ]


def _initial_states(stack: DecoderStack, items: Sequence[BatchItem]) -> list[_ItemState]:
    cos, sin = stack.rope_tables(torch.cat([item.run.positions for item in items]))  # (rows, dim) each
    states, offset = [], 0
    for item in items:
        rows = slice(offset, offset + item.run.slots.shape[0])
        offset = rows.stop
        first, stop = item.layers or (0, stack.num_layers)
        if first > 0:
            assert item.hidden is not None  # an item that starts past layer 0 carries the hidden state entering it
            hidden = item.hidden
        else:
            hidden = stack.embed(item.run.ids)
        states.append(_ItemState(hidden, item.run.slots, cos[rows], sin[rows], first, stop))
    return states


def _run_layer(stack: DecoderStack, layer: int, items: list[BatchItem], states: list[_ItemState]) -> None:
    """One layer for the active items: shared projections, per-item write / select / attend, shared MLP."""
    hidden = _cat([s.hidden for s in states])
    q, k_raw, k, v = stack.project_qkv(layer, hidden, _cat([s.cos for s in states]), _cat([s.sin for s in states]))
    window = stack.windows[layer]
    attending, attended, offset = [], [], 0
    for item, state in zip(items, states):
        rows = slice(offset, offset + state.slots.shape[0])
        offset = rows.stop
        q_item, k_item, v_item = q[:, rows], k[:, rows], v[:, rows]
        if item.capture:
            state.captured_keys.append(k_raw[:, rows])
            state.captured_values.append(v_item)
        keep = item.selector.select(layer, item.buffer, state.slots, q_item, k_item, v_item) if item.selector else None
        item.buffer.write(layer, state.slots, k_item, v_item)
        state.token_layers += k_item.shape[1]
        if item.write_only_last and layer == state.stop - 1:
            continue  # its hidden stays what entered this layer
        if keep is not None:
            q_item, state.slots, state.cos, state.sin = (
                q_item[:, keep],
                state.slots[keep],
                state.cos[keep],
                state.sin[keep],
            )
            state.hidden = state.hidden[keep]
            state.masks.clear()
        if window not in state.masks:
            state.masks[window] = item.mask_fn(state.slots, item.buffer.length, window)
        attended.append(item.buffer.attend(stack, layer, q_item, state.masks[window]))
        attending.append(state)
    if not attending:
        return
    out = stack.output_and_mlp(layer, _cat([s.hidden for s in attending]), _cat(attended))
    offset = 0
    for state in attending:
        state.hidden = out[offset : offset + state.hidden.shape[0]]
        offset += state.hidden.shape[0]


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
