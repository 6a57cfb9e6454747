"""`ragcache bench agents`: BFCL traces, tool durations, the programs' scripts, repeats and their draws, figures
and intervals, options, the chat workload, small real runs."""

import importlib
import importlib.util
import json
import math
import random

import pytest

from ragcache.bench import agents as bench_agents
from ragcache.bench import bfcl
from ragcache.bench.agents import (AgentsBenchOptions, BenchAgentsError, ProgramRecord, RequestRecord, Run,
                                   Sizes, draw_repeat, format_agents_table, mean_ci, plot_agents, repeat_figures,
                                   reused_tokens, run_agents_bench, script, summarise, t_975, targets)
from ragcache.bench.chat import (Chat, ChatBenchOptions, TurnRecord, chat_script, chat_summary, format_chat_table,
                                 make_chats, run_chat_bench)
from ragcache.bench.rag import RagExample
from ragcache.cli import main
from ragcache.storage.prefix import DEFAULT_BLOCK_TOKENS

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


def test_load_traces_without_a_turn_cap_keeps_every_user_turn_of_the_entry():
    traces = bfcl.load_traces(6, None, seed=0)
    entries = {e["id"]: e for e in bfcl._read_jsonl(bfcl.data_dir() / bfcl.BASE_FILE)}
    assert [len(t.turns) for t in traces] == [len(entries[t.id]["question"]) for t in traces]
    assert max(len(t.turns) for t in traces) > 2  # more than the old default of two
    capped = bfcl.load_traces(6, 2, seed=0)
    assert [t.turns[:2] for t in traces] == [t.turns for t in capped]  # a cap cuts, it does not redraw


def test_with_durations_redraws_only_the_durations_and_seed_0_is_what_load_traces_drew():
    trace = bfcl.load_traces(1, None, seed=0)[0]
    assert bfcl.with_durations(trace, 0) == trace
    other = bfcl.with_durations(trace, "0/1")
    assert [(c.id, c.name, c.arguments, c.result, c.kind) for c in other.calls] == [
        (c.id, c.name, c.arguments, c.result, c.kind) for c in trace.calls]
    assert all(a.duration_s != b.duration_s for a, b in zip(other.calls, trace.calls))
    assert other.tools == trace.tools and [t.message for t in other.turns] == [t.message for t in trace.turns]


def test_a_repeat_draws_durations_and_arrivals_that_every_policy_shares_and_the_next_repeat_redraws():
    traces = bfcl.load_traces(4, 2, seed=0)
    options = AgentsBenchOptions(programs=4, turns=2, arrival_rate=2.0)
    first, again, second = draw_repeat(traces, options, 0), draw_repeat(traces, options, 0), draw_repeat(traces, options, 1)
    assert first == again  # a function of (seed, repeat) alone: nothing about the policy goes in
    assert [t.id for t in second.traces] == [t.id for t in first.traces]  # the same programs in every repeat
    assert second.arrivals_s != first.arrivals_s and second.arrivals_s[0] == first.arrivals_s[0] == 0.0
    durations = [[c.duration_s for c in t.calls] for t in first.traces]
    assert durations == [[c.duration_s for c in t.calls] for t in traces]  # repeat 0: what --seed drew
    assert durations != [[c.duration_s for c in t.calls] for t in second.traces]
    assert draw_repeat(traces, AgentsBenchOptions(seed=1), 1).arrivals_s != second.arrivals_s  # --seed moves it


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


def test_reused_tokens_take_the_prefix_caches_hit_when_the_server_reports_one():
    with_prefix = reply(700, program_reused=300, cached=580, chunk_ms=600.0)
    with_prefix["ragcache"]["prefix_cached_tokens"] = 640
    assert reused_tokens(with_prefix) == 640
    with_prefix["ragcache"]["prefix_cached_tokens"] = 0  # no hit: what the older fields say
    assert reused_tokens(with_prefix) == 300
    older = reply(700, cached=580, recomputed=30)
    del older["ragcache"]["program_reused_tokens"]  # neither field: the chunk path
    assert reused_tokens(older) == 550


