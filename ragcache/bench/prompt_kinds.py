"""`ragcache bench rag --kinds`: time to first token by how a prompt relates to what came before.

    cold           first sight of this prompt (ragcache's own engine: its documents registered, as a
                   warm deployment has them; vLLM: nothing of it computed before)
    reordered      the same passages in another order (reversed)
    repeat         the identical prompt again
    followup       the same passages with another question (the next question of the dataset): a chat's
                   follow-up over the same documents
    cross_replica  vLLM with RagcacheConnector: a prompt computed on server A, then sent to server B
                   (its prefix loaded from Redis); beside it, cross_replica_miss: the same prompt under
                   another tenant's cache_salt on B, which no server has computed, so B prefills it,
                   as a replica without the connector (or without Redis) does

Every engine answers greedily through the Engine seam (BlendEngine or VLLMEngine), one request at a
time; each kind's time to first token is summarised per engine and mode over the questions, with
the prompt tokens the prefix cache gave (prefix_cached_tokens_mean); repeat_same_answer counts the
repeats whose greedy answer equals the cold request's, token for token. Each (mode, question) runs in a
tenant of its own, so no cache holds anything of it before its cold request (the own engine's
documents are registered in that tenant first, untimed, as a warm deployment has them). For the
own engine, prefix_cache gives the prefix cache's tree per mode over its requests: lookups, hit
tokens and rate, blocks and bytes held, evictions.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import NamedTuple

from tqdm import tqdm

from ragcache.bench.rag import RagExample, request_for
from ragcache.engine.request import Generation, RagRequest

KINDS = ("cold", "reordered", "repeat", "followup", "cross_replica")

Generate = Callable[[RagRequest], Generation]
Prepare = Callable[[str, RagExample], None]  # (tenant, question): what a warm deployment has before it


class Engine(NamedTuple):
    generate: Generate
    modes: Sequence[str]
    prepare: Prepare | None = None
    prefix_stats: Callable[[], dict | None] | None = None


def parse_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(kind.strip() for kind in text.split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"--kinds: comma-separated of {', '.join(KINDS)}, got {text!r}")
    return kinds


def run_prompt_kinds(
    engines: dict[str, Engine],
    examples: Sequence[RagExample],
    kinds: Sequence[str],
    max_tokens: int,
    replicas: tuple[Generate, Generate] | None = None,
) -> dict:
    """engines: name -> Engine; replicas: (A, B) for cross_replica. The follow-up of a question asks the
    next example's question over its passages."""
    results: dict[str, dict[str, dict[str, list[Generation]]]] = {}  # engine -> mode -> kind -> answers
    prefix: dict[str, dict[str, dict]] = {}
    same: dict[str, dict[str, list[bool]]] = {}  # per engine and mode: did the repeat answer as the cold did
    local = [kind for kind in kinds if kind != "cross_replica"]
    total = sum(len(engine.modes) for engine in engines.values()) * len(examples) * len(local)
    with tqdm(total=total, desc="prompt kinds", unit="req") as progress:
        for name, engine in engines.items():
            for mode in engine.modes:
                per_kind = results.setdefault(name, {}).setdefault(mode, {kind: [] for kind in local})
                before = engine.prefix_stats() if engine.prefix_stats is not None else None
                for index, example in enumerate(examples):
                    namespace = f"kinds-{name}-{mode}-{index}-{time.time_ns()}"
                    if engine.prepare is not None:
                        engine.prepare(namespace, example)
                    cold = _request(example, mode, max_tokens, namespace)
                    other = examples[(index + 1) % len(examples)].question
                    for kind in local:
                        per_kind[kind].append(engine.generate(_variant(cold, kind, other)))
                        progress.update()
                    if "cold" in per_kind and "repeat" in per_kind:
                        repeated = per_kind["cold"][-1].token_ids == per_kind["repeat"][-1].token_ids
                        same.setdefault(name, {}).setdefault(mode, []).append(repeated)
                after = engine.prefix_stats() if engine.prefix_stats is not None else None
                if before is not None and after is not None:
                    prefix.setdefault(name, {})[mode] = prefix_cache_delta(before, after)
    summary: dict = {
        "kinds": {
            name: {
                mode: {
                    kind: _stats([r.timings.ttft_s for r in answered])
                    | {"prefix_cached_tokens_mean": statistics.fmean(r.prefix_cached_tokens for r in answered)}
                    for kind, answered in runs.items()
                    if answered
                }
                for mode, runs in modes.items()
            }
            for name, modes in results.items()
        },
        "prefix_cache": prefix,
        "repeat_same_answer": {
            name: {mode: f"{sum(flags)}/{len(flags)}" for mode, flags in modes.items()} for name, modes in same.items()
        },
    }
    if "cross_replica" in kinds:
        if replicas is None:
            raise ValueError("--kinds cross_replica needs two vLLM servers with RagcacheConnector: --vllm-url A,B")
        summary["cross_replica"] = _cross_replica(replicas, examples, max_tokens)
    return summary


