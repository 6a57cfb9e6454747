"""Redis tier: chunk caches as codec bytes in a Redis (one node or a Cluster) that every replica shares.

Keys, for namespace N (it carries the model fingerprint and the tenant) and an entry key K
in bucket B = crc32(K) mod 256, written as two hex digits:

| key                                  | value                                                 |
|--------------------------------------|-------------------------------------------------------|
| ragcache:N:{N.B}:meta:K              | b"v1 {nonce} {num_parts} {total_len}"                 |
| ragcache:N:{N.B}:part:K:{nonce}:{i}  | bytes [i * part_bytes, (i + 1) * part_bytes) of the entry |
| ragcache:N:{N.B}:index               | hash: K -> entry length, for usage() and keys()       |

`{N.B}` is a hash tag: an entry's meta, its parts and its bucket's index share one cluster
slot, so every script and transaction below touches one slot; the 256 buckets of a
namespace spread its entries over the masters. keys() and usage() read all 256 index
hashes (one pipeline on a single node; one command each, concurrently, on a cluster).

A write puts the parts under a fresh nonce (pipelined, about 4 MiB per round trip so
one value never holds the server or the connection for long, each part with a
provisional 60 s expiry so a writer that dies midway leaves nothing behind), then one
script, atomic as a transaction is, sets the meta LAST (returning the meta it replaces),
lifts the parts' provisional expiry (or sets ttl_s plus a grace) and records the index.
A reader reads the meta, then that nonce's parts: it never sees a meta without its data,
and concurrent writers of one key each leave a complete entry, the last meta winning.
The parts of a replaced entry expire 10 s later instead of vanishing at once, so a
reader that fetched the old meta still finds them.

Anything wrong with what was read (unreadable meta, missing part, CorruptEntryError from
the codec: checksum, foreign fingerprint, truncation) is a miss; the entry is deleted,
only if its meta is still the one read (a concurrent writer's newer entry is kept), and
counted as corrupt. Connection failures and timeouts are misses too (put returns False);
after one, Redis is skipped for 0.5 s, doubling per failure up to 10 s, and a success
(of a call that began after the last failure) resets it, so a dead Redis costs one
timeout per back-off period rather than one per request. redis-py reconnects by itself
when Redis comes back. On a cluster the entries of a batch are read and written per
bucket, so a dead master costs the misses of its own slots and the batch's other entries
are served; the back-off is the tier's, so while a master is dead the tier is skipped
after every batch that touched it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import threading
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

from redis.asyncio import RedisCluster
from redis.exceptions import RedisError

from ragcache.kv import ChunkKey, KVChunk
from ragcache.storage.base import KVTier, TierUsage
from ragcache.storage.codec import CODECS, CorruptEntryError, decode_chunk, encode_chunk
from ragcache.storage.connect import async_client, hash_tag

log = logging.getLogger(__name__)

T = TypeVar("T")
_FAULTS = (RedisError, OSError, asyncio.TimeoutError)
_BATCH_BYTES = 4 << 20
_PROVISIONAL_PARTS_MS = 60_000
_REPLACED_PARTS_GRACE_MS = 10_000
_LATENCY_SAMPLES = 1024
_BUCKETS = 256
# KEYS: meta, index, parts. ARGV: meta, ttl ms ("" for none), parts' expiry ms, entry key, entry length.
# Sets the meta last and returns the one it replaced.
_COMMIT = """
local old = redis.call('GET', KEYS[1])
if ARGV[2] == '' then redis.call('SET', KEYS[1], ARGV[1]) else redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
for i = 3, #KEYS do
  if ARGV[2] == '' then redis.call('PERSIST', KEYS[i]) else redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
return old
"""
# KEYS: meta, index, parts. ARGV: the meta the reader saw, entry key. Drops the entry only if unchanged.
_DROP_IF_UNCHANGED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[1])
for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
"""


@dataclass(frozen=True)
class RedisTierStats:
    """Counts since the tier was made; latency over the last 1024 Redis round trips."""

    name: str
    hits: int
    misses: int  # absent, corrupt, or Redis failing or skipped
    errors: int  # connection failures, timeouts, errors returned by Redis
    corrupt: int  # entries read and dropped as unusable
    bytes_written: int  # encoded bytes stored
    bytes_read: int  # encoded bytes fetched
    raw_bytes: int  # KV bytes of the chunks encoded
    encoded_bytes: int  # what they became
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    available: bool  # False from a failure until the next success
    last_error: str | None  # what opened the back-off; None once Redis answers again

    @property
    def compression_ratio(self) -> float | None:
        return self.raw_bytes / self.encoded_bytes if self.encoded_bytes else None


