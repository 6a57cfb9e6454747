"""A category for every request: the client's, else a rule for the obvious cases, else the
nearest centroid of example queries.

Rules come first because they are certain where embeddings are not: a code fence or a
stack trace is code whatever it talks about, and "today"/"current price" make an answer
stale in minutes however the rest reads. Volatile has rules only: its examples' centroid
sat nearer than factual's to plain "who"/"what happened" questions (on fow-cache's pairs
it took 72 of 1200 questions, most with nothing time-sensitive in them). A message that
only makes sense with the turns before it ("cancel it") is conversation. Everything else
goes to the category whose examples' mean vector is nearest; below min_margin between
the best two, the default category wins, so that two wordings of one request rarely land
in different categories (a lookup searches its own category only): at 0.02, 121 of
fow-cache's 600 question pairs had their two sides classified apart; at 0.10, 33.
Conversation is structural for the same reason: a centroid of chat-like single requests
("book me a table") split 24 of those pairs between conversation and factual, for no
difference in policy worth a miss. The default examples are therefore code and factual;
any category given examples in the config joins the centroid vote.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ragcache.semantic.embedder import Embedder
from ragcache.semantic.policy import DEFAULT_CATEGORY

_CODE = re.compile(
    r"```|Traceback \(most recent call last\)|Exception in thread|\bat [\w.$]+\([\w]+\.java:\d+\)|"
    r"^\s*(?:def|class|import|from|#include|public|function|const|let|var|SELECT)\b.*[:;{(=]|"
    r"\b\w+Error:|\bsegmentation fault\b|=>|\w+\.\w+\(.*\)",
    re.M | re.I,
)
_VOLATILE = re.compile(
    r"\b(?:today|tonight|right now|at the moment|currently|this (?:morning|afternoon|evening)|"
    r"weather|forecast|stock price|share price|exchange rate|bitcoin price|news|headlines|live score|"
    r"on time|running late|delays?)\b",
    re.I,
)

DEFAULT_EXAMPLES: Mapping[str, tuple[str, ...]] = {
    "code": (
        "How do I reverse a list in Python?",
        "Why does this JavaScript function return undefined?",
        "Write a SQL query that counts orders per customer",
        "How do I fix a merge conflict in git?",
        "What does this regular expression match?",
        "How do I read a CSV file with pandas?",
        "Convert this loop to a list comprehension",
        "How do I set up a Docker container for a Node app?",
    ),
    "factual": (
        "What is the capital of Australia?",
        "How do I reset my password?",
        "What are your opening hours?",
        "How much does delivery cost?",
        "What documents do I need to open a bank account?",
        "Who wrote Pride and Prejudice?",
        "What is the notice period to end my tenancy?",
        "How do I apply for a parking permit?",
    ),
}


@dataclass(frozen=True)
class ClassifierConfig:
    examples: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_EXAMPLES))
    default: str = DEFAULT_CATEGORY
    min_margin: float = 0.10  # cosine lead the best centroid needs over the second

    def __post_init__(self) -> None:
        if not self.examples or any(not texts for texts in self.examples.values()):
            raise ValueError("every category in examples needs at least one example")


class Classification(NamedTuple):
    category: str
    source: str  # "client", "rule", "conversation", "centroid", "default"


class CategoryClassifier:
    """Thread-safe; the centroids are embedded on first use."""

    def __init__(self, embedder: Embedder, config: ClassifierConfig = ClassifierConfig()) -> None:
        self.config = config
        self._embedder = embedder
        self._centroids: tuple[list[str], np.ndarray] | None = None
        self._lock = threading.Lock()

    def classify(self, text: str, vector: np.ndarray, self_contained: bool = True) -> Classification:
        """text: the last user message; vector: its embedding; self_contained: False when the
        message depends on earlier turns (conversation.is_self_contained)."""
        if _CODE.search(text):
            return Classification("code", "rule")
        if _VOLATILE.search(text):
            return Classification("volatile", "rule")
        if not self_contained:
            return Classification("conversation", "conversation")
        names, centroids = self._centroid_matrix()
        scores = centroids @ vector
        order = np.argsort(scores)[::-1]
        if len(order) > 1 and scores[order[0]] - scores[order[1]] < self.config.min_margin:
            return Classification(self.config.default, "default")
        return Classification(names[int(order[0])], "centroid")

    def _centroid_matrix(self) -> tuple[list[str], np.ndarray]:
        with self._lock:
            if self._centroids is None:
                names = list(self.config.examples)
                rows = []
                for name in names:
                    mean = self._embedder.embed(list(self.config.examples[name])).mean(axis=0)
                    rows.append(mean / np.linalg.norm(mean))
                self._centroids = (names, np.vstack(rows).astype(np.float32))
            return self._centroids
