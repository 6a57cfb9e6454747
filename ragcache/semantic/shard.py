"""One (tenant, category) of the semantic cache: its index, its entries' bookkeeping, its counters.

A shard holds what verifying a match needs (vectors, text features, scope, times, hits)
and never the answer, which the AnswerStore keeps. Callers hold `lock` around every use.
"""

from __future__ import annotations

import heapq
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ragcache.semantic.conversation import ContextKey
from ragcache.semantic.index import VectorIndex
from ragcache.semantic.text import TextFeatures


@dataclass
class Entry:
    """What a shard knows of one entry: enough to verify a match, not the answer."""

    entry_id: str
    label: int  # the entry's label in the shard's index
    created_s: float
    expires_s: float  # hard expiry: created + the category's longest TTL
    hits: int
    model: str
    documents_hash: str
    system_hash: str
    text: TextFeatures
    text_vector: np.ndarray  # (dim,) the last message's embedding
    context: ContextKey | None  # None when the last message was self-contained
    message: str = ""  # the last message, greetings stripped: what a verifier compares
    document_digests: tuple[str, ...] = ()  # the documents the answer was built on
    last_similarity: float | None = None  # of its latest hit: what a false-hit report was served at


def eviction_priority(entry: Entry, now_s: float, ttl_s: float) -> tuple:
    """Sort key of a quota's eviction, lowest first: entries past the TTL in force, then the
    fewest hits, then the oldest. Must not mutate entry."""
    return (now_s - entry.created_s < ttl_s, entry.hits, entry.created_s)


class Shard:
    """make_index is called on the first insert: a lookup for a tenant with no entries keeps
    a row of counters, not an index's preallocated memory."""

    def __init__(self, make_index: Callable[[], VectorIndex]) -> None:
        self._make_index = make_index
        self.index: VectorIndex | None = None
        self.entries: dict[str, Entry] = {}
        self.by_label: dict[int, str] = {}
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def insert(self, entry: Entry, key_vector: np.ndarray) -> None:
        """Index entry under key_vector, replacing an entry with the same id."""
        self.remove(entry.entry_id)
        if self.index is None:
            self.index = self._make_index()
        self.index.add(entry.label, key_vector)
        self.entries[entry.entry_id] = entry
        self.by_label[entry.label] = entry.entry_id

    def remove(self, entry_id: str) -> Entry | None:
        entry = self.entries.pop(entry_id, None)
        if entry is not None:
            assert self.index is not None  # entries exist only after insert() made the index
            self.index.remove(entry.label)
            del self.by_label[entry.label]
        return entry

    def nearest(self, vector: np.ndarray, k: int) -> list[Entry]:
        """Up to k entries whose keys are nearest to vector, nearest first."""
        if self.index is None:
            return []
        return [self.entries[self.by_label[n.label]] for n in self.index.search(vector, k) if n.label in self.by_label]

    def evict_over(self, max_entries: int, now_s: float, ttl_s: float) -> list[str]:
        """Evict down to max_entries, and 1% below it at scale so the scan is amortised over
        many stores; the ids evicted, least valuable first (eviction_priority)."""
        excess = len(self.entries) - max_entries
        if excess <= 0:
            return []
        victims = heapq.nsmallest(
            excess + max_entries // 100, self.entries.values(), key=lambda entry: eviction_priority(entry, now_s, ttl_s)
        )
        for entry in victims:
            self.remove(entry.entry_id)
        self.counts["evictions"] += len(victims)
        return [entry.entry_id for entry in victims]
