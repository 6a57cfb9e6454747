"""Registered documents: tenant + id -> text, chunk key, token count, in a Registry.

The registry is the truth and is read on every resolve (one round trip), so a document
registered or replaced on any replica is seen by all at once. While the registry cannot
be reached, ids this process has resolved or registered before are served from what it
last saw (a request is not failed for an outage), and anything else is refused with
RegistryUnavailableError, never answered from a guess. Registering needs the registry:
a registration is stored or refused, never kept in one process only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from ragcache.kv import ChunkKey
from ragcache.registry.base import Registry, RegistryUnavailableError

TABLE = "documents"
_LAST_SEEN = 4096  # documents kept per process to serve through an outage


@dataclass(frozen=True)
class StoredDocument:
    id: str
    text: str
    key: ChunkKey
    num_tokens: int

    def encode(self) -> bytes:
        return msgspec.msgpack.encode({"text": self.text, "key": self.key, "num_tokens": self.num_tokens})

    @staticmethod
    def decode(doc_id: str, raw: bytes) -> StoredDocument:
        fields = msgspec.msgpack.decode(raw)
        return StoredDocument(doc_id, fields["text"], ChunkKey(fields["key"]), int(fields["num_tokens"]))


class DocumentRegistry:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._last_seen: OrderedDict[tuple[str, str], StoredDocument] = OrderedDict()
        self._lock = threading.Lock()
        self.served_from_last_seen = 0  # resolves answered during a registry outage

    def put(self, tenant: str, document: StoredDocument) -> StoredDocument | None:
        """Register (or replace) a document; returns the one it replaced."""
        previous = self.registry.put(TABLE, tenant, document.id, document.encode())
        self._saw(tenant, document)
        return StoredDocument.decode(document.id, previous) if previous is not None else None

    def get_many(self, tenant: str, ids: Sequence[str]) -> list[StoredDocument | None]:
        """The tenant's documents by id, None where unknown."""
        try:
            raws = self.registry.get_many(TABLE, tenant, ids)
        except RegistryUnavailableError:
            with self._lock:
                seen = [self._last_seen.get((tenant, doc_id)) for doc_id in ids]
                if any(document is None for document in seen):
                    raise
                self.served_from_last_seen += 1
                return seen
        found = [StoredDocument.decode(doc_id, raw) if raw is not None else None for doc_id, raw in zip(ids, raws)]
        for document in found:
            if document is not None:
                self._saw(tenant, document)
        return found

    def delete(self, tenant: str, doc_id: str) -> StoredDocument | None:
        raw = self.registry.delete(TABLE, tenant, doc_id)
        with self._lock:
            self._last_seen.pop((tenant, doc_id), None)
        return StoredDocument.decode(doc_id, raw) if raw is not None else None

    def all(self, tenant: str) -> list[StoredDocument]:
        return [StoredDocument.decode(doc_id, raw) for doc_id, raw in self.registry.items(TABLE, tenant).items()]

    def count(self, tenant: str) -> int | None:
        """None while the registry cannot be reached (stats must not fail for it)."""
        try:
            return self.registry.count(TABLE, tenant)
        except RegistryUnavailableError:
            return None

    def _saw(self, tenant: str, document: StoredDocument) -> None:
        with self._lock:
            self._last_seen[(tenant, document.id)] = document
            self._last_seen.move_to_end((tenant, document.id))
            while len(self._last_seen) > _LAST_SEEN:
                self._last_seen.popitem(last=False)
