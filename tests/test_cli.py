"""`ragcache bench rag` end to end on a tiny model saved to disk (the directory-loading path)."""

import json

import pytest

from ragcache.cli import main

from conftest import DOCUMENTS


def write_dataset(path, rows):
    path.write_text(json.dumps(rows))
    return path


def test_bench_rag_writes_every_mode(tmp_path, tiny_model_dir, capsys):
    rows = [
        {"question": "Which river reaches the Atlantic?", "answers": ["Amazon"], "ctxs": [{"text": d} for d in DOCUMENTS]},
        {"question": "How high is Kilimanjaro?", "answers": ["5,895 metres"], "ctxs": [{"text": d} for d in DOCUMENTS]},
    ]
    dataset = write_dataset(tmp_path / "data.json", rows)
    out = tmp_path / "summary.json"
    args = ["bench", "rag", str(dataset), "--docs", "3", "--ratios", "0.15,0.5", "--max-tokens", "4"]
    assert main([*args, "--model", str(tiny_model_dir), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["questions"] == 2 and summary["documents_per_question"] == 3
    assert list(summary["modes"]) == ["full", "prefix", "reuse", "blend@0.15", "blend@0.5"]
    full, reuse = summary["modes"]["full"], summary["modes"]["reuse"]
    assert full["fidelity_f1"] == 1.0 and full["first_token_kl"] == 0.0 and full["recomputed_fraction"] == 1.0
    for mode in summary["modes"].values():
        assert {"ttft_p50_s", "ttft_p90_s", "recomputed_fraction", "f1", "fidelity_f1",
                "first_token_agreement", "first_token_kl"} <= set(mode)
    assert reuse["recomputed_fraction"] < summary["modes"]["blend@0.15"]["recomputed_fraction"] < 1.0
    assert "blend@0.5" in capsys.readouterr().out


def test_bench_rag_gate_learns_on_one_file_and_reports_another(tmp_path, tiny_model_dir, capsys):
    questions = ["Which river reaches the Atlantic?", "How high is Kilimanjaro?", "Where is the Amazon?",
                 "Which mountain is oldest?", "What flows into the ocean?", "Name a tall peak."]
    rows = [{"question": q, "answers": ["x"], "ctxs": [{"text": d} for d in DOCUMENTS]} for q in questions]
    dev = write_dataset(tmp_path / "dev.json", rows[:4] * 3)
    held_out = write_dataset(tmp_path / "eval.json", rows[4:])
    out = tmp_path / "gate.json"
    args = ["bench", "rag", str(held_out), "--gate", "--learn-from", str(dev), "--epsilon", "0.05", "--docs", "3",
            "--max-tokens", "3", "--ladder", "blend@0,blend@0.5,prefix"]
    assert main([*args, "--model", str(tiny_model_dir), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    gate = summary["gate"]
    assert list(summary["modes"]) == ["full", "blend@0", "gated"] and summary["questions"] == 2
    assert gate["learn_questions"] == 12 and sum(gate["learn_served_at"].values()) == 12
    assert gate["shadow"]["counts"]["blend_done"] == 12
    estimates = gate["budget"][0]["estimates"]
    assert sum(row["n"] for row in estimates.values()) == 12
    # 12 checks are fewer than a rung needs to be judged (min_checks 30): the first rung stays, unjudged
    assert gate["setting"] == gate["budget"][0]["setting"] == "blend@0" and gate["budget"][0]["changes"] == 0
    assert estimates["blend@0"]["n"] == 12
    assert {"ttft_p50_s", "first_token_agreement", "fidelity_f1", "first_token_kl"} <= set(summary["modes"]["gated"])
    assert "chosen" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "rag", "/nonexistent.json"], "cannot read dataset"),
        (["bench", "rag", "DATA", "--ratios", "0.1,2"], "--ratios"),
        (["bench", "rag", "DATA", "--gate"], "--learn-from"),
        (["bench", "rag", "DATA", "--gate", "--learn-from", "DATA", "--epsilon", "2"], "epsilon"),
        (["bench", "rag", "DATA", "--gate", "--learn-from", "DATA", "--ladder", "blend@0.1,fast"], "fast"),
    ],
)
def test_bench_rag_bad_input_exits_2_with_a_message(tmp_path, tiny_model_dir, capsys, args, message):
    dataset = write_dataset(tmp_path / "data.json", [{"question": "q", "answers": ["a"], "ctxs": [{"text": "t"}]}])
    args = [str(dataset) if a == "DATA" else a for a in args]
    assert main([*args, "--model", str(tiny_model_dir)]) == 2
    assert message in capsys.readouterr().err


def test_missing_model_path_exits_2(tmp_path, capsys):
    dataset = write_dataset(tmp_path / "data.json", [{"question": "q", "answers": ["a"], "ctxs": [{"text": "t"}]}])
    assert main(["bench", "rag", str(dataset), "--model", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_rag_kinds_times_each_kind_per_mode(tmp_path, tiny_model_dir, capsys):
    rows = [
        {"question": "Which river reaches the Atlantic?", "answers": ["Amazon"], "ctxs": [{"text": d} for d in DOCUMENTS]},
        {"question": "How high is Kilimanjaro?", "answers": ["5,895 metres"], "ctxs": [{"text": d} for d in DOCUMENTS]},
    ]
    dataset = write_dataset(tmp_path / "data.json", rows)
    out = tmp_path / "kinds.json"
    args = ["bench", "rag", str(dataset), "--docs", "3", "--max-tokens", "2", "--kinds", "cold,reordered,repeat,followup",
            "--kind-modes", "full,blend@0.15", "--model", str(tiny_model_dir), "--json", str(out)]
    assert main(args) == 0
    summary = json.loads(out.read_text())
    modes = summary["kinds"]["ragcache"]
    assert list(modes) == ["full", "blend@0.15"]
    for kinds in modes.values():
        assert list(kinds) == ["cold", "reordered", "repeat", "followup"]
        assert all(k["n"] == 2 and 0 < k["p50_s"] <= k["p90_s"] for k in kinds.values())
        # each question in a tenant of its own: its first sight misses the prefix cache, the repeat and the
        # follow-up over the same passages hit it
        assert kinds["cold"]["prefix_cached_tokens_mean"] == 0
        assert kinds["reordered"]["prefix_cached_tokens_mean"] < kinds["followup"]["prefix_cached_tokens_mean"]
        assert kinds["repeat"]["prefix_cached_tokens_mean"] > kinds["followup"]["prefix_cached_tokens_mean"] > 0
    assert summary["repeat_same_answer"]["ragcache"] == {"full": "2/2", "blend@0.15": "2/2"}
    tree = summary["prefix_cache"]["ragcache"]["full"]
    assert tree["lookups"] == 8 and 0 < tree["hit_tokens"] < tree["lookup_tokens"] and tree["nodes"] > 0
    assert "cross_replica" not in summary
    assert "followup" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--kinds", "cold,warm"], "--kinds"),
        (["--kinds", "cold", "--engine", "llama"], "--engine"),
        (["--kinds", "cold", "--engine", "vllm"], "--vllm-url"),
        (["--kinds", "cross_replica", "--vllm-url", "http://127.0.0.1:9"], "two vLLM servers"),
    ],
)
def test_bench_rag_kinds_bad_flags_exit_2_naming_them(tmp_path, tiny_model_dir, capsys, extra, message):
    dataset = write_dataset(tmp_path / "data.json", [{"question": "q", "answers": ["a"], "ctxs": [{"text": "t"}]}])
    assert main(["bench", "rag", str(dataset), "--model", str(tiny_model_dir), *extra]) == 2
    assert message in capsys.readouterr().err
