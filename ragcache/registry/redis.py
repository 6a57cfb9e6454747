"""A registry in Redis: shared by every replica, single node or cluster, surviving restarts.

| key                                   | value                                        |
|---------------------------------------|----------------------------------------------|
| ragcache:registry:{tenant}:TABLE      | hash: key -> value (one table of one tenant) |
| ragcache:registry:tenants:TABLE       | set of tenants with rows in TABLE (listings) |

{tenant} is a hash tag (percent-encoded, so no tenant name reaches another's keys): in a
cluster a tenant's table lives in one slot, and each call touches one key, except rows(),
which reads the tenant set first. put and delete are scripts, so the value they return is
the one they replaced. After a failure, calls are refused for a second (storage/connect.py
SkipAfterFailure: RegistryUnavailableError at once) rather than each waiting out a timeout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ragcache.registry.base import Registry, RegistryStats, RegistryUnavailableError
from ragcache.storage.connect import RedisUnavailable, SkipAfterFailure, hash_tag, sync_client

_PUT = "local old = redis.call('HGET', KEYS[1], ARGV[1]) redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) return old"
_DELETE = "local old = redis.call('HGET', KEYS[1], ARGV[1]) redis.call('HDEL', KEYS[1], ARGV[1]) return old"


class RedisRegistry(Registry):
    def __init__(self, url: str, *, timeout_s: float = 0.5, prefix: str = "ragcache:registry") -> None:
        self._client = sync_client(url, timeout_s=timeout_s)
        self._put = self._client.register_script(_PUT)
        self._delete = self._client.register_script(_DELETE)
        self._prefix = prefix
        self._circuit = SkipAfterFailure("registry")

    def put(self, table: str, tenant: str, key: str, value: bytes) -> bytes | None:
        def work():
            previous = self._put(keys=[self._table(table, tenant)], args=[key, value])
            self._client.sadd(self._tenants(table), tenant)
            return previous

        return self._call(work)

    def get_many(self, table: str, tenant: str, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        return self._call(lambda: self._client.hmget(self._table(table, tenant), list(keys)))

    def delete(self, table: str, tenant: str, key: str) -> bytes | None:
        return self._call(lambda: self._delete(keys=[self._table(table, tenant)], args=[key]))

    def items(self, table: str, tenant: str) -> dict[str, bytes]:
        rows = self._call(lambda: self._client.hgetall(self._table(table, tenant)))
        return {key.decode(): value for key, value in rows.items()}

    def count(self, table: str, tenant: str) -> int:
        return int(self._call(lambda: self._client.hlen(self._table(table, tenant))))

    def rows(self, table: str) -> Iterator[tuple[str, str, bytes]]:
        tenants = self._call(lambda: self._client.smembers(self._tenants(table)))
        for tenant in sorted(name.decode() for name in tenants):
            for key, value in self.items(table, tenant).items():
                yield tenant, key, value

    def stats(self) -> RegistryStats:
        circuit = self._circuit
        return RegistryStats("redis", circuit.errors, circuit.last_error is None, circuit.last_error)

    def close(self) -> None:
        self._client.close()

    def _table(self, table: str, tenant: str) -> str:
        return f"{self._prefix}:{hash_tag(tenant)}:{table}"

    def _tenants(self, table: str) -> str:
        return f"{self._prefix}:tenants:{table}"

    def _call(self, work):
        try:
            return self._circuit.call(work)
        except RedisUnavailable as error:
            raise RegistryUnavailableError(str(error)) from error
