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
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
import torch

from ragcache.engine.blend import Prefill
from ragcache.engine.kvbuffer import KVBuffer
from ragcache.engine.stack import DecoderStack
from ragcache.kernels.rope import apply_rope
from ragcache.kv import ChunkKey, KVChunk, chunk_key
from ragcache.registry.base import Registry, RegistryUnavailableError

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
    """(tenant, program id) -> the program's latest KV entry. Thread-safe; holds no tensors.

    With a registry (registry/), records are written through to it and read from it first,
    so a program's next turn on another replica, or after a restart, finds its entry (the KV
    itself comes from the store's Redis tier). The local copy answers while the registry
    cannot be reached: a turn then reuses what this process last saw, or computes afresh."""

    def __init__(self, registry: Registry | None = None) -> None:
        self._records: dict[tuple[str, str], ProgramRecord] = {}
        self._registry = registry
        self._lock = threading.Lock()
        self.registry_errors = 0

    def latest(self, namespace: str, program_id: str) -> ProgramRecord | None:
        if self._registry is not None:
            raw = self._shared(lambda: self._registry.get(PROGRAMS_TABLE, namespace, program_id), _UNREACHED)
            if raw is not _UNREACHED:
                return _decode(raw) if raw is not None else None
        with self._lock:
            return self._records.get((namespace, program_id))

    def remember(self, namespace: str, program_id: str, record: ProgramRecord) -> ProgramRecord | None:
        """Make record the program's latest; returns the one it replaces."""
        with self._lock:
            previous = self._records.get((namespace, program_id))
            self._records[(namespace, program_id)] = record
        if self._registry is not None:
            raw = self._shared(
                lambda: self._registry.put(PROGRAMS_TABLE, namespace, program_id, _encode(record)), _UNREACHED
            )
            if raw is not _UNREACHED:
                previous = _decode(raw) if raw is not None else None
        return previous

    def forget(self, namespace: str, program_id: str) -> ProgramRecord | None:
        with self._lock:
            record = self._records.pop((namespace, program_id), None)
        if self._registry is not None:
            raw = self._shared(lambda: self._registry.delete(PROGRAMS_TABLE, namespace, program_id), _UNREACHED)
            if raw is not _UNREACHED and raw is not None:
                record = _decode(raw)
        return record

    def programs(self) -> list[tuple[str, str, ProgramRecord]]:
        if self._registry is not None:
            rows = self._shared(lambda: list(self._registry.rows(PROGRAMS_TABLE)), _UNREACHED)
            if rows is not _UNREACHED:
                return [(ns, pid, _decode(raw)) for ns, pid, raw in rows]
        with self._lock:
            return [(ns, pid, record) for (ns, pid), record in self._records.items()]

    def _shared(self, work, fallback):
        try:
            return work()
        except RegistryUnavailableError:
            with self._lock:
                self.registry_errors += 1
            return fallback


PROGRAMS_TABLE = "programs"
_UNREACHED = object()  # the registry could not be reached (not the same as "no record")


def _encode(record: ProgramRecord) -> bytes:
    return msgspec.msgpack.encode({"key": record.key, "ids": np.asarray(record.token_ids, dtype=np.int32).tobytes()})


def _decode(raw: bytes) -> ProgramRecord:
    fields = msgspec.msgpack.decode(raw)
    return ProgramRecord(ChunkKey(fields["key"]), tuple(np.frombuffer(fields["ids"], dtype=np.int32).tolist()))


def place_program(stack: DecoderStack, match: ProgramMatch, ids: Sequence[int], capacity: int) -> Prefill:
    """The prompt's KV: the program's first reused_tokens placed as they are, the rest left to compute."""
    total = len(ids)
    reused = match.reused_tokens
    buffer = KVBuffer(stack, max(total, capacity))
    prefix = KVChunk(
        match.kv.token_ids[:reused],
        match.kv.keys[:, :, :reused],
        match.kv.values[:, :, :reused],
        match.kv.model_fingerprint,
    )
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
