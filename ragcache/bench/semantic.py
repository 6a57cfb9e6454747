"""`ragcache bench semantic`: the semantic cache scored on fow-cache's labelled pairs, and timed.

Correctness: fow-cache (PyPI, CC BY 4.0) ships 600 question pairs (paraphrases and near
repeats that should hit; negation, entity-swap, number/date and scope traps that must
not) and 240 pairs of multi-turn chats whose last user messages match. Each pair runs
ragcache's real SemanticCache at its default settings against an empty cache: store one
side, look up the other, through fow_cache.evaluate(). Reported: "should-hit served" and
"traps given a wrong answer", per pair category, on the whole set and on its two halves
(ids ending in an odd digit were used to tune the defaults, the even ones were not), with
the guards on and off; then guards on/off x learned thresholds on/off (and the pair
verifier when it loads), learned on the tuning half at each δ: bench/semantic_verifiers.py.

Latency: the cache filled with N entries (1k, 10k, 100k) per index kind, then timed
lookups. Filling 100k entries through a real embedder takes minutes, so the fill uses
vectors made from real MiniLM embeddings of fow-cache questions plus noise (neighbours at
cosine ~0.9, as paraphrases are); lookups then search, verify candidates with the guards
and read the answer as in production. Embedding is timed apart, one query at a time.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ragcache.bench.semantic_verifiers import MemoEmbedder, compare_verifiers, format_verifiers
from ragcache.semantic import GuardConfig, IndexConfig, SemanticCache, SemanticCacheConfig, SemanticQuery
from ragcache.semantic.embedder import Embedder
from ragcache.semantic.text import strip_pleasantries

TENANT = "bench"


@dataclass(frozen=True)
class SemanticBenchOptions:
    datasets: tuple[str, ...] = ("questions", "conversations")
    compare_unguarded: bool = True  # also score with the guards off
    deltas: tuple[float, ...] = (0.01, 0.05, 0.1)  # learned thresholds at these δ; () skips the comparison
    sizes: tuple[int, ...] = (1000, 10_000, 100_000)  # entries for the latency runs; () skips them
    indexes: tuple[str, ...] = ("hnsw", "faiss")
    lookups: int = 1000  # timed lookups per size and index
    embed_samples: int = 200
    pool: int | None = None  # fow-cache questions the latency fill is made from; None: all 1,200
    seed: int = 0

    def __post_init__(self) -> None:
        if not set(self.datasets) <= {"questions", "conversations"}:
            raise ValueError(f"datasets must be among questions, conversations; got {self.datasets}")
        if not all(0 < delta < 1 for delta in self.deltas):
            raise ValueError(f"deltas must be in (0, 1), got {self.deltas}")
        if any(size <= 0 for size in self.sizes) or self.lookups <= 0 or self.embed_samples <= 0:
            raise ValueError("sizes, lookups and embed_samples must be positive")


def run_semantic_bench(
    options: SemanticBenchOptions = SemanticBenchOptions(),
    embedder: Embedder | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> dict:
    """Everything `ragcache bench semantic` reports, as one JSON-ready dict."""
    if embedder is None:
        from ragcache.semantic.embedder import SentenceTransformerEmbedder

        embedder = SentenceTransformerEmbedder()
    summary: dict = {
        "embedder": embedder.name,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(options).items()},
    }
    scoring = MemoEmbedder(embedder)
    for dataset in options.datasets:
        progress(f"fow-cache {dataset}, guards on")
        summary[dataset] = score_dataset(dataset, SemanticCache(scoring))
        if options.compare_unguarded:
            progress(f"fow-cache {dataset}, guards off")
            unguarded = SemanticCache(
                scoring, config=SemanticCacheConfig(guards=GuardConfig(enabled=False), default_verifiers=())
            )
            summary[dataset]["unguarded"] = _headline(score_dataset(dataset, unguarded))
        if options.deltas:
            summary[dataset].update(compare_verifiers(dataset, scoring, options.deltas, progress))
    if options.sizes:
        summary["latency_ms"] = measure_latency(options, embedder, progress)
    return summary


def score_dataset(dataset: str, cache: SemanticCache) -> dict:
    """fow-cache's evaluate() over one dataset, with the cache emptied before every pair."""
    from fow_cache import evaluate

    details: dict[str, dict] = {}

    def check(cached_side, new_side) -> bool:
        cache.invalidate(TENANT)
        stored, looked_up = _query(cached_side), _query(new_side)
        stored_category = cache.lookup_outcome(stored).category
        cache.store(stored, "cached answer")
        outcome = cache.lookup_outcome(looked_up)
        details[_key(cached_side, new_side)] = {
            "category_mismatch": stored_category != outcome.category,
            "rejected": [r.reason for r in outcome.rejections],
        }
        return outcome.hit is not None

    report = evaluate(check, dataset=dataset)
    items = {r.id: r for r in report.results}
    rows = _items(dataset)
    mismatches = sum(details[_key(row["a"], row["b"])]["category_mismatch"] for row in rows)
    reasons: dict[str, int] = {}
    for row in rows:
        if not row["same_answer"]:
            for reason in details[_key(row["a"], row["b"])]["rejected"]:
                reasons[reason] = reasons.get(reason, 0) + 1
    result = _rates(report.results)
    result["tune_half"] = _rates([items[row["id"]] for row in rows if _is_tuning(row["id"])])
    result["held_out_half"] = _rates([items[row["id"]] for row in rows if not _is_tuning(row["id"])])
    result["pairs"] = len(report.results)
    result["category_mismatches"] = mismatches
    result["trap_rejections_by_reason"] = dict(sorted(reasons.items()))
    return result


