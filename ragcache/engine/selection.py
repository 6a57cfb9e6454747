"""Which reused tokens a blend recomputes: the top-r by deviation, optionally each chunk's first tokens first.

Shared by the one-pass selector (blend.DeviationSelector) and the piecewise one
(prefill.BlendScan), so that both pick the very same tokens from the same scores.

EPIC (Hu et al., ICML 2025) observes that an independently cached chunk begins with its
own attention sink: its first tokens' KV deviates most from what full prefill gives, and
recomputing them is cheap insurance. With sink_tokens = k, the first k tokens of every
candidate chunk are chosen before ranking; the rest of the budget goes to the top scores.

The budget is plain top-r's count: EPIC only changes which tokens, never how many. When
k tokens per chunk do not fit (k * chunks > count), k shrinks to count // chunks so every
chunk keeps the same share; with fewer budget tokens than chunks that share is 0 and the
choice is plain top-r (a chunk's sink tokens are usually its most deviating anyway).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEVIATION_NAMES = ("value", "key", "attention")  # what can rank reused tokens (blend.BlendConfig.deviation)


def parse_selection(name: str) -> tuple[str, int]:
    """(deviation, sink_tokens) of a selection's name: a deviation ('value', 'key', 'attention'),
    'epic<k>' (value deviation, k sink tokens) or '<deviation>+epic<k>'. A named selection fixes
    both knobs: no epic part means no sink tokens."""
    head, plus, tail = name.partition("+")
    deviation, epic = (head, tail) if plus else ("value", head) if head.startswith("epic") else (head, "")
    if deviation not in DEVIATION_NAMES or (epic and not (epic.startswith("epic") and epic[4:].isdigit())):
        raise ValueError(
            f"{name!r} is not a selection: one of {list(DEVIATION_NAMES)}, 'epic<k>' or '<deviation>+epic<k>'"
        )
    return deviation, int(epic[4:]) if epic else 0


def recompute_count(ratio: float, num_candidates: int) -> int:
    """Candidates recomputed past the check layer at ratio r: at least one, never more than there are."""
    return min(num_candidates, max(1, round(ratio * num_candidates)))


def sink_indices(chunk_lens: Sequence[int], sink_tokens: int, count: int) -> list[int]:
    """Candidate indices of each chunk's first tokens, at most sink_tokens per chunk, count in all.

    chunk_lens: the candidate chunks' token counts in prompt order (they tile the candidates)."""
    if not chunk_lens or sink_tokens <= 0:
        return []
    per_chunk = min(sink_tokens, count // len(chunk_lens))
    indices: list[int] = []
    start = 0
    for length in chunk_lens:
        indices.extend(range(start, start + min(per_chunk, length)))
        start += length
    return indices


def choose_candidates(scores: torch.Tensor, count: int, chunk_lens: Sequence[int], sink_tokens: int) -> torch.Tensor:
    """Indices (sorted) of the count candidates to recompute: the sink tokens, then the top scores of the rest.

    scores: (candidates,) higher = recompute first."""
    sinks = sink_indices(chunk_lens, sink_tokens, count)
    if not sinks:
        return scores.topk(count).indices.sort().values
    forced = torch.tensor(sinks, device=scores.device)
    rest = scores.clone()
    rest[forced] = float("-inf")  # never picked twice: count - len(sinks) <= candidates - len(sinks)
    return torch.cat([forced, rest.topk(count - len(sinks)).indices]).sort().values