def record(returning, reprefill, ttft_s=0.1, queue_s=0.0, kind="call", called=True):
    return RequestRecord(kind, returning, 700, 700 - (reprefill or 0), reprefill, ttft_s, queue_s, 0.5, called)


def stats(created=0, expired=0, reclaimed=0, displaced=0, pinned_max=0, budget=1000, prefetched=None, held=0, lost=0,
          ttl_s=1.5):
    tier = {"budget_bytes": budget, "pinned_bytes": 0, "pinned_bytes_max": pinned_max, "max_bytes": 2 * budget}
    outcomes = {"default/cd": {"predicted_vs_actual": {"pins": created, "mean_predicted_ttl_s": ttl_s, "covered": 0.5}},
                "default/ls": {"predicted_vs_actual": {"pins": 0}}}
    counters = {"created": created, "expired": expired, "reclaimed": reclaimed, "displaced": displaced,
                "over_budget": 0, "not_worth_it": 0, "returned_held": held, "returned_lost": lost}
    if prefetched is not None:  # a server without the counter omits it
        counters["prefetched_tokens"] = prefetched
    return {"pins": {"counters": counters, "budget": {"device": tier, "cpu": tier | {"pinned_bytes_max": 0}},
                     "pin_hit_rate": held / (held + lost) if held + lost else None,
                     "predictor": {"tools": outcomes}}}


def program_run(reprefills, jcts, **pin_stats):
    programs = [ProgramRecord(f"p{i}", jct, [record(False, None, 0.2), record(True, r, 1.0, 0.5)])
                for i, (r, jct) in enumerate(zip(reprefills, jcts))]
    return Run(programs, stats(**pin_stats), 10.0)


def synthetic_runs():
    def run(reprefills, jcts, **pin_stats):
        return repeat_figures([program_run(reprefills, jcts, **pin_stats)])

    policies = {"lru": run([600, 400], [10.0, 12.0]), "fixed_ttl": run([300, 100], [9.0, 11.0], created=2, expired=1,
                                                                    pinned_max=800),
                "tool_ttl": run([50, 50], [8.0, 9.0], created=2, displaced=1, pinned_max=1000)}
    return {"program_id": policies, "prefix": {}}


def test_figures_aggregate_to_the_json_shape_with_cuts_against_lru_and_the_targets():
    traces = bfcl.load_traces(2, 1, seed=0)
    summary = summarise(synthetic_runs(), traces, AgentsBenchOptions(programs=2, turns=1), Sizes(2000, 2000, 9000))
    assert set(summary) == {"policies", "by_prefix", "pin_budget_bytes", "pin_budget_bytes_by_tier", "config",
                            "durations", "machine", "targets"}
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
    assert summary["pin_budget_bytes_by_tier"] == {"device": 1000, "cpu": 1000}
    assert summary["targets"] == {"program_id": {"reprefill_cut_ge_80pct": True, "lowest_jct_mean": True,
                                                 "reprefill_ci_separate_from_lru": True,
                                                 "jct_ci_separate_from_lru": True, "within_pin_budget": True,
                                                 "met": True}}
    assert (lru["reprefill_tokens_ci"], lru["reprefill_tokens_repeats"], lru["repeats"]) == ([1000, 1000], [1000], 1)
    assert summary["config"]["device_tier_bytes"] == 2000 and summary["config"]["fixed_ttl_s"] == 2.0
    assert summary["durations"]["all"]["calls"] == sum(len(t.calls) for t in traces)
    assert "noise" not in summary  # no prefix runs: no second LRU run to compare with
    json.dumps(summary)  # JSON-ready
    table = format_agents_table(summary)
    assert "tool_ttl" in table and "90%" in table and "met yes" in table and "1000 ± 0" in table and "8.5 ± 0.0" in table
    assert "pins device 0 + cpu 0 MiB" in table.splitlines()[0]  # each tier's pin budget (1000 bytes)