def measure_latency(options: SemanticBenchOptions, embedder: Embedder, progress: Callable[[str], None]) -> dict:
    from fow_cache import load_questions

    texts = sorted({side for item in load_questions() for side in (item["a"], item["b"])})[: options.pool]
    base = embedder.embed([strip_pleasantries(text) or text for text in texts])
    embed_s = []
    for text in random.Random(options.seed).sample(texts, min(options.embed_samples, len(texts))):
        start = time.perf_counter()
        embedder.embed([text])
        embed_s.append(time.perf_counter() - start)
    results: dict[str, dict] = {}
    for size in options.sizes:
        row: dict = {"embed_p50": _ms(embed_s, 0.5)}
        for kind in options.indexes:
            progress(f"latency: {size} entries, {kind}")
            row[kind] = _time_index(kind, size, options, texts, base)
        first = row[options.indexes[0]] if options.indexes else {}
        row.update({"lookup_p50": first.get("lookup_p50"), "lookup_p99": first.get("lookup_p99")})
        results[str(size)] = row
    return results


def format_semantic_table(summary: dict) -> str:
    lines = [f"semantic cache on fow-cache ({summary['embedder']}, default settings)"]
    for dataset in ("questions", "conversations"):
        if dataset not in summary:
            continue
        result = summary[dataset]
        lines += [
            "",
            f"{dataset}: {result['pairs']} pairs",
            f"  {'':<28}{'all':>8}{'tune half':>11}{'held out':>10}{'no guards':>11}",
        ]
        unguarded = result.get("unguarded", {})
        for label, key in (("should-hit served", "should_hit_served"), ("traps given a wrong answer", "traps_wrong")):
            lines.append(
                f"  {label:<28}{_pct(result[key]):>8}{_pct(result['tune_half'][key]):>11}"
                f"{_pct(result['held_out_half'][key]):>10}{_pct(unguarded.get(key)):>11}"
            )
        for group, rate in result["by_group"].items():
            lines.append(f"    {group:<26}{_pct(rate):>8}{'':>21}{_pct(unguarded.get('by_group', {}).get(group)):>11}")
        lines.append(f"  category mismatches between the two sides: {result['category_mismatches']}")
        lines.append(f"  trap candidates rejected, by guard: {result['trap_rejections_by_reason']}")
    lines += format_verifiers(summary)
    if "latency_ms" in summary:
        kinds = [
            k
            for k in next(iter(summary["latency_ms"].values()))
            if isinstance(next(iter(summary["latency_ms"].values()))[k], dict)
        ]
        lines += [
            "",
            "lookup latency, embedding excluded (ms):",
            f"  {'entries':>8}" + "".join(f"{k + ' p50':>12}{k + ' p99':>12}" for k in kinds) + f"{'embed p50':>11}",
        ]
        for size, row in summary["latency_ms"].items():
            lines.append(
                f"  {size:>8}"
                + "".join(f"{row[k]['lookup_p50']:>12.3f}{row[k]['lookup_p99']:>12.3f}" for k in kinds)
                + f"{row['embed_p50']:>11.2f}"
            )
    return "\n".join(lines)


