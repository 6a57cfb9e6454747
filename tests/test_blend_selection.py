"""Selections compared at an equal budget: EPIC's sink tokens first, per-request overrides, one-pass == pieces."""

import pytest
import torch

from ragcache.engine.blend import BlendConfig, blend
from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.generate import SamplingParams
from ragcache.engine.runner import RagRequest
from ragcache.engine.scheduler import SchedulerConfig
from ragcache.engine.selection import choose_candidates, recompute_count, sink_indices

from conftest import DOCUMENTS, QUESTION
from test_batching import TOLERANCE, one_pass_reference, request
from test_blend import cached_parts, run_blend


def test_sink_tokens_come_first_then_the_top_scores_of_the_rest():
    chunk_lens = (5, 3, 6)  # candidates 0-4, 5-7, 8-13
    scores = torch.zeros(14)
    scores[[4, 7, 12, 13]] = torch.tensor([1.0, 4.0, 3.0, 2.0])
    chosen = choose_candidates(scores, 8, chunk_lens, sink_tokens=2)
    assert chosen.tolist() == [0, 1, 5, 6, 7, 8, 9, 12]  # sinks 0 1 | 5 6 | 8 9, then scores 4.0 (7) and 3.0 (12)
    assert choose_candidates(scores, 8, chunk_lens, sink_tokens=0).tolist() == scores.topk(8).indices.sort().values.tolist()


def test_sink_tokens_shrink_to_an_equal_share_when_they_exceed_the_budget():
    assert sink_indices((5, 3, 6), 2, count=4) == [0, 5, 8]  # 4 // 3 chunks: one each
    assert sink_indices((5, 3, 6), 4, count=14) == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11]  # a short chunk gives all it has
    assert sink_indices((5, 3, 6), 2, count=2) == []  # fewer budget tokens than chunks: plain top-r
    scores = torch.arange(14.0)
    assert choose_candidates(scores, 2, (5, 3, 6), 2).tolist() == [12, 13]


def slots_recomputed(result, parts, chunks):
    """Candidate slots whose late-layer values moved from the cached ones: the tokens recomputed."""
    exact = len(parts.prefix_ids) + len(parts.chunk_ids[0])
    cached = torch.cat([c.values for c in chunks[1:]], dim=2)[3]
    late = (result.buffer.values[3, :, exact : exact + cached.shape[1]] - cached).abs().sum((0, 2))
    return set((late.nonzero().flatten() + exact).tolist())


def test_epic_recomputes_each_reused_chunks_first_tokens_within_plain_top_r_budget(stack, tokenizer):
    parts, prefix, chunks = cached_parts(stack, tokenizer)
    _, full = run_blend(stack, tokenizer, "full")
    exact = len(parts.prefix_ids) + len(parts.chunk_ids[0])
    lens = [len(ids) for ids in parts.chunk_ids[1:]]
    ratio, k = 0.3, 3
    plain = blend(stack, parts, prefix, chunks, mode="blend", ratio=ratio)
    epic = blend(stack, parts, prefix, chunks, mode="blend", ratio=ratio, config=BlendConfig(sink_tokens=k))
    count = recompute_count(ratio, sum(lens))
    assert epic.recomputed_tokens == plain.recomputed_tokens == count
    assert epic.recomputed_fraction == plain.recomputed_fraction
    starts = [exact + sum(lens[:i]) for i in range(len(lens))]
    sinks = {start + j for start in starts for j in range(k)}
    # The rest of the budget: the top value deviations (fresh = full prefill's at the check layer) of the others.
    fresh = full.buffer.values[1, :, exact : exact + sum(lens)]
    deviations = (fresh - torch.cat([c.values for c in chunks[1:]], dim=2)[1]).square().sum(dim=(0, 2))
    deviations[[s - exact for s in sinks]] = -1.0
    rest = set((deviations.topk(count - len(sinks)).indices + exact).tolist())
    assert slots_recomputed(epic, parts, chunks) == sinks | rest
    assert not sinks <= slots_recomputed(plain, parts, chunks)  # plain top-r would not have taken them all