def test_noise_compares_each_policys_two_runs_of_the_same_work():
    runs = synthetic_runs()
    runs["prefix"] = {name: dict(row) for name, row in runs["program_id"].items()}
    runs["prefix"]["lru"] |= {"reprefill_tokens": 1500, "jct_mean_s": 11.0, "reprefill_tokens_ci": [1500, 1500]}
    summary = summarise(runs, [], AgentsBenchOptions(), Sizes(2000, 2000, 9000))
    assert summary["noise"]["lru"] == {"reprefill_tokens_rel_diff": 0.4, "jct_mean_s_rel_diff": 0.0,
                                       "ttft_p50_s_rel_diff": 0.0}
    assert summary["noise"]["tool_ttl"]["reprefill_tokens_rel_diff"] == 0.0
    assert summary["by_prefix"]["policies"]["tool_ttl"]["reprefill_cut_vs_lru"] == pytest.approx(1 - 100 / 1500)
    assert "lru 40% / 0%, fixed_ttl 0% / 0%" in format_agents_table(summary)


def test_a_missed_target_is_reported_as_missed():
    runs = synthetic_runs()
    runs["program_id"]["tool_ttl"] |= {"reprefill_tokens": 300, "jct_mean_s": 20.0, "within_pin_budget": False,
                                       "reprefill_tokens_ci": [300, 300], "jct_mean_s_ci": [20.0, 20.0]}
    summary = summarise(runs, [], AgentsBenchOptions(), Sizes(2000, 2000, 9000))
    assert summary["policies"]["tool_ttl"]["reprefill_cut_vs_lru"] == pytest.approx(0.7)
    assert summary["targets"]["program_id"] == {"reprefill_cut_ge_80pct": False, "lowest_jct_mean": False,
                                                "reprefill_ci_separate_from_lru": True,
                                                "jct_ci_separate_from_lru": False, "within_pin_budget": False,
                                                "met": False}
    assert "met NO" in format_agents_table(summary)


