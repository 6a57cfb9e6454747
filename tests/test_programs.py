"""Agent programs: each turn reuses the program's previous KV exactly and computes only what is new."""

import torch

from ragcache.engine.generate import SamplingParams
from ragcache.engine.runner import RagRequest
from ragcache.storage.cpu import CpuTier
from ragcache.storage.gpu import GpuTier
from ragcache.storage.tiered import TieredStore
from ragcache.storage.redis import RedisTier

SYSTEM = "You are an agent. Use tools when needed."


def turn(question, history=(), program_id="prog-1", namespace="default", mode="blend"):
    return RagRequest(question, system_prompt=SYSTEM, history=tuple(history), program_id=program_id,
                      namespace=namespace, mode=mode, sampling=SamplingParams(max_tokens=5))


def two_turns(engine, **kwargs):
    first = engine.generate(turn("List the files in /tmp.", **kwargs), return_logprobs=True)
    history = [("user", "List the files in /tmp."), ("assistant", first.text.strip() or "ok"),
               ("user", "Tool result: a.txt b.txt")]
    second_request = turn("Now read a.txt.", history, **kwargs)
    return first, second_request, engine.generate(second_request, return_logprobs=True)


def test_second_turn_reuses_the_first_turns_kv_exactly(make_engine):
    engine = make_engine()
    first, request, second = two_turns(engine)
    assert first.program_reused_tokens == 0 and first.program_key is not None
    assert second.program_reused_tokens >= first.prompt_tokens  # the whole first prompt, plus any answer tokens that match
    assert second.cached_tokens == second.program_reused_tokens
    full = engine.generate(RagRequest(**{**request.__dict__, "program_id": None, "mode": "full"}), return_logprobs=True)
    assert torch.allclose(second.first_token_logprobs, full.first_token_logprobs, atol=1e-4)
    assert second.token_ids == full.token_ids


def test_a_retried_turn_reuses_everything_but_its_last_token(make_engine):
    engine = make_engine()
    first = engine.generate(turn("Ping?"))
    again = engine.generate(turn("Ping?"))
    assert again.program_reused_tokens == first.prompt_tokens - 1
    assert again.token_ids == first.token_ids


def test_a_program_keeps_one_entry_in_the_store(make_engine):
    engine = make_engine()
    _, _, second = two_turns(engine)
    entries = engine.store.usage().entries
    assert engine.store.contains(second.program_key)
    third = engine.generate(turn("Third question?", [("user", "x"), ("assistant", "y")]))
    assert engine.store.usage().entries == entries  # the new entry replaced the old one
    assert engine.store.contains(third.program_key) and not engine.store.contains(second.program_key)


def test_programs_are_isolated_by_tenant(make_engine):
    engine = make_engine()
    engine.generate(turn("Ping?", namespace="alpha"))
    other = engine.generate(turn("Ping?", namespace="beta"))
    assert other.program_reused_tokens == 0


def test_a_program_resumes_after_its_kv_moved_to_redis(make_engine, redis_url, redis_namespace):
    engine = make_engine()
    engine.store = TieredStore([GpuTier(64 << 20, device="cpu"), CpuTier(64 << 20),
                                RedisTier(redis_url, namespace=redis_namespace, model_fingerprint=engine.loaded.fingerprint)])
    first = engine.generate(turn("List the files in /tmp."))
    for tier in engine.store.local:  # as if the local tiers had evicted it while a tool ran
        tier.delete(first.program_key)
    history = [("user", "List the files in /tmp."), ("assistant", first.text.strip() or "ok")]
    second = engine.generate(turn("Thanks.", history))
    assert second.program_reused_tokens >= first.prompt_tokens
    assert engine.store.stats()["tiers"][2].hits >= 1


def test_prefetching_a_program_brings_its_kv_back_to_the_top_tier(make_engine):
    engine = make_engine()
    engine.store = TieredStore([GpuTier(64 << 20, device="cpu"), CpuTier(64 << 20)])
    first = engine.generate(turn("List the files in /tmp."))
    top, cpu = engine.store.local
    cpu.put(first.program_key, top.get(first.program_key))  # as if demoted to the CPU tier while a tool ran
    top.delete(first.program_key)
    assert not top.contains(first.program_key) and cpu.contains(first.program_key)
    assert engine.prefetch_program("default", "prog-1")
    assert top.contains(first.program_key)
    assert not engine.prefetch_program("default", "no-such-program")
