"""The blend error budget: per (tenant, category), the fastest setting whose first-token
disagreement with full prefill stays within epsilon.

Settings form a ladder from fastest to safest (the default: blend at r=0.15, r=0.3, r=0.3
with attention-weighted selection, then `prefix`, whose KV is exact). Shadow checks
(shadow.py) report, for a sampled blended answer, whether its first token (greedy, from
the same distribution the answer was sampled from) is full prefill's, and the KL between
the two first-token distributions. The controller keeps a window of those labels per rung
and moves:

    up    once the rung in force has min_checks labels (30; and at least as many as a
          clean record needs to bound the rate within epsilon: 10 at 10%, 19 at 5%, with
          z=1) and the upper end of its Wilson interval exceeds epsilon: the disagreement
          rate may be above the budget, so a safer rung serves until the evidence says
          otherwise. Why 30: judged at 10-19 checks, a single disagreement decides (1 in 19
          has an upper bound of 13%), and on MuSiQue dev the default ladder then ran up to
          `prefix` past a rung that disagreed 5% of the time; at 30 one disagreement is
          within 10% (upper 8.4%) and two are not (12.8%);
    down  once the rung in force has step_down_after labels with the upper end below
          epsilon / 2 (well inside): the faster rung is tried again with its record
          cleared, and climbs back at once if it still disagrees.

Holding the *upper* bound, not the point estimate, is what makes the budget hold on
traffic the controller has not seen: a rung that disagrees 9% of the time on a hundred
checks is as likely as not to disagree 11% tomorrow. A request that names its own mode,
ratio or selection is served as asked and not steered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache

from ragcache.checks.estimate import Tally, wilson_interval
from ragcache.engine.request import MODES, RagRequest
from ragcache.engine.selection import parse_selection


def default_ladder(ratio: float) -> tuple[str, ...]:
    """The default ladder from the engine's ratio: r, then 0.3 (if above r), attention-weighted, prefix."""
    upper = max(ratio, 0.3)
    rungs = [f"blend@{ratio:g}", f"blend@{upper:g}", f"blend@{upper:g}/attention", "prefix"]
    return tuple(dict.fromkeys(rungs))


DEFAULT_LADDER = default_ladder(0.15)  # blend@0.15, blend@0.3, blend@0.3/attention, prefix


@dataclass(frozen=True)
class BlendSetting:
    """One rung: a mode and, for blend, its ratio and selection (None: the engine's own)."""

    mode: str
    ratio: float | None = None
    deviation: str | None = None
    sink_tokens: int | None = None

    @classmethod
    def parse(cls, name: str) -> BlendSetting:
        """'prefix', 'blend@0.3', 'blend@0.3/attention', 'blend@0.15/epic4', 'blend@0.15/key+epic4'."""
        base, _, selection = name.partition("/")
        mode, _, ratio = base.partition("@")
        if mode not in MODES or (ratio and mode != "blend") or (selection and not ratio):
            raise ValueError(f"a blend setting is a mode of {list(MODES)} or blend@<ratio>[/<selection>], got {name!r}")
        try:
            value = float(ratio) if ratio else None
        except ValueError:
            raise ValueError(f"the ratio in {name!r} is not a number") from None
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"the ratio in {name!r} must be in [0, 1]")
        deviation, sink_tokens = _selection(selection, name) if selection else (None, None)
        return cls(mode, value, deviation, sink_tokens)

    @property
    def name(self) -> str:
        if self.ratio is None:
            return self.mode
        epic = [f"epic{self.sink_tokens}"] if self.sink_tokens else []
        parts = [] if self.deviation is None or (epic and self.deviation == "value") else [self.deviation]
        parts += epic
        return f"{self.mode}@{self.ratio:g}" + ("/" + "+".join(parts) if parts else "")

    def apply(self, request: RagRequest) -> RagRequest:
        return replace(
            request,
            mode=self.mode,
            blend_ratio=self.ratio,
            blend_deviation=self.deviation,
            blend_sink_tokens=self.sink_tokens,
        )


def _selection(text: str, name: str) -> tuple[str, int]:
    try:
        return parse_selection(text)
    except ValueError as exc:
        raise ValueError(f"the selection in {name!r}: {exc}") from None


def is_steerable(request: RagRequest) -> bool:
    """A request that left mode, ratio and selection to the service (its defaults)."""
    return (
        request.mode == "blend"
        and request.blend_ratio is None
        and request.blend_deviation is None
        and request.blend_sink_tokens is None
        and request.program_id is None
    )


