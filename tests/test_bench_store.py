"""`ragcache bench store` end to end on the tiny random model, real Redis; `bench eviction` unchanged."""

import json

from ragcache.bench import store as store_bench
from ragcache.cli import main
from ragcache.storage.codec import CODECS
from ragcache.storage.redis import RedisTier

FAST = ["bench", "store", "--chunks", "2", "--chunk-tokens", "24", "--repeats", "3", "--codec-repeats", "1",
        "--ttft-repeats", "2"]


def run_store(tmp_path, tiny_model_dir, *extra):
    out = tmp_path / "store.json"
    assert main([*FAST, "--model", str(tiny_model_dir), "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def positive_numbers(rows: dict, fields: set[str]) -> bool:
    return all(set(row) >= fields and all(isinstance(row[f], float) and row[f] > 0 for f in fields)
               for row in rows.values())


def test_bench_store_writes_the_issue_shape_with_positive_numbers(tmp_path, tiny_model_dir, redis_url, monkeypatch,
                                                                  capsys):
    monkeypatch.setattr(store_bench, "LLAMA3_8B", store_bench.ChunkShape(2, 2, 16, 8))  # the 8B path, tiny
    summary = run_store(tmp_path, tiny_model_dir, "--redis-url", redis_url, "--plot", str(tmp_path / "store.png"))
    assert set(summary) >= {"codecs", "tiers", "ttft_s", "tiers_llama3_8b", "targets"}
    assert list(summary["codecs"]) == list(CODECS)
    assert positive_numbers(summary["codecs"], {"ratio_vs_fp16", "encode_mb_s", "decode_mb_s"})
    assert list(summary["tiers"]) == list(summary["tiers_llama3_8b"]) == ["device", "cpu", "redis"]
    assert positive_numbers(summary["tiers"], {"put_mb_s", "get_mb_s", "get_p50_ms", "get_p99_ms"})
    assert positive_numbers(summary["tiers_llama3_8b"], {"put_mb_s", "get_mb_s", "get_p50_ms", "get_p99_ms"})
    assert set(summary["ttft_s"]) == {"device", "cpu", "redis", "miss"}
    assert all(isinstance(v, float) and v > 0 for v in summary["ttft_s"].values())
    hits = {name: run["chunk_hits"] for name, run in summary["ttft"]["runs"].items()}
    assert hits == {"device": 2, "cpu": 2, "redis": 2, "miss": 0}  # each hit scenario was served from its tier
    assert [run["chunk_hits"] for run in summary["ttft"]["redis_by_codec"].values()] == [2] * len(CODECS)
    assert summary["redis"]["ttft_codec"] == "int4-g64"  # the default: the codec sized for the ratio target
    assert summary["chunk"]["shape"] == [4, 2, 24, 16] and summary["chunk_llama3_8b"]["shape"] == [2, 2, 16, 8]
    assert (tmp_path / "store.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "target: best codec >= 3.5x smaller than float16" in out and "Redis-tier hit's TTFT" in out
    leftover = RedisTier(redis_url, namespace=summary["redis"]["namespace"])
    assert leftover.keys() == []  # the bench deletes every key it wrote
    leftover.close()


def test_bench_store_without_redis_reports_null_rows_and_why(tmp_path, tiny_model_dir, capsys):
    summary = run_store(tmp_path, tiny_model_dir, "--redis-url", "redis://127.0.0.1:1/0", "--no-llama3-8b",
                        "--codec", "int8")
    assert summary["tiers"]["redis"] is None and summary["ttft_s"]["redis"] is None
    assert summary["ttft_s"]["cpu"] > 0 and summary["redis"]["ttft_codec"] == "int8"
    assert summary["redis"]["available"] is False and "not usable" in summary["redis"]["error"]
    assert summary["targets"]["redis_vs_cpu_ttft"]["met"] is None
    assert "not usable" in capsys.readouterr().out


def test_bench_store_refuses_an_unknown_codec(tiny_model_dir, capsys):
    assert main([*FAST, "--model", str(tiny_model_dir), "--codec", "zstd"]) == 2
    assert "--codec must be one of" in capsys.readouterr().err


def test_bench_eviction_still_replays_each_policy(tmp_path, capsys):
    out = tmp_path / "eviction.json"
    assert main(["bench", "eviction", "--documents", "60", "--requests", "200", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert set(summary["policies"]) == {"lru", "lfu", "cost_aware"} and summary["options"]["requests"] == 200
    assert "cost_aware" in capsys.readouterr().out
