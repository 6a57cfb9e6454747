"""Per-category policy: how similar is similar enough, how long an answer lives, how many are kept.

One threshold and one TTL for everything is wrong (Category-Aware Semantic Caching, Wang
et al. 2025): code questions cluster densely in embedding space, so a threshold that
catches chat paraphrases serves one code question another's answer; chat is sparse, so a
threshold safe for code misses its paraphrases; a stock price is stale in minutes, a
code pattern in months. The defaults below follow those observations; the similarity
figures are all-MiniLM-L6-v2 cosines *before* the verifiers (by default the vocabulary-free
fact checks and the learned pair classifier: config.py, verify.py), measured on fow-cache
(`ragcache bench semantic`):

    factual       0.45  a floor, not the judge: the pair classifier decides (typos drop
                        MiniLM's cosine of a true paraphrase to ~0.4). With facts + pair, fow-
                        cache's held-out half (never trained on): 0.55 serves 58.0% of
                        should-hit pairs with 2.1% of traps answered wrongly; no floor serves
                        62.7% / 3.5%. TTL a day, a week under load.
    conversation  off   the last message of a chat that depends on its context ("how do I
                        set it up?"). No verifier measured safe on held-out conversations:
                        guards 67.8% served / 11.5% wrong, facts + pair 66.1% / 11.5%, over
                        the 10% a wrong answer may cost; enable it per deployment
                        (PUT /admin/semantic/categories/conversation) where that is acceptable.
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

from collections.abc import Mapping
from dataclasses import dataclass

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
        # a None bound is filled in here: once made, a policy's bounds are floats
        min_threshold = self.threshold if self.min_threshold is None else self.min_threshold
        max_threshold = self.threshold if self.max_threshold is None else self.max_threshold
        max_ttl_s = self.ttl_s if self.max_ttl_s is None else self.max_ttl_s
        object.__setattr__(self, "min_threshold", min_threshold)
        object.__setattr__(self, "max_threshold", max_threshold)
        object.__setattr__(self, "max_ttl_s", max_ttl_s)
        if not 0.0 < min_threshold <= self.threshold <= max_threshold <= 1.0:
            raise ValueError(
                f"need 0 < min_threshold <= threshold <= max_threshold <= 1, got "
                f"{min_threshold} / {self.threshold} / {max_threshold}"
            )
        if not 0.0 < self.ttl_s <= max_ttl_s:
            raise ValueError(f"need 0 < ttl_s <= max_ttl_s, got {self.ttl_s} / {max_ttl_s}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {self.max_entries}")


DEFAULT_POLICIES: Mapping[str, CategoryPolicy] = {
    "factual": CategoryPolicy(0.45, DAY_S, 100_000, min_threshold=0.40, max_threshold=0.80, max_ttl_s=7 * DAY_S),
    "conversation": CategoryPolicy(
        0.60, DAY_S, 50_000, enabled=False, min_threshold=0.55, max_threshold=0.80, max_ttl_s=3 * DAY_S
    ),
    "code": CategoryPolicy(0.90, 7 * DAY_S, 100_000, min_threshold=0.86, max_threshold=0.97, max_ttl_s=30 * DAY_S),
    "volatile": CategoryPolicy(0.85, 300.0, 10_000, min_threshold=0.82, max_threshold=0.95, max_ttl_s=900.0),
}
