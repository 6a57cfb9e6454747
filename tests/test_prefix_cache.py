"""The prefix cache: every request's KV kept as blocks; a new request computes only what follows its longest
cached prefix. Tiny random models, real stores (Redis where replicas share blocks)."""

import torch

from ragcache.engine.generate import SamplingParams
from ragcache.engine.runner import BlendEngine, EngineConfig, RagRequest
from ragcache.kv import ChunkKey
from ragcache.storage.cpu import CpuTier
from ragcache.storage.eviction import make_policy
from ragcache.storage.gpu import GpuTier
from ragcache.storage.prefix import RadixPrefixCache
from ragcache.storage.redis import RedisTier
from ragcache.storage.tiered import TieredStore

from conftest import kv_chunk, loaded, tiny_model

SYSTEM = "You are an agent. Use tools when needed."
DOCS = (
    "The Eiffel Tower is in Paris. It was finished in 1889 for the World's Fair and is 330 metres tall.",
    "The Colosseum is in Rome. It held gladiators' fights and could seat about fifty thousand people.",
    "The Golden Gate Bridge spans the strait into San Francisco Bay. It opened to traffic in 1937.",
)


def turn(question, history=(), program_id="prog-1", namespace="default", mode="blend", documents=()):
    return RagRequest(question, documents=documents, system_prompt=SYSTEM, history=tuple(history),
                      program_id=program_id, namespace=namespace, mode=mode, sampling=SamplingParams(max_tokens=5))


def two_turns(engine, **kwargs):
    first = engine.generate(turn("List the files in /tmp.", **kwargs), return_logprobs=True)
    history = [("user", "List the files in /tmp."), ("assistant", first.text.strip() or "ok"),
               ("user", "Tool result: a.txt b.txt")]
    second_request = turn("Now read a.txt.", history, **kwargs)
    return first, second_request, engine.generate(second_request, return_logprobs=True)


def whole_blocks(engine, tokens):
    return tokens // engine.prefix.block_tokens * engine.prefix.block_tokens


def test_an_identical_prompt_reuses_every_whole_block_but_the_last_token_and_answers_the_same(make_engine):
    engine = make_engine(prefix_block_tokens=8)
    first = engine.generate(turn("Ping?", program_id=None, documents=DOCS), return_logprobs=True)
    again = engine.generate(turn("Ping?", program_id=None, documents=DOCS), return_logprobs=True)
    assert first.prefix_cached_tokens == 0 and first.chunk_misses == len(DOCS)
    assert again.prefix_cached_tokens == first.prompt_tokens - 1  # every token but the last, its part block too
    assert again.chunk_hits == again.chunk_misses == 0  # no chunk was looked up: the path covered them
    assert again.token_ids == first.token_ids
    assert torch.allclose(again.first_token_logprobs, first.first_token_logprobs, atol=1e-4)


def test_a_follow_up_over_the_same_documents_reuses_them_as_they_were_blended(make_engine):
    engine = make_engine(prefix_block_tokens=8)
    first = engine.generate(turn("Where is the Eiffel Tower?", program_id=None, documents=DOCS))
    follow = engine.generate(turn("When did the bridge open?", program_id=None, documents=DOCS))
    parts = engine._prompt(turn("When did the bridge open?", program_id=None, documents=DOCS))
    covered = len(parts.prefix_ids) + parts.num_chunk_tokens
    assert follow.prefix_cached_tokens >= whole_blocks(engine, covered)
    assert follow.prefix_cached_tokens < follow.prompt_tokens
    assert first.prefix_cached_tokens == 0


def test_a_hit_that_stops_inside_fused_documents_is_not_used(make_engine):
    engine = make_engine(prefix_block_tokens=8)
    engine.generate(turn("Where?", program_id=None, documents=DOCS))
    reordered = engine.generate(turn("Where?", program_id=None, documents=(DOCS[0], DOCS[2], DOCS[1])))
    assert reordered.prefix_cached_tokens == 0  # only the prefix and the first document match: blend as usual
    assert reordered.chunk_hits == 3


def test_exact_and_blended_kv_live_in_different_trees(make_engine):
    engine = make_engine(prefix_block_tokens=8)
    engine.generate(turn("Where?", program_id=None, documents=DOCS, mode="blend"))
    full = engine.generate(turn("Where?", program_id=None, documents=DOCS, mode="full"))
    assert full.prefix_cached_tokens == 0  # full prefill never reuses blended KV
    again = engine.generate(turn("Where?", program_id=None, documents=DOCS, mode="full"))
    assert again.prefix_cached_tokens > 0 and again.token_ids == full.token_ids


