"""The working KV of one sequence: a buffer the prompt and its answer fill.

Reused chunks are copied in already rotated to their slots; recomputed tokens overwrite
their slots layer by layer; decoding appends. Keys here are post-RoPE, ready for attention.
The scheduler sizes it (capacity) within the working-KV budget, grows it as the answer
gets longer and swaps it to host memory when the sequence is preempted.

Sequences with the same system prefix share its KV (BatchLLM's global prefix sharing): a
SharedPrefix holds slots [0, P) once, already rotated (a true prefix sits at the same
positions in every prompt), and each buffer holds only its own slots [P, capacity):

    slot s < P    shared.keys[:, :, s]
    slot s >= P   own keys[:, :, s - P]

A decoding token attends over the two parts with one softmax and no copy; a prompt piece,
compute-bound anyway, attends over their concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ragcache.engine.stack import DecoderStack
from ragcache.kernels.rope import apply_rope
from ragcache.kv import ChunkKey, KVChunk


@dataclass(eq=False)
class SharedPrefix:
    """A system prefix's rotated KV, held once for every running sequence that starts with it."""

    key: ChunkKey
    keys: torch.Tensor  # (layers, kv_heads, P, dim), post-RoPE
    values: torch.Tensor
    users: int = 0

    @classmethod
    def of(cls, stack: DecoderStack, key: ChunkKey, prefix: KVChunk) -> SharedPrefix:
        cos, sin = stack.rope_tables(torch.arange(prefix.num_tokens, device=stack.device))
        keys = apply_rope(prefix.keys.to(stack.device), cos, sin).contiguous()
        return cls(key, keys, prefix.values.to(stack.device).contiguous())

    @property
    def length(self) -> int:
        return self.keys.shape[2]


class KVBuffer:
    def __init__(self, stack: DecoderStack, capacity: int, shared: SharedPrefix | None = None) -> None:
        self.shared = shared
        self.offset = shared.length if shared is not None else 0  # slots held by the shared prefix
        shape = (stack.num_layers, stack.num_kv_heads, capacity - self.offset, stack.head_dim)
        self.keys = torch.empty(shape, device=stack.device, dtype=stack.dtype)  # (layers, kv_heads, own slots, dim)
        self.values = torch.empty(shape, device=stack.device, dtype=stack.dtype)
        self.capacity = capacity
        self.length = self.offset  # slots [0, length) are attended to
        self.device = stack.device

    @staticmethod
    def bytes_per_token(stack: DecoderStack) -> int:
        """K and V of one token over every layer."""
        element = torch.empty((), dtype=stack.dtype).element_size()
        return 2 * stack.num_layers * stack.num_kv_heads * stack.head_dim * element

    @property
    def nbytes(self) -> int:
        """Bytes this buffer holds itself (a shared prefix is counted once, by the scheduler)."""
        return self.keys.nbytes + self.values.nbytes

    def place(self, chunk: KVChunk, start: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Copy a cached chunk into slots [start, start + tokens), rotating its pre-RoPE keys by cos/sin."""
        begin, end = start - self.offset, start - self.offset + chunk.num_tokens
        self.keys[:, :, begin:end] = apply_rope(chunk.keys.to(self.keys.device), cos, sin)
        self.values[:, :, begin:end] = chunk.values.to(self.values.device)

    def copy_in(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy KV already rotated to its slots (a prefix-cache block) into own slots [start, start + tokens)."""
        begin, end = start - self.offset, start - self.offset + keys.shape[2]
        self.keys[:, :, begin:end] = keys.to(self.keys.device)
        self.values[:, :, begin:end] = values.to(self.values.device)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store fresh K/V (kv_heads, tokens, dim) of one layer at the given slots (never the shared ones)."""
        own = slots - self.offset if self.offset else slots
        self.keys[layer, :, own] = keys
        self.values[layer, :, own] = values

    def clear(self, start: int, end: int) -> None:
        """Zero own slots [start, end) at every layer: a masked slot must hold no NaN (0 x NaN is NaN)."""
        self.keys[:, :, start - self.offset : end - self.offset] = 0
        self.values[:, :, start - self.offset : end - self.offset] = 0

    def keys_at(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Keys of own slots (>= the shared prefix): (kv_heads, tokens, dim)."""
        return self.keys[layer, :, slots - self.offset if self.offset else slots]

    def values_at(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        return self.values[layer, :, slots - self.offset if self.offset else slots]

    def layer(self, layer: int, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer over slots [0, end or length): (kv_heads, slots, dim) each.

        A view without a shared prefix; a copy with one (prompt pieces, selection)."""
        end = self.length if end is None else end
        own_keys, own_values = self.keys[layer, :, : end - self.offset], self.values[layer, :, : end - self.offset]
        if self.shared is None:
            return own_keys, own_values
        return (
            torch.cat([self.shared.keys[layer], own_keys], dim=1),
            torch.cat([self.shared.values[layer], own_values], dim=1),
        )

    def attend(self, stack: DecoderStack, layer: int, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """stack.attend over this buffer's slots [0, length); a decoding token reads the shared part in place."""
        if self.shared is not None and q.shape[1] == 1 and mask is None:
            own = (self.keys[layer, :, : self.length - self.offset], self.values[layer, :, : self.length - self.offset])
            return stack.attend_parts(layer, q, [(self.shared.keys[layer], self.shared.values[layer]), own])
        keys, values = self.layer(layer)
        return stack.attend(layer, q, keys, values, mask)

    def slots_kv(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every layer over slots [0, end): (layers, kv_heads, end, dim), a copy."""
        own_keys, own_values = self.keys[:, :, : end - self.offset], self.values[:, :, : end - self.offset]
        if self.shared is None:
            return own_keys.clone(), own_values.clone()
        return torch.cat([self.shared.keys, own_keys], dim=2), torch.cat([self.shared.values, own_values], dim=2)

    def resize(self, capacity: int) -> None:
        """Reallocate to capacity slots (>= length), keeping slots [0, length)."""
        if capacity < self.length:
            raise ValueError(f"capacity {capacity} < length {self.length}")
        self._reallocate(capacity, self.keys.device)

    def swap_out(self) -> None:
        """Move the used own slots to host memory (page-locked on CUDA): the working budget gets them back."""
        pin = self.device.type == "cuda"
        used = self.length - self.offset
        self.keys = _host_copy(self.keys[:, :, :used], pin)
        self.values = _host_copy(self.values[:, :, :used], pin)
        self.capacity = self.length

    def swap_in(self, capacity: int) -> None:
        """Back to the model's device with room for capacity slots; exact (a copy, nothing recomputed)."""
        self._reallocate(capacity, self.device)

    def _reallocate(self, capacity: int, device: torch.device) -> None:
        used = self.length - self.offset
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.empty((*old.shape[:2], capacity - self.offset, old.shape[3]), device=device, dtype=old.dtype)
            new[:, :, :used] = old[:, :, :used].to(device)
            setattr(self, name, new)
        self.capacity = capacity


def _host_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
    host.copy_(tensor)
    return host