def test_the_interval_is_mean_plus_minus_t_times_the_standard_error():
    low, high = mean_ci([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.3027
    assert (low, high) == (pytest.approx(2 - 4.3027 / math.sqrt(3), abs=1e-4), pytest.approx(2 + 4.3027 / math.sqrt(3), abs=1e-4))
    low, high = mean_ci([10.0, 14.0, 12.0, 12.0])  # sd sqrt(8/3), t(0.975, 3) = 3.1824
    assert high - 12.0 == pytest.approx(3.1824 * math.sqrt(8 / 3) / 2, abs=1e-4) and low + high == pytest.approx(24.0)
    assert mean_ci([7.0]) == [7.0, 7.0] and mean_ci([5.0, 5.0]) == [5.0, 5.0] and mean_ci([]) is None


def test_without_scipy_t_comes_from_the_table_then_the_normal(monkeypatch):
    real = importlib.import_module

    def no_scipy(name, *args):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real(name, *args)

    scipy_t = [t_975(df) for df in (1, 2, 30, 31, 200)]
    monkeypatch.setattr(bench_agents.importlib, "import_module", no_scipy)
    assert [t_975(df) for df in (1, 2, 30, 31, 200)] == [12.7062, 4.3027, 2.0423, 1.96, 1.96]
    assert scipy_t[:3] == pytest.approx([12.7062, 4.3027, 2.0423], abs=1e-4)  # scipy or the table: the same
    if importlib.util.find_spec("scipy") is not None:
        assert scipy_t[4] == pytest.approx(1.972, abs=1e-3)  # scipy's own past the table's end


def test_repeats_pool_records_and_average_reprefill_and_jct_with_their_interval():
    row = repeat_figures([
        program_run([600, 400], [10.0, 12.0], created=2, reclaimed=1, pinned_max=700, prefetched=300, held=1, lost=1),
        program_run([200, 400], [14.0, 16.0], created=3, reclaimed=2, pinned_max=900, held=2, lost=0, ttl_s=2.5),
    ])
    assert (row["reprefill_tokens"], row["reprefill_tokens_repeats"]) == (800, [1000, 600])
    assert row["reprefill_tokens_ci"] == pytest.approx([800 - 12.7062 * 200, 800 + 12.7062 * 200], abs=0.1)
    assert (row["jct_mean_s"], row["jct_mean_s_repeats"]) == (13.0, [11.0, 15.0])
    assert row["jct_mean_s_ci"] == pytest.approx([13.0 - 12.7062 * 2, 13.0 + 12.7062 * 2], abs=1e-3)
    assert (row["repeats"], row["programs"], row["returning_turns"], row["wall_s"]) == (2, 4, 4, 20.0)  # pooled
    assert row["reprefill_tokens_per_turn"] == 400.0 and row["jct_p90_s"] == pytest.approx(15.4)
    assert (row["pins_created"], row["force_released"], row["pins_force_released"]) == (5, 3, 3)  # summed
    assert row["prefetched_tokens"] == 300  # the second repeat's server had no counter: 0
    assert (row["pinned_bytes_max"], row["within_pin_budget"]) == (900, True)  # the highest of the repeats
    assert row["pin_hit_rate"] == 0.75  # 3 held of 4 returns, over both repeats
    assert row["pin_ttl_mean_s"] == pytest.approx((2 * 1.5 + 3 * 2.5) / 5)  # every repeat's pins, weighted


def interval_policies(tool_reprefill, tool_jct, lru_reprefill=(900.0, 1100.0), lru_jct=(20.0, 24.0)):
    def row(reprefill, jct, cut=None):
        return {"reprefill_tokens": sum(reprefill) / 2, "reprefill_tokens_ci": list(reprefill),
                "jct_mean_s": sum(jct) / 2, "jct_mean_s_ci": list(jct), "within_pin_budget": True,
                "reprefill_cut_vs_lru": cut}

    tool = row(tool_reprefill, tool_jct, 1 - sum(tool_reprefill) / sum(lru_reprefill))
    return {"lru": row(lru_reprefill, lru_jct), "fixed_ttl": row((500.0, 700.0), (21.0, 25.0), 0.4), "tool_ttl": tool}


def test_targets_ask_tool_ttls_intervals_to_lie_below_lrus():
    separate = targets(interval_policies((100.0, 150.0), (15.0, 19.0)))
    assert separate == {"reprefill_cut_ge_80pct": True, "lowest_jct_mean": True, "reprefill_ci_separate_from_lru": True,
                        "jct_ci_separate_from_lru": True, "within_pin_budget": True, "met": True}
    overlapping = targets(interval_policies((0.0, 300.0), (15.0, 21.0), lru_reprefill=(200.0, 1800.0)))
    assert (overlapping["reprefill_cut_ge_80pct"], overlapping["lowest_jct_mean"]) == (True, True)  # the means pass
    assert (overlapping["reprefill_ci_separate_from_lru"], overlapping["jct_ci_separate_from_lru"]) == (False, False)
    assert overlapping["met"] is False
    touching = targets(interval_policies((100.0, 150.0), (16.0, 20.0)))  # tool's high = LRU's low: not separate
    assert (touching["reprefill_ci_separate_from_lru"], touching["jct_ci_separate_from_lru"]) == (True, False)
    above = targets(interval_policies((100.0, 150.0), (25.0, 26.0)))  # apart, but on the wrong side
    assert above["jct_ci_separate_from_lru"] is False and above["lowest_jct_mean"] is False


def test_the_plot_draws_jct_per_policy(tmp_path):
    summary = summarise(synthetic_runs(), [], AgentsBenchOptions(), Sizes(2000, 2000, 9000))
    plot_agents(summary, tmp_path / "jct.png")
    assert (tmp_path / "jct.png").stat().st_size > 1000


@pytest.mark.parametrize("field, value, flag", [
    ("programs", 0, "--programs"), ("turns", 0, "--turns"), ("repeats", 0, "--repeats"),
    ("arrival_rate", 0.0, "--arrival-rate"), ("time_scale", -1.0, "--time-scale"), ("kv_budget_mb", 0.0, "--kv-budget-mb"),
    ("max_tokens", 4, "--max-tokens"),
])
def test_bad_options_name_their_flag(field, value, flag):
    with pytest.raises(BenchAgentsError, match=flag):
        AgentsBenchOptions(**{field: value})


@pytest.mark.parametrize("field, value, flag", [
    ("chats", 0, "--programs"), ("turns", 0, "--turns"), ("documents", 0, "--documents"), ("repeats", 0, "--repeats"),
])
def test_bad_chat_options_name_their_flag(field, value, flag):
    with pytest.raises(BenchAgentsError, match=flag):
        ChatBenchOptions(**{field: value})


@pytest.mark.parametrize("argv, message", [
    (["--arrival-rate", "0"], "--arrival-rate must be positive"),
    (["--repeats", "0"], "--repeats must be positive"),
    (["--workload", "chat", "--documents", "0"], "--documents must be positive"),
    (["--workload", "chat", "--plot", "x.png"], "--plot draws the agents workload only"),
])
def test_the_cli_refuses_a_bad_flag_before_loading_anything(capsys, argv, message):
    assert main(["bench", "agents", *argv]) == 2
    assert message in capsys.readouterr().err


def musique_like(count):
    return [RagExample(f"question {i}?", (f"answer {i}",), tuple(f"passage {i}.{k}" for k in range(3)))
            for i in range(count)]


def test_a_chat_is_one_items_passages_its_question_then_the_next_items_questions():
    options = ChatBenchOptions(chats=3, turns=3, documents=3, seed=0)
    chats = make_chats(musique_like(5), options)
    assert [c.id for c in chats] == [c.id for c in make_chats(musique_like(5), options)]  # seeded
    assert len({c.id for c in chats}) == 3
    for chat in chats:
        index = int(chat.id.split("-")[1])
        assert chat.documents == tuple(f"passage {index}.{k}" for k in range(3))
        assert chat.questions == tuple(f"question {(index + k) % 5}?" for k in range(3))  # wraps past the end
        assert chat.answers == tuple(f"answer {(index + k) % 5}" for k in range(3))
    with pytest.raises(BenchAgentsError, match="holds 5 questions"):
        make_chats(musique_like(5), ChatBenchOptions(chats=6))


def test_a_chats_messages_grow_turn_by_turn_with_the_same_documents_and_fixed_answers():
    chat = Chat("musique-7", ("doc a", "doc b"), ("q1?", "q2?", "q3?"), ("a1", "a2", "a3"))
    bodies = chat_script(chat, 12)
    assert [[(m["role"], m["content"]) for m in b["messages"]] for b in bodies] == [
        [("user", "q1?")],
        [("user", "q1?"), ("assistant", "a1"), ("user", "q2?")],
        [("user", "q1?"), ("assistant", "a1"), ("user", "q2?"), ("assistant", "a2"), ("user", "q3?")]]
    assert all(b["documents"] == [{"text": "doc a"}, {"text": "doc b"}] for b in bodies)
    assert all((b["max_tokens"], b["temperature"], b["cache"]) == (12, 0, False) for b in bodies)
    assert "tools" not in bodies[0] and "program_id" not in bodies[0]
    assert chat_script(chat, 12) == bodies  # every run sends the same prompts


def test_chat_figures_are_per_turn_index_over_repeats():
    repeats = [[TurnRecord(1, 1.0, 500, 0), TurnRecord(2, 0.4, 540, 480), TurnRecord(1, 3.0, 510, 0),
                TurnRecord(2, 0.6, 550, 500)],
               [TurnRecord(1, 2.0, 500, 0), TurnRecord(2, 0.2, 540, 490), TurnRecord(1, 4.0, 510, 0),
                TurnRecord(2, 0.4, 550, 490)]]
    options = ChatBenchOptions(chats=2, turns=2, repeats=2)
    summary = chat_summary(repeats, [], options, Sizes(1000, 1000, 5000))
    first, second = summary["turns"]
    assert (summary["workload"], first["turn"], first["requests"]) == ("chat", 1, 4)
    assert (first["ttft_p50_s"], first["ttft_mean_s"], first["ttft_mean_s_repeats"]) == (2.5, 2.5, [2.0, 3.0])
    assert first["ttft_mean_s_ci"] == pytest.approx([2.5 - 12.7062 * 0.5, 2.5 + 12.7062 * 0.5], abs=1e-3)
    assert (second["ttft_mean_s_repeats"], second["prompt_tokens_mean"], second["cached_tokens_mean"]) == (
        [pytest.approx(0.5), pytest.approx(0.3)], 545, 490)
    assert summary["config"]["documents"] == 6 and summary["config"]["device_tier_bytes"] == 1000
    json.dumps(summary)
    table = format_chat_table(summary)
    assert "2 MuSiQue chats x 2 turns" in table and "2.50 ± 6.35" in table


def test_a_small_chat_run_end_to_end_over_http(tokenizer, tmp_path):
    """One chat x three turns on a tiny random model: the prompt grows by the history each turn, the
    documents ride along every turn."""
    rows = [{"question": f"Who wrote book {i}?", "answers": [f"Author {i}"],
             "ctxs": [{"title": "", "text": f"Book {i} part {k} was written by Author {i} in year {1900 + k}."}
                      for k in range(3)]} for i in range(3)]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    options = ChatBenchOptions(chats=1, turns=3, documents=2, repeats=1, arrival_rate=20.0, time_scale=0.01,
                               answer_tokens=4, dataset=str(tmp_path / "data.json"))
    lines = []
    summary = run_chat_bench(options, lines.append, loaded=loaded(tiny_model(), tokenizer))
    turns = summary["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3] and all(t["requests"] == 1 for t in turns)
    prompts = [t["prompt_tokens_mean"] for t in turns]
    assert prompts[0] < prompts[1] < prompts[2]
    assert all(t["ttft_mean_s"] > 0 and t["ttft_mean_s_ci"] == [t["ttft_mean_s"]] * 2 for t in turns)
    assert sum("chat 1/1" in line for line in lines) == 1 and any("repeat 1/1, chat: done" in line for line in lines)


def test_a_small_run_end_to_end_over_http(tokenizer, monkeypatch):
    """Two programs x one turn on a tiny random model, one repeat: every policy does the same requests
    through the server, over the same draw; a call request the model answers with a call of the asked tool
    starts a pin (the random model runs out of max_tokens inside some calls: those pin nothing)."""
    options = AgentsBenchOptions(programs=2, turns=1, repeats=1, arrival_rate=20.0, time_scale=0.02, kv_budget_mb=64,
                                 max_tokens=64, answer_tokens=4, prefix_runs=False)
    drawn = []
    drive = bench_agents._drive

    async def spy(url, draw, options, identify, label, progress=lambda line: None):
        drawn.append((label, draw))
        return await drive(url, draw, options, identify, label, progress)

    monkeypatch.setattr(bench_agents, "_drive", spy)
    lines = []
    summary = run_agents_bench(options, lines.append, loaded=loaded(tiny_model(), tokenizer))
    traces = bfcl.load_traces(2, 1, seed=0)
    assert [label for label, _ in drawn[1:]] == [f"repeat 1/1, {name}" for name in ("lru", "fixed_ttl", "tool_ttl")]
    assert all(draw == draw_repeat(traces, options, 0) for _, draw in drawn[1:])  # every policy, the same draw
    requests = sum(len(turn.calls) + 1 for trace in traces for turn in trace.turns)
    policies = summary["policies"]
    assert list(policies) == ["lru", "fixed_ttl", "tool_ttl"] and summary["by_prefix"] == {"policies": {}}
    calls = requests - 2
    for row in policies.values():
        assert row["turns"] == requests and row["programs"] == 2 and row["returning_turns"] == calls
        assert row["within_pin_budget"] and row["pinned_bytes_max"] <= max(summary["pin_budget_bytes_by_tier"].values())
        assert row["reprefill_tokens_repeats"] == [row["reprefill_tokens"]] and row["repeats"] == 1
        assert row["jct_mean_s_ci"] == [row["jct_mean_s"]] * 2 and row["prefetched_tokens"] >= 0
    assert policies["lru"]["pins_created"] == 0 and policies["lru"]["pinned_bytes_max"] == 0
    fixed = policies["fixed_ttl"]
    # 64 MB: all fit; a call the model did not make is pinned too, from the bench's tool_start event
    assert 0 < fixed["calls_made"] < 1 and fixed["pins_created"] == calls
    for name, row in policies.items():  # 64 MB: nothing evicted; a turn reuses all but its prompt's last partial block
        assert row["reprefill_tokens"] < DEFAULT_BLOCK_TOKENS * calls, name
    assert sum("done:" in line for line in lines) == 2 * 3 and sum("repeat 1/1, tool_ttl: program" in line for line in lines) == 2
    assert summary["config"]["repeats"] == 1 and summary["config"]["user_turns"] == 2
