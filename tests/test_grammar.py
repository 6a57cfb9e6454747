"""Constrained decoding and per-token logprobs.

A tiny random model's free output is garbage, so output that parses and validates is the
grammar's doing. The test schemas terminate: enums, bounded integers, short strings, no
extra properties (a random model would otherwise write one string forever).
"""

import json

import jsonschema
import pytest
import torch

from ragcache.engine.chat import OutputConstraint, ToolSpec
from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.generate import SamplingParams
from ragcache.engine.prompt import build_rag_prompt
from ragcache.engine.request import RagRequest
from ragcache.engine.sequence import BlockingSink
from ragcache.engine.toolformat import parse_tool_calls

WEATHER = ToolSpec("get_weather", "The current weather in a city.", {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
})
SEARCH = ToolSpec("search", "Search the web.", {
    "type": "object",
    "properties": {"query": {"type": "string", "maxLength": 10},
                   "top": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["query", "top"],
    "additionalProperties": False,
})
TOOLS = (WEATHER, SEARCH)
RECORD = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"},
                   "tag": {"type": "string", "maxLength": 6}},
    "required": ["n", "ok", "tag"],
    "additionalProperties": False,
}
QUESTION = "What's the weather in Paris?"


def ask(constraint, question=QUESTION, max_tokens=64, tools=TOOLS, **sampling) -> RagRequest:
    return RagRequest(question, mode="full", tools=tools if constraint and constraint.kind == "tool_calls" else (),
                      constraint=constraint, sampling=SamplingParams(max_tokens=max_tokens, **sampling))


def calls_of(generation, tools=TOOLS):
    """The generation's calls, each checked: a listed tool, arguments valid against its schema."""
    parsed = parse_tool_calls(generation.text, tools)
    schemas = {tool.name: tool.parameters for tool in tools}
    for call in parsed.calls:
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    return parsed


def test_required_tool_calls_parse_into_valid_calls_of_listed_tools(make_engine):
    engine = make_engine()
    got = engine.generate(ask(OutputConstraint("tool_calls", TOOLS, require_call=True, parallel=True)))
    parsed = calls_of(got)
    assert len(parsed.calls) >= 1 and got.text.startswith("<tool_call>")
    rest = got.text[got.text.rindex("</tool_call>") + len("</tool_call>"):].strip()  # after the last whole call
    cut = len(got.token_ids) == 64  # max_tokens cut a further call short
    assert not rest or cut and (rest.startswith("<tool_call>") or "<tool_call>".startswith(rest))


def test_a_named_tool_is_the_one_called_and_one_call_ends_the_answer(make_engine):
    engine = make_engine()
    sink = BlockingSink()
    seq = engine.submit(ask(OutputConstraint("tool_calls", (SEARCH,), require_call=True, parallel=False),
                            logprobs=True), sink)
    while not sink.done.is_set():
        engine.step()
    got = sink.wait()
    parsed = calls_of(got)
    assert [call.name for call in parsed.calls] == ["search"] and parsed.content is None
    assert got.finish_reason != "length" and got.text.endswith("</tool_call>")
    assert len(seq.token_logprobs) == len(got.token_ids) < 64  # the grammar ended it: no step sampled an eos


def test_parallel_false_gives_exactly_one_call_of_either_tool(make_engine):
    engine = make_engine()
    got = engine.generate(ask(OutputConstraint("tool_calls", TOOLS, require_call=True, parallel=False)))
    assert len(calls_of(got).calls) == 1 and got.finish_reason != "length"


def test_json_schema_output_validates(make_engine):
    engine = make_engine()
    got = engine.generate(ask(OutputConstraint("json", schema=json.dumps(RECORD)), "Give me a record."))
    assert got.finish_reason == "stop"
    jsonschema.validate(json.loads(got.text), RECORD)


def test_json_object_output_is_an_object(make_engine):
    engine = make_engine()  # sampled: greedy, the random model writes one number forever; this seed closes it
    got = engine.generate(ask(OutputConstraint("json"), "Give me JSON.", max_tokens=48, temperature=1.0, seed=1))
    assert got.finish_reason == "stop" and isinstance(json.loads(got.text), dict)


