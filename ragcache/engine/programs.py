"""Agent programs: each program's conversation KV kept as a prefix that grows turn by turn.

After a turn, the prompt and the answer tokens that went through the model are stored as
one KV entry, content-keyed like chunks (so a retried or forked turn finds it too), and
the program remembers its latest entry. The next turn matches on the longest common token
prefix with that entry — chat templates that re-render earlier turns differently (stripped
reasoning, whitespace) only shorten the match — and computes just the tokens after it.
The reused part is exact: a true prefix at the very positions it was computed at.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from ragcache.engine.blend import Prefill
from ragcache.engine.kvbuffer import KVBuffer
from ragcache.engine.stack import DecoderStack
from ragcache.kernels import apply_rope
from ragcache.kv import ChunkKey, KVChunk, chunk_key

PROGRAM_CONTEXT = "program"


@dataclass(frozen=True)
class ProgramRecord:
    key: ChunkKey
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class ProgramMatch:
    record: ProgramRecord
    kv: KVChunk
    reused_tokens: int  # tokens of the new prompt whose KV comes from the program's entry


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ProgramIndex:
    """(tenant, program id) -> the program's latest KV entry. Thread-safe; holds no tensors."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], ProgramRecord] = {}
        self._lock = threading.Lock()

    def latest(self, namespace: str, program_id: str) -> ProgramRecord | None:
        with self._lock:
            return self._records.get((namespace, program_id))

    def remember(self, namespace: str, program_id: str, record: ProgramRecord) -> ProgramRecord | None:
        """Make record the program's latest; returns the one it replaces."""
        with self._lock:
            previous = self._records.get((namespace, program_id))
            self._records[(namespace, program_id)] = record
            return previous

    def forget(self, namespace: str, program_id: str) -> ProgramRecord | None:
        with self._lock:
            return self._records.pop((namespace, program_id), None)

    def programs(self) -> list[tuple[str, str, ProgramRecord]]:
        with self._lock:
            return [(ns, pid, record) for (ns, pid), record in self._records.items()]


def place_program(stack: DecoderStack, match: ProgramMatch, ids: Sequence[int], capacity: int) -> Prefill:
    """The prompt's KV: the program's first reused_tokens placed as they are, the rest left to compute."""
    total = len(ids)
    reused = match.reused_tokens
    buffer = KVBuffer(stack, max(total, capacity))
    prefix = KVChunk(match.kv.token_ids[:reused], match.kv.keys[:, :, :reused], match.kv.values[:, :, :reused],
                     match.kv.model_fingerprint)
    cos, sin = stack.rope_tables(torch.arange(reused, device=stack.device))
    buffer.place(prefix, 0, cos, sin)
    buffer.length = reused
    return Prefill(buffer, torch.tensor(list(ids), device=stack.device), reused, reused)


def program_kv(stack: DecoderStack, buffer: KVBuffer, token_ids: Sequence[int], fingerprint: str) -> KVChunk:
    """The buffer's first len(token_ids) slots as a KVChunk, keys turned back to pre-RoPE.

    Un-rotating divides by cos^2 + sin^2 as well, which is 1 except under YaRN-style
    attention scaling, so it is exact up to float rounding for every supported rope type.
    """
    n = len(token_ids)
    cos, sin = stack.rope_tables(torch.arange(n, device=stack.device))
    rotated, values = buffer.slots_kv(n)
    keys = apply_rope(rotated, cos, -sin) / (cos * cos + sin * sin)
    return KVChunk(tuple(token_ids), keys.contiguous(), values, fingerprint)


def program_key(fingerprint: str, token_ids: Sequence[int], namespace: str) -> ChunkKey:
    return chunk_key(fingerprint, token_ids, PROGRAM_CONTEXT, namespace)
