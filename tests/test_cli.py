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


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "rag", "/nonexistent.json"], "cannot read dataset"),
        (["bench", "rag", "DATA", "--ratios", "0.1,2"], "--ratios"),
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
