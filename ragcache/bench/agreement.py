"""How well the semantic shadow check's label works: answers_agree on fow-cache's labelled pairs.

A semantic shadow check labels a served hit by comparing the cached answer with a fresh
one (semantic/agreement.py). That label is only as good as the served model's answers
are consistent: two wordings of one question should get agreeing answers, a trap's two
sides disagreeing ones. Here both sides of fow-cache question pairs (the held-out half,
ids ending in an even digit) are answered by the engine, greedily, without documents,
and the verdict is set against the pair's label.
"""

from __future__ import annotations

from collections import Counter

from ragcache.engine.generate import SamplingParams
from ragcache.engine.request import RagRequest


def measure_agreement(engine, embedder, pairs: int, max_tokens: int = 48) -> dict:
    """answers_agree on `pairs` held-out fow-cache question pairs, half should-hit and half traps."""
    from fow_cache import load_questions

    from ragcache.semantic.agreement import answers_agree

    held_out = [row for row in load_questions() if int(row["id"][-1]) % 2 == 0]
    same = [row for row in held_out if row["same_answer"]][: (pairs + 1) // 2]
    traps = [row for row in held_out if not row["same_answer"]][: pairs // 2]
    sampling = SamplingParams(max_tokens=max_tokens)
    verdicts: dict[bool, list] = {True: [], False: []}
    rules: Counter[str] = Counter()
    for row in [*same, *traps]:
        answers = [
            engine.generate(RagRequest(side, mode="full", sampling=sampling)).text for side in (row["a"], row["b"])
        ]
        verdict = answers_agree(answers[0], answers[1], embedder)
        verdicts[row["same_answer"]].append(verdict.agree)
        rules[
            f"{'same' if row['same_answer'] else 'trap'}:{verdict.rule}:{'agree' if verdict.agree else 'disagree'}"
        ] += 1
    return {
        "pairs": len(same) + len(traps),
        "model": engine.model_name,
        "same_meaning_agree": _share(verdicts[True]),  # the label says "correct" for a right hit
        "trap_agree": _share(verdicts[False]),  # the label says "correct" for a wrong hit
        "by_rule": dict(sorted(rules.items())),
    }


def _share(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None
