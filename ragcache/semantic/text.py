"""What the guards compare: one request's text reduced to words, numbers, dates, names and roles.

All of it is plain string work (about 50 µs a request), done once per request and once
per stored entry; the guards then compare two of these without touching the text again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from ragcache.semantic.lexicon import (
    DATE_WORDS,
    IGNORABLE,
    NEGATORS,
    NUMBER_WORDS,
    PHRASES,
    PLEASANTRIES,
    ROLE_PREPOSITIONS,
    SYNONYMS,
    UNIT_WORDS,
    VERB_CUES,
)

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"})
_CONTRACTIONS = (
    (re.compile(r"\bcan't\b|\bcannot\b", re.I), "can not"),
    (re.compile(r"\bwon't\b", re.I), "will not"),
    (re.compile(r"\bshan't\b", re.I), "shall not"),
    (re.compile(r"n't\b", re.I), " not"),
    (re.compile(r"'m\b", re.I), " am"),
    (re.compile(r"'re\b", re.I), " are"),
    (re.compile(r"'ve\b", re.I), " have"),
    (re.compile(r"'ll\b", re.I), " will"),
    (re.compile(r"'(s|d)\b", re.I), ""),
    (re.compile(r"(?<=[a-z])s'(?=\s|$)", re.I), "s"),
)
# a token: a number with its currency, separators and unit, or a word (hyphens and digits inside kept)
_TOKEN = re.compile(r"[£$€]?\d[\d,]*(?:[.:]\d+)?(?:\s?(?:am|pm)\b)?[a-z%]*|[a-z][a-z0-9]*(?:[-/][a-z0-9]+)*", re.I)
_SENTENCE_END = re.compile(r"[.!?]+\s+|\n+")
_NUMERIC = re.compile(r"^[£$€]?(\d[\d,]*)(?:([.:])(\d+))?\s?(am|pm)?([a-z%]*)$", re.I)
_DOUBLED = frozenset("bdglmnprt")
_SUFFIXES = ("ational", "ation", "ings", "ing", "ies", "ied", "ed", "es", "ly", "al", "s")


class TextFeatures(NamedTuple):
    """One text as the guards see it. Built by features(); words are lower case and stemmed."""

    words: tuple[str, ...]  # every word, contractions expanded, stemmed, in order
    tokens: frozenset[str]  # every word as written, lower case (for "un"/"non-" prefixes)
    content: tuple[str, ...]  # the words that carry meaning, synonyms merged, in order
    content_raw: tuple[str, ...]  # the same words as written (lower case), for typo matching
    verbs: frozenset[str]  # the content words standing where a verb stands ("how do I *book*")
    negations: int  # count of negation words ("not", "never", "without", ...)
    numbers: frozenset[str]  # numbers, times and ids, normalised ("7pm" -> "19", "£1,350" -> "1350")
    dates: frozenset[str]  # weekdays, months, "today", "weekend", ...
    entities: frozenset[str]  # capitalised names and acronyms inside sentences, stemmed
    roles: Mapping[str, tuple[str, ...]]  # "from"/"to"/"than" -> the content word each governs
    salient: tuple[str, ...]  # numbers and entities in the order they appear


def stem(word: str) -> str:
    """A crude suffix stripper: enough to make "booking", "books" and "book" one word, and
    "withdrawals" and "withdrawing" another. Both sides of a comparison go through it."""
    word = word.lower().strip("'-")
    stripped = False
    for _ in range(2):
        for suffix in _SUFFIXES:
            if len(word) - len(suffix) >= 3 and word.endswith(suffix) and not word.endswith("ss"):
                word = word[: -len(suffix)] + ("y" if suffix in ("ies", "ied") else "")
                stripped = True
                break
        else:
            break
    if stripped and len(word) >= 4 and word[-1] == word[-2] and word[-1] in _DOUBLED:
        word = word[:-1]  # "submitting" -> "submit", "cancelled" -> "cancel"
    return word[:-1] if len(word) >= 4 and word.endswith("e") else word


_CANONICAL = {form: group[0] for group in SYNONYMS for word in group for form in (word, stem(word))}


def canonical(word: str) -> str:
    """The synonym group a (stemmed) word belongs to, or the word itself."""
    return _CANONICAL.get(word, _CANONICAL.get(stem(word), stem(word)))


def typo_equal(a: str, b: str) -> bool:
    """Equal, or one slip apart (one edit or swap from 5 letters, two from 9): "adress" = "address"."""
    if a == b:
        return True
    shortest = min(len(a), len(b))
    if shortest < 4 or max(len(a), len(b)) < 5 or a[:1] != b[:1] or any(c.isdigit() for c in a + b):
        return False
    return _edit_distance(a, b, 2 if shortest >= 9 else 1) <= (2 if shortest >= 9 else 1)


def _edit_distance(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment distance, giving up past limit."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                current[j] = min(current[j], previous2[j - 2] + 1)
        if min(current) > limit:
            return limit + 1
        previous2, previous = previous, current
    return previous[-1]


def clean(text: str) -> str:
    """Typographic quotes and dashes made plain, spaces collapsed; line breaks (which end
    sentences in a joined conversation) kept."""
    lines = (" ".join(line.split()) for line in text.translate(_QUOTES).splitlines())
    return "\n".join(line for line in lines if line)


_PHRASES = re.compile(r"\b(?:" + "|".join(re.escape(p) for p in PHRASES) + r")\b", re.I)
_SKIPPED = IGNORABLE | NEGATORS | UNIT_WORDS | frozenset(NUMBER_WORDS)


_LEADING_SEGMENT = re.compile(r"^\s*([^,!.:;?]*)[,!.:;]+")
_TRAILING_SEGMENT = re.compile(r"[,!.:;?]\s*([^,!.:;?]*)[,!.:;?]*\s*$")
_LEADING_FILLERS = frozenset("um uh er erm so okay ok yeah well oh but and hmm right".split())
_TRAILING_WORDS = re.compile(r"(?:[\s,]+(?:please|thanks|thank you|cheers))+(?=[?.!]*$)", re.I)


def strip_pleasantries(text: str) -> str:
    """The request without greetings, apologies, fillers and thanks around it; what gets embedded."""
    text = clean(text)
    while (match := _LEADING_SEGMENT.match(text)) and _only_pleasantries(match.group(1)):
        text = text[match.end() :].lstrip()
    while (match := _TRAILING_SEGMENT.search(text)) and match.start() > 0 and _only_pleasantries(match.group(1)):
        text = text[: match.start()].rstrip() + ("?" if "?" in match.group(0) else "")
    words = text.split(" ")
    while len(words) > 1 and words[0].lower().strip(",") in _LEADING_FILLERS:
        words = words[1:]
    text = _TRAILING_WORDS.sub("", " ".join(words))
    return text[:1].upper() + text[1:]


def _only_pleasantries(segment: str) -> bool:
    words = re.findall(r"[a-z']+", segment.lower())
    return bool(words) and all(word.strip("'") in PLEASANTRIES for word in words)


def features(text: str) -> TextFeatures:
    text = strip_pleasantries(text)
    expanded = text
    for pattern, replacement in _CONTRACTIONS:
        expanded = pattern.sub(replacement, expanded)
    expanded = _PHRASES.sub(lambda m: PHRASES[m.group(0).lower()], expanded)
    raw = [m.group(0) for m in _TOKEN.finditer(expanded)]
    lowered = [token.lower() for token in raw if token[0].isalpha()]
    words = tuple(stem(token) for token in lowered)
    numbers, salient = _numbers(raw), []
    entities = {canonical(entity) for entity in _entities(expanded)}
    for token in raw:
        if _number_value(token) is not None or stem(token) in entities:
            salient.append(_number_value(token) or stem(token))
    content, content_raw, verbs = [], [], set()
    for i, word in enumerate(lowered):
        if word not in _SKIPPED:
            content.append(canonical(word))
            content_raw.append(word)
            if i == 0 or lowered[i - 1] in VERB_CUES:
                verbs.add(canonical(word))
    return TextFeatures(
        words=words,
        tokens=frozenset(lowered),
        content=tuple(content),
        content_raw=tuple(content_raw),
        verbs=frozenset(verbs),
        negations=sum(word in NEGATORS for word in lowered),
        numbers=frozenset(numbers),
        dates=frozenset(_dates(lowered)),
        entities=frozenset(entities),
        roles=_roles(lowered),
        salient=tuple(salient),
    )


def _number_value(token: str) -> str | None:
    """ "7pm" -> "19", "9:15" -> "9:15", "£1,350" -> "1350", "10GB" -> "10", "P60"/"2FA" -> None here."""
    match = _NUMERIC.match(token)
    if match is None:
        return None
    whole, separator, fraction, meridiem, _unit = match.groups()
    value = int(whole.replace(",", ""))
    if meridiem:
        value = value % 12 + (12 if meridiem.lower() == "pm" else 0)
    if separator == ":":
        return f"{value}:{fraction}"
    if separator == "." and fraction.strip("0"):
        return f"{value}.{fraction.rstrip('0')}"
    return str(value)


def _numbers(raw: list[str]) -> list[str]:
    """Digits, number words ("twenty one" -> "21") and ids with digits in them ("PB-5521", "P60")."""
    found: list[str] = []
    pending: int | None = None
    for token in raw:
        parts = token.lower().split("-") if not token[0].isdigit() else [token]
        for part in parts:
            value = _number_value(part)
            if value is not None:
                found.append(value)
                continue
            word = NUMBER_WORDS.get(part)
            if word is None:
                if pending is not None:
                    found.append(str(pending))
                    pending = None
                if any(c.isdigit() for c in part):
                    found.append(part.lower())  # an id: "p60", "v5c", "ch-40127"
                continue
            if pending is not None and word in (100, 1000, 1_000_000):
                pending *= word
            elif pending is not None and pending >= 20 and pending % 10 == 0 and word < 10:
                pending += word
            else:
                if pending is not None:
                    found.append(str(pending))
                pending = word
    if pending is not None:
        found.append(str(pending))
    return found


def _dates(words: list[str]) -> set[str]:
    """Day, month and period words, plural or misspelt ("Mondys", "evenigns") read as the word."""
    return {date for word in words for date in DATE_WORDS if typo_equal(word, date) or typo_equal(word, date + "s")}


def _entities(text: str) -> set[str]:
    """Capitalised words and acronyms that do not start a sentence; none from text that shouts
    or Title Cases Every Word (there, case says nothing)."""
    found = set()
    for sentence in _SENTENCE_END.split(text):
        tokens = [m.group(0) for m in _TOKEN.finditer(sentence) if m.group(0)[0].isalpha()]
        shouted = sum(len(t) > 1 and t.isupper() for t in tokens)
        titled = sum(t[0].isupper() and (len(t) == 1 or t[1:].islower()) for t in tokens)
        if len(tokens) >= 3 and max(shouted, titled) >= 0.8 * len(tokens):
            continue
        for position, token in enumerate(tokens):
            if position > 0 and token[0].isupper() and token.lower() not in IGNORABLE:
                found.add(stem(token))
    return found


def _roles(words: Sequence[str]) -> dict[str, tuple[str, ...]]:
    roles: dict[str, list[str]] = {}
    for i, word in enumerate(words):
        role = ROLE_PREPOSITIONS.get(word)
        if role is None:
            continue
        for following in words[i + 1 :]:
            if following not in IGNORABLE and following not in NEGATORS:
                roles.setdefault(role, []).append(canonical(following))
                break
    return {role: tuple(objects) for role, objects in roles.items()}
