"""A registry in process memory: lost on exit. For tests, and for a deployment that asks for it."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence

from ragcache.registry.base import Registry, RegistryStats


class MemoryRegistry(Registry):
    def __init__(self) -> None:
        self._tables: dict[tuple[str, str], dict[str, bytes]] = defaultdict(dict)  # (table, tenant) -> rows
        self._lock = threading.Lock()

    def put(self, table: str, tenant: str, key: str, value: bytes) -> bytes | None:
        with self._lock:
            rows = self._tables[(table, tenant)]
            previous = rows.get(key)
            rows[key] = bytes(value)
            return previous

    def get_many(self, table: str, tenant: str, keys: Sequence[str]) -> list[bytes | None]:
        with self._lock:
            rows = self._tables.get((table, tenant), {})
            return [rows.get(key) for key in keys]

    def delete(self, table: str, tenant: str, key: str) -> bytes | None:
        with self._lock:
            return self._tables.get((table, tenant), {}).pop(key, None)

    def items(self, table: str, tenant: str) -> dict[str, bytes]:
        with self._lock:
            return dict(self._tables.get((table, tenant), {}))

    def count(self, table: str, tenant: str) -> int:
        with self._lock:
            return len(self._tables.get((table, tenant), {}))

    def rows(self, table: str) -> Iterator[tuple[str, str, bytes]]:
        with self._lock:
            found = [
                (tenant, key, value)
                for (name, tenant), rows in self._tables.items()
                if name == table
                for key, value in rows.items()
            ]
        yield from found

    def stats(self) -> RegistryStats:
        return RegistryStats("memory", 0, True, None)
