"""`ragcache bench agents`: BFCL traces, tool durations, the programs' scripts, figures, options, a small real run."""

import json
import math
import random

import pytest

from ragcache.bench import bfcl
from ragcache.bench.agents import (AgentsBenchOptions, BenchAgentsError, ProgramRecord, RequestRecord, Sizes,
                                   format_agents_table, plot_agents, policy_figures, reused_tokens, run_agents_bench,
                                   script, summarise)
from ragcache.cli import main

from conftest import loaded, tiny_model


def bfcl_entry(entry_id: str):
    root = bfcl.data_dir()
    entry = next(e for e in bfcl._read_jsonl(root / bfcl.BASE_FILE) if e["id"] == entry_id)
    answer = next(a for a in bfcl._read_jsonl(root / "possible_answer" / bfcl.BASE_FILE) if a["id"] == entry_id)
    return entry, answer["ground_truth"], bfcl.function_docs(entry["involved_classes"])


def test_a_trace_follows_the_bfcl_entry_and_lists_only_the_functions_it_calls():
    entry, truth, docs = bfcl_entry("multi_turn_base_0")
    trace = bfcl.derive_trace(entry, truth, docs, 3, random.Random(0))
    assert [turn.message[:27] for turn in trace.turns] == ["Move 'final_report.pdf' wit", "Perform a detailed search u",
                                                          "Upon identifying the requis"]
    assert [(c.name, json.loads(c.arguments)) for c in trace.turns[0].calls] == [
        ("cd", {"folder": "document"}), ("mkdir", {"dir_name": "temp"}),
        ("mv", {"source": "final_report.pdf", "destination": "temp"})]
    assert [(c.name, json.loads(c.arguments)) for c in trace.turns[2].calls] == [
        ("sort", {"file_name": "final_report.pdf"})]  # "sort('final_report.pdf')": positional, named by the doc
    assert [t["function"]["name"] for t in trace.tools] == ["cd", "mkdir", "mv", "grep", "sort"]
    cd = trace.tools[0]["function"]
    assert cd["description"] == "Change the current working directory to the specified folder."  # no class preamble
    assert cd["parameters"]["type"] == "object" and cd["parameters"]["required"] == ["folder"]
    assert {c.kind for c in trace.calls} == {"shell"}  # the file system runs locally
    assert [c.id for c in trace.turns[0].calls] == ["call_0_0", "call_0_1", "call_0_2"]


def test_simulated_results_are_deterministic_json_of_the_docs_response_fields():
    entry, truth, docs = bfcl_entry("multi_turn_base_0")
    first = bfcl.derive_trace(entry, truth, docs, 1, random.Random(0))
    again = bfcl.derive_trace(entry, truth, docs, 1, random.Random(0))
    assert first == again
    cd = first.turns[0].calls[0]
    assert list(json.loads(cd.result)) == ["current_working_directory"] and "document" in cd.result
    other = bfcl.derive_trace(entry, truth, docs, 1, random.Random(1))
    assert [c.result for c in other.calls] == [c.result for c in first.calls]  # results follow the call
    assert [c.duration_s for c in other.calls] != [c.duration_s for c in first.calls]  # durations the seed


def test_load_traces_draws_programs_by_seed_and_cuts_their_turns():
    traces = bfcl.load_traces(3, 2, seed=0)
    assert [t.id for t in traces] == [t.id for t in bfcl.load_traces(3, 2, seed=0)]
    assert [t.id for t in traces] != [t.id for t in bfcl.load_traces(3, 2, seed=1)]
    assert all(1 <= len(t.turns) <= 2 for t in traces)
    with pytest.raises(bfcl.TraceError, match="200 entries"):
        bfcl.load_traces(201, 1)


def test_a_bad_call_string_is_a_trace_error_naming_it():
    _, _, docs = bfcl_entry("multi_turn_base_0")
    assert bfcl.parse_call("grep(file_name='a.txt',pattern='x')", docs) == ("grep", {"file_name": "a.txt",
                                                                                     "pattern": "x"})
    with pytest.raises(bfcl.TraceError, match="no function doc for 'launch'"):
        bfcl.parse_call("launch(rocket='a')", docs)
    with pytest.raises(bfcl.TraceError, match="cannot parse"):
        bfcl.parse_call("cd(folder=", docs)


