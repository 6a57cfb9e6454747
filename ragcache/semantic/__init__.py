"""The semantic cache: answer a request from an earlier one that asked the same thing in other words.

    embedder.py      text -> unit vectors (sentence-transformers, all-MiniLM-L6-v2 offline)
    classifier.py    request -> category (client's, rules, nearest centroid)
    policy.py        per-category threshold, TTL, quota, switch
    adaptive.py      thresholds and TTLs in force: relaxed under load, tightened by false hits
    index/           nearest neighbours per (tenant, category): hnswlib or faiss
    answers/         answer documents: Redis or process memory
    conversation.py  last message vs context: what a multi-turn request is keyed on
    text.py          words, numbers, dates, names of a text; lexicon.py the word lists
    verify.py        the verifier seam (Candidate, Verifier, make_verifier by name)
    guards.py        word-level verifier: negation, numbers, dates, names, roles, scope, context
    learned.py       learned thresholds holding an error bound δ per category and entry (vCache)
    pair_verifier.py the learned pair classifier verifier
    agreement.py     does a fresh engine answer agree with the cached one (shadow checks)
    shard.py         one (tenant, category): index, entries, quota eviction
    cache.py         SemanticCache: lookup, store, record_check, learn, invalidate(_documents),
                     report_false_hit, stats
    config.py        its settings; stats.py its snapshots; types.py the values crossing its API

Heavy libraries (sentence-transformers, hnswlib, faiss, redis) are imported where used.
"""

from ragcache.semantic.adaptive import LoadConfig, LoadState
from ragcache.semantic.cache import SemanticCache
from ragcache.semantic.config import GuardConfig, SemanticCacheConfig
from ragcache.semantic.conversation import Message
from ragcache.semantic.index import IndexConfig
from ragcache.semantic.learned import LearnedConfig, Observation
from ragcache.semantic.policy import CATEGORIES, DEFAULT_POLICIES, CategoryPolicy
from ragcache.semantic.stats import CategoryStats, SemanticCacheStats
from ragcache.semantic.types import LookupOutcome, SemanticHit, SemanticQuery, document_digest, documents_hash

__all__ = [
    "CATEGORIES",
    "DEFAULT_POLICIES",
    "CategoryPolicy",
    "CategoryStats",
    "GuardConfig",
    "IndexConfig",
    "LearnedConfig",
    "LoadConfig",
    "LoadState",
    "LookupOutcome",
    "Message",
    "Observation",
    "SemanticCache",
    "SemanticCacheConfig",
    "SemanticCacheStats",
    "SemanticHit",
    "SemanticQuery",
    "document_digest",
    "documents_hash",
]
