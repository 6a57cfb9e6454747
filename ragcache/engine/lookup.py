"""Lookups across the tiers, on the submitting thread: store I/O never runs on the step loop.

First the prefix cache (storage/prefix.py): the longest run of the prompt's blocks an earlier
request left, whatever it was (the same prompt, a follow-up over the same documents, an
agent's previous turn, another replica's request). It is used when it reaches the last whole
block of a fused prompt's documents (a shorter one would leave documents to blend anyway), or
with any block of a prompt computed exactly; then only the tokens after it are computed. Otherwise the request's
content keys (the system prefix, each document in the context of that prefix) are looked up
at once, every chunk prefetched in the background while the prefix is fetched. What is
missing is computed later, at admission.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ragcache.engine.prompt import PromptParts
from ragcache.kv import ChunkKey, KVChunk, chunk_key
from ragcache.storage.base import KVStore, PrefixCache
from ragcache.storage.prefix import EXACT, PrefixHit


@dataclass
class Lookup:
    """What the submitting thread found before the sequence reached the engine."""

    prefix_key: ChunkKey | None = None
    prefix_kv: KVChunk | None = None
    chunk_keys: list[ChunkKey] = field(default_factory=list)
    chunk_kvs: list[KVChunk | None] = field(default_factory=list)
    variant: str = EXACT  # the prefix cache's tree for this request's KV (prefix_kv.kv_variant)
    cached: PrefixHit | None = None  # the prefix cache's blocks, when used
    cached_tokens: int = 0  # prompt tokens whose KV comes from them
    lookup_s: float = 0.0

    @property
    def hits(self) -> int:
        return sum(kv is not None for kv in self.chunk_kvs)

    def missing(self, chunk_ids) -> list[tuple[ChunkKey, Any]]:
        """(key, token ids) of each distinct chunk not found."""
        found = zip(self.chunk_keys, chunk_ids, self.chunk_kvs)
        return list(dict((key, ids) for key, ids, kv in found if kv is None).items())


def look_up(
    store: KVStore,
    cache: PrefixCache,
    fingerprint: str,
    request,
    parts: PromptParts,
    variant: str,
    started: float,
) -> Lookup:
    """The prefix cache's hit, else the prefix's and chunks' cached KV (full prefill looks up no chunk)."""
    lookup = Lookup(variant=variant)
    ids = parts.all_ids
    # the last token always runs: its logits are the first answer token's
    hit = cache.match(request.namespace, variant, ids[:-1]) if request.prefix_cache else PrefixHit(0)
    # fused documents: a hit must reach their last whole block (the few tokens after it are computed as
    # the question is); one that stops earlier would leave documents to blend anyway
    fused = variant != EXACT
    documents_end = len(parts.prefix_ids) + parts.num_chunk_tokens
    needed = max(1, documents_end // cache.block_tokens * cache.block_tokens) if fused else 1
    if hit.num_tokens >= needed:
        lookup.cached, lookup.cached_tokens = hit, hit.num_tokens
    elif request.mode != "full":
        namespace = request.namespace
        lookup.prefix_key = chunk_key(fingerprint, parts.prefix_ids, "", namespace)
        lookup.chunk_keys = [chunk_key(fingerprint, ids, lookup.prefix_key, namespace) for ids in parts.chunk_ids]
        loading = store.prefetch(lookup.chunk_keys) if lookup.chunk_keys else None
        lookup.prefix_kv = store.get(lookup.prefix_key)
        lookup.chunk_kvs = loading.result() if loading is not None else []
    lookup.lookup_s = time.perf_counter() - started
    return lookup
