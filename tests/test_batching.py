"""Batching never changes an answer: each sequence of a batch gives what it gives alone.

Tolerance: float32 tiny models; first-token log-probabilities within 1e-4 of the sequence
run alone (the shared matrix products of a batch round differently), tokens identical.
"""

import pytest
import torch

from ragcache.engine.blend import blend
from ragcache.engine.forward import TokenRun, run_tokens
from ragcache.engine.generate import SamplingParams
from ragcache.engine.prompt import build_rag_prompt
from ragcache.engine.runner import BlockingSink, RagRequest, SequenceCancelled
from ragcache.engine.scheduler import SchedulerConfig
from ragcache.kv import chunk_key

from conftest import DOCUMENTS, QUESTION, tiny_model

LONG_QUESTION = " ".join(["Which of these rivers and mountains is the oldest, and why would it be so?"] * 6)
TOLERANCE = 1e-4


def request(question=QUESTION, documents=DOCUMENTS, mode="blend", max_tokens=8, **extra) -> RagRequest:
    return RagRequest(question, tuple(documents), mode=mode, blend_ratio=extra.pop("blend_ratio", 0.5),
                      sampling=SamplingParams(max_tokens=max_tokens, **extra.pop("sampling", {})), **extra)


def run_together(engine, requests, after_step=None):
    """Submit every request, then step the engine until all are done; their Generations in order."""
    sinks = [BlockingSink() for _ in requests]
    for req, sink in zip(requests, sinks):
        engine.submit(req, sink, return_logprobs=True)
    while not all(sink.done.is_set() for sink in sinks):
        if not engine.step():
            sinks[0].done.wait(0.001)
        if after_step is not None:
            after_step(engine)
    return [sink.wait() for sink in sinks]


def each_alone(make_engine, model, requests, documents=()):
    """Each request on its own fresh engine (documents added first): nothing another request left in the
    prefix cache changes what it reuses."""
    results = []
    for req in requests:
        engine = make_engine(model=model)
        if documents:
            engine.add_documents(list(documents))
        results.append(engine.generate(req, return_logprobs=True))
    return results


def assert_same(alone, batched):
    assert batched.token_ids == alone.token_ids and batched.text == alone.text
    assert torch.allclose(batched.first_token_logprobs, alone.first_token_logprobs, atol=TOLERANCE)
    assert (batched.cached_tokens, batched.recomputed_tokens) == (alone.cached_tokens, alone.recomputed_tokens)


def test_every_mode_and_a_program_turn_in_one_batch_give_what_they_give_alone(make_engine):
    model = tiny_model()

    def warmed():  # documents stored, the program's first turn done
        engine = make_engine(model=model)
        engine.add_documents(list(DOCUMENTS))
        engine.generate(request(documents=DOCUMENTS[:2], program_id="agent"))
        return engine

    first = warmed().generate(request(documents=DOCUMENTS[:2], program_id="probe"))
    history = (("user", QUESTION), ("assistant", first.text.strip() or "ok"))
    mixes = [
        request(mode="full", max_tokens=6),
        request(mode="prefix", documents=DOCUMENTS[:3], max_tokens=9),
        request(mode="reuse", question=LONG_QUESTION, max_tokens=5),
        request(mode="blend", documents=DOCUMENTS[1:], max_tokens=12),
        request(mode="blend", documents=DOCUMENTS[:1], question="Where?", max_tokens=3),
        request(documents=DOCUMENTS[:2], program_id="agent", question="And the longest?", history=history),
    ]
    alone = [warmed().generate(r, return_logprobs=True) for r in mixes]
    running = []
    batched = run_together(warmed(), mixes, after_step=lambda e: running.append(len(e.scheduler.running)))
    assert max(running) == len(mixes)  # all of them in the same steps
    assert len({a.prompt_tokens for a in alone}) == len(mixes)  # prompts of different lengths
    assert batched[-1].prefix_cached_tokens == alone[-1].prefix_cached_tokens > 0
    for a, b in zip(alone, batched):
        assert_same(a, b)