def test_bfcl_schema_types_become_json_schema():
    schema = {"type": "dict", "required": ["a"], "properties": {
        "a": {"type": "float", "description": "a number", "default": 1.0},
        "b": {"type": "tuple", "items": {"type": "any"}},
        "c": {"type": "any", "description": "anything"},
        "d": {"type": "array", "items": {"type": "dict", "properties": {"x": {"type": "integer"}}}},
        "e": {"type": "string", "enum": ["on", "off"]}}}
    assert bfcl.json_schema(schema) == {"type": "object", "required": ["a"], "properties": {
        "a": {"type": "number", "description": "a number"},
        "b": {"type": "array", "items": {}},
        "c": {"description": "anything"},
        "d": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer"}}}},
        "e": {"type": "string", "enum": ["on", "off"]}}}


@pytest.mark.parametrize("kind", ["web", "shell"])
def test_tool_durations_are_lognormal_with_the_stated_mean_and_sd(kind):
    dist = bfcl.DURATIONS[kind]
    mean = math.exp(dist.mu + dist.sigma ** 2 / 2)  # the log-normal's moments are the stated ones
    assert mean == pytest.approx(dist.mean_s)
    assert mean * math.sqrt(math.expm1(dist.sigma ** 2)) == pytest.approx(dist.sd_s)
    rng = random.Random(8)
    draws = [dist.draw(rng) for _ in range(200_000)]
    assert bfcl.duration_stats(draws)["mean_s"] == pytest.approx(dist.mean_s, rel=0.05) and min(draws) > 0


def test_the_shell_distribution_has_the_heavier_tail():
    rng = random.Random(3)
    shares = {kind: bfcl.duration_stats([bfcl.DURATIONS[kind].draw(rng) for _ in range(100_000)])["slowest_10pct_share"]
              for kind in ("web", "shell")}
    assert 0.30 < shares["web"] < 0.40  # theory: 1 − Φ(z₀.₉ − σ) = 0.35 at σ = 0.89
    assert 0.55 < shares["shell"] < 0.75  # 0.66 at σ = 1.68: the slowest tenth carries most of the delay
    assert bfcl.duration_stats([]) == {"calls": 0, "mean_s": None, "sd_s": None, "slowest_10pct_share": None}
    assert bfcl.duration_stats([1.0] * 9 + [11.0])["slowest_10pct_share"] == pytest.approx(0.55)


def test_a_programs_script_asks_for_each_ground_truth_call_then_the_answer():
    entry, truth, docs = bfcl_entry("multi_turn_base_0")
    trace = bfcl.derive_trace(entry, truth, docs, 2, random.Random(0))
    options = AgentsBenchOptions(max_tokens=40, answer_tokens=8, think_s=3.0)
    steps = script(trace, options)
    assert [s.tool for s in steps] == ["cd", "mkdir", "mv", None, "cd", "grep", None]
    assert [s.returning for s in steps] == [False, True, True, True, False, True, True]
    assert [s.wait_s for s in steps] == [*(c.duration_s for c in trace.turns[0].calls), 3.0,
                                         *(c.duration_s for c in trace.turns[1].calls), 0.0]
    second = steps[1].body
    assert second["tool_choice"] == {"type": "function", "function": {"name": "mkdir"}}
    assert second["max_tokens"] == 40 and second["temperature"] == 0 and "program_id" not in second
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "tool"]
    assert second["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0_0", "type": "function", "function": {"name": "cd", "arguments": '{"folder": "document"}'}}]}
    assert second["messages"][2]["tool_call_id"] == "call_0_0"
    answer, last = steps[3].body, steps[-1].body
    assert (answer["tool_choice"], answer["max_tokens"], "is_last_step" in answer) == ("none", 8, False)
    assert last["is_last_step"] is True
    assert steps[4].body["messages"][-2] == {"role": "assistant", "content": "Done: cd, mkdir, mv."}


def reply(prompt, program_reused=0, cached=0, recomputed=0, chunk_ms=0.0, ttft_ms=100.0, queue_ms=10.0):
    return {"usage": {"prompt_tokens": prompt},
            "choices": [{"message": {"tool_calls": None}}],
            "ragcache": {"program_reused_tokens": program_reused, "cached_tokens": cached,
                         "recomputed_tokens": recomputed, "timings": {"chunk_compute_ms": chunk_ms, "ttft_ms": ttft_ms,
                                                                      "queue_ms": queue_ms}}}


def test_reused_tokens_count_only_kv_that_came_from_the_store():
    assert reused_tokens(reply(700, program_reused=650, cached=650)) == 650
    assert reused_tokens(reply(700, cached=580, chunk_ms=600.0)) == 0  # the prefix was computed for this request
    assert reused_tokens(reply(700, cached=580, recomputed=30)) == 550  # the prefix chunk was found


