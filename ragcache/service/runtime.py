"""The one object the HTTP layer calls: the whole request path, documents, tenants, stats.

    answer(tenant, request)   semantic lookup -> (hit: the cached answer)
                              -> engine.submit (batched with every other request)
                              -> text pieces as they are generated -> the Generation
                              -> the answer stored in the semantic cache, the agent's turn finished

Handlers only translate wire formats around it, streamed or not. Engine work runs on the
engine's own thread; tokenising, store lookups and embeddings run in worker threads, so
the event loop never blocks on them. Past max_queue requests waiting for admission, a
new request is refused at once (QueueFullError -> 429) rather than piling up.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace

import msgspec

from ragcache.agents.coordinator import ProgramCoordinator
from ragcache.bench.metrics import percentile
from ragcache.checks.blend_budget import BlendBudget, is_steerable
from ragcache.checks.shadow import ShadowChecks
from ragcache.engine.base import Engine
from ragcache.engine.chat import ChatTurn
from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.request import Generation, RagRequest
from ragcache.registry import MemoryRegistry
from ragcache.registry.documents import DocumentRegistry, StoredDocument

DEFAULT_CATEGORY = "default"  # a request's category for the blend budget when the semantic cache names none


class QueueFullError(RuntimeError):
    """More requests are waiting than max_queue allows."""


class UnknownDocumentError(LookupError):
    """A document id the tenant never added (or deleted)."""


@dataclass(frozen=True)
class SemanticQueryIn:
    """What the semantic cache needs to know of a request besides the engine's RagRequest."""

    messages: list[dict]  # the conversation as the cache keys it
    category: str | None = None
    use_cache: bool = True
    cache_sampled: bool = False


@dataclass(frozen=True)
class CachedAnswer:
    """An answer served from the semantic cache (the engine never ran)."""

    text: str
    similarity: float
    entry_id: str
    elapsed_s: float


@dataclass(frozen=True)
class Accepted:
    """The engine took the request (it passed every check): a stream's 200 can go out now."""


@dataclass
class RequestMetrics:
    """Rolling service figures for /admin/stats and /metrics."""

    requests: Counter
    errors: Counter
    ttft_s: deque
    blend_ratios: Counter

    @classmethod
    def empty(cls) -> RequestMetrics:
        return cls(Counter(), Counter(), deque(maxlen=2048), Counter())


