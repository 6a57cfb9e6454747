"""The engine over a TieredStore with a real Redis tier: replicas share chunks, a dead Redis costs nothing but reuse."""

import torch

from ragcache.engine.generate import SamplingParams
from ragcache.engine.runner import RagRequest
from ragcache.storage.cpu import CpuTier
from ragcache.storage.gpu import GpuTier
from ragcache.storage.tiered import TieredStore
from ragcache.storage.redis import RedisTier

from conftest import DOCUMENTS, QUESTION, tiny_model
from redis_server import wait_until

MiB = 1 << 20


def replica_store(url: str, namespace: str, fingerprint: str, device_bytes: int = 64 * MiB) -> TieredStore:
    return TieredStore(
        [GpuTier(device_bytes, device="cpu"), CpuTier(64 * MiB),
         RedisTier(url, namespace=namespace, model_fingerprint=fingerprint, timeout_s=0.3)]
    )


def ask(engine):
    """The same RAG request; past the prefix cache, so every ask looks its chunks up in the store."""
    request = RagRequest(QUESTION, DOCUMENTS, sampling=SamplingParams(max_tokens=3), prefix_cache=False)
    return engine.generate(request, return_logprobs=True)


def test_two_replicas_share_chunks_through_redis(make_engine, redis_url, redis_namespace):
    model = tiny_model()
    first = make_engine(model)
    fingerprint = first.loaded.fingerprint
    first.store = replica_store(redis_url, redis_namespace, fingerprint)
    second = make_engine(model, store=replica_store(redis_url, redis_namespace, fingerprint))

    computed = ask(first)
    reused = ask(second)
    assert (computed.chunk_hits, computed.chunk_misses) == (0, 4)
    assert (reused.chunk_hits, reused.chunk_misses) == (4, 0)
    # raw codec: the second replica blends bit-identical KV, so it answers identically
    assert torch.equal(reused.first_token_logprobs, computed.first_token_logprobs)
    stats = second.store.stats()
    assert stats["store"].promotions == 5  # the prefix and four documents, from Redis to the device tier
    assert stats["tiers"][2].hits == 5


def test_dead_redis_degrades_to_local_tiers(make_engine, throwaway_redis):
    engine = make_engine()
    engine.store = replica_store(throwaway_redis.url, "dead", engine.loaded.fingerprint)
    throwaway_redis.kill()
    first = ask(engine)
    again = ask(engine)
    assert (first.chunk_misses, again.chunk_hits) == (4, 4)  # computed, then served from local tiers
    redis_stats = engine.store.stats()["tiers"][2]
    assert not redis_stats.available and redis_stats.errors >= 1
    assert engine.store.stats()["store"].write_through_failures >= 1

    throwaway_redis.start()  # same port: the tier reconnects by itself
    redis_tier = engine.store.tiers[2]
    key = engine.store.local[0].keys()[0]
    chunk = engine.store.get(key)
    assert wait_until(lambda: redis_tier.put(key, chunk), timeout_s=15)
    assert redis_tier.get(key) is not None and redis_tier.stats().available


def test_a_chunk_evicted_from_every_local_tier_comes_back_from_redis(make_engine, redis_url, redis_namespace):
    engine = make_engine()
    one_chunk = 25_000  # bytes: room for one of this tiny model's chunk caches (about 22 kB) per local tier
    engine.store = TieredStore(
        [GpuTier(one_chunk, device="cpu"), CpuTier(one_chunk),
         RedisTier(redis_url, namespace=redis_namespace, model_fingerprint=engine.loaded.fingerprint)]
    )
    first = ask(engine)
    second = ask(engine)
    assert first.chunk_misses == 4 and second.chunk_hits == 4
    assert torch.equal(first.first_token_logprobs, second.first_token_logprobs)
    assert engine.store.stats()["tiers"][2].hits >= 3  # what the local tiers could not keep


def test_flushing_the_redis_tier_empties_the_namespace(make_engine, redis_url, redis_namespace):
    engine = make_engine()
    engine.store = replica_store(redis_url, redis_namespace, engine.loaded.fingerprint)
    ask(engine)
    redis_tier = engine.store.tiers[2]
    assert len(redis_tier.keys()) == 5
    assert sum(redis_tier.delete(key) for key in redis_tier.keys()) == 5
    assert redis_tier.keys() == [] and redis_tier.usage().entries == 0
