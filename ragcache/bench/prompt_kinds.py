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
time; each kind's time to first token is summarised per engine and mode over the questions.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from tqdm import tqdm

from ragcache.bench.rag import RagExample, request_for
from ragcache.engine.request import Generation, RagRequest
from ragcache.kv import DEFAULT_NAMESPACE

KINDS = ("cold", "reordered", "repeat", "followup", "cross_replica")

Generate = Callable[[RagRequest], Generation]


def parse_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(kind.strip() for kind in text.split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"--kinds: comma-separated of {', '.join(KINDS)}, got {text!r}")
    return kinds


def run_prompt_kinds(
    engines: dict[str, tuple[Generate, Sequence[str], bool]],
    examples: Sequence[RagExample],
    kinds: Sequence[str],
    max_tokens: int,
    replicas: tuple[Generate, Generate] | None = None,
) -> dict:
    """engines: name -> (generate, modes, fresh): fresh gives every question a tenant of its own, so a
    server's prefix cache holds nothing of it before (vLLM); otherwise the default tenant, whose
    documents the caller registered (ragcache's own engine). replicas: (A, B) for cross_replica."""
    ttft: dict[str, dict[str, dict[str, list[float]]]] = {}
    local = [kind for kind in kinds if kind != "cross_replica"]
    total = sum(len(modes) for _, modes, _ in engines.values()) * len(examples) * len(local)
    with tqdm(total=total, desc="prompt kinds", unit="req") as progress:
        for name, (generate, modes, fresh) in engines.items():
            per_mode = ttft.setdefault(name, {})
            for mode in modes:
                per_kind = per_mode.setdefault(mode, {kind: [] for kind in local})
                for index, example in enumerate(examples):
                    namespace = f"kinds-{name}-{mode}-{index}-{time.time_ns()}" if fresh else DEFAULT_NAMESPACE
                    cold = _request(example, mode, max_tokens, namespace)
                    for kind in local:
                        request = (
                            replace(cold, documents=tuple(reversed(cold.documents))) if kind == "reordered" else cold
                        )
                        per_kind[kind].append(generate(request).timings.ttft_s)
                        progress.update()
    summary: dict = {
        "kinds": {name: {mode: _figures(runs) for mode, runs in modes.items()} for name, modes in ttft.items()}
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


def _variant(cold: RagRequest, kind: str, other_question: str) -> RagRequest:
    if kind == "reordered":
        return replace(cold, documents=tuple(reversed(cold.documents)))
    if kind == "followup":
        return replace(cold, question=other_question)
    return cold


def _request(example: RagExample, mode: str, max_tokens: int, namespace: str) -> RagRequest:
    """Greedy, in the given namespace (tenant)."""
    return replace(request_for(example, mode, max_tokens), namespace=namespace)


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
    lines = [f"{'engine':<16}{'mode':<14}{'kind':<14}{'n':>4}{'p50 s':>10}{'p90 s':>10}{'mean s':>10}"]
    for engine, modes in summary["kinds"].items():
        for mode, kinds in modes.items():
            for kind, figures in kinds.items():
                lines.append(
                    f"{engine:<16}{mode:<14}{kind:<14}{figures['n']:>4}"
                    f"{figures['p50_s']:>10.3f}{figures['p90_s']:>10.3f}{figures['mean_s']:>10.3f}"
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
