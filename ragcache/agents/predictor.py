"""How long to keep a program's KV pinned while its tool runs: Continuum's TTL cost model.

Holding a program's KV for τ seconds pays off if its tool returns within τ: the next turn
then skips the reload (re-prefill, or a load from a lower tier) and the queueing delay
that programs without their KV meet. It costs the memory held meanwhile. So, with P the
empirical CDF of the tool's past durations,

    τ* = argmax over τ ∈ {0} ∪ {observed durations ≤ max_ttl_s}  of  P(τ)·(T·η + reload) − τ·(mem / M)

where T is the recent queueing delay of returning programs that lost their KV, η the
correlation term (1 by default), reload the seconds to bring this program's KV back and
mem / M its KV size relative to the average program's (ProgramPins prices it by how full the
pin budget would be: a second of memory nobody else is waiting for costs little). τ = 0 scores 0, so τ* = 0 ("do not
pin") whenever no hold pays for its memory. The candidates are the observed durations
because the objective only rises at them: between two samples P is flat and the cost grows;
so the cap max_ttl_s drops the longer durations from the candidates (a TTL cut to the cap
would score no better than the longest duration under it).

A pin that runs out while its tool still runs is judged again (ProgramPins.renew_expiring,
tool_ttl only): the same argmax over the durations beyond the time already waited, with
P(d <= τ | d > waited) and the memory priced at the budget's pressure then. A heavy tail
that did not pay at the start may pay now that the body of the distribution is past.

Cold start, in order: the tool's own CDF (per tenant) once it has min_samples; else the
global CDF over every tenant's and tool's durations once that has min_samples; else
default_ttl_s (2 s, the flat pin of Continuum's released code), scored with
default_probability, so it too is refused when it cannot pay.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

from ragcache.agents.cdf import DurationHistory, EmpiricalCDF


@dataclass(frozen=True)
class PredictorConfig:
    max_samples: int = 256  # durations kept per (tenant, tool)
    global_max_samples: int = 1024  # durations kept across every tenant and tool (the cold-start CDF)
    min_samples: int = 5  # a CDF is trusted from this many samples on
    default_ttl_s: float = 2.0  # before any CDF can be trusted
    default_probability: float = 0.5  # the chance assumed that a tool returns within default_ttl_s
    max_ttl_s: float = 30.0  # no pin is held longer, whatever the CDF says
    max_outcomes: int = 256  # (predicted TTL, actual duration) pairs kept per tool for stats

    def __post_init__(self) -> None:
        if self.max_samples < 1 or self.global_max_samples < 1 or self.max_outcomes < 1:
            raise ValueError("max_samples, global_max_samples and max_outcomes must be >= 1")
        if not 1 <= self.min_samples <= min(self.max_samples, self.global_max_samples):
            raise ValueError(f"min_samples must be in [1, max_samples], got {self.min_samples}")
        if not 0.0 < self.default_ttl_s <= self.max_ttl_s:
            raise ValueError(f"need 0 < default_ttl_s <= max_ttl_s, got {self.default_ttl_s}, {self.max_ttl_s}")
        if not 0.0 <= self.default_probability <= 1.0:
            raise ValueError(f"default_probability must be in [0, 1], got {self.default_probability}")


@dataclass(frozen=True)
class TTLChoice:
    """The chosen TTL and why: which CDF, the chance the tool returns in time, the net value."""

    ttl_s: float  # 0.0: do not pin
    source: str  # "tool", "global" or "default"
    probability: float  # P(duration <= ttl_s)
    saving_s: float  # T·η + reload: what a pin that holds saves the next turn
    value_s: float  # probability·saving_s − ttl_s·mem_ratio (0.0 when ttl_s is 0)


class ToolDurationPredictor:
    """Per (tenant, tool) duration histories and the TTL they imply. Not thread-safe: one owner (ProgramPins)."""

    def __init__(self, config: PredictorConfig = PredictorConfig()) -> None:
        self.config = config
        self._tools: dict[tuple[str, str], DurationHistory] = {}
        self._global = DurationHistory(config.global_max_samples)
        self._outcomes: dict[tuple[str, str], deque[tuple[float, float]]] = defaultdict(
            lambda: deque(maxlen=config.max_outcomes)
        )

    def record(self, tenant: str, tool: str, duration_s: float, predicted_ttl_s: float | None = None) -> None:
        """One finished call of tool took duration_s; predicted_ttl_s is the TTL its pin was given, if any."""
        if duration_s < 0:
            raise ValueError(f"duration_s must be >= 0, got {duration_s}")
        history = self._tools.get((tenant, tool))
        if history is None:
            history = self._tools[(tenant, tool)] = DurationHistory(self.config.max_samples)
        history.add(duration_s)
        self._global.add(duration_s)
        if predicted_ttl_s is not None:
            self._outcomes[(tenant, tool)].append((predicted_ttl_s, duration_s))

    def distribution(self, tenant: str, tool: str) -> tuple[EmpiricalCDF | None, str]:
        """The CDF the model uses for this tool now, and its source; (None, "default") before any can be trusted."""
        for history, source in ((self._tools.get((tenant, tool)), "tool"), (self._global, "global")):
            if history is not None and len(history) >= self.config.min_samples:
                return history.cdf(), source
        return None, "default"

    def choose(
        self,
        tenant: str,
        tool: str,
        reload_s: float,
        mem_ratio: float,
        queue_delay_s: float,
        eta: float = 1.0,
        running_s: float = 0.0,
    ) -> TTLChoice:
        """τ* for a pin of this tool's program (see the module docstring). running_s > 0: the tool has run that
        long already (a pin running out): τ* > running_s on the durations beyond it, P(d <= τ | d > running_s),
        the memory priced from now on; ttl_s 0 when holding on does not pay (or before any CDF)."""
        saving_s = queue_delay_s * eta + reload_s
        cdf, source = self.distribution(tenant, tool)
        cap = self.config.max_ttl_s
        if cdf is None:
            if running_s > 0:
                return self._never(source, saving_s)
            ttl, probability = self.config.default_ttl_s, self.config.default_probability
            value = probability * saving_s - ttl * mem_ratio
            return TTLChoice(ttl, source, probability, saving_s, value) if value > 0 else self._never(source, saving_s)
        best = self._never(source, saving_s)
        for tau in sorted({d for d in cdf.durations_s if running_s < d <= cap and d > 0}):
            probability = cdf.between(running_s, tau) if running_s > 0 else cdf.at(tau)
            value = probability * saving_s - (tau - running_s) * mem_ratio
            if value > best.value_s:
                best = TTLChoice(tau, source, probability, saving_s, value)
        return best

    def value_of(
        self,
        tenant: str,
        tool: str,
        ttl_s: float,
        reload_s: float,
        mem_ratio: float,
        queue_delay_s: float,
        eta: float = 1.0,
    ) -> TTLChoice:
        """A hold of ttl_s (> 0) scored as choose() scores its candidates, whether it pays or not."""
        saving_s = queue_delay_s * eta + reload_s
        cdf, source = self.distribution(tenant, tool)
        probability = self.config.default_probability if cdf is None else cdf.at(ttl_s)
        return TTLChoice(ttl_s, source, probability, saving_s, probability * saving_s - ttl_s * mem_ratio)

    def ttl_s(
        self, tenant: str, tool: str, reload_s: float, mem_ratio: float, queue_delay_s: float, eta: float = 1.0
    ) -> float:
        return self.choose(tenant, tool, reload_s, mem_ratio, queue_delay_s, eta).ttl_s

    def hold_probability(self, tenant: str, tool: str, ttl_s: float, age_s: float) -> float:
        """For a pin held age_s of its ttl_s: the chance its tool returns before it expires."""
        cdf, _ = self.distribution(tenant, tool)
        if cdf is None:
            return self.config.default_probability if age_s < ttl_s else 0.0
        return cdf.between(age_s, ttl_s)

    def stats(self) -> dict:
        """Per tenant and tool: samples, mean/p50/p90 duration, and predicted TTL vs actual duration."""
        tools = {}
        for (tenant, tool), history in self._tools.items():
            cdf = history.cdf()
            assert cdf is not None  # record() makes a history with its first sample, so none is empty
            outcomes = self._outcomes.get((tenant, tool), ())
            tools[f"{tenant}/{tool}"] = {
                "tenant": tenant,
                "tool": tool,
                "samples": len(cdf),
                "mean_s": cdf.mean_s,
                "p50_s": cdf.quantile(0.5),
                "p90_s": cdf.quantile(0.9),
                "predicted_vs_actual": _outcome_stats(outcomes),
            }
        return {"tools": tools, "global_samples": len(self._global)}

    @staticmethod
    def _never(source: str, saving_s: float) -> TTLChoice:
        return TTLChoice(0.0, source, 0.0, saving_s, 0.0)


def _outcome_stats(outcomes) -> dict:
    """How the TTLs given compare with the durations that followed: means, and the share covered."""
    if not outcomes:
        return {"pins": 0}
    predicted = [p for p, _ in outcomes]
    actual = [a for _, a in outcomes]
    return {
        "pins": len(outcomes),
        "mean_predicted_ttl_s": sum(predicted) / len(predicted),
        "mean_actual_s": sum(actual) / len(actual),
        "covered": sum(a <= p for p, a in outcomes) / len(outcomes),  # returned before the pin expired
    }