@dataclass(frozen=True)
class BlendBudgetConfig:
    epsilon: float = 0.1  # the largest first-token disagreement rate blending may have
    epsilons: Mapping[str, float] = field(default_factory=dict)  # per-category overrides
    ladder: tuple[str, ...] = DEFAULT_LADDER
    min_checks: int = 30
    step_down_after: int = 100
    window: int = 500
    z: float = 1.0  # the interval's width in standard deviations (1.0: ~84% one-sided)

    def __post_init__(self) -> None:
        if not 0.0 < self.epsilon < 1.0 or any(not 0.0 < e < 1.0 for e in self.epsilons.values()):
            raise ValueError("epsilon values must be in (0, 1)")
        if not self.ladder:
            raise ValueError("the ladder needs at least one setting")
        for name in self.ladder:
            BlendSetting.parse(name)
        if self.min_checks <= 0 or self.step_down_after < self.min_checks or self.window < self.step_down_after:
            raise ValueError("need 0 < min_checks <= step_down_after <= window")


@dataclass
class _Budget:
    tallies: list[Tally]
    level: int = 0
    changes: int = 0
    last_change: dict | None = None


class BlendBudget:
    """Thread-safe. setting_for() on every steerable request, observe() for every shadow check."""

    def __init__(self, config: BlendBudgetConfig = BlendBudgetConfig(), clock=time.time) -> None:
        self.config = config
        self.ladder = tuple(BlendSetting.parse(name) for name in config.ladder)
        self._names = [setting.name for setting in self.ladder]
        self._clock = clock
        self._lock = threading.Lock()
        self._budgets: dict[tuple[str, str], _Budget] = {}
        self._epsilons = dict(config.epsilons)

    def set_epsilon(self, category: str, epsilon: float) -> None:
        """A category's budget at run time (an operator's PUT); it steers from the next check on."""
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
        with self._lock:
            self._epsilons[category] = epsilon

    def _epsilon(self, category: str) -> float:
        return self._epsilons.get(category, self.config.epsilon)

    def setting_for(self, tenant: str, category: str) -> BlendSetting:
        with self._lock:
            return self.ladder[self._budget(tenant, category).level]

    def observe(self, tenant: str, category: str, setting: str, disagreed: bool, kl: float | None = None) -> None:
        """A shadow check of an answer served at `setting` (a ladder name); others are ignored."""
        if setting not in self._names:
            return
        rung = self._names.index(setting)
        with self._lock:
            budget = self._budget(tenant, category)
            budget.tallies[rung].add(disagreed, kl)
            if rung == budget.level:
                self._steer(budget, category)

    def state(self) -> list[dict]:
        """Per (tenant, category): epsilon, the setting in force, each rung's estimate, the last change."""
        rows = []
        with self._lock:
            for (tenant, category), budget in sorted(self._budgets.items()):
                rungs = {}
                for name, tally in zip(self._names, budget.tallies):
                    if tally.n:
                        rungs[name] = tally.estimate().as_dict() | {"mean_first_token_kl": tally.mean_value()}
                rows.append(
                    {
                        "tenant": tenant,
                        "category": category,
                        "epsilon": self._epsilon(category),
                        "setting": self._names[budget.level],
                        "estimates": rungs,
                        "changes": budget.changes,
                        "last_change": budget.last_change,
                    }
                )
        return rows

    def _budget(self, tenant: str, category: str) -> _Budget:
        budget = self._budgets.get((tenant, category))
        if budget is None:
            tallies = [Tally(self.config.window, self.config.z) for _ in self.ladder]
            budget = self._budgets[(tenant, category)] = _Budget(tallies)
        return budget

    def _steer(self, budget: _Budget, category: str) -> None:
        epsilon, config = self._epsilon(category), self.config
        estimate = budget.tallies[budget.level].estimate()
        judged = estimate.n >= max(config.min_checks, clean_record_checks(epsilon, config.z))
        if judged and estimate.high > epsilon and budget.level < len(self.ladder) - 1:
            self._move(
                budget,
                budget.level + 1,
                f"first-token disagreement {estimate.rate:.1%} in {estimate.n} checks, upper bound "
                f"{estimate.high:.1%} > epsilon {epsilon:.1%}",
            )
        elif budget.level > 0 and estimate.n >= config.step_down_after and estimate.high < epsilon / 2:
            faster = budget.level - 1
            budget.tallies[faster].clear()  # its old record is what sent us up; give it a fresh trial
            self._move(
                budget,
                faster,
                f"first-token disagreement {estimate.rate:.1%} in {estimate.n} checks, upper bound "
                f"{estimate.high:.1%} < epsilon/2 {epsilon / 2:.1%}: trying the faster setting",
            )

    def _move(self, budget: _Budget, level: int, reason: str) -> None:
        budget.last_change = {
            "at_s": self._clock(),
            "from": self._names[budget.level],
            "to": self._names[level],
            "reason": reason,
        }
        budget.level = level
        budget.changes += 1


@lru_cache(maxsize=64)
def clean_record_checks(epsilon: float, z: float) -> int:
    """Checks after which a rung with no disagreement at all has its upper bound within epsilon:
    judging sooner would step up for want of evidence, not for evidence of disagreement."""
    n = 1
    while wilson_interval(0, n, z)[1] > epsilon:
        n += 1
    return n