@dataclass
class _Counts:
    hits: int = 0
    misses: int = 0
    errors: int = 0
    corrupt: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    raw_bytes: int = 0
    encoded_bytes: int = 0


class _Meta(NamedTuple):
    nonce: str
    num_parts: int
    total_len: int

    def encode(self) -> bytes:
        return f"v1 {self.nonce} {self.num_parts} {self.total_len}".encode()

    @staticmethod
    def parse(raw: bytes) -> _Meta | None:
        """None for anything this version did not write (each part holds at least one byte)."""
        try:
            version, nonce, num_parts, total_len = raw.decode("ascii").split(" ")
            meta = _Meta(nonce, int(num_parts), int(total_len))
        except (UnicodeDecodeError, ValueError):
            return None
        valid = version == "v1" and nonce.isalnum() and 1 <= meta.num_parts <= max(1, meta.total_len) < 1 << 40
        return meta if valid else None


class _Backoff:
    """Circuit breaker: closed until a failure, then open for a delay that doubles per failure."""

    def __init__(self, base_s: float = 0.5, max_s: float = 10.0) -> None:
        self._base_s, self._max_s = base_s, max_s
        self._delay_s = 0.0
        self._open_until = 0.0
        self._failed_at = float("-inf")
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self._delay_s == 0.0

    def allows(self) -> bool:
        return time.monotonic() >= self._open_until

    def failed(self) -> None:
        """Failures of calls already in flight when it opened count once."""
        with self._lock:
            now = self._failed_at = time.monotonic()
            if now < self._open_until:
                return
            self._delay_s = min(2 * self._delay_s, self._max_s) if self._delay_s else self._base_s
            self._open_until = now + self._delay_s

    def succeeded(self, started_s: float) -> None:
        """A call begun at started_s (time.monotonic()) went through: closed, unless a failure came since."""
        with self._lock:
            if self._failed_at < started_s:
                self._delay_s = self._open_until = 0.0


