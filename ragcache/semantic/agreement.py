"""Does a fresh engine answer agree with the cached one? The label a semantic shadow check records.

A shadow check (SemanticCache.record_check) runs the engine on a request the cache served
(or nearly served) and compares the two answers. Generation varies its wording, so
equality is too strict for long answers; and a short answer's meaning is in its few
words ("Yes" against "No", "14 days" against "30 days"), which an embedding barely tells
apart. The rule, in order:

    normalised   equal after lower-casing, dropping punctuation, articles and extra
                 spaces: agree ("The Amazon." = "amazon")
    numbers      the numbers differ ("14 days" / "30 days", "£10.99" / "£24.99"): disagree
    short        either side has at most `short_words` words and they differ: disagree
    negation     one negates what the other says plainly (guards.negation_differs: "you
                 can cancel online" / "you cannot cancel online"): disagree, since MiniLM
                 scores that pair 0.88, above a true rewording of it (0.84)
    cosine       otherwise the answers' embedding cosine must reach `min_cosine`

It errs towards "disagree" ("two weeks" against "14 days" disagrees): a false "wrong"
only raises a threshold a little, a false "correct" lets the cache serve looser matches.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ragcache.semantic.guards import negation_differs
from ragcache.semantic.text import features

_ARTICLES = frozenset({"a", "an", "the"})
_WORD = re.compile(r"[a-z0-9]+(?:[.,][0-9]+)*")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


class AgreementVerdict(NamedTuple):
    agree: bool
    rule: str  # "normalised", "numbers", "short", "negation" or "cosine": the rule that decided
    similarity: float | None  # the answers' cosine, when the cosine rule decided


def normalise(answer: str) -> str:
    return " ".join(w for w in _WORD.findall(answer.lower()) if w not in _ARTICLES)


def answers_agree(
    cached: str, fresh: str, embedder, short_words: int = 8, min_cosine: float = 0.80
) -> AgreementVerdict:
    """The verdict on two answers to (what the cache took for) the same request; see the module
    docstring. embedder: any Embedder (unit vectors); used only by the cosine rule."""
    a, b = normalise(cached), normalise(fresh)
    if a == b:
        return AgreementVerdict(True, "normalised", None)
    if set(_NUMBER.findall(a)) != set(_NUMBER.findall(b)):
        return AgreementVerdict(False, "numbers", None)
    if min(len(a.split()), len(b.split())) <= short_words:
        return AgreementVerdict(False, "short", None)
    if negation_differs(features(cached), features(fresh)):
        return AgreementVerdict(False, "negation", None)
    vectors = embedder.embed([cached, fresh])
    similarity = float(vectors[0] @ vectors[1])
    return AgreementVerdict(similarity >= min_cosine, "cosine", similarity)
