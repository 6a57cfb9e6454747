"""One pass of tokens through the decoder layers, over a KV buffer that may already hold reused KV.

Every prefill in ragcache is this loop with different inputs: full prefill (all tokens,
empty buffer), prepacked chunk computation (a block-diagonal mask), blending (reused
chunks in the buffer, a selector that narrows the recomputed tokens at the check layer)
and decoding (one token). Masks are exact: a token attends to slots up to its own, even
when it is recomputed out of order among reused ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

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
    hidden = stack.embed(run.ids)  # (tokens, hidden)
    cos, sin = stack.rope_tables(run.positions)  # (tokens, dim) each
    slots = run.slots
    masks: dict[int | None, torch.Tensor | None] = {}
    captured_keys, captured_values = [], []
    token_layers = 0
    for layer in range(stack.num_layers):
        q, k_raw, k, v = stack.project_qkv(layer, hidden, cos, sin)
        if capture:
            captured_keys.append(k_raw)
            captured_values.append(v)
        keep = selector.select(layer, buffer, slots, q, k, v) if selector is not None else None
        buffer.write(layer, slots, k, v)
        if keep is not None:
            hidden, q, slots, cos, sin = hidden[keep], q[:, keep], slots[keep], cos[keep], sin[keep]
            masks.clear()
        window = stack.windows[layer]
        if window not in masks:
            masks[window] = mask_fn(slots, buffer.length, window)
        keys, values = buffer.layer(layer)
        hidden = stack.attend_and_mlp(layer, hidden, q, keys, values, masks[window])
        token_layers += k.shape[1]
    return RunOutput(
        hidden,
        slots,
        token_layers,
        torch.stack(captured_keys) if capture else None,
        torch.stack(captured_values) if capture else None,
    )
