"""Answers in process memory: the store when no Redis is configured (lost on restart)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence

from ragcache.semantic.answers.base import AnswerRecord, AnswerStore, AnswerStoreStats


class MemoryAnswerStore(AnswerStore):
    def __init__(self, clock=time.time) -> None:
        self._records: dict[tuple[str, str], AnswerRecord] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def put(self, record: AnswerRecord) -> bool:
        with self._lock:
            self._records[(record.tenant, record.entry_id)] = record
        return True

    def answer(self, tenant: str, entry_id: str) -> str | None:
        with self._lock:
            record = self._records.get((tenant, entry_id))
            if record is None or record.expires_s <= self._clock():
                self._records.pop((tenant, entry_id), None)
                return None
            self._records[(tenant, entry_id)] = dataclasses.replace(record, hits=record.hits + 1)
            return record.answer

    def delete(self, tenant: str, entry_ids: Sequence[str]) -> int:
        with self._lock:
            return sum(self._records.pop((tenant, entry_id), None) is not None for entry_id in entry_ids)

    def records(self, now_s: float) -> Iterator[AnswerRecord]:
        with self._lock:
            live = [record for record in self._records.values() if record.expires_s > now_s]
        yield from live

    def stats(self) -> AnswerStoreStats:
        return AnswerStoreStats("memory", 0, True, None)
