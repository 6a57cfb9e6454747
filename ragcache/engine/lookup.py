"""Chunk lookup across the tiers, on the submitting thread: store I/O never runs on the step loop.

A request's content keys (the system prefix, each document in the context of that prefix)
are looked up at once — every chunk prefetched in the background while the prefix is
fetched — or, for an agent program's turn, its stored conversation KV is matched on the
longest common token prefix. What is missing is computed later, at admission.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ragcache.engine.programs import ProgramIndex, ProgramMatch, common_prefix_len
from ragcache.engine.prompt import PromptParts
from ragcache.kv import ChunkKey, KVChunk, chunk_key
from ragcache.storage.base import KVStore


@dataclass
class Lookup:
    """What the submitting thread found before the sequence reached the engine."""

    prefix_key: ChunkKey | None = None
    prefix_kv: KVChunk | None = None
    chunk_keys: list[ChunkKey] = field(default_factory=list)
    chunk_kvs: list[KVChunk | None] = field(default_factory=list)
    program: ProgramMatch | None = None  # when the program's stored KV covers the prompt's documents
    lookup_s: float = 0.0

    @property
    def hits(self) -> int:
        return sum(kv is not None for kv in self.chunk_kvs)

    def missing(self, chunk_ids) -> list[tuple[ChunkKey, Any]]:
        """(key, token ids) of each distinct chunk not found."""
        found = zip(self.chunk_keys, chunk_ids, self.chunk_kvs)
        return list(dict((key, ids) for key, ids, kv in found if kv is None).items())


def look_up(
    store: KVStore, programs: ProgramIndex, fingerprint: str, request, parts: PromptParts, started: float
) -> Lookup:
    """The prefix's and chunks' cached KV (full prefill looks nothing up), or the program's."""
    lookup = Lookup()
    if request.program_id and request.mode != "full":
        lookup.program = match_program(store, programs, request, parts)
    if request.mode != "full" and lookup.program is None:
        namespace = request.namespace
        lookup.prefix_key = chunk_key(fingerprint, parts.prefix_ids, "", namespace)
        lookup.chunk_keys = [chunk_key(fingerprint, ids, lookup.prefix_key, namespace) for ids in parts.chunk_ids]
        loading = store.prefetch(lookup.chunk_keys) if lookup.chunk_keys else None
        lookup.prefix_kv = store.get(lookup.prefix_key)
        lookup.chunk_kvs = loading.result() if loading is not None else []
    lookup.lookup_s = time.perf_counter() - started
    return lookup


def match_program(store: KVStore, programs: ProgramIndex, request, parts: PromptParts) -> ProgramMatch | None:
    """The program's stored KV if it covers at least the prompt's prefix and documents (else blend them)."""
    record = programs.latest(request.namespace, request.program_id)
    if record is None:
        return None
    ids = parts.all_ids
    reused = min(common_prefix_len(record.token_ids, ids), len(ids) - 1)  # the last token must run for logits
    if reused < len(parts.prefix_ids) + parts.num_chunk_tokens:
        return None
    kv = store.get(record.key)
    return ProgramMatch(record, kv, reused) if kv is not None else None
