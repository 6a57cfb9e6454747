"""Where answers live, apart from the index (the paper's hybrid architecture).

The index in process memory answers "which entry is nearest?" in about a millisecond; the
answer documents, which can be large, live in an AnswerStore: Redis when one is
configured (shared by replicas, surviving restarts), process memory otherwise. A record
also keeps the query's vectors, so a restart rebuilds the index without re-embedding
(100k entries load in seconds instead of the ten minutes re-embedding takes on two
cores); a record written by a different embedder is re-embedded from its text instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ragcache.semantic.conversation import Message


class AnswerStoreUnavailable(RuntimeError):
    """The store could not be read (Redis down or slow): a miss, not a reason to drop the entry."""


@dataclass(frozen=True, eq=False)
class AnswerRecord:
    """One cached answer with everything needed to verify a match and to rebuild the index.

    history is kept only when the last message depends on it (conversation.py); the
    vectors are the embedder's for `text` and, when history is kept, for its last turns.
    expires_s is the hard expiry (created + the category's longest TTL), the one the
    store enforces; the cache may stop serving an entry earlier (its TTL in force).
    """

    entry_id: str
    tenant: str
    category: str
    text: str
    history: tuple[Message, ...]
    answer: str
    model: str
    documents_hash: str
    system_hash: str
    created_s: float
    expires_s: float
    embedder: str
    text_vector: np.ndarray  # (dim,) float32
    context_vector: np.ndarray | None  # (dim,) float32, or None for a self-contained text
    hits: int = 0
    document_digests: tuple[str, ...] = ()  # types.document_digest of each document used; () for none


class AnswerStoreStats(NamedTuple):
    kind: str
    errors: int  # failed calls (Redis unreachable, timed out, refused)
    available: bool  # False from a failure until the next success
    last_error: str | None


class AnswerStore(ABC):
    """Answer records by (tenant, entry id). Safe to call from any number of threads."""

    @abstractmethod
    def put(self, record: AnswerRecord) -> bool:
        """Store (or replace) the record until record.expires_s; False if it could not be written."""

    @abstractmethod
    def answer(self, tenant: str, entry_id: str) -> str | None:
        """The entry's answer, counting a hit on it; None if it is gone or expired. Raises
        AnswerStoreUnavailable when the store cannot tell."""

    @abstractmethod
    def delete(self, tenant: str, entry_ids: Sequence[str]) -> int:
        """Drop these entries; how many were there. Unknown ids are ignored."""

    @abstractmethod
    def records(self, now_s: float) -> Iterator[AnswerRecord]:
        """Every record not expired at now_s, of every tenant, with its hit count: what a
        restart rebuilds the index from. Yields nothing when the store is unreachable."""

    @abstractmethod
    def stats(self) -> AnswerStoreStats: ...

    def close(self) -> None:  # noqa: B027  a no-op by default: only stores holding connections override it
        """Release connections; the store is unusable afterwards."""


def pack_record(record: AnswerRecord) -> bytes:
    """A record as bytes (msgpack; vectors as float32 bytes): how the embedded store and the
    replicas' change messages carry it."""
    import msgspec

    fields = {name: getattr(record, name) for name in AnswerRecord.__dataclass_fields__}
    fields["history"] = [list(message) for message in record.history]
    fields["text_vector"] = np.asarray(record.text_vector, dtype=np.float32).tobytes()
    fields["context_vector"] = (
        None if record.context_vector is None else np.asarray(record.context_vector, dtype=np.float32).tobytes()
    )
    fields["document_digests"] = list(record.document_digests)
    return msgspec.msgpack.encode(fields)


def unpack_record(raw: bytes) -> AnswerRecord:
    """pack_record's inverse; ValueError for bytes it did not write."""
    import msgspec

    try:
        fields = msgspec.msgpack.decode(raw)
        fields["history"] = tuple(Message(role, content) for role, content in fields["history"])
        fields["text_vector"] = np.frombuffer(fields["text_vector"], dtype=np.float32).copy()
        if fields["context_vector"] is not None:
            fields["context_vector"] = np.frombuffer(fields["context_vector"], dtype=np.float32).copy()
        fields["document_digests"] = tuple(fields["document_digests"])
        return AnswerRecord(**fields)
    except (msgspec.DecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"not an answer record: {error}") from None
