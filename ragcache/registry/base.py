"""The contract of a registry: state users create, kept durably and shared by every replica.

Caches may be dropped; registrations may not. A registry holds small records (bytes) in
tables, each row named by (table, tenant, key); a tenant's rows are never read through
another tenant's name. Implementations: memory.py (lost on exit, for tests and when asked),
sqlite.py (one node, survives restarts), redis.py (shared by replicas, single node or cluster).

Every method may be called from any thread. Reads and writes raise RegistryUnavailableError
when the backing store cannot be reached: a registration is either stored or refused, never
kept only in one process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import NamedTuple


class RegistryUnavailableError(RuntimeError):
    """The registry's store cannot be reached now (the service answers 503; retry later)."""


class RegistryStats(NamedTuple):
    kind: str  # memory, sqlite or redis
    errors: int  # calls that failed because the store could not be reached
    available: bool  # False from a failure until the next success
    last_error: str | None


class Registry(ABC):
    @abstractmethod
    def put(self, table: str, tenant: str, key: str, value: bytes) -> bytes | None:
        """Store value under (table, tenant, key) atomically; returns the value it replaced, if any."""

    @abstractmethod
    def get_many(self, table: str, tenant: str, keys: Sequence[str]) -> list[bytes | None]:
        """The values of keys, None where absent; one round trip."""

    def get(self, table: str, tenant: str, key: str) -> bytes | None:
        return self.get_many(table, tenant, [key])[0]

    @abstractmethod
    def delete(self, table: str, tenant: str, key: str) -> bytes | None:
        """Remove the row atomically; returns the value it held, None if there was none."""

    @abstractmethod
    def items(self, table: str, tenant: str) -> dict[str, bytes]:
        """Every row of a tenant's table (tables are registrations, not caches: they stay small)."""

    @abstractmethod
    def count(self, table: str, tenant: str) -> int: ...

    @abstractmethod
    def rows(self, table: str) -> Iterator[tuple[str, str, bytes]]:
        """(tenant, key, value) of every tenant's rows: for operators' listings, never the request path."""

    @abstractmethod
    def stats(self) -> RegistryStats: ...

    def close(self) -> None:  # noqa: B027  a no-op by default: only registries holding connections override it
        """Release connections; the registry is unusable afterwards."""