class _QueueSink:
    """Hands a sequence's output from engine threads to the request's asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def on_text(self, piece: str) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, piece)

    def on_finish(self, result: Generation) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, result)

    def on_error(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, error)


class Runtime:
    """engine: any Engine (started here); semantic: the SemanticCache or None; coordinator: the agents
    layer (program-level admission order, tool-aware pins) or None, built by the caller over the
    engine's store; budget: the blend error budget that picks each steerable request's setting, or
    None (the engine's defaults); shadow: the shadow checks feeding it and the semantic cache, or None;
    conversations: treat chats that name no program (with tools or history) as programs found by their
    prompt's prefix (storage/labels.py), so plain OpenAI agent loops get pins as well as reuse;
    documents: where registered documents live (registry/; process memory when None)."""

    def __init__(
        self,
        engine: Engine,
        max_queue: int,
        semantic=None,
        coordinator: ProgramCoordinator | None = None,
        budget: BlendBudget | None = None,
        shadow: ShadowChecks | None = None,
        conversations: bool = True,
        documents: DocumentRegistry | None = None,
    ) -> None:
        self.engine = engine
        self.conversations = conversations
        self.semantic = semantic
        self.coordinator = coordinator
        self.budget = budget
        self.shadow = shadow
        self.model_name = engine.model_name
        self.max_queue = max_queue
        self.started_s = time.time()
        self._in_flight = 0
        self.documents = documents or DocumentRegistry(MemoryRegistry())
        self._closed = False
        self.metrics: dict[str, RequestMetrics] = defaultdict(RequestMetrics.empty)  # per tenant

    def start(self) -> None:
        """Start the engine's step loop on its own thread, unless a caller drives it (engine.run_loop)."""
        self.engine.start()

    @property
    def queue_depth(self) -> int:
        """Requests in flight: being looked up, waiting for admission or running."""
        return self._in_flight

    def check_capacity(self) -> None:
        """Raise QueueFullError now if a new request would be refused (before a stream's 200 goes out)."""
        waiting = self._in_flight - self.engine.stats()["running"]
        if waiting >= self.max_queue:
            raise QueueFullError(f"{waiting} requests are waiting (max_queue={self.max_queue}); retry later")

    # the request path

    async def answer(
        self,
        tenant: str,
        request: RagRequest,
        query: SemanticQueryIn | None = None,
        is_last_step: bool = False,
        conversation: bool = True,
    ) -> AsyncGenerator[Accepted | str | Generation | CachedAnswer, None]:
        """Accepted, text pieces as they are generated, then the Generation; or one CachedAnswer from the
        semantic cache. Bad input and a full queue raise before Accepted.

        query None: the semantic cache is not consulted (an agent's turn always is not: its answer
        depends on tool results the cache cannot see). conversation False: the request is not kept as
        an implicit program (one of n choices)."""
        started = time.perf_counter()
        semantic_query = self._semantic_query(tenant, request, query)
        outcome = await self._lookup(semantic_query)
        category = _category(outcome, query)
        setting = None
        if self.budget is not None and is_steerable(request):
            setting = self.budget.setting_for(tenant, category)
            request = setting.apply(request)
        if outcome is not None and outcome.hit is not None:
            hit = outcome.hit
            if self.shadow is not None and self.shadow.sample_semantic():
                self.shadow.check_semantic(tenant, request, hit.answer, hit.entry_id, hit.similarity)
            yield CachedAnswer(hit.answer, hit.similarity, hit.entry_id, time.perf_counter() - started)
            return
        if conversation:
            request = await self._conversation(request)
        checked = setting is not None and self.shadow is not None and self.shadow.sample_blend()
        served = None
        try:
            async for item in self._generate(tenant, request, is_last_step, return_logprobs=checked):
                if isinstance(item, Generation):
                    served = item
                    await self._remember(semantic_query, item)
                    self._label_rejected(tenant, outcome, item)
                yield item
        finally:
            if checked:
                assert self.shadow is not None and setting is not None  # checked says both are there
                if served is not None:
                    self.shadow.check_blend(tenant, category, setting.name, request, served)
                else:
                    self.shadow.abandon()

    async def _generate(
        self, tenant: str, request: RagRequest, is_last_step: bool, return_logprobs: bool = False
    ) -> AsyncIterator[Accepted | str | Generation]:
        try:
            self.check_capacity()
        except QueueFullError:
            self.metrics[tenant].errors[QueueFullError.__name__] += 1
            raise
        self._in_flight += 1
        sink = _QueueSink(asyncio.get_running_loop())
        ticket = self.coordinator.arrive(tenant, request.program_id) if self.coordinator is not None else None
        seq = None
        try:
            try:
                seq = await asyncio.to_thread(
                    self.engine.submit, request, sink, ticket=ticket, return_logprobs=return_logprobs
                )
            except BaseException:
                if ticket is not None:
                    assert self.coordinator is not None  # only a coordinator hands out tickets
                    self.coordinator.abandon(ticket)
                raise
            yield Accepted()
            while not isinstance(item := await sink.queue.get(), Generation):
                if isinstance(item, BaseException):
                    raise item
                yield item
        except BaseException as exc:
            if not isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
                self.metrics[tenant].errors[type(exc).__name__] += 1
            raise
        finally:
            self._in_flight -= 1
            if seq is not None:
                seq.cancel()  # a no-op once finished; frees the slot of a client that went away
        self._finish(tenant, ticket, item, is_last_step)
        yield item

    async def _conversation(self, request: RagRequest) -> RagRequest:
        """A chat with tools or history that names no program continues the stored conversation its
        prompt extends (found by token prefix), or starts one; either way its KV is kept (and pinned
        while a tool it calls runs) as a program's."""
        if not self.conversations or request.program_id is not None or not (request.tools or request.history):
            return request
        program_id = await asyncio.to_thread(self.engine.conversation_of, request)
        return replace(request, program_id=program_id or f"conv-{uuid.uuid4().hex[:20]}", implicit_program=True)

    def _semantic_query(self, tenant: str, request: RagRequest, query: SemanticQueryIn | None):
        if self.semantic is None or query is None or request.program_id is not None or _agentic(request):
            return None
        from ragcache.semantic import SemanticQuery, documents_hash
        from ragcache.semantic.types import document_digest

        try:
            return SemanticQuery.from_messages(
                tenant,
                query.messages,
                model=self.model_name,
                documents_hash=documents_hash(request.documents),
                document_digests=tuple(document_digest(text) for text in request.documents),
                category=query.category,
                temperature=request.sampling.temperature,
                use_cache=query.use_cache,
                cache_sampled=query.cache_sampled,
            )
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None

    async def _lookup(self, query):
        if query is None:
            return None
        try:
            return await asyncio.to_thread(self.semantic.lookup_outcome, query)
        except ValueError as exc:  # e.g. an unknown category
            raise InvalidRequestError(str(exc)) from None

    async def _remember(self, query, result: Generation) -> None:
        """Store a finished answer (not one cut by max_tokens) and tell the cache how loaded the engine is."""
        if query is None:
            return
        if result.finish_reason == "stop" and result.text.strip():
            await asyncio.to_thread(self.semantic.store, query, result.text)
        self.semantic.update_load(self.queue_depth, result.timings.ttft_s)

    def _label_rejected(self, tenant: str, outcome, result: Generation) -> None:
        """The best candidate the learned threshold turned away gets a label from the answer just made."""
        rejected = [r for r in (outcome.rejections if outcome is not None else ()) if r.reason == "threshold"]
        if rejected and result.finish_reason == "stop" and self.shadow is not None and self.shadow.sample_semantic():
            best = max(rejected, key=lambda r: r.similarity)
            self.shadow.check_rejected(tenant, best.entry_id, best.similarity, result.text)

    def _finish(self, tenant: str, ticket, result: Generation, is_last_step: bool) -> None:
        metrics = self.metrics[tenant]
        metrics.requests[result.mode] += 1
        metrics.ttft_s.append(result.timings.ttft_s)
        if result.mode == "blend":
            metrics.blend_ratios[f"{result.blend_ratio:g}"] += 1
        if self.coordinator is not None and ticket is not None:
            nbytes = result.program_tokens * self.engine.kv_bytes_per_token
            tool = result.tool_calls[0].name if result.finish_reason == "tool_calls" else None
            self.coordinator.finish(
                ticket, result.prefix_path, nbytes, result.program_tokens, tool=tool, is_last_step=is_last_step
            )

    def program_event(self, tenant: str, program_id: str, kind: str, tool: str | None) -> None:
        """A client's tool_start / tool_end / end for a program; tool_start pins its KV for the tool's TTL."""
        if self.coordinator is None:
            raise InvalidRequestError("program events need a tiered KV store with a local tier")
        try:
            self.coordinator.event(tenant, program_id, kind, tool)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        if kind == "end":
            self.engine.forget_program(tenant, program_id)
        elif kind == "tool_end":  # the next turn comes now: its KV to where it will run, meanwhile
            threading.Thread(
                target=self.engine.prefetch_program, args=(tenant, program_id), name="ragcache-prefetch", daemon=True
            ).start()

    # documents

    async def add_documents(self, tenant: str, documents: list[tuple[str | None, str]], system_prompt: str | None):
        for index, (doc_id, _) in enumerate(documents):
            if doc_id is not None and (not doc_id.strip() or "/" in doc_id or len(doc_id) > 200):
                raise InvalidRequestError(f"documents[{index}].id must be 1-200 characters without '/'")
        texts = [text for _, text in documents]
        infos = await asyncio.to_thread(self.engine.add_documents, texts, system_prompt, tenant)
        records = [
            StoredDocument(doc_id or hashlib.sha256(text.encode()).hexdigest()[:16], text, info.key, info.num_tokens)
            for (doc_id, text), info in zip(documents, infos)
        ]
        previous = await asyncio.to_thread(lambda: [self.documents.put(tenant, record) for record in records])
        replaced = [old for old, record in zip(previous, records) if old is not None and old.text != record.text]
        await self._invalidate(tenant, replaced)
        return [(record, info.cached) for record, info in zip(records, infos)]

    async def resolve_documents(self, tenant: str, ids: list[str]) -> list[str]:
        """Texts of the tenant's documents; another tenant's id is as unknown as a made-up one."""
        found = await asyncio.to_thread(self.documents.get_many, tenant, ids)
        missing = [doc_id for doc_id, record in zip(ids, found) if record is None]
        if missing:
            raise UnknownDocumentError(f"unknown document id(s): {missing}")
        return [record.text for record in found if record is not None]  # none is: missing is empty

    async def delete_document(self, tenant: str, doc_id: str) -> None:
        record = await asyncio.to_thread(self.documents.delete, tenant, doc_id)
        if record is None:
            raise UnknownDocumentError(f"unknown document id: {doc_id!r}")
        await self._invalidate(tenant, [record])

    async def _invalidate(self, tenant: str, gone: list[StoredDocument]) -> None:
        """Documents deleted or re-registered with other text: drop their chunk KV and every semantic
        answer built on them, unless the same text is still registered under another id."""
        if not gone:
            return
        live = {record.text for record in await asyncio.to_thread(self.documents.all, tenant)}
        gone = [record for record in gone if record.text not in live]
        for record in gone:
            await asyncio.to_thread(self.engine.store.delete, record.key)
        if self.semantic is not None and gone:
            from ragcache.semantic.types import document_digest

            digests = [document_digest(record.text) for record in gone]
            await asyncio.to_thread(self.semantic.invalidate_documents, tenant, digests)

    # operations

    async def flush(self, tier: str | None, tenant: str | None) -> int:
        """Drop cached KV: every tier or one; everything, or one tenant's documents and prefix-cache blocks.
        Returns entries dropped. The documents stay registered (their KV is computed again on next use)."""
        if tier is not None and tier not in self.engine.store.tier_names:
            raise InvalidRequestError(f"tier must be one of {self.engine.store.tier_names}, got {tier!r}")
        keys = None
        if tenant is not None:
            keys = [record.key for record in await asyncio.to_thread(self.documents.all, tenant)]
            keys += self.engine.tenant_blocks(tenant)
        return await asyncio.to_thread(self.engine.store.flush, tier, keys)

    def stats(self) -> dict:
        store = self.engine.store.stats()
        engine = self.engine.stats()
        return {
            "model": self.model_name,
            "uptime_s": time.time() - self.started_s,
            "queue": {"depth": self._in_flight, "waiting": engine["waiting"], "max": self.max_queue},
            "engine": engine,
            "tiers": msgspec.to_builtins(store["tiers"]),
            "store": msgspec.to_builtins(store["store"]) | {"active_pins": store["active_pins"]},
            "registry": self.documents.registry.stats()._asdict()
            | {"documents_served_in_outage": self.documents.served_from_last_seen},
            "tenants": {tenant: self._tenant_stats(tenant, m) for tenant, m in self.metrics.items()},
            "semantic": _semantic_categories(self.semantic),
            "prefix_cache": self.engine.prefix_stats(),
            "blend_budget": self.budget.state() if self.budget is not None else [],
            "shadow": self.shadow.stats() if self.shadow is not None else None,
        }

    def program_stats(self) -> dict:
        programs = [
            {"tenant": ns, "program_id": pid, "tokens": tokens} for ns, pid, tokens in self.engine.program_records()
        ]
        agents = self.coordinator.stats() if self.coordinator is not None else {}
        return {"programs": programs, **agents}

    def _tenant_stats(self, tenant: str, metrics: RequestMetrics) -> dict:
        ttft = list(metrics.ttft_s)
        return {
            "requests": dict(metrics.requests),
            "errors": dict(metrics.errors),
            "documents": self.documents.count(tenant),
            "blend_ratios": dict(metrics.blend_ratios),
            "ttft_s": {f"p{q}": percentile(ttft, q) for q in (50, 90, 99)} if ttft else {},
        }

    def close(self) -> None:
        """Let queued work finish, release pins, write hot local KV through to Redis (if configured), close."""
        if self._closed:
            return
        self._closed = True
        if self.coordinator is not None:
            self.coordinator.close()
        if self.shadow is not None:
            self.shadow.close()
        self.engine.close()
        if self.semantic is not None:
            self.semantic.answers.close()
        self.documents.registry.close()


def _agentic(request: RagRequest) -> bool:
    """Tools, tool results or a constrained output: answers the semantic cache must not serve or keep."""
    return bool(
        request.tools
        or request.constraint is not None
        or any(isinstance(turn, ChatTurn) and turn.about_tools for turn in request.history)
    )


def _category(outcome, query: SemanticQueryIn | None) -> str:
    """The request's category: the semantic cache's (classified or the client's), else the client's, else default."""
    if outcome is not None and outcome.category not in ("", "-"):
        return outcome.category
    return (query.category if query is not None else None) or DEFAULT_CATEGORY


def _semantic_categories(semantic) -> list[dict]:
    if semantic is None:
        return []
    return msgspec.to_builtins(semantic.stats().categories)