def one_pass_reference(engine, tokenizer, question, mode, ratio, max_tokens, config=None):
    """What one blend() pass + a token-by-token greedy decode give: (tokens, first-token log-probabilities)."""
    from ragcache.engine.blend import BlendConfig

    parts = build_rag_prompt(tokenizer, question, DOCUMENTS)
    fp = engine.loaded.fingerprint
    prefix_key = chunk_key(fp, parts.prefix_ids, "", "default")
    prefix_kv = engine.store.get(prefix_key)
    chunk_kvs = [engine.store.get(chunk_key(fp, ids, prefix_key, "default")) for ids in parts.chunk_ids]
    fused = blend(engine.stack, parts, prefix_kv, chunk_kvs, mode=mode, ratio=ratio, config=config or BlendConfig(),
                  extra_capacity=max_tokens)
    token, tokens = int(fused.last_logits.argmax()), []
    while token not in engine.eos_ids and len(tokens) < max_tokens:
        tokens.append(token)
        if len(tokens) == max_tokens:
            break
        slot = fused.buffer.length
        fused.buffer.length += 1
        out = run_tokens(engine.stack, fused.buffer, TokenRun.contiguous(torch.tensor([token]), slot))
        token = int(engine.stack.logits(out.hidden)[0].argmax())
    return tokens, torch.log_softmax(fused.last_logits, -1), fused


@pytest.mark.parametrize("mode", ["full", "prefix", "reuse", "blend"])
def test_a_single_request_gives_the_one_pass_reference_output(make_engine, tokenizer, mode):
    """The batched engine alone gives what one blend() pass + a token-by-token greedy decode gives."""
    engine = make_engine()
    engine.add_documents(list(DOCUMENTS))
    got = engine.generate(request(mode=mode, max_tokens=10), return_logprobs=True)
    tokens, logprobs, _ = one_pass_reference(engine, tokenizer, QUESTION, mode, 0.5, 10)
    assert got.token_ids == tokens
    assert torch.allclose(got.first_token_logprobs, logprobs, atol=TOLERANCE)


def test_chunked_prefill_equals_unchunked(make_engine):
    long_question = " ".join([QUESTION] * 8)
    whole = make_engine()
    chunked = make_engine(scheduler=SchedulerConfig(step_tokens=16))
    req = request(mode="full", question=long_question, max_tokens=8)
    a = whole.generate(req, return_logprobs=True)
    steps_before = chunked.scheduler.counters.steps
    b = chunked.generate(req, return_logprobs=True)
    assert a.prompt_tokens > 16 * 4  # spread over at least five steps of 16 tokens
    assert chunked.scheduler.counters.steps - steps_before >= a.prompt_tokens // 16 + len(b.token_ids) - 1
    assert_same(a, b)


def test_decodes_keep_flowing_while_a_long_prefill_is_chunked(make_engine):
    engine = make_engine(scheduler=SchedulerConfig(step_tokens=16))
    short = request(mode="full", question="Where?", documents=(), max_tokens=6)
    long = request(mode="full", question=" ".join([QUESTION] * 8), max_tokens=1)
    tokens_of_short_before_long_done = []

    def watch(engine):
        running = {seq.request.question: seq for seq in engine.scheduler.running}
        seq = running.get(long.question)
        if seq is not None and not seq.progress.done and short.question in running:
            tokens_of_short_before_long_done.append(len(running[short.question].stream.tokens))

    run_together(engine, [short, long], after_step=watch)
    assert max(tokens_of_short_before_long_done) >= 3  # the short answer decoded during the long prompt's steps


