"""Conversation-aware keys: when the turns before the last message are part of the question.

"Cancel it" after a chat about a streaming plan and "cancel it" after one about a gym are
the same string, and a cache keyed on the last message serves one the other's answer
(fow-cache measures 98% wrong answers for such caches). So every request is split into
the last user message and its context, and the last message is judged:

    self-contained  names what it asks about and points at nothing earlier ("What's the
                    cooling-off period for a new Kestrel broadband contract?"): the
                    context is ignored, so the same question after different small talk hits.
    dependent       points back ("it", "that", "the second one", "yes please") or is too
                    short to stand alone ("how do I verify?"): the context is part of the
                    key, and a hit needs a similar context with the same facts in it.

The context is the last `context_turns` messages before the last one (the recent turns
carry the referent) plus the numbers and names of the whole conversation (a detail given
twenty turns back still changes the answer).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ragcache.semantic.text import TextFeatures, clean, features, strip_pleasantries

# Words that point at something said before.
_POINTERS = frozenset(
    """
    it its that this these those they them their one ones same other others else former latter
    he him his she her then previous above earlier either both
    """.split()
)
# "so ...", "and ...", "ok so ...": the message carries on from the one before.
_CONTINUES = re.compile(r"^\W*(?:(?:ok|okay|right|alright)\W+)?(?:so|and|but|then|also|plus)\b", re.I)
# "this year", "that day": a time, not a pointer.
_TIME_DEICTIC = re.compile(
    r"\b(?:this|that|next|last)\s+(?:year|month|week|weekend|morning|afternoon|evening|time|day)\b", re.I
)
_REPLIES = re.compile(
    r"^(yes|yeah|yep|yup|no|nope|nah|ok|okay|sure|fine|great|perfect|please|go ahead|go on|do it|"
    r"sounds good|that works|thanks|cool|right|alright)\b",
    re.I,
)
_ORDINAL = re.compile(r"^\W*(?:the\s+)?(?:first|second|third|last|other|former|latter|1st|2nd|3rd|option\s+\d)\b", re.I)
_ORDINAL_REFERENCE = re.compile(r"\bthe\s+(?:first|second|third|last|other|former|latter|earlier|later)\b", re.I)
_EXISTENTIAL = re.compile(r"\b(is|are|was|were|will|would|be)\s+there\b", re.I)
_WORD = re.compile(r"[a-z][a-z'-]*", re.I)
MIN_CONTENT_WORDS = 4


class Message(NamedTuple):
    role: str  # "system", "user", "assistant", "tool"
    content: str


class Conversation(NamedTuple):
    """A chat request split the way the cache keys it."""

    system: str  # system messages joined; part of the exact-match scope
    history: tuple[Message, ...]  # every message before the last user message, system excluded
    text: str  # the last user message


def split_messages(messages: Sequence[Message | dict]) -> Conversation:
    """System prompt, history and last user message of an OpenAI-style message list."""
    normalised = [
        m if isinstance(m, Message) else Message(str(m["role"]), str(m.get("content") or "")) for m in messages
    ]
    last_user = max((i for i, m in enumerate(normalised) if m.role == "user"), default=None)
    if last_user is None:
        raise ValueError("a conversation needs at least one user message")
    system = "\n".join(m.content for m in normalised if m.role == "system")
    history = tuple(m for m in normalised[:last_user] if m.role != "system")
    return Conversation(system, history, normalised[last_user].content)


def is_self_contained(text: str) -> bool:
    """Whether the message can be answered without the turns before it (see the module docstring)."""
    core = strip_pleasantries(text)
    if answers_reply(text) or _CONTINUES.match(clean(text)):
        return False
    words = [w.lower().strip("'") for w in _WORD.findall(_TIME_DEICTIC.sub(" ", _EXISTENTIAL.sub(" ", core)))]
    if any(word in _POINTERS for word in words) or _ORDINAL_REFERENCE.search(core):
        return False
    analysed = features(core)
    return len(analysed.content) >= (2 if analysed.entities else MIN_CONTENT_WORDS)


def context_text(history: Sequence[Message], turns: int) -> str:
    """The last `turns` messages, one per line, as the context's embedding sees them."""
    return "\n".join(clean(m.content) for m in history[-turns:] if m.content)


def facts_text(history: Sequence[Message]) -> str:
    """The whole history, for the numbers and names the context guard compares."""
    return "\n".join(clean(m.content) for m in history if m.content)


class ContextKey(NamedTuple):
    """The part of a conversation a dependent message is keyed and checked on."""

    vector: np.ndarray  # (dim,) embedding of context_text(history, turns)
    facts: TextFeatures  # numbers and names anywhere in the history
    opening: TextFeatures  # the first exchange, which usually sets what the chat is about
    last_reply: TextFeatures  # the last assistant message: what "yes please" or "the second one" answers
    user_turns: str  # what the user said before, normalised: equal user turns and a different last
    # reply mean the same words answer a different offer


def context_key(history: Sequence[Message], vector: np.ndarray) -> ContextKey:
    replies = [m.content for m in history if m.role == "assistant"]
    said = " ".join(strip_pleasantries(m.content).lower() for m in history if m.role == "user")
    return ContextKey(
        vector,
        features(facts_text(history)),
        features(facts_text(history[:2])),
        features(replies[-1] if replies else ""),
        " ".join(re.findall(r"[a-z0-9]+", said)),
    )


def answers_reply(text: str) -> bool:
    """ "yes please", "go ahead", "the second one": a message whose whole meaning is the reply it answers."""
    core = clean(text)
    return bool(_REPLIES.match(core) or _ORDINAL.match(core))
