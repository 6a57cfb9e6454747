"""Decoding: greedy and sampled, stop strings, streaming, limits."""

import pytest
import torch

from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.generate import SamplingParams, held_back, sample_token
from ragcache.engine.runner import RagRequest

from conftest import DOCUMENTS, QUESTION


def ask(engine, **sampling):
    return engine.generate(RagRequest(QUESTION, DOCUMENTS, sampling=SamplingParams(**sampling)))


def test_greedy_is_deterministic_and_stops_at_max_tokens(make_engine):
    engine = make_engine()
    first, second = ask(engine, max_tokens=6), ask(engine, max_tokens=6)
    assert first.token_ids == second.token_ids and len(first.token_ids) == 6
    assert first.finish_reason == "length"


def test_seeded_sampling_repeats_and_seeds_differ(make_engine):
    engine = make_engine()
    runs = [ask(engine, max_tokens=12, temperature=1.5, seed=seed).token_ids for seed in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([3.0, 2.0, 1.0, -5.0])
    drawn = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.5), torch.Generator().manual_seed(s)) for s in range(50)}
    assert drawn == {0}  # token 0 alone holds more than half the mass
    drawn = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.9), torch.Generator().manual_seed(s)) for s in range(200)}
    assert drawn == {0, 1}


def test_stop_string_cuts_the_answer_and_streaming_adds_up(make_engine):
    engine = make_engine()
    free = ask(engine, max_tokens=12)
    stop = free.text[3:6]
    assert stop and stop in free.text
    pieces = []
    stopped = engine.generate(
        RagRequest(QUESTION, DOCUMENTS, sampling=SamplingParams(max_tokens=12, stop=(stop,))), on_token=pieces.append
    )
    assert stopped.text == free.text[: free.text.find(stop)]
    assert stopped.finish_reason == "stop"
    assert "".join(pieces) == stopped.text


def test_held_back_covers_partial_stop_strings():
    assert held_back("answer: foo##", ["###"]) == 2
    assert held_back("answer", ["###"]) == 0
    assert held_back("caf\ufffd", []) == 1


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"stop": ("",)}, "stop")],
)
def test_bad_sampling_parameters_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_request_fields_are_refused(make_engine):
    with pytest.raises(InvalidRequestError, match="blend_ratio"):
        RagRequest(QUESTION, blend_ratio=1.5)
    with pytest.raises(InvalidRequestError, match="mode"):
        RagRequest(QUESTION, mode="fast")
    with pytest.raises(InvalidRequestError, match="question is empty"):
        make_engine().generate(RagRequest("  "))


def test_prompt_plus_max_tokens_over_context_is_refused(make_engine):
    engine = make_engine()
    with pytest.raises(InvalidRequestError, match="exceeds the model's context of 4096"):
        engine.generate(RagRequest(QUESTION, DOCUMENTS, sampling=SamplingParams(max_tokens=4000)))
