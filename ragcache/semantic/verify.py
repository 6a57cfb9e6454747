"""The verifier seam: between a nearest neighbour above the threshold and a hit.

A candidate the index found similar enough is shown to the category's verifiers in turn;
the first one that names a reason turns it down. Each implementation judges from what a
`Candidate` carries (the two texts, their features and embeddings, the similarity) and
never calls the network: the word-level guards (guards.py), learned per-category and
per-entry thresholds, and a learned pair classifier are the implementations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ragcache.semantic.text import TextFeatures


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


@runtime_checkable
class Verifier(Protocol):
    """name: what stats and /admin/semantic call it."""

    name: str

    def reject_reason(self, candidate: Candidate) -> str | None:
        """Why the cached answer does not answer the new request, or None to let it through."""
        ...