@pytest.mark.parametrize("constraint, field", [
    (OutputConstraint("json", schema='{"type": "foo"}'), "response_format.json_schema"),
    (OutputConstraint("json", schema="{not json"), "response_format.json_schema"),
    (OutputConstraint("json", schema="[1, 2]"), "response_format.json_schema"),
    (OutputConstraint("tool_calls", (WEATHER, ToolSpec("broken", "", {"type": "object", "required": "x"})),
                      require_call=True), "'broken'"),
])
def test_a_bad_schema_is_refused_at_submit_naming_the_field(make_engine, constraint, field):
    engine = make_engine()
    with pytest.raises(InvalidRequestError, match=field):
        engine.submit(ask(constraint), BlockingSink())
    assert engine.stats()["waiting"] == 0  # nothing was queued


def test_an_engine_without_constraints_never_loads_the_grammar_compiler(make_engine):
    engine = make_engine()
    engine.generate(ask(None, max_tokens=4, logprobs=True))
    assert engine.grammars.stats() == {"loaded": False, "compiled": 0}
    engine.generate(ask(OutputConstraint("json", schema=json.dumps(RECORD))))
    engine.generate(ask(OutputConstraint("json", schema=json.dumps(RECORD))))
    assert engine.grammars.stats() == {"loaded": True, "compiled": 1}  # the second one from the cache


def test_constrained_and_free_sequences_batched_give_what_they_give_alone(make_engine):
    engine = make_engine()
    requests = [
        ask(OutputConstraint("tool_calls", TOOLS, require_call=True, parallel=False)),
        ask(None, "Where is Paris?", max_tokens=12),
        ask(OutputConstraint("json", schema=json.dumps(RECORD)), "Give me a record.", logprobs=True, top_logprobs=2),
        ask(OutputConstraint("tool_calls", TOOLS, require_call=True, parallel=True), max_tokens=40,
            temperature=0.9, seed=3),
        ask(OutputConstraint("tool_calls", TOOLS), "Hello!", max_tokens=10),  # auto: free text, calls allowed
    ]
    alone = [engine.generate(r) for r in requests]
    sinks = [BlockingSink() for _ in requests]
    for r, sink in zip(requests, sinks):
        engine.submit(r, sink)
    running = []
    while not all(sink.done.is_set() for sink in sinks):
        engine.step()
        running.append(len(engine.scheduler.running))
    assert max(running) == len(requests)
    for a, sink in zip(alone, sinks):
        b = sink.wait()
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        assert [lp.token_id for lp in b.token_logprobs] == [lp.token_id for lp in a.token_logprobs]
        logprobs = [lp.logprob for lp in a.token_logprobs]
        assert [lp.logprob for lp in b.token_logprobs] == pytest.approx(logprobs, abs=1e-4)
    assert len(alone[2].token_logprobs) == len(alone[2].token_ids) > 0


def test_a_preempted_constrained_sequence_resumes_where_its_grammar_was(make_engine):
    from ragcache.engine.scheduler import SchedulerConfig

    requests = [ask(OutputConstraint("tool_calls", TOOLS, require_call=True, parallel=False), question=question)
                for question in (QUESTION, "And in Rome?")]
    probe = make_engine()
    alone = [probe.generate(r) for r in requests]
    budget = (sum(a.prompt_tokens + 4 for a in alone) + 12) * probe.kv_bytes_per_token  # not both whole answers
    engine = make_engine(scheduler=SchedulerConfig(max_working_kv_bytes=budget, kv_block_tokens=4))
    sinks = [BlockingSink() for _ in requests]
    for r, sink in zip(requests, sinks):
        engine.submit(r, sink)
    while not all(sink.done.is_set() for sink in sinks):
        engine.step()
    assert engine.stats()["preemptions"] >= 1
    assert [sink.wait().token_ids for sink in sinks] == [a.token_ids for a in alone]


def test_logprobs_per_token_with_sorted_alternatives_match_a_full_prefill(make_engine, tokenizer):
    engine = make_engine()
    got = engine.generate(ask(None, "Where is Paris?", max_tokens=8, logprobs=True, top_logprobs=5))
    assert len(got.token_logprobs) == len(got.token_ids) == 8
    assert [lp.token_id for lp in got.token_logprobs] == got.token_ids
    for lp in got.token_logprobs:
        values = [value for _, value in lp.top]
        assert len(lp.top) == 5 and values == sorted(values, reverse=True)
        assert lp.top[0] == (lp.token_id, pytest.approx(lp.logprob, abs=1e-6))  # greedy: the most likely token
    first, model = got.token_logprobs[0], full_prefill_logprobs(engine, tokenizer, "Where is Paris?")
    assert first.logprob == pytest.approx(float(model[first.token_id]), abs=1e-4)


