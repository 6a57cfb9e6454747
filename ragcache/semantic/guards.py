"""The local verifier between a nearest neighbour and a hit.

Sentence embeddings score "Is ibuprofen safe with alcohol?" against "...unsafe..." at 0.99:
they place a text by its topic, and one word that flips the answer barely moves it. So a
candidate above the similarity threshold is served only if these cheap checks find no
such word. Each check names the reason it rejects (counted per category in stats()):

    negation  an odd number of "not"/"never"/"without" on one side; opposite words
              ("open"/"closed", "include"/"exclude"); "un"/"non-"/"dis" before a word the
              other side has plain ("refundable"/"non-refundable")
    number    a different set of numbers, times or ids ("2-year"/"5-year", "7am"/"7pm")
    date      different days, months or periods ("Saturday"/"Sunday", "weekdays"/"weekends")
    entity    a name on one side missing from the other ("Camden"/"Brixton"), or, in two
              near-identical texts, one content word swapped for another ("pool"/"gym")
    order     the same things in swapped roles ("from savings to current", and back)
    scope     near-identical texts where one adds or drops a qualifier ("insurance" vs
              "car insurance", "password" vs "colleague's password")
    context   in a conversation, the turns before the last message differ (see conversation.py)

"Near-identical" means they share at least half of the shorter text's content words;
below that the texts are rewordings and only the first five checks apply, since a
reworded paraphrase changes many words at once. Typos (one slip from five letters,
two from nine), inflections and a short synonym table do not count as changes.

No check calls a model: each is set and list arithmetic over text.TextFeatures (tens of
microseconds). A local cross-encoder was not tried: none ships as an installable package
here and the cache never downloads weights; at the default thresholds the checks bring
the share of fow-cache's question traps given a wrong answer from 87% (similarity alone)
to 2.7%, at a cost of 91% -> 72% of should-hit pairs served (`ragcache bench semantic`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ragcache.semantic.conversation import ContextKey
from ragcache.semantic.lexicon import NEGATING_PREFIXES, OPPOSITES
from ragcache.semantic.text import TextFeatures, stem, typo_equal

if TYPE_CHECKING:
    from ragcache.semantic.verify import Candidate, Verifier

REASONS = ("negation", "number", "date", "entity", "order", "scope", "context")

_OPPOSITES = tuple(
    (frozenset(stem(word) for word in left), frozenset(stem(word) for word in right)) for left, right in OPPOSITES
)


def check_question(
    new: TextFeatures,
    cached: TextFeatures,
    similarity: float,
    near_overlap: float = 0.5,
    min_matched: int = 2,
    trust_similarity: float = 0.93,
) -> str | None:
    """The reason the cached answer does not answer `new`, or None when none was found.

    similarity: the two texts' embedding similarity; from trust_similarity up, a changed
    ordinary word is taken for a synonym (the hard checks above it still apply).
    """
    reason = check_facts(new, cached)
    if reason is not None:
        return reason
    if not (_all_present(new.entities, cached) and _all_present(cached.entities, new)):
        return "entity"
    if _swapped_roles(new, cached):
        return "order"
    if _compound_changed(new, cached) or _compound_changed(cached, new):
        return "scope"
    if similarity >= trust_similarity:
        return None
    return _changed_terms(new, cached, near_overlap, min_matched)


def check_facts(new: TextFeatures, cached: TextFeatures) -> str | None:
    """The checks that need no vocabulary fitted to a benchmark: a negation on one side only
    (or an opposite), other numbers, other dates. What the other checks catch by word lists
    (entities, scope, roles) is left to a learned verifier (pair_verifier.py)."""
    if negation_differs(new, cached):
        return "negation"
    if not _same_numbers(new.numbers, cached.numbers):
        return "number"
    if new.dates and cached.dates and not _same_words(new.dates, cached.dates):
        return "date"
    return None


def check_context(new: ContextKey, cached: ContextKey, similarity: float, threshold: float) -> str | None:
    """ "context" when two conversations' turns before the last message differ: their recent
    turns are not similar enough; each names a number or a name the other lacks (a swap:
    order 70452 against 70425, Spain against Florida; one side only adding some, as small
    talk does, is no swap), or the opening exchange, which sets the subject, swaps a
    number; the last reply lists the same things in another order ("the second one"); or
    the user said the same things and the last reply offers something else ("yes please"
    to a cancellation against "yes please" to an upgrade)."""
    if similarity < threshold:
        return "context"
    if _facts_swapped(new.facts, cached.facts) or _numbers_swapped(new.opening, cached.opening):
        return "context"
    a, b = new.last_reply, cached.last_reply
    if sorted(a.salient) == sorted(b.salient) and a.salient != b.salient:
        return "context"
    if _same_user_turns(new.user_turns, cached.user_turns) and _offer_changed(a, b):
        return "context"
    return None


def _same_user_turns(a: str, b: str, min_overlap: float = 0.75) -> bool:
    """The user said (nearly) the same things: shared words over all words, at least min_overlap."""
    words_a, words_b = set(a.split()), set(b.split())
    return words_a == words_b or len(words_a & words_b) >= min_overlap * len(words_a | words_b)


def _numbers_swapped(a: TextFeatures, b: TextFeatures) -> bool:
    return bool(a.numbers - b.numbers and b.numbers - a.numbers)


def _facts_swapped(a: TextFeatures, b: TextFeatures) -> bool:
    """Each side has a number, or a name, the other lacks; one side only adding some is no swap."""
    return _numbers_swapped(a, b) or (_missing(a.entities, b) and _missing(b.entities, a))


def _offer_changed(a: TextFeatures, b: TextFeatures) -> bool:
    """Two replies do not offer the same things in the same order: words swapped for others,
    or the shared words in another order ("refund or credit?" against "credit or refund?")."""
    only_a, only_b, _ = unmatched(a, b)
    if only_a and only_b:
        return True
    shared = set(a.content) & set(b.content)
    return [w for w in a.content if w in shared] != [w for w in b.content if w in shared]


def negation_differs(a: TextFeatures, b: TextFeatures) -> bool:
    """One side negates what the other says plainly (also how agreement.py compares answers)."""
    if a.negations % 2 != b.negations % 2:
        return True
    only_a, only_b = set(a.words) - set(b.words), set(b.words) - set(a.words)
    for left, right in _OPPOSITES:
        if (only_a & left and only_b & right) or (only_a & right and only_b & left):
            return True
    return _prefix_negated(a, b) or _prefix_negated(b, a)


def _prefix_negated(a: TextFeatures, b: TextFeatures) -> bool:
    """a says "unsafe" (or "non-refundable", "disable") where b says "safe"."""
    plain_a = set(a.words)
    for token in a.tokens - b.tokens:
        for prefix in NEGATING_PREFIXES:
            rest = token[len(prefix) :]
            if token.startswith(prefix) and len(rest) >= 3 and stem(rest) in b.words and stem(rest) not in plain_a:
                return True
    return False


def _same_numbers(a: frozenset[str], b: frozenset[str]) -> bool:
    """Equal sets; "one egg" against "an egg" (a lone 1 against nothing) counts as equal."""
    return a == b or {a, b} == {frozenset({"1"}), frozenset()}


def _same_words(a: frozenset[str], b: frozenset[str]) -> bool:
    return _all_in(a, b) and _all_in(b, a)


def _all_in(words: frozenset[str], others: frozenset[str]) -> bool:
    return all(any(typo_equal(word, other) for other in others) for word in words)


def _missing(entities: frozenset[str], other: TextFeatures) -> bool:
    return not _all_present(entities, other)


def _all_present(entities: frozenset[str], other: TextFeatures) -> bool:
    """Each name appears among the other text's words (or their synonyms), whatever its case there."""
    return _all_in(entities, frozenset(other.words) | frozenset(other.content))