def record(returning, reprefill, ttft_s=0.1, queue_s=0.0, kind="call", called=True):
    return RequestRecord(kind, returning, 700, 700 - (reprefill or 0), reprefill, ttft_s, queue_s, 0.5, called)


def stats(created=0, expired=0, reclaimed=0, displaced=0, pinned_max=0, budget=1000):
    tier = {"budget_bytes": budget, "pinned_bytes": 0, "pinned_bytes_max": pinned_max, "max_bytes": 2 * budget}
    outcomes = {"default/cd": {"predicted_vs_actual": {"pins": created, "mean_predicted_ttl_s": 1.5, "covered": 0.5}},
                "default/ls": {"predicted_vs_actual": {"pins": 0}}}
    return {"pins": {"counters": {"created": created, "expired": expired, "reclaimed": reclaimed,
                                  "displaced": displaced, "over_budget": 0, "not_worth_it": 0},
                     "budget": {"device": tier, "cpu": tier | {"pinned_bytes_max": 0}}, "pin_hit_rate": None,
                     "predictor": {"tools": outcomes}}}


def synthetic_runs():
    def run(reprefills, jcts, **pin_stats):
        programs = [ProgramRecord(f"p{i}", jct, [record(False, None, 0.2), record(True, r, 1.0, 0.5)])
                    for i, (r, jct) in enumerate(zip(reprefills, jcts))]
        return policy_figures(programs, stats(**pin_stats)) | {"wall_s": 10.0}

    policies = {"lru": run([600, 400], [10.0, 12.0]), "fixed_ttl": run([300, 100], [9.0, 11.0], created=2, expired=1,
                                                                    pinned_max=800),
                "tool_ttl": run([50, 50], [8.0, 9.0], created=2, displaced=1, pinned_max=1000)}
    return {"program_id": policies, "prefix": {}}


def test_figures_aggregate_to_the_json_shape_with_cuts_against_lru_and_the_targets():
    traces = bfcl.load_traces(2, 1, seed=0)
    summary = summarise(synthetic_runs(), traces, AgentsBenchOptions(programs=2, turns=1), Sizes(2000, 2000, 9000))
    assert set(summary) == {"policies", "by_prefix", "pin_budget_bytes", "config", "durations", "machine", "targets"}
    assert list(summary["policies"]) == ["lru", "fixed_ttl", "tool_ttl"] and summary["by_prefix"] == {"policies": {}}
    lru, fixed, tool = (summary["policies"][name] for name in ("lru", "fixed_ttl", "tool_ttl"))
    assert (lru["reprefill_tokens"], lru["reprefill_tokens_per_turn"], lru["returning_turns"]) == (1000, 500.0, 2)
    assert "reprefill_cut_vs_lru" not in lru
    assert (fixed["reprefill_cut_vs_lru"], tool["reprefill_cut_vs_lru"]) == (pytest.approx(0.6), pytest.approx(0.9))
    assert (tool["jct_mean_s"], tool["turns"], tool["ttft_p50_s"]) == (8.5, 4, pytest.approx(0.6))
    assert tool["queue_delay_mean_s"] == 0.5  # returning turns only
    assert (tool["pins_created"], tool["pins_displaced"], tool["pinned_bytes_max"]) == (2, 1, 1000)
    assert (fixed["pins_expired"], fixed["pins_force_released"]) == (1, 0)
    assert (tool["pin_ttl_mean_s"], tool["pins_covering"]) == (1.5, 0.5)
    assert (lru["pin_ttl_mean_s"], lru["pins_covering"]) == (None, None)
    assert summary["pin_budget_bytes"] == 1000 and tool["within_pin_budget"]
    assert summary["targets"] == {"program_id": {"reprefill_cut_ge_80pct": True, "lowest_jct_mean": True,
                                                 "within_pin_budget": True, "met": True}}
    assert summary["config"]["device_tier_bytes"] == 2000 and summary["config"]["fixed_ttl_s"] == 2.0
    assert summary["durations"]["all"]["calls"] == sum(len(t.calls) for t in traces)
    assert "noise" not in summary  # no prefix runs: no second LRU run to compare with
    json.dumps(summary)  # JSON-ready
    table = format_agents_table(summary)
    assert "tool_ttl" in table and "90%" in table and "met yes" in table


