"""The load generator of `ragcache bench serve`: streamed requests, closed and open loops, level figures.

A request is timed from sending to its first non-empty content delta (TTFT) and, past it,
per output token (TPOT = (last token time - first token time) / (output tokens - 1)).
Closed loop: C workers each send back to back until N requests are done. Open loop:
Poisson arrivals at rate λ, each request sent when it arrives whether or not earlier ones
have finished, so queueing shows in TTFT as it would for independent users.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

import httpx

from ragcache.bench.metrics import percentile_or_none as _percentile


class BenchServeError(ValueError):
    """The serve bench cannot run: a bad flag, a server that does not start or refuses the set-up."""


class RequestOutcome(NamedTuple):
    ttft_s: float | None  # None: failed, or no content came
    tpot_s: float | None  # None: fewer than two output tokens
    output_tokens: int
    error: str | None = None  # None: a 200 stream with a finish_reason, ended by [DONE]


class LevelRun(NamedTuple):
    outcomes: list[RequestOutcome]
    wall_s: float


Send = Callable[[int], Coroutine[Any, Any, RequestOutcome]]  # a coroutine: open_loop makes it a task


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict, headers: dict[str, str]) -> RequestOutcome:
    """POST one streamed chat completion and time it; every failure comes back as an outcome, never raised."""
    start = time.perf_counter()
    first: float | None = None
    last: float | None = None
    deltas, usage_tokens, done, finished = 0, None, False, False
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return RequestOutcome(None, None, 0, f"HTTP {response.status_code}: {text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return RequestOutcome(None, None, 0, f"stream error: {event['error']}")
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or ():
                    finished = finished or bool(choice.get("finish_reason"))
                    if (choice.get("delta") or {}).get("content"):
                        last = time.perf_counter()
                        first = first or last
                        deltas += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return RequestOutcome(None, None, 0, f"{type(exc).__name__}: {exc}")
    if not done:
        return RequestOutcome(None, None, 0, "stream ended without [DONE]")
    if not finished:  # llama.cpp's server, interrupting a stream for a newer request, still sends [DONE]
        return RequestOutcome(None, None, 0, "stream cut short: no finish_reason")
    tokens = usage_tokens if usage_tokens is not None else deltas
    ttft = None if first is None else first - start
    tpot = (last - first) / (tokens - 1) if first is not None and last is not None and tokens > 1 else None
    return RequestOutcome(ttft, tpot, tokens)


async def closed_loop(send: Send, num_requests: int, concurrency: int, duration_s: float | None) -> LevelRun:
    """concurrency workers share request indices 0..num_requests-1; none starts a request past duration_s."""
    indices = iter(range(num_requests))
    outcomes: list[RequestOutcome] = []
    start = time.perf_counter()
    deadline = start + duration_s if duration_s else math.inf

    async def worker() -> None:
        for index in indices:  # one iterator for all workers: each index is taken once
            if time.perf_counter() > deadline:
                return
            outcomes.append(await send(index))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, num_requests))))
    return LevelRun(outcomes, time.perf_counter() - start)


async def open_loop(send: Send, num_requests: int, rate: float, seed: str, duration_s: float | None) -> LevelRun:
    """num_requests Poisson arrivals at rate per second (gaps drawn from seed); none arrives past duration_s."""
    rng = random.Random(seed)
    tasks: list[asyncio.Task[RequestOutcome]] = []
    start = time.perf_counter()
    arrival_s = 0.0
    for index in range(num_requests):
        arrival_s += rng.expovariate(rate)
        if duration_s and arrival_s > duration_s:
            break
        await asyncio.sleep(max(0.0, start + arrival_s - time.perf_counter()))
        tasks.append(asyncio.create_task(send(index)))
    outcomes = list(await asyncio.gather(*tasks))
    return LevelRun(outcomes, time.perf_counter() - start)


def level_figures(run: LevelRun) -> dict:
    """One level's JSON row: throughput over the level's wall time, latency percentiles over successes."""
    ok = [o for o in run.outcomes if o.error is None]
    errors = [o.error for o in run.outcomes if o.error is not None]
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    tpot = [o.tpot_s for o in ok if o.tpot_s is not None]
    return {
        "requests": len(run.outcomes),
        "requests_per_s": len(ok) / run.wall_s if run.wall_s > 0 else 0.0,
        "output_tokens_per_s": sum(o.output_tokens for o in ok) / run.wall_s if run.wall_s > 0 else 0.0,
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p99_s": _percentile(ttft, 99),
        "tpot_p50_s": _percentile(tpot, 50),
        "tpot_p99_s": _percentile(tpot, 99),
        "errors": len(errors),
        "wall_s": run.wall_s,
        "error_examples": sorted(set(errors))[:3],
    }