class _LoopThread:
    """The one event loop the connection pool lives on, in a daemon thread; callers submit to it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class RedisTier:
    """A KVTier over Redis, one node or a Cluster; safe to call from any number of threads at once.

    namespace: prefix of every key (model fingerprint and tenant); model_fingerprint, when
    given, is checked against every entry read. timeout_s bounds each round trip (one
    command, or one batch of about 4 MiB of parts) and each connection attempt. At most
    max_connections round trips are in flight at once. The calls block their thread while
    the tier's own event loop does the I/O; get_many_async does not.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        namespace: str,
        codec: str = "raw",
        model_fingerprint: str | None = None,
        ttl_s: float | None = None,
        part_bytes: int = 1 << 20,
        timeout_s: float = 0.5,
        max_connections: int = 16,
        name: str = "redis",
    ) -> None:
        if not namespace:
            raise ValueError("namespace must be non-empty")
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
        if part_bytes <= 0 or timeout_s <= 0 or (ttl_s is not None and ttl_s < 0.001):
            raise ValueError(
                f"need part_bytes > 0, timeout_s > 0, ttl_s >= 0.001 s: {part_bytes}, {timeout_s}, {ttl_s}"
            )
        self.name = name
        self.codec = codec
        self._prefix = "ragcache:" + namespace.replace("{", "%7B").replace("}", "%7D")
        self._tags = [hash_tag(f"{namespace}.{bucket:02x}") for bucket in range(_BUCKETS)]
        self._fingerprint = model_fingerprint
        self._ttl_ms = None if ttl_s is None else int(ttl_s * 1000)
        self._part_bytes = part_bytes
        self._parts_per_batch = max(1, _BATCH_BYTES // part_bytes)
        self._timeout_s = timeout_s
        self._counts = _Counts()
        self._latencies_s: deque[float] = deque(maxlen=_LATENCY_SAMPLES)
        self._last_error: str | None = None
        self._lock = threading.Lock()
        self._backoff = _Backoff()
        self._loop = _LoopThread(f"ragcache-{name}")
        self._client = async_client(url, timeout_s=timeout_s, max_connections=max_connections)
        self._cluster = isinstance(self._client, RedisCluster)
        if self._cluster:  # learn the slots' masters now, not within the first request's timeout
            self._loop.submit(self._guarded(self._client.initialize, None)).result()
        self._in_flight = asyncio.Semaphore(max_connections)

    @property
    def available(self) -> bool:
        """False from a failure until the next success; calls made while it is False may skip Redis."""
        return self._backoff.available

    # KVTier

    def get(self, key: ChunkKey) -> KVChunk | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[ChunkKey]) -> list[KVChunk | None]:
        return self.get_many_async(keys).result()

    def get_many_async(self, keys: Sequence[ChunkKey]) -> concurrent.futures.Future[list[KVChunk | None]]:
        """get_many running on the tier's loop, for a caller that computes meanwhile; never fails."""
        if keys and self._backoff.allows():
            return self._loop.submit(self._read_many(list(keys)))
        self._count(misses=len(keys))
        return _done([None] * len(keys))

    def put(self, key: ChunkKey, chunk: KVChunk) -> bool:
        return self.put_many([(key, chunk)])[0]

    def put_many(self, items: Sequence[tuple[ChunkKey, KVChunk]]) -> list[bool]:
        """Encodes on the calling thread (CPU work stays off the loop), then writes concurrently;
        per item, False if it was not written (Redis failing or skipped, or the codec refused it)."""
        if not items or not self._backoff.allows():
            return [False] * len(items)
        encoded = [(key, self._encode(chunk)) for key, chunk in items]
        return self._call(
            lambda: self._each([self._write(key, blob) for key, blob in encoded], False), [False] * len(items)
        )

    def contains(self, key: ChunkKey) -> bool:
        return bool(self._call(lambda: self._round_trip(self._client.exists(self._meta_key(key))), 0))

    def delete(self, key: ChunkKey) -> bool:
        return self._call(lambda: self._delete(key), False)

    def keys(self) -> list[ChunkKey]:
        """Keys the namespace's index lists (approximate, as usage() is): how flushes find entries."""
        names: list[bytes] = self._call(lambda: self._read_index("HKEYS"), [])
        return [ChunkKey(name.decode() if isinstance(name, bytes) else name) for name in names]

    def usage(self) -> TierUsage:
        """From the index puts and deletes keep: approximate, since Redis's maxmemory eviction and
        TTL expiry drop entries without telling it. max_bytes 0: the budget is Redis's own."""
        sizes: list[bytes] = self._call(lambda: self._read_index("HVALS"), [])
        return TierUsage(self.name, len(sizes), sum(int(size) for size in sizes), 0)

    # the rest of the public surface

    def stats(self) -> RedisTierStats:
        with self._lock:
            counts = asdict(self._counts)
            latencies_s = sorted(self._latencies_s)
            last_error = self._last_error
        return RedisTierStats(
            name=self.name,
            **counts,
            latency_p50_ms=_percentile_ms(latencies_s, 0.5),
            latency_p99_ms=_percentile_ms(latencies_s, 0.99),
            available=self._backoff.available,
            last_error=None if self._backoff.available else last_error,
        )

    def close(self) -> None:
        """Closes the connections and stops the loop; the tier is unusable afterwards."""
        if self._loop.loop.is_closed():
            return
        self._loop.submit(self._client.aclose()).result()
        self._loop.stop()

    # keys

    def _tag(self, key: str) -> str:
        return self._tags[zlib.crc32(key.encode()) % _BUCKETS]

    def _index_key(self, key: str) -> str:
        return f"{self._prefix}:{self._tag(key)}:index"

    def _meta_key(self, key: str) -> str:
        return f"{self._prefix}:{self._tag(key)}:meta:{key}"

    def _part_keys(self, key: str, meta: _Meta) -> list[str]:
        return [f"{self._prefix}:{self._tag(key)}:part:{key}:{meta.nonce}:{i}" for i in range(meta.num_parts)]

    # reading

    async def _read_many(self, keys: list[ChunkKey]) -> list[KVChunk | None]:
        chunks: list[KVChunk | None] = await self._guarded(lambda: self._fetch_many(keys), [None] * len(keys))
        hits = sum(chunk is not None for chunk in chunks)
        self._count(hits=hits, misses=len(keys) - hits)
        return chunks

    async def _fetch_many(self, keys: list[ChunkKey]) -> list[KVChunk | None]:
        return await self._each([self._fetch(key, raw) for key, raw in zip(keys, await self._read_metas(keys))], None)

    async def _read_metas(self, keys: list[ChunkKey]) -> list[bytes | None]:
        """One MGET on a single node; on a cluster one MGET per bucket (a slot), a failed one giving Nones."""
        if not self._cluster:
            return await self._round_trip(self._mget([self._meta_key(key) for key in keys]))
        buckets: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            buckets.setdefault(self._tag(key), []).append(i)
        groups = list(buckets.values())
        replies = await self._each(
            [self._round_trip(self._mget([self._meta_key(keys[i]) for i in group])) for group in groups],
            None,
        )
        metas: list[bytes | None] = [None] * len(keys)
        for group, reply in zip(groups, replies):
            for i, raw in zip(group, reply or [None] * len(group)):
                metas[i] = raw
        return metas

    async def _fetch(self, key: ChunkKey, raw_meta: bytes | None) -> KVChunk | None:
        if raw_meta is None:
            return None
        meta = _Meta.parse(raw_meta)
        if meta is None:
            await self._drop(key, raw_meta, None, "unreadable meta")
            return None
        names = self._part_keys(key, meta)
        parts: list[bytes | None] = []
        for first in range(0, len(names), self._parts_per_batch):
            parts += await self._round_trip(self._mget(names[first : first + self._parts_per_batch]))
        if any(part is None for part in parts):
            await self._drop(key, raw_meta, meta, "missing part")
            return None
        blob = b"".join(parts)  # type: ignore[arg-type]
        self._count(bytes_read=len(blob))
        try:
            return await asyncio.to_thread(decode_chunk, blob, self._fingerprint)
        except CorruptEntryError as error:
            await self._drop(key, raw_meta, meta, str(error))
            return None

    async def _drop(self, key: ChunkKey, raw_meta: bytes, meta: _Meta | None, reason: str) -> None:
        """Deletes an unusable entry (meta, index field, parts) unless a writer has replaced it since it was read."""
        self._count(corrupt=1)
        log.warning("%s: dropping entry %s: %s", self.name, key, reason)
        names = [self._meta_key(key), self._index_key(key), *(self._part_keys(key, meta) if meta else [])]
        await self._round_trip(self._client.eval(_DROP_IF_UNCHANGED, len(names), *names, raw_meta, key))

    def _mget(self, names: list[str]) -> Awaitable[list[bytes | None]]:
        """MGET of names. The client is made without decode_responses, so its values are bytes
        (redis-py's annotation, bytes | str, covers clients that decode)."""
        return cast("Awaitable[list[bytes | None]]", self._client.mget(names))

    async def _read_index(self, command: str) -> list[bytes]:
        """HKEYS or HVALS of every bucket's index, flattened."""
        names = [f"{self._prefix}:{tag}:index" for tag in self._tags]
        if self._cluster:
            replies = await self._each([self._round_trip(self._client.execute_command(command, n)) for n in names], [])
        else:
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.execute_command(command, name)
            replies = await self._round_trip(pipe.execute())
        return [item for reply in replies for item in reply]

    # writing

    def _encode(self, chunk: KVChunk) -> bytes | None:
        try:
            blob = encode_chunk(chunk, self.codec)
        except ValueError as error:
            log.warning("%s: cannot encode a chunk as %s: %s", self.name, self.codec, error)
            return None
        self._count(raw_bytes=chunk.nbytes, encoded_bytes=len(blob))
        return blob

    async def _write(self, key: ChunkKey, blob: bytes | None) -> bool:
        if blob is None:
            return False
        meta = _Meta(secrets.token_hex(8), max(1, -(-len(blob) // self._part_bytes)), len(blob))
        names, view, size = self._part_keys(key, meta), memoryview(blob), self._part_bytes
        for first in range(0, len(names), self._parts_per_batch):
            pipe = self._client.pipeline(transaction=False)
            for i, name in enumerate(names[first : first + self._parts_per_batch], start=first):
                pipe.set(name, view[i * size : (i + 1) * size], px=_PROVISIONAL_PARTS_MS)
            await self._round_trip(pipe.execute())
        # parts outlive their meta, so a live meta never points at expired parts
        ttl_ms = "" if self._ttl_ms is None else self._ttl_ms
        parts_ms = "" if self._ttl_ms is None else self._ttl_ms + _REPLACED_PARTS_GRACE_MS
        keys = [self._meta_key(key), self._index_key(key), *names]
        replaced = await self._round_trip(
            self._client.eval(_COMMIT, len(keys), *keys, meta.encode(), ttl_ms, parts_ms, key, len(blob))
        )
        self._count(bytes_written=len(blob))
        old = _Meta.parse(replaced) if replaced else None
        if old is not None:
            pipe = self._client.pipeline(transaction=False)
            for name in self._part_keys(key, old):
                pipe.pexpire(name, _REPLACED_PARTS_GRACE_MS, lt=True)
            await self._round_trip(pipe.execute())
        return True

    async def _delete(self, key: ChunkKey) -> bool:
        pipe = self._client.pipeline(transaction=False)
        pipe.getdel(self._meta_key(key))
        pipe.hdel(self._index_key(key), key)
        raw_meta, _ = await self._round_trip(pipe.execute())
        meta = _Meta.parse(raw_meta) if raw_meta is not None else None
        if meta is not None:
            await self._round_trip(self._client.delete(*self._part_keys(key, meta)))
        return raw_meta is not None

    # plumbing

    def _call(self, work: Callable[[], Awaitable[T]], fallback: T) -> T:
        """Runs work() on the loop and waits; fallback when Redis is skipped or fails."""
        if not self._backoff.allows():
            return fallback
        return self._loop.submit(self._guarded(work, fallback)).result()

    async def _guarded(self, work: Callable[[], Awaitable[T]], fallback: T) -> T:
        started_s = time.monotonic()
        try:
            result = await work()
        except _FAULTS as error:
            self._failed(error)
            return fallback
        self._backoff.succeeded(started_s)
        return result

    async def _each(self, coros: Sequence[Awaitable[T]], fallback: T) -> list[T]:
        """Runs coros concurrently; each that fails with a Redis fault gives fallback, and the
        first such fault counts as the call's failure (the rest are the same outage)."""
        results = await asyncio.gather(*coros, return_exceptions=True)
        faults = [r for r in results if isinstance(r, _FAULTS)]
        if faults:
            self._failed(faults[0])
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, _FAULTS):
                raise result
        return [fallback if isinstance(r, _FAULTS) else r for r in results]  # type: ignore[misc]

    def _failed(self, error: BaseException) -> None:
        with self._lock:
            self._counts.errors += 1
            self._last_error = f"{type(error).__name__}: {error}"
        self._backoff.failed()
        log.warning("%s: Redis failed, skipping it for a while: %s", self.name, self._last_error)

    async def _round_trip(self, awaitable: Awaitable[T]) -> T:
        """One request/response with Redis, bounded by timeout_s; its latency is sampled.

        redis-py 8.1's asyncio connection can leak an AttributeError or TypeError (its writer or
        transport already torn down) instead of ConnectionError when a command is sent on a
        connection the server just closed (redis-py issues #4287, #3546; seen here when a cluster
        master is killed under load): inside a round trip, those are connection failures."""
        start = time.perf_counter()
        try:
            result = await asyncio.wait_for(self._limited(awaitable), self._timeout_s)
        except (AttributeError, TypeError) as error:
            raise ConnectionError(f"connection lost mid-command ({type(error).__name__}: {error})") from error
        with self._lock:
            self._latencies_s.append(time.perf_counter() - start)
        return result

    async def _limited(self, awaitable: Awaitable[T]) -> T:
        async with self._in_flight:
            return await awaitable

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for counter, delta in deltas.items():
                setattr(self._counts, counter, getattr(self._counts, counter) + delta)


def _percentile_ms(sorted_s: list[float], q: float) -> float | None:
    return 1000 * sorted_s[int(q * (len(sorted_s) - 1))] if sorted_s else None


def _done(value: T) -> concurrent.futures.Future[T]:
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    future.set_result(value)
    return future


if TYPE_CHECKING:  # the type checker holds RedisTier to the KVTier contract
    _tier: type[KVTier] = RedisTier