def test_a_constrained_tokens_logprob_is_the_models_before_the_mask(make_engine, tokenizer):
    engine = make_engine()
    got = engine.generate(ask(OutputConstraint("tool_calls", (WEATHER,), require_call=True, parallel=False),
                              tools=(WEATHER,), logprobs=True, top_logprobs=3))
    assert len(got.token_logprobs) == len(got.token_ids)
    model = full_prefill_logprobs(engine, tokenizer, QUESTION, (WEATHER,))
    first = got.token_logprobs[0]  # forced by the grammar, yet reported with the model's own probability
    assert tokenizer.decode([first.token_id]).startswith("<")
    assert first.logprob == pytest.approx(float(model[first.token_id]), abs=1e-4) and first.logprob < -1.0
    assert first.top[0][0] == int(model.argmax())


def test_an_ending_eos_has_no_logprob_entry(make_engine):
    engine = make_engine()
    got = engine.generate(ask(OutputConstraint("json", schema='{"type": "integer", "minimum": 0, "maximum": 9}'),
                              "A digit.", max_tokens=6, logprobs=True))
    assert got.finish_reason == "stop" and len(got.token_ids) == 1  # a number ends with eos, not by itself
    assert len(got.token_logprobs) == 1 and 0 <= int(got.text) <= 9


def test_the_mask_touches_only_constrained_rows_and_never_leaves_one_all_minus_infinity(tokenizer):
    from ragcache.engine.grammar import ConstraintCompiler, mask_logits

    compiler = ConstraintCompiler(tokenizer, 49152, stop_ids=[2, 63])  # 63: the sign bit of its bitmask word
    digit = OutputConstraint("json", schema='{"type": "integer", "minimum": 0, "maximum": 9}')
    fresh, spent = compiler.matcher(digit), compiler.matcher(digit)
    assert spent.accept(tokenizer.encode("5", add_special_tokens=False)[0]) and spent.accept(2)
    assert spent.ended  # a stop token accepted: the grammar allows nothing more
    logits = torch.zeros(3, 49152)
    mask_logits(logits, [(1, fresh), (2, spent)])
    assert torch.equal(logits[0], torch.zeros(49152))  # free text: untouched
    allowed = {tokenizer.decode([token]) for token in torch.isfinite(logits[1]).nonzero().flatten().tolist()}
    assert allowed and all(text.strip() in "0123456789" and text.strip() for text in allowed)
    assert torch.isfinite(logits[2]).nonzero().flatten().tolist() == [2, 63]  # nothing allowed: the stop tokens


def full_prefill_logprobs(engine, tokenizer, question, tools=()):
    """log_softmax of the model's next-token logits after the whole prompt, in one plain forward pass."""
    parts = build_rag_prompt(tokenizer, question, (), engine.config.system_prompt, engine.config.limits, (), tools)
    with torch.inference_mode():
        logits = engine.loaded.model(torch.tensor([parts.all_ids])).logits[0, -1]
    return torch.log_softmax(logits.float(), -1)


@pytest.mark.real_model
def test_the_real_model_calls_get_weather_for_paris_when_a_call_is_required(real_model):
    from ragcache.engine.runner import BlendEngine
    from ragcache.storage.cpu import CpuTier
    from ragcache.storage.tiered import TieredStore

    weather = ToolSpec("get_weather", "Get the current weather in a given city.", {
        "type": "object", "properties": {"city": {"type": "string", "description": "The city, e.g. London"}},
        "required": ["city"]})
    engine = BlendEngine(real_model, TieredStore([CpuTier(1 << 30)]))
    got = engine.generate(ask(OutputConstraint("tool_calls", (weather,), require_call=True, parallel=False),
                              tools=(weather,), max_tokens=48))
    parsed = calls_of(got, (weather,))
    assert [call.name for call in parsed.calls] == ["get_weather"] and got.finish_reason != "length"
    assert "paris" in json.loads(parsed.calls[0].arguments)["city"].lower()
