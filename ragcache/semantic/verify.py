"""The verifier seam: between a nearest neighbour above the threshold and a hit.

A candidate the index found similar enough is shown to the category's verifiers in turn;
the first one that names a reason turns it down. Each implementation judges from what a
`Candidate` carries (the two texts, their features and embeddings, the similarity) and
never calls the network: the word-level guards (guards.py: "guards"), learned per-category
and per-entry thresholds (learned.py: "learned") and a learned pair classifier
(pair_verifier.py: "pair") are the implementations; make_verifier builds one by name, so
config can say which a category runs and in what order (SemanticCacheConfig.verifiers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ragcache.semantic.conversation import ContextKey
from ragcache.semantic.text import TextFeatures

VERIFIERS = ("guards", "facts", "learned", "pair")


@dataclass(frozen=True)
class Candidate:
    """One (new request, cached entry) pair as a verifier sees it."""

    tenant: str
    category: str
    entry_id: str
    new_text: str  # the new request's last message, greetings stripped
    cached_text: str  # the cached entry's last message, greetings stripped
    new_features: TextFeatures
    cached_features: TextFeatures
    new_vector: np.ndarray  # unit embeddings of the two texts
    cached_vector: np.ndarray
    similarity: float  # new_vector @ cached_vector
    new_context: ContextKey | None = None  # the turns before a dependent last message; None when self-contained
    cached_context: ContextKey | None = None
    context_similarity: float | None = None  # of the two contexts, when both have one


@runtime_checkable
class Verifier(Protocol):
    """name: what stats and /admin/semantic call it."""

    name: str

    def reject_reason(self, candidate: Candidate) -> str | None:
        """Why the cached answer does not answer the new request, or None to let it through.
        Must not mutate candidate; called from any thread, with no cache lock held."""
        ...


def make_verifier(name: str, *, embedder, guards, threshold_of: Callable[[Candidate], float]) -> Verifier:
    """The verifier called `name`: "guards" (GuardConfig guards), "learned" (rejects below
    threshold_of(candidate), the learned threshold in force) or "pair" (the learned pair
    classifier, imported here). Raises ValueError for an unknown or unavailable name."""
    if name == "guards":
        from ragcache.semantic.guards import GuardVerifier

        return GuardVerifier(guards)
    if name == "facts":
        from ragcache.semantic.guards import FactVerifier

        return FactVerifier(guards)
    if name == "learned":
        from ragcache.semantic.learned import LearnedVerifier

        return LearnedVerifier(threshold_of)
    if name == "pair":
        try:
            from ragcache.semantic.pair_verifier import PairVerifier

            return PairVerifier(embedder)
        except (ImportError, OSError) as error:  # the module or its weights are not there
            raise ValueError(f"verifier 'pair' is unavailable: {error}") from None
    raise ValueError(f"unknown verifier {name!r}; known: {', '.join(VERIFIERS)}")
