"""`ragcache bench eviction`: eviction policies compared on a RAG retrieval trace.

The trace: a corpus of documents with log-normal token lengths and Zipf popularity that
drifts (every `drift_every` requests the popularity ranking is reshuffled for a share of
the corpus, as news or tickets come and go); each request retrieves `docs_per_request`
distinct documents. One CPU tier with a byte budget replays the trace under each policy.
Time is logical (one tick per request), so cost_aware's half-life is counted in requests.
Bytes per token are the default model's (30 layers x 2 x 3 KV heads x 64 dims x 4 bytes);
chunks are tiny tensors with that accounting, so the replay needs no model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ragcache.kv import ChunkKey, KVChunk
from ragcache.storage.cpu import CpuTier
from ragcache.storage.eviction import POLICIES, make_policy

BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4


@dataclass(frozen=True)
class TraceOptions:
    documents: int = 2000
    requests: int = 5000
    docs_per_request: int = 6
    zipf_s: float = 0.9
    drift_every: int = 500
    drift_share: float = 0.2
    budget_share: float = 0.1  # budget as a share of the whole corpus's KV bytes
    seed: int = 0


class _SizedChunk(KVChunk):
    """A KVChunk whose byte count is the real model's for its token count."""

    @property
    def nbytes(self) -> int:
        return self.num_tokens * BYTES_PER_TOKEN


def make_trace(options: TraceOptions) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(options.seed)
    lengths = [min(4000, max(32, int(rng.lognormvariate(5.8, 0.7)))) for _ in range(options.documents)]
    ranking = list(range(options.documents))
    rng.shuffle(ranking)
    weights = [1.0 / (rank + 1) ** options.zipf_s for rank in range(options.documents)]
    requests = []
    for step in range(options.requests):
        if step and step % options.drift_every == 0:
            moved = rng.sample(range(options.documents), int(options.drift_share * options.documents))
            targets = moved[:]
            rng.shuffle(targets)
            snapshot = ranking[:]
            for source, target in zip(moved, targets):
                ranking[target] = snapshot[source]
        picked: set[int] = set()
        while len(picked) < options.docs_per_request:
            picked.add(ranking[rng.choices(range(options.documents), weights)[0]])
        requests.append(sorted(picked))
    return lengths, requests


def replay(policy_name: str, lengths: list[int], requests: list[list[int]], budget_bytes: int) -> dict:
    tier = CpuTier(budget_bytes, policy=make_policy(policy_name))
    step = 0
    tier.clock = lambda: step  # logical time: one tick per request, so the replay is deterministic
    hits = tokens_hit = tokens_total = 0
    tiny = torch.zeros(1, 1, 1, 1)
    for step, request in enumerate(requests):  # noqa: B007  the tier's clock reads step
        for doc in request:
            key = ChunkKey(str(doc))
            tokens_total += lengths[doc]
            if tier.get(key) is not None:
                hits += 1
                tokens_hit += lengths[doc]
            else:
                ids = (0,) * lengths[doc]
                shape = (1, 1, lengths[doc], 1)
                tier.put(key, _SizedChunk(ids, tiny.expand(shape), tiny.expand(shape), "bench"))
    lookups = sum(len(r) for r in requests)
    return {
        "hit_rate": hits / lookups,
        "token_hit_rate": tokens_hit / tokens_total,
        "evictions": tier.stats().evictions,
    }


def run_eviction_bench(options: TraceOptions) -> dict:
    lengths, requests = make_trace(options)
    budget = int(options.budget_share * sum(lengths) * BYTES_PER_TOKEN)
    results = {name: replay(name, lengths, requests, budget) for name in tqdm(POLICIES, desc="policies")}
    return {"options": vars(options), "budget_bytes": budget, "policies": results}


def format_eviction_table(summary: dict) -> str:
    o = summary["options"]
    lines = [
        f"{o['requests']} requests x {o['docs_per_request']} documents from {o['documents']} (Zipf s={o['zipf_s']}, "
        f"{o['drift_share']:.0%} reshuffled every {o['drift_every']}); CPU tier budget "
        f"{summary['budget_bytes'] / 2**30:.2f} GiB = {o['budget_share']:.0%} of the corpus KV",
        f"{'policy':<12} {'hit rate':>9} {'token hit rate':>15} {'evictions':>10}",
    ]
    for name, r in summary["policies"].items():
        lines.append(f"{name:<12} {r['hit_rate']:>9.3f} {r['token_hit_rate']:>15.3f} {r['evictions']:>10}")
    return "\n".join(lines)
