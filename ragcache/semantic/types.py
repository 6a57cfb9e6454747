"""The values that cross the semantic cache's boundary: a query in, a hit out."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from ragcache.semantic.conversation import Message, split_messages


def document_digest(text: str) -> str:
    """One document's digest (sha256 of its text, hex): what an answer records per document,
    so deleting or re-registering that document can drop the answers built on it
    (SemanticCache.invalidate_documents)."""
    return hashlib.sha256(text.encode()).hexdigest()


def documents_hash(documents: Sequence[str]) -> str:
    """The documents a RAG answer was generated from, in order, as one short digest ("" for none).

    A cached RAG answer is reusable only for the same documents: the same question over
    other documents has another answer.
    """
    return documents_hash_of([document_digest(document) for document in documents])


def documents_hash_of(digests: Sequence[str]) -> str:
    """documents_hash from the documents' digests (document_digest), in order."""
    if not digests:
        return ""
    digest = hashlib.sha256()
    for one in digests:
        digest.update(bytes.fromhex(one))
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class SemanticQuery:
    """One request as the semantic cache sees it.

    text: the last user message; history: the messages before it (system messages
    excluded, they go in `system`). category: the client's, or None to let the classifier
    pick. use_cache: the client's `cache` flag; False bypasses lookup and store.
    document_digests: document_digest of each document the answer is built on; given
    without documents_hash, documents_hash is derived from them.
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
    document_digests: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.tenant:
            raise ValueError("tenant must be non-empty")
        if not self.text.strip():
            raise ValueError("text (the last user message) must be non-empty")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        # any sequence of Message or {"role", "content"} dicts in; a hashable tuple of Message kept
        history = tuple(
            m if isinstance(m, Message) else Message(str(m["role"]), str(m.get("content") or "")) for m in self.history
        )
        object.__setattr__(self, "history", history)
        object.__setattr__(self, "document_digests", tuple(self.document_digests))
        if self.document_digests and not self.documents_hash:
            object.__setattr__(self, "documents_hash", documents_hash_of(self.document_digests))

    @classmethod
    def from_messages(cls, tenant: str, messages: Sequence[Message | dict], **fields) -> SemanticQuery:
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