def test_a_cancelled_sequence_frees_its_working_kv_at_the_next_step(make_engine):
    engine = make_engine()
    sink = BlockingSink()
    seq = engine.submit(request(mode="full", max_tokens=64, sampling={"stop": ("never-appears",)}), sink)
    for _ in range(3):
        engine.step()
    assert engine.scheduler.used_bytes > 0 and not sink.done.is_set()
    seq.cancel()
    engine.step()
    assert engine.scheduler.used_bytes == 0 and engine.stats()["cancelled"] == 1
    with pytest.raises(SequenceCancelled):
        sink.wait()


@pytest.mark.parametrize("mode", ["full", "blend"])  # blend: buffers over a shared system prefix
def test_preempted_sequences_resume_with_the_same_answer_and_the_budget_holds(make_engine, mode):
    probe = make_engine()
    probe.add_documents(list(DOCUMENTS))
    reqs = [request(mode=mode, max_tokens=24, question=q, documents=DOCUMENTS[:2],
                    sampling={"temperature": 0.8, "seed": 7}) for q in (QUESTION, "Which mountain is highest?")]
    alone = each_alone(make_engine, probe.loaded.model, reqs, DOCUMENTS)
    per_token = probe.kv_bytes_per_token
    assert all(len(a.token_ids) == 24 for a in alone)
    both_admitted = sum(a.prompt_tokens + 4 for a in alone)
    budget = (both_admitted + 12) * per_token  # both prompts fit, but not both answers: someone is preempted
    engine = make_engine(scheduler=SchedulerConfig(max_working_kv_bytes=budget, kv_block_tokens=4))
    engine.add_documents(list(DOCUMENTS))
    seen = []

    def check_budget(engine):
        held = sum(seq.prefill.buffer.nbytes for seq in engine.scheduler.running if seq.prefill is not None)
        seen.append(held)
        assert engine.scheduler.used_bytes <= budget and held <= budget

    batched = run_together(engine, reqs, after_step=check_budget)
    assert engine.stats()["preemptions"] >= 1 and engine.stats()["resumptions"] >= 1
    assert max(seen) > 0
    for a, b in zip(alone, batched):
        assert_same(a, b)


def test_a_request_larger_than_the_working_budget_is_refused_at_submit(make_engine):
    from ragcache.engine.errors import InvalidRequestError

    engine = make_engine(scheduler=SchedulerConfig(max_working_kv_bytes=1 << 16))
    with pytest.raises(InvalidRequestError, match="max_working_kv_bytes"):
        engine.submit(request(max_tokens=64), BlockingSink())
    assert not engine.scheduler.has_unfinished


def test_sampling_is_per_sequence_in_a_batch(make_engine):
    engine = make_engine()
    seeded = [request(mode="full", max_tokens=10, sampling={"temperature": 1.0, "seed": s}) for s in (1, 2, 1)]
    greedy = request(mode="full", max_tokens=10)
    alone = [engine.generate(r, return_logprobs=True) for r in [*seeded, greedy]]
    batched = run_together(engine, [*seeded, greedy])
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]
    assert batched[0].token_ids == batched[2].token_ids  # the same seed, the same draw, batch or not


@pytest.mark.parametrize("deviation, sink_tokens", [("value", 0), ("key", 0), ("attention", 0), ("key", 4)])
def test_a_blend_run_in_pieces_equals_the_one_pass_blend(make_engine, tokenizer, deviation, sink_tokens):
    from ragcache.engine.blend import BlendConfig

    question = " ".join([QUESTION] * 3)  # question tokens spread over several pieces too
    config = BlendConfig(deviation=deviation, sink_tokens=sink_tokens)  # sink_tokens: EPIC's k
    engine = make_engine(blend=config, scheduler=SchedulerConfig(step_tokens=8))
    engine.add_documents(list(DOCUMENTS))
    got = engine.generate(request(mode="blend", question=question, blend_ratio=0.3, max_tokens=6),
                          return_logprobs=True)
    assert engine.scheduler.counters.steps > 10  # the scan and the finish went in many pieces
    tokens, logprobs, fused = one_pass_reference(engine, tokenizer, question, "blend", 0.3, 6, config)
    assert got.token_ids == tokens
    assert torch.allclose(got.first_token_logprobs, logprobs, atol=TOLERANCE)
    assert got.recomputed_tokens == fused.recomputed_tokens > 0
    assert got.recomputed_fraction == pytest.approx(fused.recomputed_fraction)