def _swapped_roles(a: TextFeatures, b: TextFeatures) -> bool:
    """Both texts say "from X"/"to Y", and what one sends from or to the other has in the other role."""
    for role in a.roles.keys() & b.roles.keys():
        only_a = set(a.roles[role]) - set(b.roles[role])
        only_b = set(b.roles[role]) - set(a.roles[role])
        if only_a & set(b.content) and only_b & set(a.content):
            return True
    return False


_SCOPE_PARTS = frozenset("self non ex co sub semi part full half pre post".split())


def _compound_changed(a: TextFeatures, b: TextFeatures) -> bool:
    """ "check-in" against "check-out", "full-time" against "part-time", "self-employed" against "employed"."""
    mine = [token.split("-") for token in a.tokens - b.tokens if "-" in token]
    theirs = [set(token.split("-")) for token in b.tokens - a.tokens if "-" in token]
    for parts in mine:
        if any(set(parts) & other and set(parts) != other for other in theirs):
            return True
        if parts[0] in _SCOPE_PARTS and "-".join(parts[1:]) in b.tokens:
            return True
    return False


def unmatched(a: TextFeatures, b: TextFeatures) -> tuple[list[str], list[str], int]:
    """The content words of a and of b with no counterpart on the other side, and how many matched."""
    rest = list(zip(b.content, b.content_raw))
    left = []
    for word, raw in zip(a.content, a.content_raw):
        match = next(
            (i for i, (other, other_raw) in enumerate(rest) if typo_equal(word, other) or typo_equal(raw, other_raw)),
            None,
        )
        if match is None:
            left.append(word)
        else:
            rest.pop(match)
    return left, [word for word, _ in rest], len(a.content) - len(left)


