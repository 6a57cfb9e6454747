"""The values that cross the semantic cache's boundary: a query in, a hit out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

from ragcache.semantic.conversation import Message, split_messages


def documents_hash(documents: Sequence[str]) -> str:
    """The documents a RAG answer was generated from, in order, as one short digest ("" for none).

    A cached RAG answer is reusable only for the same documents: the same question over
    other documents has another answer.
    """
    if not documents:
        return ""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(hashlib.sha256(document.encode()).digest())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class SemanticQuery:
    """One request as the semantic cache sees it.

    text: the last user message; history: the messages before it (system messages
    excluded, they go in `system`). category: the client's, or None to let the classifier
    pick. use_cache: the client's `cache` flag; False bypasses lookup and store.
    temperature > 0 bypasses too unless cache_sampled (the client asks that a sampled
    request be served and stored anyway).
    """

    tenant: str
    text: str
    history: tuple[Message, ...] = ()  # a list, or dicts with role and content, are accepted too
    system: str = ""
    model: str = ""
    documents_hash: str = ""
    category: str | None = None
    temperature: float = 0.0
    use_cache: bool = True
    cache_sampled: bool = False

    def __post_init__(self) -> None:
        if not self.tenant:
            raise ValueError("tenant must be non-empty")
        if not self.text.strip():
            raise ValueError("text (the last user message) must be non-empty")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        # any sequence of Message or {"role", "content"} dicts in; a hashable tuple of Message kept
        history = tuple(m if isinstance(m, Message) else Message(str(m["role"]), str(m.get("content") or ""))
                        for m in self.history)
        object.__setattr__(self, "history", history)

    @classmethod
    def from_messages(cls, tenant: str, messages: Sequence[Message | dict], **fields) -> "SemanticQuery":
        """From an OpenAI-style message list: the last user message is the text."""
        conversation = split_messages(messages)
        return cls(tenant, conversation.text, conversation.history, conversation.system, **fields)

    @property
    def bypass_reason(self) -> str | None:
        """Why this request skips the cache ("disabled", "sampled"), or None."""
        if not self.use_cache:
            return "disabled"
        if self.temperature > 0 and not self.cache_sampled:
            return "sampled"
        return None


@dataclass(frozen=True)
class SemanticHit:
    """A cached answer served for a query. similarity: of the last messages (0..1)."""

    answer: str
    similarity: float
    entry_id: str
    category: str
    age_s: float
    context_similarity: float | None = None  # set when the conversation's context was compared


@dataclass(frozen=True)
class GuardRejection:
    """A candidate above the threshold that a guard turned down (for stats and debugging)."""

    entry_id: str
    reason: str
    similarity: float


@dataclass(frozen=True)
class LookupOutcome:
    """What one lookup did, for a caller that wants more than hit-or-None (see SemanticCache.lookup_outcome)."""

    hit: SemanticHit | None
    category: str
    bypass: str | None = None  # "disabled", "sampled", "category_off"
    rejections: tuple[GuardRejection, ...] = field(default=())