def test_a_miss_answers_as_on_an_empty_cache_in_every_mode(make_engine):
    model = tiny_model()
    for mode in ("full", "prefix", "reuse", "blend"):
        fresh = make_engine(model=model, prefix_block_tokens=8)
        busy = make_engine(model=model, prefix_block_tokens=8)
        busy.generate(turn("Another question entirely?", program_id=None, documents=DOCS[::-1], mode=mode))
        request = RagRequest("Where is the Colosseum?", documents=DOCS, mode=mode,
                             sampling=SamplingParams(max_tokens=6))
        a, b = fresh.generate(request, return_logprobs=True), busy.generate(request, return_logprobs=True)
        assert b.prefix_cached_tokens == 0, mode
        assert a.token_ids == b.token_ids, mode
        assert torch.equal(a.first_token_logprobs, b.first_token_logprobs), mode


def test_second_turn_reuses_the_first_turns_kv_exactly(make_engine):
    engine = make_engine(prefix_block_tokens=8)
    first, request, second = two_turns(engine)
    assert first.prefix_cached_tokens == 0 and first.prefix_path is not None
    assert second.prefix_cached_tokens >= whole_blocks(engine, first.prompt_tokens)
    assert second.cached_tokens == second.prefix_cached_tokens
    fresh = make_engine(model=engine.loaded.model, prefix_block_tokens=8)
    full = fresh.generate(RagRequest(**{**request.__dict__, "program_id": None, "mode": "full"}),
                          return_logprobs=True)
    assert torch.allclose(second.first_token_logprobs, full.first_token_logprobs, atol=1e-4)
    assert second.token_ids == full.token_ids


def test_paths_share_their_blocks(make_engine):
    engine = make_engine(prefix_block_tokens=8)
    engine.generate(turn("Ping?", program_id=None))
    nodes = engine.prefix.stats()["nodes"]
    engine.generate(turn("Pong?", program_id=None))  # the same system prompt: its blocks are stored once
    prompt = engine._prompt(turn("Pong?", program_id=None))
    new_blocks = engine.prefix.stats()["nodes"] - nodes
    assert new_blocks < (prompt.num_tokens + 5) // 8
    assert engine.store.usage().entries == engine.prefix.stats()["nodes"] + 1  # + the system prefix chunk


def test_a_program_is_a_label_on_its_latest_path(make_engine):
    engine = make_engine(prefix_block_tokens=8)
    _, _, second = two_turns(engine)
    assert engine.program_records() == [("default", "prog-1", second.prefix_path.num_tokens)]
    assert engine.forget_program("default", "prog-1")
    assert engine.program_records() == []


def test_prefix_paths_are_isolated_by_tenant(make_engine):
    engine = make_engine(prefix_block_tokens=8)
    engine.generate(turn("Ping?", namespace="alpha"))
    other = engine.generate(turn("Ping?", namespace="beta"))
    assert other.prefix_cached_tokens == 0


def test_a_replica_sharing_redis_finds_the_blocks_another_computed(tokenizer, redis_url, redis_namespace):
    model = loaded(tiny_model(), tokenizer)

    def replica():
        store = TieredStore([CpuTier(64 << 20), RedisTier(redis_url, namespace=redis_namespace,
                                                         model_fingerprint=model.fingerprint)])
        return BlendEngine(model, store, EngineConfig(prefix_block_tokens=8))

    a, b = replica(), replica()
    first = a.generate(turn("List the files in /tmp.", documents=DOCS))
    a.close()  # its writes are through to Redis
    second = b.generate(turn("List the files in /tmp.", documents=DOCS))
    assert second.prefix_cached_tokens >= whole_blocks(b, first.prompt_tokens - 1)  # whole blocks by key
    assert second.token_ids == first.token_ids
    assert b.prefix.stats()["hit_tokens"] == second.prefix_cached_tokens
    b.close()


def test_blocks_the_store_dropped_are_pruned_and_recomputed(make_engine):
    engine = make_engine(prefix_block_tokens=8)
    first = engine.generate(turn("Ping?", program_id=None))
    path = first.prefix_path
    engine.store.delete(path.keys[2])  # as if evicted: blocks 0 and 1 are still reachable
    again = engine.generate(turn("Ping?", program_id=None))
    assert again.prefix_cached_tokens == 16
    assert engine.prefix.stats()["evictions"] >= 1
    assert again.token_ids == first.token_ids


