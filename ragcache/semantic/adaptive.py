"""Thresholds and TTLs in force: the policy's, moved by load and by false-hit reports.

Load (the paper's third part): when the model runner is busy, a cached answer that is a
little less similar or a little older is worth more than a long wait, so thresholds relax
toward min_threshold and TTLs lengthen toward max_ttl_s; when it is idle they tighten
back. Pressure is a number in [0, 1]: the larger of the queue depth and the recent time to
first token, each mapped linearly between its low and high marks, smoothed over samples
and halving every idle_half_life_s without one (an idle service sends no samples). The
TTL in force applies at lookup to every entry, so relaxing also revives entries younger
than max_ttl_s, and tightening retires them again.

Feedback: each false hit a client reports raises that tenant's threshold for the
category by false_hit_step, up to max_threshold, until the policy is set again.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

from ragcache.semantic.policy import CategoryPolicy


@dataclass(frozen=True)
class LoadConfig:
    enabled: bool = True
    queue_low: float = 2.0  # queue depth at or below which the queue adds no pressure
    queue_high: float = 16.0  # ... at or above which it is full pressure
    ttft_low_s: float = 1.0
    ttft_high_s: float = 8.0
    smoothing: float = 0.3  # weight of a new sample in the running pressure
    idle_half_life_s: float = 30.0
    false_hit_step: float = 0.02

    def __post_init__(self) -> None:
        if not (0 <= self.queue_low < self.queue_high and 0 <= self.ttft_low_s < self.ttft_high_s):
            raise ValueError("need 0 <= queue_low < queue_high and 0 <= ttft_low_s < ttft_high_s")
        if not 0 < self.smoothing <= 1 or self.idle_half_life_s <= 0 or self.false_hit_step < 0:
            raise ValueError("need 0 < smoothing <= 1, idle_half_life_s > 0, false_hit_step >= 0")


class LoadState(NamedTuple):
    enabled: bool
    pressure: float  # 0 idle .. 1 fully loaded, as applied now
    queue_depth: float | None  # last sample
    ttft_s: float | None
    samples: int


class ThresholdController:
    """Thread-safe; the cache asks it for the threshold and TTL of each lookup and store."""

    def __init__(self, config: LoadConfig = LoadConfig(), clock=time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._pressure = 0.0
        self._sampled_at = clock()
        self._last: tuple[float | None, float | None] = (None, None)
        self._samples = 0
        self._offsets: defaultdict[tuple[str, str], float] = defaultdict(float)

    def update_load(self, queue_depth: float, ttft_s: float | None = None) -> float:
        """Feed one sample of the runner's load; returns the pressure now in force."""
        c = self.config
        sample = _ramp(queue_depth, c.queue_low, c.queue_high)
        if ttft_s is not None:
            sample = max(sample, _ramp(ttft_s, c.ttft_low_s, c.ttft_high_s))
        with self._lock:
            current = self._decayed()
            self._pressure = current + c.smoothing * (sample - current)
            self._sampled_at = self._clock()
            self._last = (queue_depth, ttft_s)
            self._samples += 1
            return self._pressure if c.enabled else 0.0

    def pressure(self) -> float:
        if not self.config.enabled:
            return 0.0
        with self._lock:
            return self._decayed()

    def threshold(self, tenant: str, category: str, policy: CategoryPolicy) -> float:
        """policy.threshold, raised by false-hit reports, relaxed by load; within the policy's bounds."""
        # CategoryPolicy.__post_init__ fills every None bound
        assert policy.min_threshold is not None and policy.max_threshold is not None
        relaxed = self.pressure() * (policy.threshold - policy.min_threshold)
        with self._lock:
            offset = self._offsets.get((tenant, category), 0.0)
        return min(policy.max_threshold, max(policy.min_threshold, policy.threshold + offset - relaxed))

    def ttl_s(self, policy: CategoryPolicy) -> float:
        assert policy.max_ttl_s is not None  # CategoryPolicy.__post_init__ fills every None bound
        return policy.ttl_s + self.pressure() * (policy.max_ttl_s - policy.ttl_s)

    def report_false_hit(self, tenant: str, category: str, policy: CategoryPolicy) -> None:
        assert policy.max_threshold is not None  # CategoryPolicy.__post_init__ fills every None bound
        with self._lock:
            room = policy.max_threshold - policy.threshold
            self._offsets[(tenant, category)] = min(
                room, self._offsets[(tenant, category)] + self.config.false_hit_step
            )

    def reset(self, category: str) -> None:
        """Forget false-hit tightening for a category (its policy was set anew)."""
        with self._lock:
            for key in [key for key in self._offsets if key[1] == category]:
                del self._offsets[key]

    def state(self) -> LoadState:
        with self._lock:
            queue_depth, ttft_s = self._last
            pressure = self._decayed() if self.config.enabled else 0.0
            return LoadState(self.config.enabled, pressure, queue_depth, ttft_s, self._samples)

    def _decayed(self) -> float:
        idle_s = max(0.0, self._clock() - self._sampled_at)
        return self._pressure * 0.5 ** (idle_s / self.config.idle_half_life_s)


def _ramp(value: float, low: float, high: float) -> float:
    return min(1.0, max(0.0, (value - low) / (high - low)))