def test_a_sequence_preempted_mid_prefill_resumes_with_room_for_its_whole_prompt(make_engine):
    """A long prompt, chunked over steps, is swapped out half computed when a decoding one grows."""
    short = request(mode="full", question="Where?", documents=(), max_tokens=40, sampling={"stop": ("never",)})
    long = request(mode="full", question=" ".join([QUESTION] * 8), max_tokens=4)
    probe = make_engine()
    alone = each_alone(make_engine, probe.loaded.model, (short, long))
    per_token = probe.kv_bytes_per_token
    # the short one's prompt + a block and the long one's prompt + a block fit; the short one's next block does not
    budget = (alone[0].prompt_tokens + 4 + alone[1].prompt_tokens + 4 + 2) * per_token
    engine = make_engine(scheduler=SchedulerConfig(max_working_kv_bytes=budget, kv_block_tokens=4, step_tokens=16))
    preempted_mid_prefill = []

    def watch(engine):
        for seq in engine.scheduler.swapped:
            preempted_mid_prefill.append(not seq.progress.done)

    batched = run_together(engine, [short, long], after_step=watch)
    assert any(preempted_mid_prefill)
    for a, b in zip(alone, batched):
        assert_same(a, b)


def test_unwritten_working_kv_never_reaches_an_answer(make_engine, tokenizer, monkeypatch):
    """Working KV starts as whatever memory held (NaN here): masked slots must never turn into NaN logits."""
    import ragcache.engine.kvbuffer as kvbuffer

    real_empty = torch.empty

    def nan_empty(*shape, **kwargs):
        return real_empty(*shape, **kwargs).fill_(float("nan"))

    engine = make_engine(scheduler=SchedulerConfig(step_tokens=8))
    engine.add_documents(list(DOCUMENTS))
    question = " ".join([QUESTION] * 3)
    reference = {mode: one_pass_reference(engine, tokenizer, question, mode, 0.3, 6)[:2]
                 for mode in ("full", "prefix", "blend")}
    monkeypatch.setattr(kvbuffer.torch, "empty", nan_empty)
    for mode, (tokens, logprobs) in reference.items():
        got = engine.generate(request(mode=mode, question=question, blend_ratio=0.3, max_tokens=6),
                              return_logprobs=True)
        assert got.token_ids == tokens and torch.allclose(got.first_token_logprobs, logprobs, atol=TOLERANCE)


def test_sequences_with_the_same_system_prefix_hold_its_kv_once(make_engine):
    engine = make_engine()
    engine.add_documents(list(DOCUMENTS))
    reqs = [request(mode="blend", documents=DOCUMENTS[i:i + 2], max_tokens=6) for i in range(3)]
    alone = each_alone(make_engine, engine.loaded.model, reqs, DOCUMENTS)
    seen = []

    def check(engine):
        running = [s for s in engine.scheduler.running if s.prefill is not None]
        if len(running) < 2:
            return
        shared = {id(s.prefill.buffer.shared) for s in running}
        prefix_len = running[0].shared_len
        own = sum(s.reserved_slots - prefix_len for s in running)
        assert len(shared) == 1 and engine.stats()["shared_prefixes"] == 1
        assert engine.scheduler.used_bytes == (own + prefix_len) * engine.kv_bytes_per_token
        assert all(s.prefill.buffer.nbytes == (s.reserved_slots - prefix_len) * engine.kv_bytes_per_token
                   for s in running)
        seen.append(len(running))

    batched = run_together(engine, reqs, after_step=check)
    assert max(seen) == 3 and engine.stats()["shared_prefixes"] == 0  # released with the last user
    for a, b in zip(alone, batched):
        assert_same(a, b)
