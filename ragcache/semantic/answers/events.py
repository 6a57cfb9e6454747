"""Replicas tell each other of answers stored and removed, over Redis pub/sub.

Each replica indexes answers in its own memory (the HNSW index) and reads them from the
shared answer store. Without this, a replica would only see entries that existed when it
started. SharedAnswerStore wraps the shared store: every put and delete is also published
on one channel, with the packed record (vectors included, so the receiver need not embed
or fetch anything); every other replica's listener indexes or drops the entry as it
arrives, typically within milliseconds.

Pub/sub delivers only to listeners connected at that moment. After the listener loses its
connection (Redis restarted, a failover), it reconnects with a growing pause and then calls
on_gap, which rebuilds the index from the store, so an entry published meanwhile is not
missed for good. A message from this replica itself, or one it cannot read, is ignored.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence

import msgspec
from redis.exceptions import RedisError

from ragcache.semantic.answers.base import AnswerRecord, AnswerStore, AnswerStoreStats, pack_record, unpack_record
from ragcache.storage.connect import sync_client

log = logging.getLogger(__name__)

_FIRST_RETRY_S, _MAX_RETRY_S = 0.1, 5.0


class AnswerEvents:
    """Publishes this replica's changes and follows the others'. Thread-safe."""

    def __init__(self, url: str, *, namespace: str = "semantic", timeout_s: float = 0.5) -> None:
        self.origin = uuid.uuid4().hex
        self.channel = f"ragcache:{namespace}:semantic:events"
        self._client = sync_client(url, timeout_s=timeout_s)
        self._timeout_s = timeout_s
        self._closed = threading.Event()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        self.received = 0
        self.publish_errors = 0

    def stored(self, record: AnswerRecord) -> None:
        self._publish({"op": "stored", "record": pack_record(record)})

    def removed(self, tenant: str, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            self._publish({"op": "removed", "tenant": tenant, "entry_ids": list(entry_ids)})

    def follow(
        self,
        on_stored: Callable[[AnswerRecord], None],
        on_removed: Callable[[str, list[str]], None],
        on_gap: Callable[[], object],
        ready_timeout_s: float = 2.0,
    ) -> bool:
        """Start the listener thread; True once it is subscribed (waits up to ready_timeout_s)."""
        self._thread = threading.Thread(
            target=self._listen, args=(on_stored, on_removed, on_gap), name="ragcache-semantic-events", daemon=True
        )
        self._thread.start()
        return self._subscribed.wait(ready_timeout_s)

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._client.close()

    def _publish(self, message: dict) -> None:
        try:
            self._client.publish(self.channel, msgspec.msgpack.encode({"origin": self.origin, **message}))
        except (RedisError, OSError) as error:  # the others rebuild after their own gap, or see it on restart
            self.publish_errors += 1
            log.warning("semantic events: cannot publish (%s)", error)

    def _listen(self, on_stored, on_removed, on_gap) -> None:
        pause_s, gap = _FIRST_RETRY_S, False
        while not self._closed.is_set():
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                pubsub.get_message(timeout=self._timeout_s)  # the subscribe confirmation
                self._subscribed.set()
                if gap:
                    on_gap()
                    gap, pause_s = False, _FIRST_RETRY_S
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message.get("type") == "message":
                        self._handle(message["data"], on_stored, on_removed)
                pubsub.close()
            except (RedisError, OSError, ValueError) as error:
                if not gap:
                    log.warning("semantic events: lost the channel (%s); reconnecting", error)
                gap = True
                self._closed.wait(pause_s)
                pause_s = min(2 * pause_s, _MAX_RETRY_S)

    def _handle(self, data: bytes, on_stored, on_removed) -> None:
        try:
            message = msgspec.msgpack.decode(data)
            if message.get("origin") == self.origin:
                return
            if message["op"] == "stored":
                on_stored(unpack_record(message["record"]))
            elif message["op"] == "removed":
                on_removed(str(message["tenant"]), [str(i) for i in message["entry_ids"]])
            self.received += 1
        except (msgspec.DecodeError, KeyError, TypeError, ValueError) as error:
            log.warning("semantic events: ignoring an unreadable message (%s)", error)


class SharedAnswerStore(AnswerStore):
    """An answer store whose changes are published to the other replicas (AnswerEvents)."""

    def __init__(self, inner: AnswerStore, events: AnswerEvents) -> None:
        self.inner, self.events = inner, events

    def put(self, record: AnswerRecord) -> bool:
        written = self.inner.put(record)
        if written:
            self.events.stored(record)
        return written

    def answer(self, tenant: str, entry_id: str) -> str | None:
        return self.inner.answer(tenant, entry_id)

    def delete(self, tenant: str, entry_ids: Sequence[str]) -> int:
        removed = self.inner.delete(tenant, entry_ids)
        self.events.removed(tenant, entry_ids)
        return removed

    def records(self, now_s: float) -> Iterator[AnswerRecord]:
        return self.inner.records(now_s)

    def stats(self) -> AnswerStoreStats:
        return self.inner.stats()

    def close(self) -> None:
        self.events.close()
        self.inner.close()


def follow_replicas(cache) -> bool | None:
    """Have a SemanticCache index (and drop) the entries other replicas store (and remove), and
    rebuild after a lost channel. None when its answer store is not shared (no Redis); else
    whether the listener subscribed within its ready timeout."""
    if not isinstance(cache.answers, SharedAnswerStore):
        return None
    return cache.answers.events.follow(cache.index_record, cache.drop_entries, cache.rebuild)
