"""Registries: what users register (documents, agent programs) kept durably and shared by replicas.

base.py       the Registry contract (tables of small records per tenant) and its errors
memory.py     in process memory (lost on exit)
sqlite.py     one SQLite file under the data directory (a single node; survives restarts)
redis.py      Redis, single node or cluster (every replica sees the same)
documents.py  document id -> text, chunk key, token count, over any Registry
"""

from __future__ import annotations

from pathlib import Path

from ragcache.registry.base import Registry, RegistryStats, RegistryUnavailableError
from ragcache.registry.memory import MemoryRegistry


def make_registry(kind: str, redis_url: str | None = None, data_path: Path | None = None) -> Registry:
    """kind: memory, sqlite (data_path/registry.sqlite3) or redis (redis_url)."""
    if kind == "memory":
        return MemoryRegistry()
    if kind == "sqlite":
        from ragcache.registry.sqlite import SqliteRegistry

        if data_path is None:
            raise ValueError("the sqlite registry needs a data directory")
        return SqliteRegistry(Path(data_path) / "registry.sqlite3")
    if kind == "redis":
        from ragcache.registry.redis import RedisRegistry

        if not redis_url:
            raise ValueError("the redis registry needs redis_url")
        return RedisRegistry(redis_url)
    raise ValueError(f"registry must be memory, sqlite or redis, got {kind!r}")


__all__ = ["MemoryRegistry", "Registry", "RegistryStats", "RegistryUnavailableError", "make_registry"]
