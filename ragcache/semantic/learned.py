"""Learned thresholds: the similarity a category (and a well-observed entry) needs, held to an error bound δ.

A fixed threshold is a guess about how similarity relates to correctness; vCache (ICLR
2026) learns it instead, from labelled observations, so that the rate of wrong answers
among served candidates stays at or below a user-set δ. Here an observation is
(tenant, category, entry, similarity, correct): a shadow check comparing a fresh engine
answer with the cached one (SemanticCache.record_check), a false-hit report (always
wrong), or a labelled pair given to learn() offline.

The threshold of a (tenant, category) is the lowest observed similarity t such that, among
the observations at or above t, the one-sided Wilson upper bound of the wrong rate at
`confidence` is <= δ, with at least `min_observations` of them; never below `floor` (the
policy's min_threshold when None). Until a category has min_observations the policy's
threshold stays in force (cold). When no t holds δ, only identical texts (cosine 1) are
served: the data says no looser match is safe.

Per entry (vCache's per-embedding thresholds): a wrong observation on an entry at
similarity s means that entry is not served again at s or below; an entry with at least
`entry_min_observations` of its own gets its own threshold from them by the same rule
(popular questions in a dense region learn a tighter or looser bound than their category).

Thresholds never extrapolate below the lowest observation: evidence for serving looser
matches comes from shadow checks of candidates the threshold turned down (their entry
id and similarity are in LookupOutcome.rejections, reason "threshold").
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, NamedTuple

from ragcache.checks.estimate import wilson_interval

if TYPE_CHECKING:
    from ragcache.semantic.verify import Candidate, Verifier

SIMILARITY_SLACK = 1e-6  # cosines of identical texts come out a hair under 1.0


@dataclass(frozen=True)
class LearnedConfig:
    """min_observations: a category's observations before its learned threshold applies;
    entry_min_observations: an entry's before it gets its own; window: observations kept
    per category (the oldest are dropped); entry_window: per entry; confidence: of the
    Wilson bound; floor: the lowest threshold learning may choose (None: the policy's
    min_threshold); max_tracked_entries: entries whose observations are kept."""

    min_observations: int = 30
    entry_min_observations: int = 20
    window: int = 5000
    entry_window: int = 64
    confidence: float = 0.95
    floor: float | None = None
    max_tracked_entries: int = 100_000

    def __post_init__(self) -> None:
        if self.min_observations < 1 or self.entry_min_observations < 1:
            raise ValueError("min_observations and entry_min_observations must be >= 1")
        if self.window < self.min_observations or self.entry_window < 1 or self.max_tracked_entries < 1:
            raise ValueError("need window >= min_observations, entry_window >= 1, max_tracked_entries >= 1")
        if not 0.5 <= self.confidence < 1 or (self.floor is not None and not 0 < self.floor <= 1):
            raise ValueError("need 0.5 <= confidence < 1 and 0 < floor <= 1")


class Observation(NamedTuple):
    """One labelled (request, cached entry) similarity. entry_id None: counts for the category only."""

    tenant: str
    category: str
    entry_id: str | None
    similarity: float
    correct: bool


class Estimate(NamedTuple):
    """A threshold and the wrong rate among the observations at or above it."""

    threshold: float | None  # None: not enough observations (the policy's threshold applies)
    served: int  # observations at or above the threshold
    wrong: int  # ... of which wrong
    wrong_rate_low: float | None  # Wilson bounds of the wrong rate, one-sided each at `confidence`
    wrong_rate_high: float | None


@dataclass(frozen=True)
class ThresholdChange:
    at_s: float
    before: float | None  # None: cold (the policy's threshold)
    after: float | None
    reason: str


@dataclass(frozen=True)
class LearnedStats:
    """What stats() shows of a category's learning (JSON-friendly)."""

    delta: float
    observations: int
    wrong: int
    threshold: float | None  # learned, None while cold
    served: int
    wrong_rate_low: float | None
    wrong_rate_high: float | None
    entries_with_own_threshold: int
    last_change: ThresholdChange | None


