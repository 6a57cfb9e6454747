"""`ragcache bench rag EVAL.json --gate --learn-from DEV.json`: blending under an error budget.

Two phases over one engine, with the service's own budget and shadow checks (ragcache/checks):

    learn   DEV's questions replayed as live traffic, each served at the setting the budget
            holds in force; a share of them (--shadow-fraction, all by default) is checked
            against full prefill as background work, and the budget steps its ladder
    eval    EVAL's questions at the setting learned (no more checks: the figures are those
            of what was learned), each beside full prefill measured in the same run, and
            beside the ladder's first rung (what the engine would do ungated)

The JSON has the bench's usual modes (`full`, the first rung, `gated`, with the fields of
`ragcache bench rag`) and a `gate` object: epsilon, the ladder, the setting chosen, the
learning phase's checks and changes, and the budget's estimates per rung.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from ragcache.bench.rag import BenchOptions, ModeRuns, RagExample, _record, _summary, load_examples, request_for
from ragcache.checks.blend_budget import BlendBudget, BlendBudgetConfig, default_ladder
from ragcache.checks.shadow import ShadowChecks, ShadowConfig
from ragcache.engine.runner import BlendEngine

TENANT, CATEGORY = "bench", "default"


@dataclass(frozen=True)
class GateOptions:
    learn_from: Path
    epsilon: float = 0.1
    ladder: tuple[str, ...] | None = None  # None: the service's default from the engine's ratio
    shadow_fraction: float = 1.0  # of DEV's answers checked while learning

    def budget_config(self, engine_ratio: float) -> BlendBudgetConfig:
        return BlendBudgetConfig(self.epsilon, ladder=self.ladder or default_ladder(engine_ratio))


def run_gate_bench(engine: BlendEngine, examples: list[RagExample], options: BenchOptions, gate: GateOptions) -> dict:
    learn = load_examples(gate.learn_from, replace(options, limit=None))
    budget = BlendBudget(gate.budget_config(engine.config.default_ratio))
    shadow = ShadowChecks(engine, budget, ShadowConfig(blend_fraction=gate.shadow_fraction, max_pending=1))
    # nothing live runs beside the checks here: let them take whole steps instead of the service's small pieces
    scheduler = engine.scheduler
    scheduler.config = replace(scheduler.config, background_step_tokens=scheduler.config.step_tokens)
    _cache_documents(engine, learn, "caching DEV's documents")
    engine.generate(request_for(learn[0], "full", 2))  # warm-up: first-call allocations are not timed
    served_at = _learn(engine, budget, shadow, learn, options.max_tokens)
    shadow.close()
    _cache_documents(engine, examples, "caching EVAL's documents")  # last, so they are what the tiers hold
    chosen = budget.setting_for(TENANT, CATEGORY)
    first = budget.ladder[0]
    modes = {"full": None, first.name: first, "gated": chosen}
    runs = {mode: ModeRuns() for mode in modes}
    for example in tqdm(examples, desc=f"eval at {chosen.name}", unit="question"):
        reference = None
        for mode, setting in modes.items():
            request = request_for(example, "full" if setting is None else "blend", options.max_tokens)
            result = engine.generate(request if setting is None else setting.apply(request), return_logprobs=True)
            reference = reference or result
            _record(runs[mode], example, result, reference)
    summary = _summary(engine, examples, runs)
    summary["gate"] = {
        "epsilon": gate.epsilon,
        "ladder": [setting.name for setting in budget.ladder],
        "setting": chosen.name,
        "learned_from": str(gate.learn_from),
        "learn_questions": len(learn),
        "learn_served_at": served_at,
        "shadow": shadow.stats(),
        "budget": budget.state(),
        "ttft_speedup_vs_full": summary["modes"]["full"]["ttft_p50_s"] / summary["modes"]["gated"]["ttft_p50_s"],
    }
    return summary


def _cache_documents(engine: BlendEngine, examples: list[RagExample], label: str) -> None:
    for example in tqdm(examples, desc=label, unit="question"):
        engine.add_documents(list(example.documents))


def _learn(
    engine: BlendEngine, budget: BlendBudget, shadow: ShadowChecks, learn: list[RagExample], max_tokens: int
) -> dict[str, int]:
    """Serve each DEV question at the setting in force, shadow-check the sampled ones; questions per setting."""
    served_at: dict[str, int] = {}
    progress = tqdm(learn, desc="learning", unit="question")
    for example in progress:
        setting = budget.setting_for(TENANT, CATEGORY)
        request = setting.apply(request_for(example, "blend", max_tokens))
        checked = shadow.sample_blend()
        served = engine.generate(request, return_logprobs=checked)
        served_at[setting.name] = served_at.get(setting.name, 0) + 1
        if checked:
            shadow.check_blend(TENANT, CATEGORY, setting.name, request, served)
            while shadow.stats()["pending"]:  # no live traffic here: the check runs now, in background pieces
                if not engine.step():
                    time.sleep(0.001)  # the submission is still on its way from the shadow thread
        progress.set_postfix(setting=budget.setting_for(TENANT, CATEGORY).name)
    return served_at


def format_gate(summary: dict) -> str:
    gate = summary["gate"]
    lines = [
        f"gate: epsilon {gate['epsilon']:.0%} over {gate['ladder']}; learned on {gate['learn_questions']} "
        f"questions of {gate['learned_from']} (served at {gate['learn_served_at']}); chosen "
        f"{gate['setting']}, TTFT {gate['ttft_speedup_vs_full']:.1f}x faster than full"
    ]
    for row in gate["budget"]:
        for setting, estimate in row["estimates"].items():
            lines.append(
                f"  {setting:<22} checks {estimate['n']:>4}  disagreement {estimate['rate']:.1%} "
                f"[{estimate['low']:.1%}, {estimate['high']:.1%}]  mean KL {estimate['mean_first_token_kl']:.4f}"
            )
        if row["last_change"]:
            lines.append(
                f"  last change: {row['last_change']['from']} -> {row['last_change']['to']}: "
                f"{row['last_change']['reason']}"
            )
    return "\n".join(lines)