def test_noise_compares_each_policys_two_runs_of_the_same_work():
    runs = synthetic_runs()
    runs["prefix"] = {name: dict(row) for name, row in runs["program_id"].items()}
    runs["prefix"]["lru"] |= {"reprefill_tokens": 1500, "jct_mean_s": 11.0}
    summary = summarise(runs, [], AgentsBenchOptions(), Sizes(2000, 2000, 9000))
    assert summary["noise"]["lru"] == {"reprefill_tokens_rel_diff": 0.4, "jct_mean_s_rel_diff": 0.0,
                                       "ttft_p50_s_rel_diff": 0.0}
    assert summary["noise"]["tool_ttl"]["reprefill_tokens_rel_diff"] == 0.0
    assert summary["by_prefix"]["policies"]["tool_ttl"]["reprefill_cut_vs_lru"] == pytest.approx(1 - 100 / 1500)
    assert "lru 40% / 0%, fixed_ttl 0% / 0%" in format_agents_table(summary)


def test_a_missed_target_is_reported_as_missed():
    runs = synthetic_runs()
    runs["program_id"]["tool_ttl"] |= {"reprefill_tokens": 300, "jct_mean_s": 20.0, "within_pin_budget": False}
    summary = summarise(runs, [], AgentsBenchOptions(), Sizes(2000, 2000, 9000))
    assert summary["policies"]["tool_ttl"]["reprefill_cut_vs_lru"] == pytest.approx(0.7)
    assert summary["targets"]["program_id"] == {"reprefill_cut_ge_80pct": False, "lowest_jct_mean": False,
                                                "within_pin_budget": False, "met": False}
    assert "met NO" in format_agents_table(summary)


def test_the_plot_draws_jct_per_policy(tmp_path):
    summary = summarise(synthetic_runs(), [], AgentsBenchOptions(), Sizes(2000, 2000, 9000))
    plot_agents(summary, tmp_path / "jct.png")
    assert (tmp_path / "jct.png").stat().st_size > 1000


@pytest.mark.parametrize("field, value, flag", [
    ("programs", 0, "--programs"), ("turns", 0, "--turns"), ("arrival_rate", 0.0, "--arrival-rate"),
    ("time_scale", -1.0, "--time-scale"), ("kv_budget_mb", 0.0, "--kv-budget-mb"), ("max_tokens", 4, "--max-tokens"),
])
def test_bad_options_name_their_flag(field, value, flag):
    with pytest.raises(BenchAgentsError, match=flag):
        AgentsBenchOptions(**{field: value})


def test_the_cli_refuses_a_bad_flag_before_loading_anything(capsys):
    assert main(["bench", "agents", "--arrival-rate", "0"]) == 2
    assert "--arrival-rate must be positive" in capsys.readouterr().err


def test_a_small_run_end_to_end_over_http(tokenizer):
    """Two programs x one turn on a tiny random model: every policy does the same requests through the
    server; a call request the model answers with a call of the asked tool starts a pin (the random model
    runs out of max_tokens inside some calls: those pin nothing)."""
    options = AgentsBenchOptions(programs=2, turns=1, arrival_rate=20.0, time_scale=0.02, kv_budget_mb=64,
                                 max_tokens=64, answer_tokens=4, prefix_runs=False)
    lines = []
    summary = run_agents_bench(options, lines.append, loaded=loaded(tiny_model(), tokenizer))
    traces = bfcl.load_traces(2, 1, seed=0)
    requests = sum(len(turn.calls) + 1 for trace in traces for turn in trace.turns)
    policies = summary["policies"]
    assert list(policies) == ["lru", "fixed_ttl", "tool_ttl"] and summary["by_prefix"] == {"policies": {}}
    calls = requests - 2
    for name, row in policies.items():
        assert row["turns"] == requests and row["programs"] == 2 and row["returning_turns"] == calls
        assert row["within_pin_budget"] and row["pinned_bytes_max"] <= summary["pin_budget_bytes"]
    assert policies["lru"]["pins_created"] == 0 and policies["lru"]["pinned_bytes_max"] == 0
    fixed = policies["fixed_ttl"]
    assert fixed["calls_made"] > 0 and fixed["pins_created"] == round(fixed["calls_made"] * calls)  # 64 MB: all fit
    assert policies["fixed_ttl"]["reprefill_tokens"] == 0  # nothing evicted: the next turn reuses it all
    assert sum("done:" in line for line in lines) == 2 * 3 and sum("program" in line for line in lines) >= 6