def wilson_bounds(wrong: int, n: int, confidence: float) -> tuple[float, float]:
    """One-sided Wilson score bounds of a binomial rate, each at `confidence`."""
    return wilson_interval(wrong, n, NormalDist().inv_cdf(confidence))


def estimate(
    observations: Iterable[tuple[float, bool]], delta: float, confidence: float, min_observations: int, floor: float
) -> Estimate:
    """The lowest observed similarity (>= floor) whose observations above it hold δ; see the module docstring."""
    ordered = sorted(observations, key=lambda o: -o[0])
    if len(ordered) < min_observations:
        return Estimate(None, 0, 0, None, None)
    best: tuple[float, int, int] | None = None
    wrong = 0
    for i, (similarity, correct) in enumerate(ordered):
        wrong += not correct
        if i + 1 < len(ordered) and ordered[i + 1][0] == similarity:
            continue  # ties: a threshold serves all of them or none
        if similarity < floor:
            break
        n = i + 1
        if n >= min_observations and wilson_bounds(wrong, n, confidence)[1] <= delta:
            best = (similarity, n, wrong)
    if best is None:
        return Estimate(1.0, 0, 0, None, None)
    low, high = wilson_bounds(best[2], best[1], confidence)
    return Estimate(best[0], best[1], best[2], low, high)


class _Series:
    """The observations of one (tenant, category) or one entry, and the estimate they give."""

    def __init__(self, window: int) -> None:
        self.points: deque[tuple[float, bool]] = deque(maxlen=window)
        self.wrong = 0
        self.max_wrong: float | None = None  # the highest similarity observed wrong
        self._memo: tuple[tuple, Estimate] | None = None

    def add(self, similarity: float, correct: bool) -> None:
        if len(self.points) == self.points.maxlen:
            self.wrong -= not self.points[0][1]
        self.points.append((similarity, correct))
        self.wrong += not correct
        if not correct:
            self.max_wrong = similarity if self.max_wrong is None else max(self.max_wrong, similarity)
        self._memo = None

    def estimate(self, delta: float, confidence: float, min_observations: int, floor: float) -> Estimate:
        key = (delta, confidence, min_observations, floor)
        if self._memo is None or self._memo[0] != key:
            self._memo = (key, estimate(self.points, delta, confidence, min_observations, floor))
        return self._memo[1]


