"""Empirical distributions of durations: what the TTL cost model reads its probabilities from.

Continuum's P(τ, tool) is the share of a tool's past calls that returned within τ seconds.
A `DurationHistory` keeps the latest samples of one tool (bounded: a tool's latency drifts
as caches warm or a backend degrades, and the model should follow what it does now); an
`EmpiricalCDF` is an immutable sorted snapshot of it that answers P(d <= τ), conditional
probabilities for pins already held, and quantiles for stats.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass


def quantile(sorted_values: tuple[float, ...] | list[float], q: float) -> float:
    """The q-quantile (0..1) of ascending values, linearly interpolated; 0.0 for no values."""
    if not sorted_values:
        return 0.0
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


@dataclass(frozen=True)
class EmpiricalCDF:
    """Durations in seconds, ascending. P(d <= τ) is the share of samples at or below τ."""

    durations_s: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.durations_s:
            raise ValueError("an empirical CDF needs at least one sample")

    def __len__(self) -> int:
        return len(self.durations_s)

    def at(self, tau_s: float) -> float:
        """P(d <= tau_s)."""
        return bisect.bisect_right(self.durations_s, tau_s) / len(self.durations_s)

    def between(self, given_s: float, tau_s: float) -> float:
        """P(d <= tau_s | d > given_s): for a pin already held given_s seconds, the chance that
        its tool returns before the pin expires at tau_s. 0.0 once every sample is below given_s."""
        survivors = 1.0 - self.at(given_s)
        if survivors <= 0.0 or tau_s <= given_s:
            return 0.0
        return (self.at(tau_s) - self.at(given_s)) / survivors

    def quantile(self, q: float) -> float:
        return quantile(self.durations_s, q)

    @property
    def mean_s(self) -> float:
        return sum(self.durations_s) / len(self.durations_s)


class DurationHistory:
    """The latest max_samples durations of one tool (or of every tool), oldest dropped first."""

    def __init__(self, max_samples: int) -> None:
        self._samples: deque[float] = deque(maxlen=max_samples)

    def add(self, duration_s: float) -> None:
        self._samples.append(duration_s)

    def __len__(self) -> int:
        return len(self._samples)

    def cdf(self) -> EmpiricalCDF | None:
        return EmpiricalCDF(tuple(sorted(self._samples))) if self._samples else None