@pytest.mark.parametrize("deviation, sink_tokens", [("value", 2), ("attention", 3)])
def test_a_per_request_selection_in_pieces_equals_its_one_pass_blend(make_engine, tokenizer, deviation, sink_tokens):
    question = " ".join([QUESTION] * 3)
    engine = make_engine(scheduler=SchedulerConfig(step_tokens=8))  # the engine's own: value, no sink tokens
    engine.add_documents(list(DOCUMENTS))
    got = engine.generate(request(question=question, blend_ratio=0.3, max_tokens=6, blend_deviation=deviation,
                                  blend_sink_tokens=sink_tokens), return_logprobs=True)
    assert engine.scheduler.counters.steps > 10
    config = BlendConfig(deviation=deviation, sink_tokens=sink_tokens)
    tokens, logprobs, fused = one_pass_reference(engine, tokenizer, question, "blend", 0.3, 6, config)
    _, default_logprobs, default = one_pass_reference(engine, tokenizer, question, "blend", 0.3, 6)
    assert got.token_ids == tokens
    assert torch.allclose(got.first_token_logprobs, logprobs, atol=TOLERANCE)
    assert not torch.allclose(got.first_token_logprobs, default_logprobs, atol=TOLERANCE)  # the override was used
    assert got.recomputed_tokens == fused.recomputed_tokens == default.recomputed_tokens > 0
    assert (got.blend_deviation, got.blend_sink_tokens) == (deviation, sink_tokens)


def test_generation_reports_the_selection_used(make_engine):
    engine = make_engine(blend=BlendConfig(deviation="key", sink_tokens=4))
    inherited = engine.generate(request(max_tokens=1))
    overridden = engine.generate(request(max_tokens=1, blend_deviation="attention", blend_sink_tokens=0))
    full = engine.generate(request(mode="full", max_tokens=1, blend_deviation="attention"))
    assert (inherited.blend_deviation, inherited.blend_sink_tokens) == ("key", 4)
    assert (overridden.blend_deviation, overridden.blend_sink_tokens) == ("attention", 0)
    assert (full.blend_deviation, full.blend_sink_tokens) == ("", 0)  # nothing was selected


@pytest.mark.parametrize(
    "overrides, field",
    [({"blend_deviation": "cosine"}, "blend_deviation"), ({"blend_sink_tokens": -1}, "blend_sink_tokens"),
     ({"blend_sink_tokens": 1.5}, "blend_sink_tokens"), ({"blend_sink_tokens": True}, "blend_sink_tokens")],
)
def test_bad_selection_overrides_are_refused_by_name(overrides, field):
    with pytest.raises(InvalidRequestError, match=field):
        RagRequest(QUESTION, DOCUMENTS, sampling=SamplingParams(max_tokens=1), **overrides)


def test_bad_sink_tokens_in_the_engine_config_are_refused():
    with pytest.raises(ValueError, match="sink_tokens"):
        BlendConfig(sink_tokens=-1)


def test_bench_modes_carry_their_selection():
    from ragcache.bench.rag import BenchOptions, RagExample, mode_names, request_for

    example = RagExample(QUESTION, ("Amazon",), DOCUMENTS)
    assert mode_names((0.15,), ("default", "key", "attention+epic4")) == [
        "full", "prefix", "reuse", "blend@0.15", "blend@0.15/key", "blend@0.15/attention+epic4"]
    plain, keyed, epic = (request_for(example, mode, 4) for mode in ("blend@0.15", "blend@0.15/key", "blend@0.3/epic4"))
    assert (plain.blend_ratio, plain.blend_deviation, plain.blend_sink_tokens) == (0.15, None, None)
    assert (keyed.blend_deviation, keyed.blend_sink_tokens) == ("key", 0)
    assert (epic.blend_ratio, epic.blend_deviation, epic.blend_sink_tokens) == (0.3, "value", 4)
    assert request_for(example, "full", 4).mode == "full"
    with pytest.raises(ValueError, match="--selections"):
        BenchOptions(selections=("cosine",))