class LearnedThresholds:
    """Thread-safe store of observations and the thresholds they give. δ and the floor are
    passed at each question (they live in the category's policy, which can change)."""

    def __init__(self, config: LearnedConfig = LearnedConfig(), clock=time.time) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._categories: dict[tuple[str, str], _Series] = {}
        self._entries: OrderedDict[tuple[str, str], _Series] = OrderedDict()
        self._in_force: dict[tuple[str, str], float | None] = {}
        self._changes: dict[tuple[str, str], ThresholdChange] = {}
        self._last_source: dict[tuple[str, str], str] = {}

    def observe(self, observation: Observation, source: str = "check") -> None:
        """Add one observation; source ("check", "feedback", "learn") names it in last_change."""
        key = (observation.tenant, observation.category)
        with self._lock:
            series = self._categories.get(key)
            if series is None:
                series = self._categories[key] = _Series(self.config.window)
            series.add(float(observation.similarity), bool(observation.correct))
            self._last_source[key] = source
            if observation.entry_id is not None:
                entry_key = (observation.tenant, observation.entry_id)
                entry = self._entries.pop(entry_key, None) or _Series(self.config.entry_window)
                entry.add(float(observation.similarity), bool(observation.correct))
                self._entries[entry_key] = entry
                while len(self._entries) > self.config.max_tracked_entries:
                    self._entries.popitem(last=False)

    def learn(self, observations: Iterable[Observation]) -> int:
        """Add labelled observations offline (e.g. a tuning set); how many were added."""
        count = 0
        for observation in observations:
            self.observe(observation, "learn")
            count += 1
        return count

    def threshold(self, tenant: str, category: str, delta: float, floor: float) -> float | None:
        """The category's learned threshold, or None while cold. Records a change when it moves."""
        key = (tenant, category)
        with self._lock:
            series = self._categories.get(key)
            if series is None:
                return None
            c = self.config
            found = series.estimate(delta, c.confidence, c.min_observations, floor)
            before = self._in_force.get(key)
            if found.threshold != before:
                self._in_force[key] = found.threshold
                self._changes[key] = ThresholdChange(
                    self._clock(), before, found.threshold, self._reason(key, series, found, before)
                )
            return found.threshold

    def in_force(
        self, tenant: str, category: str, entry_id: str | None, delta: float, floor: float, cold: float
    ) -> float:
        """The threshold a candidate for entry_id needs: the entry's own estimate once it has
        entry_min_observations, else the category's (cold: while it has none), and never at
        or below a similarity the entry was wrong at."""
        category_threshold = self.threshold(tenant, category, delta, floor)
        threshold = cold if category_threshold is None else category_threshold
        if entry_id is None:
            return threshold
        with self._lock:
            series = self._entries.get((tenant, entry_id))
            if series is None:
                return threshold
            c = self.config
            own = series.estimate(delta, c.confidence, c.entry_min_observations, floor).threshold
            if own is not None:
                threshold = own
            if series.max_wrong is not None:
                threshold = max(threshold, min(1.0, series.max_wrong + 2 * SIMILARITY_SLACK))
            return threshold

    def forget_entries(self, tenant: str, entry_ids: Iterable[str]) -> None:
        """Drop removed entries' own observations (their category keeps them)."""
        with self._lock:
            for entry_id in entry_ids:
                self._entries.pop((tenant, entry_id), None)

    def stats(self, tenant: str, category: str, delta: float, floor: float) -> LearnedStats:
        self.threshold(tenant, category, delta, floor)  # refreshes last_change
        key = (tenant, category)
        c = self.config
        with self._lock:
            series = self._categories.get(key)
            found = (
                series.estimate(delta, c.confidence, c.min_observations, floor)
                if series
                else Estimate(None, 0, 0, None, None)
            )
            own = sum(
                1
                for (owner, _), entry in self._entries.items()
                if owner == tenant and len(entry.points) >= c.entry_min_observations
            )
            return LearnedStats(
                delta,
                len(series.points) if series else 0,
                series.wrong if series else 0,
                found.threshold,
                found.served,
                found.wrong_rate_low,
                found.wrong_rate_high,
                own,
                self._changes.get(key),
            )

    def _reason(self, key, series: _Series, found: Estimate, before: float | None) -> str:
        source = self._last_source.get(key, "check")
        counts = f"{len(series.points)} observations, {series.wrong} wrong"
        if found.threshold is None:
            return f"{source}: cold again ({counts})"
        if before is None:
            return f"{source}: learned from {counts}"
        if found.served == 0:
            return f"{source}: no threshold holds the bound ({counts})"
        direction = (
            "raised: wrong answers above it" if found.threshold > before else "lowered: correct answers below it"
        )
        return f"{source}: {direction} ({counts})"


def similarity_passes(similarity: float, threshold: float) -> bool:
    return similarity >= threshold - SIMILARITY_SLACK


class LearnedVerifier:
    """Rejects ("threshold") a candidate below the learned threshold in force for it, which
    the cache works out (threshold_of): the entry's own, else the category's, else, while
    cold, the policy's threshold in force."""

    name = "learned"

    def __init__(self, threshold_of) -> None:
        self._threshold_of = threshold_of

    def reject_reason(self, candidate: Candidate) -> str | None:
        return None if similarity_passes(candidate.similarity, self._threshold_of(candidate)) else "threshold"


if TYPE_CHECKING:  # the type checker holds LearnedVerifier to the Verifier contract
    _verifier: type[Verifier] = LearnedVerifier
