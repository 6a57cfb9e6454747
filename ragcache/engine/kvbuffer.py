"""The working KV of one sequence: a buffer the prompt and its answer fill.

Reused chunks are copied in already rotated to their slots; recomputed tokens overwrite
their slots layer by layer; decoding appends. Keys here are post-RoPE, ready for attention.
The scheduler sizes it (capacity) within the working-KV budget, grows it as the answer
gets longer and swaps it to host memory when the sequence is preempted.
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
        self.device = stack.device

    @staticmethod
    def bytes_per_token(stack: DecoderStack) -> int:
        """K and V of one token over every layer."""
        element = torch.empty((), dtype=stack.dtype).element_size()
        return 2 * stack.num_layers * stack.num_kv_heads * stack.head_dim * element

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def resize(self, capacity: int) -> None:
        """Reallocate to capacity slots (>= length), keeping slots [0, length)."""
        if capacity < self.length:
            raise ValueError(f"capacity {capacity} < length {self.length}")
        shape = (*self.keys.shape[:2], capacity, self.keys.shape[3])
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.empty(shape, device=old.device, dtype=old.dtype)
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        self.capacity = capacity

    def swap_out(self) -> None:
        """Move the used slots to host memory (page-locked on CUDA): the working budget gets them back."""
        pin = self.device.type == "cuda"
        self.keys = _host_copy(self.keys[:, :, : self.length], pin)
        self.values = _host_copy(self.values[:, :, : self.length], pin)
        self.capacity = self.length

    def swap_in(self, capacity: int) -> None:
        """Back to the model's device with room for capacity slots; exact (a copy, nothing recomputed)."""
        shape = (*self.keys.shape[:2], capacity, self.keys.shape[3])
        for name in ("keys", "values"):
            host = getattr(self, name)
            new = torch.empty(shape, device=self.device, dtype=host.dtype)
            new[:, :, : self.length] = host.to(self.device)
            setattr(self, name, new)
        self.capacity = capacity

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


def _host_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
    host.copy_(tensor)
    return host
