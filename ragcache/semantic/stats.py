"""stats() snapshots of the semantic cache: plain values for the admin endpoint and metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ragcache.semantic.adaptive import LoadState
from ragcache.semantic.answers import AnswerStoreStats
from ragcache.semantic.learned import LearnedStats
from ragcache.semantic.policy import CategoryPolicy


@dataclass(frozen=True)
class CategoryStats:
    """One (tenant, category) since start-up. rejections: candidates above the threshold that
    a verifier turned down, by reason (guards.REASONS, "threshold" for the learned one, the
    pair verifier's own); verifiers: the names run, in order; checks / checks_wrong: shadow
    checks recorded (record_check) and how many found the cached answer wrong; learned: the
    learned thresholds' estimate when "learned" is among the verifiers, else None."""

    tenant: str
    category: str
    entries: int
    lookups: int
    hits: int
    hit_rate: float | None
    stores: int
    evictions: int
    expired: int
    false_hits: int  # hits clients reported as wrong
    rejections: Mapping[str, int]
    threshold: float  # in force now: the learned one, else policy, false-hit tightening, load relaxing
    ttl_s: float  # in force now
    enabled: bool
    verifiers: tuple[str, ...] = ()
    checks: int = 0
    checks_wrong: int = 0
    invalidated_by_document: int = 0
    learned: LearnedStats | None = None

    @classmethod
    def of(
        cls,
        tenant: str,
        category: str,
        entries: int,
        counts: Counter,
        policy: CategoryPolicy,
        threshold: float,
        ttl_s: float,
        verifiers: tuple[str, ...] = (),
        learned: LearnedStats | None = None,
    ) -> CategoryStats:
        lookups = counts["lookups"]
        return cls(
            tenant,
            category,
            entries,
            lookups,
            counts["hits"],
            counts["hits"] / lookups if lookups else None,
            counts["stores"],
            counts["evictions"],
            counts["expired"],
            counts["false_hits"],
            {key.split(":", 1)[1]: n for key, n in sorted(counts.items()) if key.startswith("rejected:")},
            threshold,
            ttl_s,
            policy.enabled,
            verifiers,
            counts["checks"],
            counts["checks_wrong"],
            counts["invalidated_by_document"],
            learned,
        )


@dataclass(frozen=True)
class SemanticCacheStats:
    categories: tuple[CategoryStats, ...]
    bypasses: Mapping[str, int]  # "tenant:reason" -> requests that skipped the cache
    thresholds: Mapping[str, float]  # per category, in force now (before any tenant's false-hit tightening)
    ttls_s: Mapping[str, float]
    load: LoadState
    lookup_p50_ms: float | None  # search + verification + answer read, embedding excluded
    lookup_p99_ms: float | None
    embed_p50_ms: float | None
    index: str
    embedder: str
    answers: AnswerStoreStats


def percentile_ms(samples_s: Iterable[float], q: float) -> float | None:
    ordered = sorted(samples_s)
    if not ordered:
        return None
    return 1000.0 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]