def _changed_terms(a: TextFeatures, b: TextFeatures, near_overlap: float, min_matched: int = 1) -> str | None:
    only_a, only_b, matched = unmatched(a, b)
    swapped_one = matched >= 1 and len(only_a) == len(only_b) == 1  # "hotel pool" / "hotel gym"
    if matched < max(min_matched, near_overlap * min(len(a.content), len(b.content))) and not swapped_one:
        return None
    verbs_a = [word for word in only_a if word in a.verbs]
    verbs_b = [word for word in only_b if word in b.verbs]
    for verb_a, verb_b in zip(verbs_a, verbs_b):  # "how do I cancel" = "how do I end": verbs may differ
        only_a.remove(verb_a)
        only_b.remove(verb_b)
    if not (only_a or only_b):
        return None
    return "entity" if only_a and only_b else "scope"


class GuardVerifier:
    """The checks above as a Verifier (verify.py): the question's words, then, in a
    conversation, its context (a dependent message against a self-contained one is "context")."""

    name = "guards"

    def __init__(self, config) -> None:
        self.config = config  # a GuardConfig

    def reject_reason(self, candidate: Candidate) -> str | None:
        reason = self._question_reason(candidate)
        new, cached = candidate.new_context, candidate.cached_context
        if reason is not None or (new is None and cached is None):
            return reason
        if new is None or cached is None or candidate.context_similarity is None:
            return "context"
        return check_context(new, cached, candidate.context_similarity, self.config.context_threshold)

    def _question_reason(self, candidate) -> str | None:
        g = self.config
        return check_question(
            candidate.new_features,
            candidate.cached_features,
            candidate.similarity,
            g.near_overlap,
            g.min_matched,
            g.trust_similarity,
        )


class FactVerifier(GuardVerifier):
    """Only check_facts on the question (negation, numbers, dates), then the conversation's context
    as GuardVerifier checks it: the part of the guards that carries over to other traffic."""

    name = "facts"

    def _question_reason(self, candidate) -> str | None:
        return check_facts(candidate.new_features, candidate.cached_features)


if TYPE_CHECKING:  # the type checker holds the guard verifiers to the Verifier contract
    _guards: type[Verifier] = GuardVerifier
    _facts: type[Verifier] = FactVerifier