# helpers


def _query(side) -> SemanticQuery:
    if isinstance(side, list):
        return SemanticQuery.from_messages(TENANT, side)
    return SemanticQuery(TENANT, side)


def _key(a, b) -> str:
    return repr((a, b))


def _items(dataset: str) -> list[dict]:
    from fow_cache import load_conversations, load_questions

    return load_questions() if dataset == "questions" else load_conversations()


def _is_tuning(item_id: str) -> bool:
    return int(item_id[-1]) % 2 == 1


def _rates(results: Sequence) -> dict:
    hits = [r for r in results if r.same_answer]
    traps = [r for r in results if not r.same_answer]
    groups: dict[str, list] = {}
    for r in results:
        groups.setdefault(r.group, []).append(r.served)
    return {
        "should_hit_served": sum(r.served for r in hits) / len(hits) if hits else None,
        "traps_wrong": sum(r.served for r in traps) / len(traps) if traps else None,
        "by_group": {group: sum(served) / len(served) for group, served in groups.items()},
    }


def _headline(result: dict) -> dict:
    return {key: result[key] for key in ("should_hit_served", "traps_wrong", "by_group")}


class _NoisyEmbedder:
    """Real MiniLM embeddings of fow-cache questions plus seeded noise, for texts the bench
    registered first (keyed as the cache will embed them: without greetings)."""

    def __init__(self, base: np.ndarray, noise: float = 0.5) -> None:
        self._base = base
        self._noise = noise / np.sqrt(base.shape[1])
        self._vectors: dict[str, np.ndarray] = {}
        self.dim = base.shape[1]
        self.name = "bench-noisy"

    def register(self, text: str, row: int, seed: int) -> str:
        vector = self._base[row] + np.random.default_rng(seed).normal(0.0, self._noise, self.dim)
        self._vectors[strip_pleasantries(text) or text] = (vector / np.linalg.norm(vector)).astype(np.float32)
        return text

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray([self._vectors[text] for text in texts], dtype=np.float32).reshape(len(texts), self.dim)


def _time_index(kind: str, size: int, options: SemanticBenchOptions, texts: list[str], base: np.ndarray) -> dict:
    embedder = _NoisyEmbedder(base)
    config = SemanticCacheConfig(index=replace(IndexConfig(), kind=kind))
    cache = SemanticCache(embedder, config=config)
    start = time.perf_counter()
    for i in range(size):
        text = embedder.register(f"{texts[i % len(texts)]} (entry {i})", i % len(texts), i)
        cache.store(SemanticQuery(TENANT, text, category="factual"), f"answer {i}")
    build_s = time.perf_counter() - start
    rng = random.Random(options.seed)
    for j in range(options.lookups):
        row = rng.randrange(len(texts))
        text = embedder.register(f"{texts[row]} (entry {size + j})", row, size + j)
        cache.lookup(SemanticQuery(TENANT, text, category="factual"))
    stats = cache.stats()
    return {"lookup_p50": stats.lookup_p50_ms, "lookup_p99": stats.lookup_p99_ms, "build_s": build_s}


def _ms(samples_s: list[float], q: float) -> float:
    ordered = sorted(samples_s)
    return 1000.0 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
