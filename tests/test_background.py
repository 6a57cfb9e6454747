"""Background (shadow-check) sequences use only spare capacity and never change a live answer."""

import torch

from ragcache.engine.generate import SamplingParams
from ragcache.engine.runner import BlockingSink, RagRequest
from ragcache.engine.scheduler import SchedulerConfig

from conftest import DOCUMENTS, QUESTION


def request(question=QUESTION, mode="full", max_tokens=6) -> RagRequest:
    return RagRequest(question, tuple(DOCUMENTS), mode=mode, blend_ratio=0.5,
                      sampling=SamplingParams(max_tokens=max_tokens))


def step_until(engine, sinks, watch=lambda: None):
    while not all(sink.done.is_set() for sink in sinks):
        if not engine.step():
            sinks[0].done.wait(0.001)
        watch()


def test_background_work_waits_while_a_live_sequence_runs(make_engine):
    engine = make_engine(scheduler=SchedulerConfig(step_tokens=32, background_step_tokens=8))
    engine.add_documents(list(DOCUMENTS))
    live_sink, shadow_sink = BlockingSink(), BlockingSink()
    shadow = engine.submit(request(max_tokens=1), shadow_sink, background=True, return_logprobs=True)
    live = engine.submit(request(mode="blend", max_tokens=8), live_sink)
    shadow_tokens_while_live = []

    def watch():  # the sequence's own state: its sink hears of the end later, from the writer thread
        if not live.done:
            shadow_tokens_while_live.append(shadow.token_layers)

    step_until(engine, [live_sink, shadow_sink], watch)
    assert set(shadow_tokens_while_live) == {0}  # submitted first, yet nothing of it ran beside the live one
    assert shadow_sink.wait().finish_reason == "length" and engine.stats()["background"]["steps"] > 0


def test_background_pieces_are_small_and_a_live_arrival_preempts_nothing_it_needs(make_engine):
    engine = make_engine(scheduler=SchedulerConfig(step_tokens=64, background_step_tokens=8))
    engine.add_documents(list(DOCUMENTS))
    shadow_sink = BlockingSink()
    engine.submit(request(max_tokens=1), shadow_sink, background=True)
    engine.step()
    assert engine.stats()["last_step_tokens"] <= 8  # idle engine: one small background piece per step
    live_sink = BlockingSink()
    engine.submit(request(mode="full", question="Where?", max_tokens=4), live_sink)
    engine.step()
    assert engine.stats()["last_step_tokens"] > 8  # the live request takes the full step budget at once
    step_until(engine, [live_sink, shadow_sink])


def test_live_answers_are_the_same_with_or_without_background_work(make_engine):
    alone_engine = make_engine()
    alone_engine.add_documents(list(DOCUMENTS))
    alone = alone_engine.generate(request(mode="blend", max_tokens=8), return_logprobs=True)
    engine = make_engine(scheduler=SchedulerConfig(step_tokens=32, background_step_tokens=8))
    engine.add_documents(list(DOCUMENTS))
    sinks = [BlockingSink(), BlockingSink()]
    engine.submit(request(max_tokens=1), sinks[1], background=True)
    engine.step()  # the shadow has started
    engine.submit(request(mode="blend", max_tokens=8), sinks[0], return_logprobs=True)
    step_until(engine, sinks)
    live = sinks[0].wait()
    assert live.token_ids == alone.token_ids
    assert torch.allclose(live.first_token_logprobs, alone.first_token_logprobs, atol=1e-4)


def test_live_admission_preempts_background_work_holding_the_budget(make_engine):
    probe = make_engine()
    probe.add_documents(list(DOCUMENTS))
    need = probe.generate(request(max_tokens=2)).prompt_tokens + 8
    engine = make_engine(scheduler=SchedulerConfig(max_working_kv_bytes=need * probe.kv_bytes_per_token,
                                                   kv_block_tokens=4, background_step_tokens=8))
    engine.add_documents(list(DOCUMENTS))
    shadow_sink, live_sink = BlockingSink(), BlockingSink()
    engine.submit(request(max_tokens=1), shadow_sink, background=True)
    engine.step()
    assert engine.stats()["background"]["running"] == 1
    engine.submit(request(mode="full", max_tokens=2), live_sink)
    engine.step()
    stats = engine.stats()
    assert stats["running"] == 1 and stats["swapped"] == 1 and stats["preemptions"] == 1
    step_until(engine, [live_sink, shadow_sink])
    assert shadow_sink.wait().prompt_tokens == live_sink.wait().prompt_tokens  # the shadow resumed and finished
