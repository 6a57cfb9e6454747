"""Answer stores behind one contract (base.py): Redis when configured (shared by replicas, with
their changes published to each other: events.py), SQLite on one node, process memory when asked."""

from __future__ import annotations

from pathlib import Path

from ragcache.semantic.answers.base import AnswerRecord, AnswerStore, AnswerStoreStats, AnswerStoreUnavailable
from ragcache.semantic.answers.memory import MemoryAnswerStore


def make_answer_store(
    redis_url: str | None, namespace: str = "semantic", sqlite_path: Path | None = None
) -> AnswerStore:
    """A RedisAnswerStore wrapped in a SharedAnswerStore (its changes published to the other
    replicas) when a URL is given, else SqliteAnswerStore at sqlite_path when one is given, else
    MemoryAnswerStore. redis-py is imported only for Redis."""
    if redis_url:
        from ragcache.semantic.answers.events import AnswerEvents, SharedAnswerStore
        from ragcache.semantic.answers.redis import RedisAnswerStore

        return SharedAnswerStore(
            RedisAnswerStore(redis_url, namespace=namespace), AnswerEvents(redis_url, namespace=namespace)
        )
    if sqlite_path is not None:
        from ragcache.semantic.answers.sqlite import SqliteAnswerStore

        return SqliteAnswerStore(sqlite_path)
    return MemoryAnswerStore()


__all__ = [
    "AnswerRecord",
    "AnswerStore",
    "AnswerStoreStats",
    "AnswerStoreUnavailable",
    "MemoryAnswerStore",
    "make_answer_store",
]
