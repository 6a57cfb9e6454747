"""Per-category policy: how similar is similar enough, how long an answer lives, how many are kept.

One threshold and one TTL for everything is wrong (Category-Aware Semantic Caching, Wang
et al. 2025): code questions cluster densely in embedding space, so a threshold that
catches chat paraphrases serves one code question another's answer; chat is sparse, so a
threshold safe for code misses its paraphrases; a stock price is stale in minutes, a
code pattern in months. The defaults below follow those observations; the similarity
figures are all-MiniLM-L6-v2 cosines *with the guards in front* (guards.py), measured on
fow-cache's question pairs (`ragcache bench semantic`):

    factual       0.55  chosen on the tuning half (odd ids) of fow-cache's question pairs:
                        there 73% of should-hit pairs are served and 0.6% of traps get a
                        wrong answer (at 0.50: 74% / 0.6%, at 0.60: 67% / 0.6%); the guards
                        catch the one-word traps, so the threshold only has to turn away
                        unrelated questions and loose rewordings. TTL a day, a week under load.
    conversation  0.60  the last message of a chat that depends on its context ("how do I
                        set it up?"); the context check carries the weight (recent turns at
                        cosine >= 0.5, no swapped facts: GuardConfig and guards.py), tuned on
                        the tuning half of fow-cache's conversation pairs.
    code          0.90  dense: "how do I sort a list" and "...reverse a list" score 0.8+,
                        and the guards let verbs differ. TTL a week, up to a month (the
                        paper: code patterns stay valid for months).
    volatile      0.85  time-sensitive ("today", "current price", "weather"): a 5-minute
                        TTL, up to 15 under load (the paper: stock data stales in minutes);
                        kept on, since the paper's hybrid design makes even 5-15% hit rates pay.

min_threshold/max_ttl_s bound what the load-adaptive policy may relax to (adaptive.py);
max_threshold bounds how far false-hit reports may tighten a tenant's threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

CATEGORIES = ("code", "conversation", "factual", "volatile")
DEFAULT_CATEGORY = "factual"

HOUR_S = 3600.0
DAY_S = 24 * HOUR_S


@dataclass(frozen=True)
class CategoryPolicy:
    """threshold: the cosine a candidate needs (0..1); ttl_s: how long an answer is served;
    max_entries: the quota per tenant (least valuable evicted first); enabled: False
    neither serves nor stores the category (e.g. personal data); delta: the wrong-answer
    rate learned thresholds hold among served candidates (learned.py), when the category's
    verifiers include "learned"."""

    threshold: float
    ttl_s: float
    max_entries: int
    enabled: bool = True
    min_threshold: float | None = None  # load may relax the threshold down to this; None: no relaxing
    max_threshold: float | None = None  # false-hit reports may tighten up to this; None: no tightening
    max_ttl_s: float | None = None  # load may lengthen the TTL up to this; None: no lengthening
    delta: float = 0.05

    def __post_init__(self) -> None:
        for name, default in (("min_threshold", self.threshold), ("max_threshold", self.threshold), ("max_ttl_s", self.ttl_s)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if not 0.0 < self.min_threshold <= self.threshold <= self.max_threshold <= 1.0:
            raise ValueError(
                f"need 0 < min_threshold <= threshold <= max_threshold <= 1, got "
                f"{self.min_threshold} / {self.threshold} / {self.max_threshold}"
            )
        if not 0.0 < self.ttl_s <= self.max_ttl_s:
            raise ValueError(f"need 0 < ttl_s <= max_ttl_s, got {self.ttl_s} / {self.max_ttl_s}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {self.max_entries}")


DEFAULT_POLICIES: Mapping[str, CategoryPolicy] = {
    "factual": CategoryPolicy(0.55, DAY_S, 100_000, min_threshold=0.50, max_threshold=0.80, max_ttl_s=7 * DAY_S),
    "conversation": CategoryPolicy(0.60, DAY_S, 50_000, min_threshold=0.55, max_threshold=0.80, max_ttl_s=3 * DAY_S),
    "code": CategoryPolicy(0.90, 7 * DAY_S, 100_000, min_threshold=0.86, max_threshold=0.97, max_ttl_s=30 * DAY_S),
    "volatile": CategoryPolicy(0.85, 300.0, 10_000, min_threshold=0.82, max_threshold=0.95, max_ttl_s=900.0),
}
