"""The one object the HTTP layer calls: engine work off the event loop, documents, tenants, stats.

Model work runs on one worker thread (the engine serves one request at a time); requests
wait in a bounded queue and past max_queue are refused at once (QueueFullError -> 429)
rather than piling up. Streaming hands each piece of text from the worker thread to the
request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import msgspec

from ragcache.agents.coordinator import AgentConfig, ProgramCoordinator
from ragcache.agents.profile import kv_bytes_per_token, measure_prefill_profile, stack_prefill_fn
from ragcache.bench.metrics import percentile
from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.runner import BlendEngine, Generation, RagRequest
from ragcache.kv import ChunkKey
from ragcache.storage.tiered import TieredStore


class QueueFullError(RuntimeError):
    """More requests are waiting than max_queue allows."""


class UnknownDocumentError(LookupError):
    """A document id the tenant never added (or deleted)."""


class _Cancelled(Exception):
    """Raised inside the engine's token callback when the client went away."""


@dataclass(frozen=True)
class StoredDocument:
    id: str
    text: str
    key: ChunkKey
    num_tokens: int


@dataclass
class RequestMetrics:
    """Rolling service figures for /admin/stats and /metrics."""

    requests: Counter
    errors: Counter
    ttft_s: deque
    blend_ratios: Counter

    @classmethod
    def empty(cls) -> "RequestMetrics":
        return cls(Counter(), Counter(), deque(maxlen=2048), Counter())


