"""The working KV of one request: a preallocated buffer the prompt and its answer fill.

Reused chunks are copied in already rotated to their slots; recomputed tokens overwrite
their slots layer by layer; decoding appends. Keys here are post-RoPE, ready for attention.
"""

from __future__ import annotations

import torch

from ragcache.engine.stack import DecoderStack
from ragcache.kernels import apply_rope
from ragcache.kv import KVChunk


class KVBuffer:
    def __init__(self, stack: DecoderStack, capacity: int) -> None:
        shape = (stack.num_layers, stack.num_kv_heads, capacity, stack.head_dim)
        self.keys = torch.empty(shape, device=stack.device, dtype=stack.dtype)  # (layers, kv_heads, slots, dim)
        self.values = torch.empty(shape, device=stack.device, dtype=stack.dtype)
        self.capacity = capacity
        self.length = 0  # slots [0, length) are attended to

    def place(self, chunk: KVChunk, start: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Copy a cached chunk into slots [start, start + tokens), rotating its pre-RoPE keys by cos/sin."""
        end = start + chunk.num_tokens
        self.keys[:, :, start:end] = apply_rope(chunk.keys.to(self.keys.device), cos, sin)
        self.values[:, :, start:end] = chunk.values.to(self.values.device)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store fresh K/V (kv_heads, tokens, dim) of one layer at the given slots."""
        self.keys[layer, :, slots] = keys
        self.values[layer, :, slots] = values

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer over the attended slots: (kv_heads, length, dim) each."""
        return self.keys[layer, :, : self.length], self.values[layer, :, : self.length]
