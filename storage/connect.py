"""One way for every part of ragcache to open Redis: a single node or a Redis Cluster.

A deployment gives one URL (any node of a cluster will do); whether it is a cluster is
asked of the server (`INFO cluster`) when the client is made, so the same setting works
for both. In a cluster, keys that one operation touches together (an entry's meta and its
parts, a registry table) carry the same hash tag, `{...}`, so they share a slot.

If the server cannot be reached when the client is made, a single-node client is made
(and a warning logged): a cluster must be reachable at start-up to be used as one.

async_client never retries a failed command: its caller (the Redis tier) has its own
back-off, and a retry inside the client would multiply the time a dead node costs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import quote

import redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_cluster(url: str, timeout_s: float = 0.5) -> bool:
    """True when the server at url runs with cluster-enabled yes; False for a node or an unreachable one."""
    try:
        with redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s) as probe:
            return bool(probe.info("cluster").get("cluster_enabled"))
    except (RedisError, OSError) as error:
        log.warning(
            "cannot reach Redis at %s to ask whether it is a cluster (%s): using a single-node client", url, error
        )
        return False


def sync_client(url: str, *, timeout_s: float = 0.5) -> redis.Redis | redis.RedisCluster:
    """A blocking client with timeouts on every command and connection attempt."""
    options = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    if is_cluster(url, timeout_s):
        return redis.RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


def async_client(
    url: str, *, timeout_s: float = 0.5, max_connections: int = 16
) -> redis.asyncio.Redis | redis.asyncio.RedisCluster:
    """An asyncio client for the event loop it is first used on, with timeouts on every command and
    connection attempt. A single node gets a blocking pool of max_connections (a caller waits up to
    timeout_s for a free one); a cluster gets up to max_connections per node, and the caller must
    keep no more than that in flight (the cluster client fails a command beyond it)."""
    from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    options = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
    if is_cluster(url, timeout_s):
        return RedisCluster.from_url(url, max_connections=max_connections, **options)
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s, **options)
    return Redis.from_pool(pool)  # closing the client closes the pool


def hash_tag(text: str) -> str:
    """`{text}` with braces percent-encoded inside, so all keys built on it land in one cluster slot."""
    return "{" + quote(text, safe="") + "}"


class RedisUnavailable(RuntimeError):
    """SkipAfterFailure refused a call: Redis failed just now, or this call failed."""


class SkipAfterFailure:
    """The circuit of a blocking Redis client: after a failure, calls are refused at once for
    skip_s (a dead Redis costs one timeout per period, not one per request); a success clears
    the error. Counts failures and keeps the last one, for stats. Thread-safe."""

    def __init__(self, name: str, skip_s: float = 1.0) -> None:
        self.name, self.skip_s = name, skip_s
        self.errors = 0
        self.last_error: str | None = None
        self._skip_until = 0.0
        self._lock = threading.Lock()

    def call(self, work: Callable[[], T]) -> T:
        """work()'s result; RedisUnavailable while skipping or when work fails with a Redis or socket error."""
        if time.monotonic() < self._skip_until:
            raise RedisUnavailable(f"{self.name}: Redis failed ({self.last_error}); retry later")
        try:
            result = work()
        except (RedisError, OSError) as error:
            with self._lock:
                self.errors += 1
                self.last_error = f"{type(error).__name__}: {error}"
                self._skip_until = time.monotonic() + self.skip_s
            log.warning("%s: Redis failed, skipping it for %.0f s: %s", self.name, self.skip_s, error)
            raise RedisUnavailable(f"{self.name}: Redis failed ({self.last_error}); retry later") from error
        if self.last_error is not None:
            with self._lock:
                self.last_error = None
        return result