class Runtime:
    """coordinator: the agents layer (program-level scheduling, tool-aware pins); built here over
    the engine's store when that is a TieredStore, with the engine's prefill profile measured once."""

    def __init__(self, engine: BlendEngine, max_queue: int, model_name: str, semantic=None) -> None:
        self.engine = engine
        self.semantic = semantic  # ragcache.semantic.SemanticCache, or None: every request goes to the engine
        self.model_name = model_name
        self.max_queue = max_queue
        self.started_s = time.time()
        self._pending = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragcache-engine")
        self._documents: dict[str, dict[str, StoredDocument]] = defaultdict(dict)  # tenant -> id -> doc
        self._lock = threading.Lock()
        self.metrics: dict[str, RequestMetrics] = defaultdict(RequestMetrics.empty)  # per tenant
        self.coordinator = _coordinator(engine)
        self.kv_bytes_per_token = kv_bytes_per_token(engine.stack)

    @property
    def queue_depth(self) -> int:
        return self._pending

    def check_capacity(self) -> None:
        """Raise QueueFullError now if a new request would be refused (before a stream's 200 goes out)."""
        if self._pending >= self.max_queue:
            raise QueueFullError(f"{self._pending} requests are queued (max_queue={self.max_queue}); retry later")

    async def _run(self, work: Callable, tenant: str | None = None, program_id: str | None = None):
        """Run work on the engine's worker; generation (tenant given) first takes its turn in the program scheduler."""
        self.check_capacity()
        self._pending += 1
        try:
            if tenant is None or self.coordinator is None:
                return await asyncio.get_running_loop().run_in_executor(self._worker, work)
            async with self.coordinator.turn(tenant, program_id):
                return await asyncio.get_running_loop().run_in_executor(self._worker, work)
        finally:
            self._pending -= 1

    # generation

    async def generate(self, tenant: str, request: RagRequest, is_last_step: bool = False) -> Generation:
        try:
            result = await self._run(lambda: self.engine.generate(request), tenant, request.program_id)
        except Exception as exc:
            self.metrics[tenant].errors[type(exc).__name__] += 1
            raise
        self._finish(tenant, request, result, is_last_step)
        return result

    async def stream(self, tenant: str, request: RagRequest, is_last_step: bool = False) -> AsyncIterator[str | Generation]:
        """Yield text pieces as they are generated, then the finished Generation."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()

        def on_token(piece: str) -> None:
            if gone.is_set():
                raise _Cancelled
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        work = lambda: self.engine.generate(request, on_token=on_token)  # noqa: E731
        task = asyncio.ensure_future(self._run(work, tenant, request.program_id))
        task.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
        try:
            while (piece := await pieces.get()) is not None:
                yield piece
            result = task.result()
        except BaseException:
            gone.set()
            raise
        self._finish(tenant, request, result, is_last_step)
        yield result

    def program_event(self, tenant: str, program_id: str, kind: str, tool: str | None) -> None:
        """A client's tool_start / tool_end / end for a program; tool_start pins its KV for the tool's TTL."""
        if self.coordinator is None:
            raise InvalidRequestError("program events need a tiered KV store")
        try:
            self.coordinator.event(tenant, program_id, kind, tool)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        if kind == "end":
            record = self.engine.programs.forget(tenant, program_id)
            if record is not None:
                self.engine.store.delete(record.key)

    def _finish(self, tenant: str, request: RagRequest, result: Generation, is_last_step: bool) -> None:
        self._record(tenant, request, result)
        if self.coordinator is None or request.program_id is None or result.program_key is None:
            return
        record = self.engine.programs.latest(tenant, request.program_id)
        num_tokens = len(record.token_ids) if record is not None else 0
        self.coordinator.finish(tenant, request.program_id, result.program_key,
                                num_tokens * self.kv_bytes_per_token, num_tokens, is_last_step=is_last_step)

    def _record(self, tenant: str, request: RagRequest, result: Generation) -> None:
        metrics = self.metrics[tenant]
        metrics.requests[request.mode] += 1
        metrics.ttft_s.append(result.timings.ttft_s)
        if request.mode == "blend":
            ratio = self.engine.config.default_ratio if request.blend_ratio is None else request.blend_ratio
            metrics.blend_ratios[f"{ratio:g}"] += 1

    # documents

    async def add_documents(self, tenant: str, documents: list[tuple[str | None, str]], system_prompt: str | None):
        for index, (doc_id, _) in enumerate(documents):
            if doc_id is not None and (not doc_id.strip() or "/" in doc_id or len(doc_id) > 200):
                raise InvalidRequestError(f"documents[{index}].id must be 1-200 characters without '/'")
        texts = [text for _, text in documents]
        infos = await self._run(lambda: self.engine.add_documents(texts, system_prompt, namespace=tenant))
        stored = []
        with self._lock:
            for (doc_id, text), info in zip(documents, infos):
                doc_id = doc_id or hashlib.sha256(text.encode()).hexdigest()[:16]
                record = StoredDocument(doc_id, text, info.key, info.num_tokens)
                self._documents[tenant][doc_id] = record
                stored.append((record, info.cached))
        return stored

    def resolve_documents(self, tenant: str, ids: list[str]) -> list[str]:
        """Texts of the tenant's documents; another tenant's id is as unknown as a made-up one."""
        with self._lock:
            known = self._documents.get(tenant, {})
            missing = [doc_id for doc_id in ids if doc_id not in known]
            if missing:
                raise UnknownDocumentError(f"unknown document id(s): {missing}")
            return [known[doc_id].text for doc_id in ids]

    async def delete_document(self, tenant: str, doc_id: str) -> None:
        with self._lock:
            record = self._documents.get(tenant, {}).pop(doc_id, None)
        if record is None:
            raise UnknownDocumentError(f"unknown document id: {doc_id!r}")
        await self._run(lambda: self.engine.store.delete(record.key))

    # operations

    async def flush(self, tier: str | None, tenant: str | None) -> int:
        """Drop cached chunk KV: every tier or one, every tenant's documents or one's. Returns entries dropped."""
        store = self.engine.store

        def work() -> int:
            if tenant is None:
                return sum(_flush_tier(t) for t in store.tiers if tier in (None, t.name))
            with self._lock:
                records = list(self._documents.pop(tenant, {}).values())
            dropped = 0
            for record in records:
                dropped += sum(bool(t.delete(record.key)) for t in store.tiers if tier in (None, t.name))
            return dropped

        if tier is not None and tier not in [t.name for t in store.tiers]:
            raise InvalidRequestError(f"tier must be one of {[t.name for t in store.tiers]}, got {tier!r}")
        return await self._run(work)

    def stats(self) -> dict:
        store = self.engine.store.stats()
        return {
            "model": self.model_name,
            "uptime_s": time.time() - self.started_s,
            "queue": {"depth": self._pending, "max": self.max_queue},
            "tiers": msgspec.to_builtins(store["tiers"]),
            "store": msgspec.to_builtins(store["store"]) | {"active_pins": store["active_pins"]},
            "tenants": {tenant: self._tenant_stats(tenant, m) for tenant, m in self.metrics.items()},
            "semantic": _semantic_categories(self.semantic),
        }

    def program_stats(self) -> dict:
        programs = [{"tenant": ns, "program_id": pid, "tokens": len(record.token_ids)}
                    for ns, pid, record in self.engine.programs.programs()]
        agents = self.coordinator.stats() if self.coordinator is not None else {}
        return {"programs": programs, **agents}

    def _tenant_stats(self, tenant: str, metrics: RequestMetrics) -> dict:
        ttft = list(metrics.ttft_s)
        return {
            "requests": dict(metrics.requests),
            "errors": dict(metrics.errors),
            "documents": len(self._documents.get(tenant, {})),
            "blend_ratios": dict(metrics.blend_ratios),
            "ttft_s": {f"p{q}": percentile(ttft, q) for q in (50, 90, 99)} if ttft else {},
        }

    def close(self) -> None:
        """Let queued work finish, release pins, write hot local KV through to Redis (if configured), close the store."""
        self._worker.shutdown(wait=True)
        if self.coordinator is not None:
            self.coordinator.close()
        store = self.engine.store
        if getattr(store, "remote", None):
            store.write_back()
        if hasattr(store, "close"):
            store.close()


def _semantic_categories(semantic) -> list[dict]:
    if semantic is None:
        return []
    return msgspec.to_builtins(semantic.stats().categories)


def _coordinator(engine: BlendEngine) -> ProgramCoordinator | None:
    """The agents layer over a tiered store; the reload cost profile is measured on this engine now."""
    if not isinstance(engine.store, TieredStore) or not engine.store.local:
        return None
    profile = measure_prefill_profile(stack_prefill_fn(engine.stack), (64, 256, 1024), repeats=1)
    return ProgramCoordinator(engine.store, profile, AgentConfig())


def _flush_tier(tier) -> int:
    return sum(bool(tier.delete(key)) for key in tier.keys())
