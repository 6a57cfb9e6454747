"""`ragcache bench semantic`, verifier part: guards on/off x learned thresholds on/off (x the pair verifier).

Each configuration runs on fow-cache's pairs as bench/semantic.py does (store one side in
an empty cache, look up the other). Learned thresholds are learned on the tuning half
only: every tuning pair is looked up once with the learned verifier cold and the floor
as the search threshold, and each candidate that got past the verifiers before
"learned" (a hit, or a "threshold" rejection) becomes an observation labelled by the
pair's should-hit flag (fow-cache's "ambiguous" pairs count as traps, as its evaluate()
does). A fresh cache then learns those observations at each δ and is scored on both
halves with the thresholds fixed (nothing learned while scoring).

Result, merged into each dataset's summary: "static" {configuration: {tune_half, held_out_half}} and "learned"
{δ: {configuration: {tune_half, held_out_half, thresholds}}}, each half with
should_hit_served and traps_wrong. Configurations: guards_on, guards_off, and, when
ragcache.semantic.pair_verifier loads, pair (the pair classifier alone) and facts_pair (the
guards' vocabulary-free checks, guards.check_facts, then the pair classifier).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from ragcache.semantic import GuardConfig, SemanticCache, SemanticCacheConfig
from ragcache.semantic.embedder import Embedder
from ragcache.semantic.learned import Observation

CONFIGURATIONS = {"guards_on": ("guards",), "guards_off": (), "pair": ("pair",), "facts_pair": ("facts", "pair")}


def compare_verifiers(
    dataset: str, embedder: Embedder, deltas: Sequence[float], progress: Callable[[str], None] = lambda line: None
) -> dict:
    """The static and learned rows of one dataset (see the module docstring)."""
    from ragcache.bench.semantic import TENANT, _is_tuning, _items, _query, score_dataset

    static: dict[str, dict] = {}
    learned: dict[str, dict] = {f"{delta:g}": {} for delta in deltas}
    for name, verifiers in CONFIGURATIONS.items():
        if "pair" in verifiers and not pair_available(embedder):
            continue
        progress(f"fow-cache {dataset}, {name}, static")
        static[name] = _halves(score_dataset(dataset, _cache(embedder, verifiers)))
        progress(f"fow-cache {dataset}, {name}, learning on the tuning half")
        tuning = [row for row in _items(dataset) if _is_tuning(row["id"])]
        observed = observe(_cache(embedder, verifiers + ("learned",)), tuning, TENANT, _query)
        for delta in deltas:
            progress(f"fow-cache {dataset}, {name}, learned at delta {delta:g}")
            cache = _cache(embedder, verifiers + ("learned",), delta)
            cache.learn(observed)
            row = _halves(score_dataset(dataset, cache))
            row["thresholds"] = {r.category: r.learned.threshold for r in cache.stats().categories if r.learned}
            row["observations"] = len(observed)
            learned[f"{delta:g}"][name] = row
    return {"static": static, "learned": learned}


def observe(cache: SemanticCache, rows: Sequence[dict], tenant: str, make_query) -> list[Observation]:
    """One labelled observation per pair whose candidate reached the learned verifier."""
    found = []
    for row in rows:
        cache.invalidate(tenant)
        cache.store(make_query(row["a"]), "cached answer")
        outcome = cache.lookup_outcome(make_query(row["b"]))
        correct = False if row.get("ambiguous") else bool(row["same_answer"])
        if outcome.hit is not None:
            found.append(Observation(tenant, outcome.category, None, outcome.hit.similarity, correct))
        else:
            found += [
                Observation(tenant, outcome.category, None, r.similarity, correct)
                for r in outcome.rejections
                if r.reason == "threshold"
            ][:1]
    cache.invalidate(tenant)
    return found


def pair_available(embedder: Embedder) -> bool:
    try:
        _cache(embedder, ("pair",))
    except ValueError:
        return False
    return True


def plot_verifiers(summary: dict, path) -> None:
    """Served against wrong, one panel per dataset: a marker per configuration and δ, the
    held-out half filled and the tuning half hollow."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    datasets = [d for d in ("questions", "conversations") if "learned" in summary.get(d, {})]
    figure, axes = plt.subplots(1, max(1, len(datasets)), figsize=(6 * max(1, len(datasets)), 5), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        rows = summary[dataset]
        points = [(f"{name} static", row) for name, row in rows["static"].items()]
        points += [
            (f"{name} learned δ={delta}", row)
            for delta, by_name in rows["learned"].items()
            for name, row in by_name.items()
        ]
        for i, (label, row) in enumerate(points):
            colour = plt.cm.tab20(i % 20)
            for half, fill in (("held_out_half", colour), ("tune_half", "none")):
                x, y = row[half]["traps_wrong"], row[half]["should_hit_served"]
                axis.scatter(
                    [100 * x],
                    [100 * y],
                    s=50,
                    facecolors=fill,
                    edgecolors=[colour],
                    label=label if half == "held_out_half" else None,
                )
        axis.set(
            title=f"fow-cache {dataset} (filled: held out, hollow: tuning half)",
            xlabel="traps given a wrong answer (%)",
            ylabel="should-hit pairs served (%)",
        )
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def format_verifiers(summary: dict) -> list[str]:
    lines = []
    for dataset in ("questions", "conversations"):
        rows = summary.get(dataset, {})
        if "learned" not in rows:
            continue
        lines += [
            "",
            f"{dataset}: verifiers x learned thresholds (should-hit served / traps wrong)",
            f"  {'configuration':<30}{'tune half':>18}{'held out':>18}  thresholds",
        ]
        entries = [(f"{name}, static", row) for name, row in rows["static"].items()]
        entries += [
            (f"{name}, learned δ={delta}", row)
            for delta, by_name in rows["learned"].items()
            for name, row in by_name.items()
        ]
        for label, row in entries:
            thresholds = ", ".join(
                f"{c} {'-' if t is None else f'{t:.3f}'}" for c, t in row.get("thresholds", {}).items()
            )
            lines.append(f"  {label:<30}{_pair(row['tune_half']):>18}{_pair(row['held_out_half']):>18}  {thresholds}")
    return lines


def _cache(embedder: Embedder, verifiers: tuple[str, ...], delta: float | None = None) -> SemanticCache:
    base = SemanticCacheConfig()
    # every category on (conversations are off by default): the comparison is of verifiers, not switches
    policies = {
        k: replace(p, enabled=True, delta=p.delta if delta is None else delta) for k, p in base.policies.items()
    }
    guards = GuardConfig(enabled="guards" in verifiers)
    names = tuple(v for v in verifiers if v != "guards") if not guards.enabled else verifiers
    return SemanticCache(embedder, config=replace(base, policies=policies, guards=guards, default_verifiers=names))


def _halves(result: dict) -> dict:
    keys = ("should_hit_served", "traps_wrong")
    return {half: {k: result[half][k] for k in keys} for half in ("tune_half", "held_out_half")}


def _pair(half: dict) -> str:
    return f"{100 * half['should_hit_served']:.1f}% / {100 * half['traps_wrong']:.1f}%"


class MemoEmbedder:
    """An embedder that embeds each distinct text once (the bench looks the same texts up
    in many configurations); same name and dim as the one it wraps."""

    def __init__(self, inner: Embedder) -> None:
        self._inner = inner
        self.name, self.dim = inner.name, inner.dim
        self._vectors: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if missing:
            self._vectors.update(zip(missing, self._inner.embed(missing)))
        return np.asarray([self._vectors[t] for t in texts], dtype=np.float32).reshape(len(texts), self.dim)

    def __getattr__(self, name):  # anything else (e.g. a tokenizer a verifier reads) from the real one
        return getattr(self._inner, name)
