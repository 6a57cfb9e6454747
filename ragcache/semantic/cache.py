"""SemanticCache: answer a request from an earlier one that asked the same thing in other words.

    lookup(query)            embed -> category -> nearest entries of (tenant, category)
                             -> exact scope (model, documents, system prompt) -> threshold in
                             force -> the category's verifiers in order (verify.py: guards,
                             learned thresholds, pair classifier) -> answer store
    store(query, answer)     the same key, written to the answer store and the index
    record_check / learn     labelled observations for the learned thresholds (learned.py)
    invalidate / invalidate_documents / report_false_hit / set_policy / update_load / stats

One index per (tenant, category) (a `Shard`): a lookup never sees another tenant's
entries. The shard keeps per entry what verification needs (vectors, text features,
scope, times, hits), never the answer itself, which lives in the AnswerStore and is
read only on a hit.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, replace

import numpy as np

from ragcache.semantic.adaptive import ThresholdController
from ragcache.semantic.answers import AnswerRecord, AnswerStore, AnswerStoreUnavailable, MemoryAnswerStore
from ragcache.semantic.classifier import CategoryClassifier
from ragcache.semantic.config import SemanticCacheConfig
from ragcache.semantic.conversation import ContextKey, context_key, context_text, is_self_contained
from ragcache.semantic.embedder import Embedder
from ragcache.semantic.index import make_index
from ragcache.semantic.learned import LearnedThresholds, Observation
from ragcache.semantic.policy import CategoryPolicy
from ragcache.semantic.shard import Entry, Shard
from ragcache.semantic.stats import CategoryStats, SemanticCacheStats, percentile_ms
from ragcache.semantic.text import TextFeatures, features, strip_pleasantries
from ragcache.semantic.types import GuardRejection, LookupOutcome, SemanticHit, SemanticQuery
from ragcache.semantic.verify import Candidate, Verifier, make_verifier

_PREPARED_MEMO = 256  # queries whose embeddings are kept between lookup and store
_LATENCY_SAMPLES = 2048


@dataclass(frozen=True)
class _Prepared:
    """A query embedded and analysed once, for its lookup and its store."""

    category: str
    text: str  # the last message without greetings and thanks
    features: TextFeatures
    text_vector: np.ndarray
    context: ContextKey | None
    key_vector: np.ndarray  # what the index is searched with


class SemanticCache:
    """Thread-safe. embedder: any Embedder (the packaged MiniLM when None, loaded here);
    answers: where answers live (process memory when None). Entries already in the answer
    store are indexed at construction, so a restart over Redis loses nothing unexpired."""

    def __init__(
        self,
        embedder: Embedder | None = None,
        answers: AnswerStore | None = None,
        config: SemanticCacheConfig = SemanticCacheConfig(),
        clock=time.time,
    ) -> None:
        if embedder is None:
            from ragcache.semantic.embedder import SentenceTransformerEmbedder

            embedder = SentenceTransformerEmbedder()
        self.config = config
        self.embedder = embedder
        self.answers = answers or MemoryAnswerStore(clock)
        self._clock = clock
        self._policies = dict(config.policies)
        self._classifier = CategoryClassifier(embedder, config.classifier)
        self._control = ThresholdController(config.load)
        self._learned = LearnedThresholds(config.learned, clock)
        self._verifier_pool: dict[str, Verifier] = {}
        self._shards: dict[tuple[str, str], Shard] = {}
        self._expiries: list[tuple[float, str, str, str]] = []  # heap of (expires_s, tenant, category, entry id)
        self._bypasses: Counter[tuple[str, str]] = Counter()
        self._labels = itertools.count()
        self._prepared: OrderedDict[SemanticQuery, _Prepared] = OrderedDict()
        self._lookup_s: deque[float] = deque(maxlen=_LATENCY_SAMPLES)
        self._embed_s: deque[float] = deque(maxlen=_LATENCY_SAMPLES)
        self._lock = threading.Lock()
        for category in config.policies:
            self._verifiers(category)  # an unknown or unavailable verifier fails here, not at the first lookup
        self.rebuilt = self.rebuild()

    # the request path

    def lookup(self, query: SemanticQuery) -> SemanticHit | None:
        """The cached answer for query, or None (a miss, a bypass, or a disabled category)."""
        return self.lookup_outcome(query).hit

    def lookup_outcome(self, query: SemanticQuery) -> LookupOutcome:
        """lookup() with what it did: the category used, a bypass reason, the guards' rejections."""
        if query.bypass_reason is not None:
            return self._bypass(query, query.category or "-", query.bypass_reason)
        prepared = self._prepare(query)
        if not self._policy(prepared.category).enabled:
            return self._bypass(query, prepared.category, "category_off")
        start = time.perf_counter()
        now = self._clock()
        self._sweep(now)
        shard = self._shard(query.tenant, prepared.category)
        hit, rejections = self._find(shard, query, prepared, now)
        with shard.lock:
            shard.counts["lookups"] += 1
            shard.counts["hits" if hit else "misses"] += 1
            shard.counts.update(f"rejected:{r.reason}" for r in rejections)
        self._lookup_s.append(time.perf_counter() - start)
        return LookupOutcome(hit, prepared.category, None, tuple(rejections))

    def store(self, query: SemanticQuery, answer: str) -> bool:
        """Cache answer for query; False when bypassed, disabled or not written."""
        if query.bypass_reason is not None or not answer:
            return False
        prepared = self._prepare(query)
        policy = self._policy(prepared.category)
        if not policy.enabled:
            return False
        now = self._clock()
        record = AnswerRecord(
            entry_id=self._entry_id(query, prepared),
            tenant=query.tenant,
            category=prepared.category,
            text=query.text,
            history=query.history if prepared.context is not None else (),
            answer=answer,
            model=query.model,
            documents_hash=query.documents_hash,
            document_digests=query.document_digests,
            system_hash=_digest(query.system),
            created_s=now,
            expires_s=now + policy.max_ttl_s,
            embedder=self.embedder.name,
            text_vector=prepared.text_vector,
            context_vector=None if prepared.context is None else prepared.context.vector,
        )
        if not self.answers.put(record):
            return False
        self._index(record, prepared)
        return True

    # administration

    def invalidate(self, tenant: str, category: str | None = None, entry_id: str | None = None) -> int:
        """Remove a tenant's entries: all, one category's, or one entry; how many were removed."""
        removed: list[str] = []
        for (_owner, name), shard in self._tenant_shards(tenant):
            if category is not None and name != category:
                continue
            with shard.lock:
                ids = [entry_id] if entry_id is not None else list(shard.entries)
                removed += [i for i in ids if shard.remove(i) is not None]
        self.answers.delete(tenant, removed)
        self._learned.forget_entries(tenant, removed)
        return len(removed)

    def invalidate_documents(self, tenant: str, digests) -> int:
        """Remove a tenant's entries whose answers used any of these documents (their
        types.document_digest: the document was deleted or re-registered with other text);
        how many were removed. Entries stored without document_digests are never matched."""
        wanted = frozenset(digests)
        removed: list[str] = []
        for _, shard in self._tenant_shards(tenant):
            with shard.lock:
                ids = [e.entry_id for e in shard.entries.values() if wanted.intersection(e.document_digests)]
                removed += [i for i in ids if shard.remove(i) is not None]
                shard.counts["invalidated_by_document"] += len(ids)
        self.answers.delete(tenant, removed)
        self._learned.forget_entries(tenant, removed)
        return len(removed)

    def record_check(
        self, tenant: str, entry_id: str, similarity: float, correct: bool, category: str | None = None
    ) -> bool:
        """A labelled observation for the learned thresholds: a fresh engine answer compared
        with this entry's cached one (agreement.answers_agree) for a request at `similarity`
        (SemanticHit.similarity, or a rejection's). The entry stays either way; a wrong one
        is not served again at that similarity or below. False if the entry is unknown."""
        for (_, name), shard in self._tenant_shards(tenant):
            if category is not None and name != category:
                continue
            with shard.lock:
                if entry_id not in shard.entries:
                    continue
                shard.counts["checks"] += 1
                shard.counts["checks_wrong"] += not correct
            self._learned.observe(Observation(tenant, name, entry_id, float(similarity), bool(correct)))
            return True
        return False

    def learn(self, observations) -> int:
        """Labelled observations offline (learned.Observation: e.g. a tuning set's pairs with
        the similarities the cache saw); how many were taken. They count as record_check's do."""
        return self._learned.learn(observations)

    def report_false_hit(self, tenant: str, entry_id: str) -> bool:
        """A client says this entry was served wrongly: remove it, count it, and raise the
        tenant's threshold for its category a step (adaptive.py); the learned thresholds
        take it as a wrong observation at the similarity it was last served at. False if unknown."""
        for (_, category), shard in self._tenant_shards(tenant):
            with shard.lock:
                entry = shard.remove(entry_id)
                if entry is None:
                    continue
                shard.counts["false_hits"] += 1
            self.answers.delete(tenant, [entry_id])
            self._learned.forget_entries(tenant, [entry_id])
            if entry.last_similarity is not None:  # a labelled 'wrong' at the similarity it was served at
                self._learned.observe(Observation(tenant, category, None, entry.last_similarity, False), "feedback")
            self._control.report_false_hit(tenant, category, self._policies[category])
            return True
        return False

    def set_policy(self, category: str, policy: CategoryPolicy) -> None:
        """Replace (or add) a category's policy at run time; it applies to the next request,
        existing entries included (TTL and threshold are checked at lookup)."""
        if not isinstance(policy, CategoryPolicy):
            raise TypeError("policy must be a CategoryPolicy")
        with self._lock:
            self._policies[category] = policy
        self._control.reset(category)

    def policies(self) -> dict[str, CategoryPolicy]:
        with self._lock:
            return dict(self._policies)

    def update_load(self, queue_depth: float, ttft_s: float | None = None) -> float:
        """A load sample from the model runner; returns the pressure now applied (0..1)."""
        return self._control.update_load(queue_depth, ttft_s)

    def stats(self) -> SemanticCacheStats:
        rows = []
        with self._lock:
            shards = sorted(self._shards.items())
            bypasses = sorted(self._bypasses.items())
        for (tenant, category), shard in shards:
            policy = self._policy(category)
            with shard.lock:
                counts = Counter(shard.counts)
                entries = len(shard.entries)
            names = tuple(v.name for v in self._verifiers(category))
            learned = (
                self._learned.stats(tenant, category, policy.delta, self._floor(policy)) if "learned" in names else None
            )
            threshold = self._control.threshold(tenant, category, policy)
            if learned is not None and learned.threshold is not None:
                threshold = learned.threshold
            rows.append(
                CategoryStats.of(
                    tenant, category, entries, counts, policy, threshold, self._control.ttl_s(policy), names, learned
                )
            )
        return SemanticCacheStats(
            categories=tuple(rows),
            bypasses={f"{tenant}:{reason}": n for (tenant, reason), n in bypasses},
            thresholds={name: self._control.threshold("", name, p) for name, p in sorted(self.policies().items())},
            ttls_s={name: self._control.ttl_s(p) for name, p in sorted(self.policies().items())},
            load=self._control.state(),
            lookup_p50_ms=percentile_ms(self._lookup_s, 0.5),
            lookup_p99_ms=percentile_ms(self._lookup_s, 0.99),
            embed_p50_ms=percentile_ms(self._embed_s, 0.5),
            index=self.config.index.kind,
            embedder=self.embedder.name,
            answers=self.answers.stats(),
        )

    def rebuild(self) -> int:
        """Index every unexpired record in the answer store (done at construction); how many."""
        return sum(self.index_record(record) for record in self.answers.records(self._clock()))

    def index_record(self, record: AnswerRecord) -> bool:
        """Index a record already in the answer store (at a rebuild, or one another replica stored);
        False for a category this cache does not have or an expired record."""
        if record.category not in self._policies or record.expires_s <= self._clock():
            return False
        if record.embedder != self.embedder.name:
            record = self._reembedded(record)
        query = SemanticQuery(
            record.tenant,
            record.text,
            record.history,
            model=record.model,
            documents_hash=record.documents_hash,
            category=record.category,
            document_digests=record.document_digests,
        )
        self._index(record, self._analyse(query, record.category, record.text_vector, record.context_vector))
        return True

    def drop_entries(self, tenant: str, entry_ids) -> int:
        """Take entries out of the index only (another replica removed them from the shared store)."""
        wanted, dropped = set(entry_ids), 0
        for _, shard in self._tenant_shards(tenant):
            with shard.lock:
                dropped += sum(shard.remove(i) is not None for i in wanted if i in shard.entries)
        self._learned.forget_entries(tenant, list(wanted))
        return dropped

    # internals: preparing a query

    def _prepare(self, query: SemanticQuery) -> _Prepared:
        with self._lock:
            prepared = self._prepared.get(query)
            if prepared is not None:
                self._prepared.move_to_end(query)
                return prepared
        text = strip_pleasantries(query.text) or query.text
        dependent = bool(query.history) and not is_self_contained(query.text)
        texts = [text] + ([context_text(query.history, self.config.guards.context_turns)] if dependent else [])
        start = time.perf_counter()
        vectors = self.embedder.embed(texts)
        self._embed_s.append(time.perf_counter() - start)
        if query.category is not None:
            if query.category not in self._policies:
                raise ValueError(f"unknown category {query.category!r}; known: {', '.join(sorted(self._policies))}")
            category = query.category
        else:
            category = self._classifier.classify(text, vectors[0], not dependent).category
        prepared = self._analyse(query, category, vectors[0], vectors[1] if dependent else None)
        with self._lock:
            self._prepared[query] = prepared
            if len(self._prepared) > _PREPARED_MEMO:
                self._prepared.popitem(last=False)
        return prepared

    def _analyse(self, query: SemanticQuery, category: str, text_vector, context_vector) -> _Prepared:
        context = None if context_vector is None else context_key(query.history, context_vector)
        key = text_vector if context is None else _unit(text_vector + context.vector)
        text = strip_pleasantries(query.text) or query.text
        return _Prepared(category, text, features(query.text), text_vector, context, key)

    # internals: finding and indexing

    def _find(self, shard: Shard, query: SemanticQuery, prepared: _Prepared, now: float):
        policy = self._policy(prepared.category)
        verifiers = self._verifiers(prepared.category)
        threshold = self._control.threshold(query.tenant, prepared.category, policy)
        if any(v.name == "learned" for v in verifiers):  # the learned verifier decides from the floor up
            threshold = min(threshold, self._floor(policy))
        ttl_s = self._control.ttl_s(policy)
        rejections: list[GuardRejection] = []
        with shard.lock:
            candidates = shard.nearest(prepared.key_vector, self.config.candidates)
        for entry in candidates:
            if now >= entry.expires_s or now - entry.created_s >= ttl_s:
                continue
            if (entry.model, entry.documents_hash, entry.system_hash) != (
                query.model,
                query.documents_hash,
                _digest(query.system),
            ):
                continue
            similarity = float(prepared.text_vector @ entry.text_vector)
            if similarity < threshold:
                continue
            candidate = self._candidate(query.tenant, prepared, entry, similarity)
            reason = next((r for r in (v.reject_reason(candidate) for v in verifiers) if r is not None), None)
            if reason is not None:
                rejections.append(GuardRejection(entry.entry_id, reason, similarity))
                continue
            try:
                answer = self.answers.answer(query.tenant, entry.entry_id)
            except AnswerStoreUnavailable:
                with shard.lock:
                    shard.counts["store_unavailable"] += 1
                return None, rejections
            if answer is None:  # expired or deleted behind our back (another replica, Redis eviction)
                with shard.lock:
                    shard.remove(entry.entry_id)
                continue
            with shard.lock:
                entry.hits += 1
                entry.last_similarity = similarity
            return SemanticHit(
                answer,
                similarity,
                entry.entry_id,
                prepared.category,
                now - entry.created_s,
                candidate.context_similarity,
            ), rejections
        return None, rejections

    def _candidate(self, tenant: str, prepared: _Prepared, entry: Entry, similarity: float) -> Candidate:
        return Candidate(
            tenant,
            prepared.category,
            entry.entry_id,
            prepared.text,
            entry.message,
            prepared.features,
            entry.text,
            prepared.text_vector,
            entry.text_vector,
            similarity,
            prepared.context,
            entry.context,
            float(prepared.context.vector @ entry.context.vector)
            if prepared.context is not None and entry.context is not None
            else None,
        )

    def _verifiers(self, category: str) -> tuple[Verifier, ...]:
        """The category's verifiers in order, built once per name and shared by categories."""
        names = self.config.verifiers.get(category, self.config.default_verifiers)
        chain = []
        for name in names:
            if name == "guards" and not self.config.guards.enabled:
                continue
            with self._lock:
                verifier = self._verifier_pool.get(name)
            if verifier is None:
                verifier = make_verifier(
                    name, embedder=self.embedder, guards=self.config.guards, threshold_of=self._learned_threshold
                )
                with self._lock:
                    verifier = self._verifier_pool.setdefault(name, verifier)
            chain.append(verifier)
        return tuple(chain)

    def _learned_threshold(self, candidate: Candidate) -> float:
        policy = self._policy(candidate.category)
        cold = self._control.threshold(candidate.tenant, candidate.category, policy)
        return self._learned.in_force(
            candidate.tenant, candidate.category, candidate.entry_id, policy.delta, self._floor(policy), cold
        )

    def _floor(self, policy: CategoryPolicy) -> float:
        assert policy.min_threshold is not None  # CategoryPolicy.__post_init__ fills every None bound
        return self.config.learned.floor if self.config.learned.floor is not None else policy.min_threshold

    def _index(self, record: AnswerRecord, prepared: _Prepared) -> None:
        entry = Entry(
            record.entry_id,
            next(self._labels),
            record.created_s,
            record.expires_s,
            record.hits,
            record.model,
            record.documents_hash,
            record.system_hash,
            prepared.features,
            prepared.text_vector,
            prepared.context,
            prepared.text,
            record.document_digests,
        )
        shard = self._shard(record.tenant, record.category)
        policy = self._policy(record.category)
        with shard.lock:
            shard.insert(entry, prepared.key_vector)
            shard.counts["stores"] += 1
            victims = shard.evict_over(policy.max_entries, self._clock(), self._control.ttl_s(policy))
        with self._lock:
            heapq.heappush(self._expiries, (record.expires_s, record.tenant, record.category, record.entry_id))
        if victims:
            self.answers.delete(record.tenant, victims)

    def _sweep(self, now: float) -> None:
        """Drop entries past their hard expiry (the TTL in force is checked at lookup)."""
        expired: list[tuple[float, str, str, str]] = []
        with self._lock:
            while self._expiries and self._expiries[0][0] <= now:
                expired.append(heapq.heappop(self._expiries))
        for expires_s, tenant, category, entry_id in expired:
            shard = self._shards.get((tenant, category))
            if shard is None:
                continue
            with shard.lock:
                entry = shard.entries.get(entry_id)
                if entry is not None and entry.expires_s == expires_s:
                    shard.remove(entry_id)
                    shard.counts["expired"] += 1
            self.answers.delete(tenant, [entry_id])

    # small helpers

    def _shard(self, tenant: str, category: str) -> Shard:
        with self._lock:
            shard = self._shards.get((tenant, category))
            if shard is None:
                shard = self._shards[(tenant, category)] = Shard(
                    lambda: make_index(self.embedder.dim, self.config.index)
                )
            return shard

    def _tenant_shards(self, tenant: str) -> list[tuple[tuple[str, str], Shard]]:
        with self._lock:
            return [(key, shard) for key, shard in self._shards.items() if key[0] == tenant]

    def _policy(self, category: str) -> CategoryPolicy:
        with self._lock:
            return self._policies[category]

    def _bypass(self, query: SemanticQuery, category: str, reason: str) -> LookupOutcome:
        with self._lock:
            self._bypasses[(query.tenant, reason)] += 1
        return LookupOutcome(None, category, reason)

    def _entry_id(self, query: SemanticQuery, prepared: _Prepared) -> str:
        """Equal keys give equal ids, so storing the same request again replaces its entry."""
        history = context_text(query.history, self.config.guards.context_turns) if prepared.context else ""
        parts = (
            query.tenant,
            prepared.category,
            prepared.text.lower(),
            history,
            query.model,
            query.documents_hash,
            query.system,
        )
        return _digest("\x00".join(parts))[:24]

    def _reembedded(self, record: AnswerRecord) -> AnswerRecord:
        texts = [strip_pleasantries(record.text) or record.text]
        if record.context_vector is not None:
            texts.append(context_text(record.history, self.config.guards.context_turns))
        vectors = self.embedder.embed(texts)
        return replace(
            record,
            embedder=self.embedder.name,
            text_vector=vectors[0],
            context_vector=vectors[1] if len(texts) > 1 else None,
        )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32] if text else ""


def _unit(vector: np.ndarray) -> np.ndarray:
    return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)
