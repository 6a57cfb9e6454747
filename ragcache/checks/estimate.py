"""An error rate estimated from labelled observations, with a confidence interval.

Wilson's score interval, not the normal approximation: the rates watched here are small
(a few percent) and the counts short (tens), where p +- z*sqrt(p(1-p)/n) collapses to
[0, 0] after a run of successes and claims a certainty nobody has.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


def wilson_interval(errors: int, n: int, z: float = 1.0) -> tuple[float, float]:
    """(low, high) of the error rate after `errors` in `n`; (0, 1) with no observations."""
    if n <= 0:
        return 0.0, 1.0
    p = errors / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


@dataclass(frozen=True)
class RateEstimate:
    """errors in n observations; rate and its interval at the tally's z (JSON-friendly)."""

    n: int
    errors: int
    rate: float | None
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"n": self.n, "errors": self.errors, "rate": self.rate, "low": self.low, "high": self.high}


class Tally:
    """The last `window` labelled observations (True = an error) of one setting; not thread-safe.

    A window, not all history: what a setting got wrong last month says less about today's
    traffic than what it got wrong in the last few hundred checks."""

    def __init__(self, window: int = 500, z: float = 1.0) -> None:
        if window <= 0 or z <= 0:
            raise ValueError("window and z must be positive")
        self.z = z
        self._errors: deque[bool] = deque(maxlen=window)
        self._values: deque[float] = deque(maxlen=window)

    def add(self, error: bool, value: float | None = None) -> None:
        self._errors.append(bool(error))
        if value is not None:
            self._values.append(float(value))

    def clear(self) -> None:
        self._errors.clear()
        self._values.clear()

    @property
    def n(self) -> int:
        return len(self._errors)

    def estimate(self) -> RateEstimate:
        n, errors = len(self._errors), sum(self._errors)
        low, high = wilson_interval(errors, n, self.z)
        return RateEstimate(n, errors, errors / n if n else None, low, high)

    def mean_value(self) -> float | None:
        """Mean of the values observed beside the labels (e.g. first-token KL), None without any."""
        return sum(self._values) / len(self._values) if self._values else None