def _cross_replica(replicas: tuple[Generate, Generate], examples: Sequence[RagExample], max_tokens: int) -> dict:
    a, b = replicas
    runs: dict[str, list[float]] = {"computed_on_a": [], "loaded_on_b": [], "computed_on_b": []}
    same_first_token = 0
    for index, example in enumerate(tqdm(examples, desc="cross replica", unit="question")):
        request = _request(example, "full", max_tokens, f"cross-{index}-{time.time_ns()}")
        on_a = a(request)
        on_b = b(request)
        missed = b(replace(request, namespace=f"{request.namespace}-miss"))
        runs["computed_on_a"].append(on_a.timings.ttft_s)
        runs["loaded_on_b"].append(on_b.timings.ttft_s)
        runs["computed_on_b"].append(missed.timings.ttft_s)
        same_first_token += on_a.token_ids[:1] == on_b.token_ids[:1]
    figures = _figures(runs)
    ratio = [b_ / a_ for a_, b_ in zip(runs["computed_on_a"], runs["loaded_on_b"]) if a_ > 0]
    figures["loaded_over_computed"] = _stats(ratio)
    figures["same_first_token"] = f"{same_first_token}/{len(examples)}"
    return figures


def prefix_cache_delta(before: dict, after: dict) -> dict:
    """The prefix cache over one run: its counters' growth, and what its tree holds at the end."""
    grown = {key: after[key] - before[key] for key in ("lookups", "lookup_tokens", "hit_tokens", "evictions")}
    return grown | {
        "hit_rate": grown["hit_tokens"] / grown["lookup_tokens"] if grown["lookup_tokens"] else None,
        "nodes": after["nodes"],
        "cached_tokens": after["cached_tokens"],
        "cached_bytes": after["cached_bytes"],
    }


def _variant(cold: RagRequest, kind: str, other_question: str) -> RagRequest:
    if kind == "reordered":
        return replace(cold, documents=tuple(reversed(cold.documents)))
    if kind == "followup":
        return replace(cold, question=other_question)
    return cold


def _request(example: RagExample, mode: str, max_tokens: int, namespace: str) -> RagRequest:
    """Greedy, in the given namespace (tenant)."""
    return replace(request_for(example, mode, max_tokens), namespace=namespace, prefix_cache=True)


def _figures(runs: dict[str, list[float]]) -> dict:
    return {kind: _stats(values) for kind, values in runs.items()}


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {
        "n": len(values),
        "p50_s": statistics.median(ordered),
        "p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "mean_s": statistics.fmean(ordered),
        "stdev_s": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
    }


def format_kinds_table(summary: dict) -> str:
    lines = [
        f"{'engine':<16}{'mode':<14}{'kind':<14}{'n':>4}{'p50 s':>10}{'p90 s':>10}{'mean s':>10}{'cached tok':>11}"
    ]
    for engine, modes in summary["kinds"].items():
        for mode, kinds in modes.items():
            for kind, figures in kinds.items():
                lines.append(
                    f"{engine:<16}{mode:<14}{kind:<14}{figures['n']:>4}"
                    f"{figures['p50_s']:>10.3f}{figures['p90_s']:>10.3f}{figures['mean_s']:>10.3f}"
                    f"{figures['prefix_cached_tokens_mean']:>11.0f}"
                )
    for engine, modes in summary.get("prefix_cache", {}).items():
        for mode, tree in modes.items():
            rate = "-" if tree["hit_rate"] is None else f"{tree['hit_rate']:.0%}"
            lines.append(
                f"prefix cache, {engine} {mode}: {tree['hit_tokens']}/{tree['lookup_tokens']} tokens hit ({rate}), "
                f"{tree['nodes']} blocks, {tree['cached_bytes'] / 2**20:.0f} MiB held, {tree['evictions']} evicted"
            )
    cross = summary.get("cross_replica")
    if cross:
        for kind in ("computed_on_a", "loaded_on_b", "computed_on_b"):
            figures = cross[kind]
            lines.append(
                f"{'vllm+connector':<16}{'full':<14}{kind:<14}{figures['n']:>4}"
                f"{figures['p50_s']:>10.3f}{figures['p90_s']:>10.3f}{figures['mean_s']:>10.3f}"
            )
        ratio = cross["loaded_over_computed"]
        lines.append(
            f"cross replica: B's TTFT / A's, p50 {ratio['p50_s']:.3f} (mean {ratio['mean_s']:.3f}); "
            f"same first token {cross['same_first_token']}"
        )
    return "\n".join(lines)
