"""What it costs to bring a program's KV back once it is gone: reload(r) in the TTL cost model.

Two ways back, and the cheaper one counts: prefill the program's tokens again (time from a
profile of full prefills the engine measures at start-up, interpolated between the
measured lengths and extrapolated along the last segment past them), or load its bytes
from a lower tier (a fixed latency plus bytes over the measured bandwidth).

    profile = measure_prefill_profile(stack_prefill_fn(engine.stack), (64, 256, 1024))
    profile.reload_s(num_tokens=900, nbytes=18 << 20)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise

DEFAULT_LENGTHS = (64, 256, 1024)


@dataclass(frozen=True)
class LoadProfile:
    """Loading nbytes from a lower tier takes latency_s + nbytes / bytes_per_s."""

    bytes_per_s: float
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if self.bytes_per_s <= 0 or self.latency_s < 0:
            raise ValueError(f"need bytes_per_s > 0 and latency_s >= 0, got {self.bytes_per_s}, {self.latency_s}")

    def load_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


@dataclass(frozen=True)
class PrefillProfile:
    """Measured (tokens, seconds) of full prefills, tokens strictly increasing, and an optional load path."""

    points: tuple[tuple[int, float], ...]
    load: LoadProfile | None = None

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a prefill profile needs at least one (tokens, seconds) point")
        tokens = [n for n, _ in self.points]
        if tokens[0] <= 0 or any(b <= a for a, b in pairwise(tokens)):
            raise ValueError(f"profile lengths must be positive and strictly increasing, got {tokens}")
        if any(s < 0 for _, s in self.points):
            raise ValueError("profile seconds must be >= 0")

    @classmethod
    def from_points(cls, points: Sequence[tuple[int, float]], load: LoadProfile | None = None) -> PrefillProfile:
        return cls(tuple(sorted((int(n), float(s)) for n, s in points)), load)

    def with_load(self, load: LoadProfile | None) -> PrefillProfile:
        return replace(self, load=load)

    def prefill_s(self, num_tokens: int) -> float:
        """Seconds to prefill num_tokens: linear between measured points, from (0, 0) below the
        first, along the last segment (or the line through the origin) past the last."""
        if num_tokens <= 0:
            return 0.0
        points = [(0, 0.0), *self.points]
        for (n0, s0), (n1, s1) in pairwise(points):
            if num_tokens <= n1:
                return s0 + (s1 - s0) * (num_tokens - n0) / (n1 - n0)
        (n0, s0), (n1, s1) = points[-2], points[-1]
        return s1 + (s1 - s0) / (n1 - n0) * (num_tokens - n1)

    def reload_s(self, num_tokens: int, nbytes: int) -> float:
        """reload(r): the cheaper of prefilling the tokens again and loading the bytes from below."""
        prefill = self.prefill_s(num_tokens)
        return prefill if self.load is None else min(prefill, self.load.load_s(nbytes))


def measure_prefill_profile(
    prefill_fn: Callable[[int], object],
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    repeats: int = 2,
    clock: Callable[[], float] = time.perf_counter,
    load: LoadProfile | None = None,
) -> PrefillProfile:
    """Time prefill_fn(n) for each length (best of repeats, after one untimed warm-up call).

    Times are made non-decreasing in length (a longer prefill is never cheaper; a smaller
    reading is noise), so the profile's interpolation is monotone.
    """
    if repeats < 1 or not lengths:
        raise ValueError("need repeats >= 1 and at least one length")
    lengths = sorted(set(lengths))
    prefill_fn(lengths[0])
    points, floor = [], 0.0
    for n in lengths:
        best = min(_timed(prefill_fn, n, clock) for _ in range(repeats))
        floor = max(floor, best)
        points.append((n, floor))
    return PrefillProfile(tuple(points), load)


def measure_load_profile(
    load_fn: Callable[[int], object],
    sizes: Sequence[int],
    repeats: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> LoadProfile:
    """Time load_fn(nbytes) for each size (best of repeats) and fit seconds = latency + bytes / bandwidth."""
    if len(set(sizes)) < 2:
        raise ValueError("need at least two distinct sizes to fit a bandwidth")
    load_fn(sizes[0])
    samples = [(n, min(_timed(load_fn, n, clock) for _ in range(repeats))) for n in sizes]
    mean_n = sum(n for n, _ in samples) / len(samples)
    mean_s = sum(s for _, s in samples) / len(samples)
    covariance = sum((n - mean_n) * (s - mean_s) for n, s in samples)
    variance = sum((n - mean_n) ** 2 for n, _ in samples)
    slope = covariance / variance
    if slope <= 0:  # no measurable growth with size: all latency, bandwidth as large as measured
        largest = max(n for n, _ in samples)
        return LoadProfile(largest / max(mean_s, 1e-9), 0.0)
    return LoadProfile(1.0 / slope, max(0.0, mean_s - slope * mean_n))


def stack_prefill_fn(stack) -> Callable[[int], None]:
    """A prefill_fn over the engine's DecoderStack: a full causal prefill of n tokens, nothing stored."""
    import torch

    from ragcache.engine.forward import TokenRun, run_tokens
    from ragcache.engine.kvbuffer import KVBuffer

    @torch.inference_mode()
    def prefill(num_tokens: int) -> None:
        buffer = KVBuffer(stack, num_tokens)
        buffer.length = num_tokens
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=stack.device)
        run_tokens(stack, buffer, TokenRun.contiguous(ids, 0))
        if stack.device.type == "cuda":
            torch.cuda.synchronize(stack.device)

    return prefill


def kv_bytes_per_token(stack) -> int:
    """Bytes one token's K and V take in the stack's dtype: a program's KV is num_tokens times this."""
    itemsize = stack.embed_tokens.weight.element_size()
    return 2 * stack.num_layers * stack.num_kv_heads * stack.head_dim * itemsize


def _timed(fn: Callable[[int], object], n: int, clock: Callable[[], float]) -> float:
    started = clock()
    fn(n)
    return clock() - started
