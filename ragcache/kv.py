"""The KV object that crosses module lines, and the content key that names it.

A chunk's identity is its content: the model fingerprint, the tenant namespace, the
context it was computed after (the key of the system prefix, "" for the prefix itself)
and its token ids. Never its position or its neighbours, so the same document hits in
any prompt, at any place, in any order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

import torch

ChunkKey = NewType("ChunkKey", str)

DEFAULT_NAMESPACE = "default"


def chunk_key(
    model_fingerprint: str,
    token_ids: Sequence[int],
    context: str = "",
    namespace: str = DEFAULT_NAMESPACE,
) -> ChunkKey:
    """Content key of a chunk: equal inputs give equal keys on every replica."""
    digest = hashlib.sha256()
    for part in (model_fingerprint, namespace, context):
        digest.update(part.encode())
        digest.update(b"\x00")
    digest.update(torch.tensor(list(token_ids), dtype=torch.int64).numpy().tobytes())
    return ChunkKey(digest.hexdigest()[:32])


@dataclass(frozen=True)
class KVChunk:
    """Per-layer K and V of one chunk, independent of transformers' cache classes.

    Keys are stored *before* RoPE: the blender rotates them to wherever the chunk lands
    in a prompt, which is exact for every rope type (a rotation by a position delta is
    not, e.g. under YaRN's attention factor or dynamic NTK scaling).

    keys, values: (layers, kv_heads, tokens, head_dim)
    start_pos: the position of the first token when it was computed (after the prefix).

    One exception: the prefix cache's blocks (storage/prefix.py) hold keys as attention saw
    them, rotated to positions start_pos on, since a prefix never moves (engine/prefix_kv.py).
    """

    token_ids: tuple[int, ...]
    keys: torch.Tensor
    values: torch.Tensor
    model_fingerprint: str
    start_pos: int = 0

    def __post_init__(self) -> None:
        if self.keys.shape != self.values.shape:
            raise ValueError(f"keys {tuple(self.keys.shape)} and values {tuple(self.values.shape)} differ")
        if self.keys.dim() != 4 or self.keys.shape[2] != len(self.token_ids):
            raise ValueError(
                f"expected keys of shape (layers, kv_heads, {len(self.token_ids)}, head_dim), "
                f"got {tuple(self.keys.shape)}"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype
