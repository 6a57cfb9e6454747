"""`ragcache bench serve` against a real server over a tiny random model, and its flag checks."""

import importlib.util
import json

import pytest

from ragcache.bench.serve_targets import document_id, rag_messages
from ragcache.cli import main
from ragcache.engine.prompt import DEFAULT_SYSTEM_PROMPT, split_template
from service_server import running_server

from conftest import DOCUMENTS

LEVEL_FIELDS = {"requests", "requests_per_s", "output_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s",
                "tpot_p99_s", "errors"}


def write_dataset(path):
    rows = [
        {"question": "Which river reaches the Atlantic?", "answers": ["Amazon"],
         "ctxs": [{"title": "Amazon", "text": DOCUMENTS[0]}, {"title": "Kilimanjaro", "text": DOCUMENTS[1]}]},
        {"question": "Which lake holds a fifth of the fresh water?", "answers": ["Baikal"],
         "ctxs": [{"title": "Danube", "text": DOCUMENTS[2]}, {"title": "Baikal", "text": DOCUMENTS[3]}]},
    ]
    path.write_text(json.dumps(rows))
    return path


def test_bench_serve_measures_every_mode_and_load(tmp_path, make_engine, capsys):
    dataset, out = write_dataset(tmp_path / "data.json"), tmp_path / "serve.json"
    with running_server(make_engine()) as (url, runtime):
        args = ["bench", "serve", str(dataset), "--url", url, "--peer", "none", "--docs", "2", "--max-tokens", "4",
                "--modes", "full,prefix,blend@0.5", "--concurrency", "1,2", "--rates", "20", "--requests", "4",
                "--json", str(out)]
        assert main(args) == 0
        registered = runtime.documents.get_many("default", [document_id(text) for text in DOCUMENTS])
    assert [document.text for document in registered] == list(DOCUMENTS)  # every passage registered by id before the timed requests
    summary = json.loads(out.read_text())
    assert set(summary) == {"machine", "config", "engines"}
    assert summary["machine"]["cpus"] >= 1 and summary["config"]["concurrency"] == [1, 2]
    assert list(summary["engines"]) == ["ragcache"]
    modes = summary["engines"]["ragcache"]["modes"]
    assert list(modes) == ["full", "prefix", "blend@0.5"]
    for runs in modes.values():
        assert [row["concurrency"] for row in runs["closed"]] == [1, 2]
        assert [row["rate"] for row in runs["open"]] == [20]
        for row in runs["closed"] + runs["open"]:
            assert LEVEL_FIELDS <= set(row)
            assert row["requests"] == 4 and row["errors"] == 0, row["error_examples"]
            assert row["requests_per_s"] > 0 and row["output_tokens_per_s"] > 0
            assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] and 0 < row["tpot_p50_s"] <= row["tpot_p99_s"]
    table = capsys.readouterr().out
    assert "blend@0.5" in table and "rate=20/s" in table and "c=2" in table


def test_bench_serve_plots_every_mode(tmp_path, make_engine):
    dataset, plot = write_dataset(tmp_path / "data.json"), tmp_path / "serve.png"
    with running_server(make_engine()) as (url, _):
        args = ["bench", "serve", str(dataset), "--url", url, "--peer", "none", "--max-tokens", "2",
                "--modes", "blend@0.15", "--concurrency", "1", "--rates", "", "--requests", "2", "--plot", str(plot)]
        assert main(args) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_bench_serve_measures_the_llamacpp_peer_on_the_default_gguf(tmp_path, make_engine):
    dataset, out = write_dataset(tmp_path / "data.json"), tmp_path / "serve.json"
    with running_server(make_engine()) as (url, _):
        args = ["bench", "serve", str(dataset), "--url", url, "--peer", "llamacpp", "--max-tokens", "2",
                "--modes", "full", "--concurrency", "2", "--rates", "", "--requests", "2", "--json", str(out)]
        assert main(args) == 0
    peer = json.loads(out.read_text())["engines"]["llamacpp"]
    assert peer["model"].endswith(".gguf") and list(peer["modes"]) == ["full"]
    (row,) = peer["modes"]["full"]["closed"]
    assert row["requests"] == 2 and row["errors"] == 0, row["error_examples"]  # queued, not interrupted
    assert row["ttft_p50_s"] > 0 and row["output_tokens_per_s"] > 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--concurrency", "0"], "--concurrency must be positive integers, got '0'"),
        (["--concurrency", "1,x"], "--concurrency: expected comma-separated int values"),
        (["--rates", "-1"], "--rates must be positive"),
        (["--modes", "full,blend@2"], "--modes must be full, prefix, reuse, blend or blend@r"),
        (["--docs", "0"], "--docs must be positive"),
        (["--concurrency", "", "--rates", ""], "--concurrency and --rates are both empty"),
    ],
)
def test_bench_serve_bad_flags_exit_2_naming_the_flag(tmp_path, capsys, flags, message):
    dataset = write_dataset(tmp_path / "data.json")
    assert main(["bench", "serve", str(dataset), "--url", "http://127.0.0.1:9", *flags]) == 2
    assert message in capsys.readouterr().err


def test_unreachable_server_exits_2(tmp_path, capsys):
    dataset = write_dataset(tmp_path / "data.json")
    assert main(["bench", "serve", str(dataset), "--url", "http://127.0.0.1:9", "--peer", "none"]) == 2
    assert "ragcache at http://127.0.0.1:9/v1/models: ConnectError" in capsys.readouterr().err


def test_peer_prompt_is_ragcache_layout(tokenizer):
    question = "  Which river reaches the Atlantic? "
    before, after = split_template(tokenizer, DEFAULT_SYSTEM_PROMPT, question.strip(), True)
    ragcache_text = before + "".join(d.strip() + "\n\n" for d in DOCUMENTS[:2]) + after
    peer_text = tokenizer.apply_chat_template(rag_messages(question, DOCUMENTS[:2]), tokenize=False,
                                              add_generation_prompt=True)
    assert peer_text == ragcache_text