def test_the_store_evicts_a_paths_leaves_first(make_engine):
    probe = make_engine(prefix_block_tokens=8)
    path = probe.generate(turn("Ping?", program_id=None)).prefix_path
    block_bytes = path.nbytes // len(path.keys)
    top = GpuTier(block_bytes * (len(path.keys) + 2), device="cpu", policy=make_policy("lru"))
    engine = make_engine(model=probe.loaded.model, store=TieredStore([top]), prefix_block_tokens=8)
    engine.generate(turn("Ping?", program_id=None))
    engine.generate(RagRequest("Something else entirely, and longer?", system_prompt="Be brief.",
                               sampling=SamplingParams(max_tokens=5)))  # needs room: evicts
    kept = [top.contains(key) for key in path.keys]
    assert not all(kept)
    assert kept == sorted(kept, reverse=True)  # what survives is a root-side prefix of the path


def test_prefetching_a_program_brings_its_path_back_to_the_top_tier(make_engine):
    engine = make_engine(store=TieredStore([GpuTier(64 << 20, device="cpu"), CpuTier(64 << 20)]), prefix_block_tokens=8)
    first = engine.generate(turn("List the files in /tmp."))
    top, cpu = engine.store.local
    for key in first.prefix_path.keys:  # as if demoted to the CPU tier while a tool ran
        cpu.put(key, top.get(key))
        top.delete(key)
    assert engine.prefetch_program("default", "prog-1")
    assert all(top.contains(key) for key in first.prefix_path.keys)
    assert engine.prefix.stats()["promoted_tokens"] == first.prefix_path.num_tokens
    assert not engine.prefetch_program("default", "no-such-program")


def test_a_next_turn_reuses_every_token_it_shares_with_the_previous_path_not_only_whole_blocks(make_engine):
    engine = make_engine(prefix_block_tokens=8)
    first, request, second = two_turns(engine)
    first_ids = engine._prompt(turn("List the files in /tmp.")).all_ids
    second_ids = engine._prompt(request).all_ids

    def shared(path):
        n = 0
        while n < min(len(path), len(second_ids)) and path[n] == second_ids[n]:
            n += 1
        return n

    fed = shared((*first_ids, *first.token_ids[:-1]))  # the answer's last token never went through the model
    assert min(fed, len(second_ids) - 1) <= second.prefix_cached_tokens <= shared((*first_ids, *first.token_ids))
    assert second.prefix_cached_tokens % 8 or fed % 8 == 0  # not rounded down to a block


def test_blocks_evicted_while_a_request_ran_count_as_not_stored_and_are_stored_again():
    store = TieredStore([GpuTier(1 << 20, device="cpu")])
    cache = RadixPrefixCache(store, "fp", block_tokens=4)
    ids = list(range(100, 112))
    keys = cache.block_keys("t", "exact", ids, tail=True)
    cache.insert("t", "exact", keys, len(ids), 0, [kv_chunk(4)] * 3)
    assert cache.known(keys) == 3
    store.local[0].delete(keys[1])  # the store evicted it; the tree has not heard
    assert cache.known(keys) == 1  # so a finished request stores the path from there on
    cache.insert("t", "exact", keys, len(ids), 1, [kv_chunk(4)] * 2)
    assert store.held_locally(keys) == [True, True, True]
    assert cache.match("t", "exact", ids + [1]).num_tokens == 12


def test_a_stored_path_ages_from_its_end_so_the_store_evicts_its_leaves_first():
    store = TieredStore([GpuTier(5 * kv_chunk(4).nbytes, device="cpu", policy=make_policy("lru"))])
    cache = RadixPrefixCache(store, "fp", block_tokens=4)
    ids = list(range(100, 112))
    keys = cache.block_keys("t", "exact", ids, tail=True)
    cache.insert("t", "exact", keys[:2], 8, 0, [kv_chunk(4)] * 2)  # a first turn: its blocks are old now
    other = cache.block_keys("t", "exact", list(range(500, 508)), tail=True)
    cache.insert("t", "exact", other, 8, 0, [kv_chunk(4)] * 2)  # another program's, newer
    cache.insert("t", "exact", keys, 12, 2, [kv_chunk(4)])  # the next turn extends the first path
    store.put(ChunkKey("newcomer"), kv_chunk(4))  # no room: the oldest block goes
    assert store.held_locally(other) == [True, False]  # the other path's leaf
    store.put(ChunkKey("newcomer-2"), kv_chunk(4))
    assert store.held_locally(other) == [False, False]
    assert store.held_locally(keys) == [True, True, True]  # the path just used is the newest, root last
