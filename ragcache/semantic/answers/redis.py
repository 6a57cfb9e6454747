"""Answers in Redis: one hash per entry, shared by replicas and kept across restarts.

| key                                         | value                                       |
|---------------------------------------------|---------------------------------------------|
| ragcache:{namespace}:semantic:{tenant}:{id} | hash: answer, text, history (JSON), model,  |
|                                             | documents_hash, system_hash, category,      |
|                                             | created_s, expires_s, hits, embedder,       |
|                                             | text_vector, context_vector (float32 bytes) |
|                                             | document_digests (comma-separated hex)      |

Records written before document_digests existed decode with none.

The tenant is percent-encoded, so no tenant name can reach into another's keys. Each
hash expires in Redis at expires_s (PEXPIREAT), and the cache checks the time itself
before serving, so a clock skew or a late expiry never serves a stale answer. A hit
increments `hits` only if the hash still exists (a script), so a hit racing an expiry
cannot leave a hash without a TTL behind.

Failures (connection refused, timeouts) count as errors and raise AnswerStoreUnavailable
on reads (a miss for the caller); after one, Redis is skipped for a second, so a dead
Redis costs one timeout per second rather than one per request.

On a Redis Cluster (storage.connect finds out) every command and the script touch one
key, so each goes to its key's master; delete splits its keys by slot and records()
scans every master. A dead master costs the answers in its slots: reads of them are
misses, and records() yields nothing while it is down (the index rebuilds on the next start).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from urllib.parse import quote, unquote

import numpy as np
from redis.typing import EncodableT, FieldT

from ragcache.semantic.answers.base import AnswerRecord, AnswerStore, AnswerStoreStats, AnswerStoreUnavailable
from ragcache.semantic.conversation import Message
from ragcache.storage.connect import RedisUnavailable, SkipAfterFailure, sync_client

log = logging.getLogger(__name__)

_SKIP_AFTER_FAILURE_S = 1.0
_SCAN_BATCH = 500
# the answer, counting a hit, only while the hash exists
_ANSWER_AND_COUNT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HINCRBY', KEYS[1], 'hits', 1)
return redis.call('HGET', KEYS[1], 'answer')
"""


class RedisAnswerStore(AnswerStore):
    def __init__(
        self, url: str = "redis://127.0.0.1:6379/0", *, namespace: str = "semantic", timeout_s: float = 0.5
    ) -> None:
        if not namespace or ":" in namespace:
            raise ValueError(f"namespace must be non-empty and free of ':', got {namespace!r}")
        self._client = sync_client(url, timeout_s=timeout_s)
        self._answer_script = self._client.register_script(_ANSWER_AND_COUNT)
        self._prefix = f"ragcache:{namespace}:semantic"
        self._circuit = SkipAfterFailure("semantic answers", _SKIP_AFTER_FAILURE_S)

    def put(self, record: AnswerRecord) -> bool:
        key = self._key(record.tenant, record.entry_id)
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping=_encode(record))
        pipe.pexpireat(key, int(record.expires_s * 1000))
        return self._call(pipe.execute, None) is not None

    def answer(self, tenant: str, entry_id: str) -> str | None:
        missing = object()
        raw = self._call(lambda: self._answer_script(keys=[self._key(tenant, entry_id)]), missing)
        if raw is missing:
            raise AnswerStoreUnavailable(self._circuit.last_error or "redis skipped after a failure")
        return None if raw is None else raw.decode()

    def delete(self, tenant: str, entry_ids: Sequence[str]) -> int:
        if not entry_ids:
            return 0
        return int(self._call(lambda: self._client.delete(*[self._key(tenant, i) for i in entry_ids]), 0))

    def records(self, now_s: float) -> Iterator[AnswerRecord]:
        keys = self._call(lambda: list(self._client.scan_iter(match=f"{self._prefix}:*", count=1000)), [])
        for first in range(0, len(keys), _SCAN_BATCH):
            batch = keys[first : first + _SCAN_BATCH]
            pipe = self._client.pipeline(transaction=False)
            for key in batch:
                pipe.hgetall(key)
            for key, fields in zip(batch, self._call(pipe.execute, [])):
                record = _decode(key.decode(), fields)
                if record is not None and record.expires_s > now_s:
                    yield record

    def stats(self) -> AnswerStoreStats:
        circuit = self._circuit
        return AnswerStoreStats("redis", circuit.errors, circuit.last_error is None, circuit.last_error)

    def close(self) -> None:
        self._client.close()

    def _key(self, tenant: str, entry_id: str) -> str:
        return f"{self._prefix}:{quote(tenant, safe='')}:{entry_id}"

    def _call(self, work, fallback):
        try:
            return self._circuit.call(work)
        except RedisUnavailable:
            return fallback


def _encode(record: AnswerRecord) -> dict[FieldT, EncodableT]:
    fields: dict[FieldT, EncodableT] = {
        "answer": record.answer,
        "text": record.text,
        "history": json.dumps([[m.role, m.content] for m in record.history]),
        "category": record.category,
        "model": record.model,
        "documents_hash": record.documents_hash,
        "system_hash": record.system_hash,
        "created_s": repr(record.created_s),
        "expires_s": repr(record.expires_s),
        "hits": record.hits,
        "embedder": record.embedder,
        "text_vector": np.asarray(record.text_vector, dtype=np.float32).tobytes(),
        "document_digests": ",".join(record.document_digests),
    }
    if record.context_vector is not None:
        fields["context_vector"] = np.asarray(record.context_vector, dtype=np.float32).tobytes()
    return fields


def _decode(key: str, fields: dict[bytes, bytes]) -> AnswerRecord | None:
    """None for a hash this version did not write (logged, then skipped)."""
    try:
        tenant, entry_id = key.rsplit(":", 2)[1:]
        text = {k.decode(): v for k, v in fields.items()}
        context = text.get("context_vector")
        return AnswerRecord(
            entry_id=entry_id,
            tenant=unquote(tenant),
            category=text["category"].decode(),
            text=text["text"].decode(),
            history=tuple(Message(role, content) for role, content in json.loads(text["history"])),
            answer=text["answer"].decode(),
            model=text["model"].decode(),
            documents_hash=text["documents_hash"].decode(),
            system_hash=text["system_hash"].decode(),
            created_s=float(text["created_s"]),
            expires_s=float(text["expires_s"]),
            embedder=text["embedder"].decode(),
            text_vector=np.frombuffer(text["text_vector"], dtype=np.float32).copy(),
            context_vector=None if context is None else np.frombuffer(context, dtype=np.float32).copy(),
            hits=int(text.get("hits", b"0")),
            document_digests=tuple(d for d in text.get("document_digests", b"").decode().split(",") if d),
        )
    except (KeyError, ValueError, UnicodeDecodeError) as error:
        log.warning("semantic answers: skipping unreadable entry %s: %s", key, error)
        return None
