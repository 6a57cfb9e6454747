"""Answer stores behind one contract (base.py): Redis when configured, process memory otherwise."""

from __future__ import annotations

from ragcache.semantic.answers.base import AnswerRecord, AnswerStore, AnswerStoreStats, AnswerStoreUnavailable
from ragcache.semantic.answers.memory import MemoryAnswerStore


def make_answer_store(redis_url: str | None, namespace: str = "semantic") -> AnswerStore:
    """RedisAnswerStore when a URL is given (redis-py imported only then), else MemoryAnswerStore."""
    if redis_url:
        from ragcache.semantic.answers.redis import RedisAnswerStore

        return RedisAnswerStore(redis_url, namespace=namespace)
    return MemoryAnswerStore()


__all__ = [
    "AnswerRecord", "AnswerStore", "AnswerStoreStats", "AnswerStoreUnavailable", "MemoryAnswerStore", "make_answer_store",
]
