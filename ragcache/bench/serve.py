"""`ragcache bench serve`: the HTTP service under load, per mode, beside llama.cpp's server.

Against a running server (--url) or one it starts: each question's documents are
registered first (warm, as a deployment would have them), one untimed request warms the
model, then every mode runs closed-loop concurrency levels and open-loop Poisson rates.
Every mode sends the questions in the same (seeded) order and every open-loop level of a
rate the same arrival gaps, so modes differ only in how the server gets the KV. The peer,
llama.cpp's server on the same GGUF file, gets the same prompts as plain text ("full").
"""

from __future__ import annotations

import asyncio
import os
import platform
import random
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from functools import partial

import httpx
from tqdm import tqdm

from ragcache.bench.rag import RagExample
from ragcache.bench.serve_load import (
    BenchServeError,
    LevelRun,
    RequestOutcome,
    Send,
    closed_loop,
    level_figures,
    open_loop,
    stream_chat,
)
from ragcache.bench.serve_targets import (
    CHAT_PATH,
    ServerOptions,
    Target,
    llamacpp_target,
    ragcache_target,
    vllm_target,
    wants_peer,
)

_MODE = re.compile(r"^(full|prefix|reuse|blend(@(0(\.\d*)?|1(\.0*)?|\.\d+))?)$")  # blend@r: r in [0, 1]
MIN_REQUESTS = 8


@dataclass(frozen=True)
class ServeBenchOptions:
    limit: int | None = None
    docs: int = 6
    max_tokens: int = 128
    modes: tuple[str, ...] = ("full", "prefix", "blend@0.15")
    concurrency: tuple[int, ...] = (1, 4, 8)
    rates: tuple[float, ...] = (0.2, 0.5)  # requests/s; () skips the open loop
    requests: int | None = None  # per level; None: max(2 x concurrency, 8) closed, 8 open
    duration_s: float | None = None  # no request starts later than this into a level
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.limit is None or self.limit > 0, "--limit", self.limit, "must be positive"),
            (self.docs > 0, "--docs", self.docs, "must be positive"),
            (self.max_tokens > 0, "--max-tokens", self.max_tokens, "must be positive"),
            (
                bool(self.modes) and all(_MODE.match(m) for m in self.modes),
                "--modes",
                self.modes,
                "must be full, prefix, reuse, blend or blend@r with r in [0, 1]",
            ),
            (len(set(self.modes)) == len(self.modes), "--modes", self.modes, "must not repeat a mode"),
            (all(c > 0 for c in self.concurrency), "--concurrency", self.concurrency, "must be positive integers"),
            (all(r > 0 for r in self.rates), "--rates", self.rates, "must be positive requests/s"),
            (bool(self.concurrency or self.rates), "--concurrency", self.concurrency, "and --rates are both empty"),
            (self.requests is None or self.requests > 0, "--requests", self.requests, "must be positive"),
            (self.duration_s is None or self.duration_s > 0, "--duration-s", self.duration_s, "must be positive"),
        ]
        for ok, flag, value, rule in checks:
            if not ok:
                shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
                raise BenchServeError(f"{flag} {rule}, got {shown!r}")

    def closed_requests(self, concurrency: int) -> int:
        return self.requests or max(2 * concurrency, MIN_REQUESTS)

    def open_requests(self) -> int:
        return self.requests or MIN_REQUESTS

    def requests_per_mode(self) -> int:
        return sum(map(self.closed_requests, self.concurrency)) + self.open_requests() * len(self.rates)


def parse_list(text: str, kind: Callable, flag: str) -> tuple:
    """'1,4,8' -> (1, 4, 8); a malformed item names the flag."""
    try:
        return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        raise BenchServeError(f"{flag}: expected comma-separated {kind.__name__} values, got {text!r}") from None


def run_serve_bench(
    examples: Sequence[RagExample], options: ServeBenchOptions, servers: ServerOptions, dataset: str = ""
) -> dict:
    """Measure ragcache (and the peer when wanted) in every mode and load; the JSON-ready summary."""
    openers: list[Callable[[], AbstractContextManager[Target]]] = [lambda: ragcache_target(servers, options.modes)]
    if servers.engine == "vllm":
        openers.append(lambda: ragcache_target(servers, options.modes, "vllm"))
    if wants_peer(servers):
        openers.append(lambda: llamacpp_target(servers))
    if servers.peer == "vllm":
        openers.append(lambda: vllm_target(servers))
    num_modes = len(options.modes) + len(openers) - 1  # every target but ragcache's own engine runs "full" only
    summary = {"machine": machine_info(), "config": _config(examples, options, servers, dataset), "engines": {}}
    with tqdm(total=options.requests_per_mode() * num_modes, desc="bench serve", unit="req") as progress:
        for open_target in openers:  # one server up at a time: neither takes CPU from the other
            with open_target() as target:
                summary["engines"][target.name] = asyncio.run(_measure(target, examples, options, progress))
    return summary


async def _measure(target: Target, examples: Sequence[RagExample], options: ServeBenchOptions, progress: tqdm) -> dict:
    order = list(range(len(examples)))
    random.Random(options.seed).shuffle(order)
    url = target.url + CHAT_PATH
    timeout = httpx.Timeout(600.0, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None)) as client:
        progress.set_description(f"{target.name}: warming up")
        await target.prepare(client, examples)
        warm = await stream_chat(client, url, target.body(examples[order[0]], target.modes[0], 2), target.headers)
        if warm.error is not None:  # a bad mode, key or model would fail every request: say so once
            raise BenchServeError(f"{target.name}: the warm-up request failed: {warm.error}")

        async def send(mode: str, index: int) -> RequestOutcome:
            body = target.body(examples[order[index % len(order)]], mode, options.max_tokens)
            outcome = await stream_chat(client, url, body, target.headers)
            progress.update()
            return outcome

        modes = {}
        for mode in target.modes:
            progress.set_description(f"{target.name} {mode}")
            modes[mode] = await _measure_mode(partial(send, mode), options, progress)
    return {"url": target.url, "model": target.model, "modes": modes}


async def _measure_mode(send: Send, options: ServeBenchOptions, progress: tqdm) -> dict:
    closed, opened = [], []
    for concurrency in options.concurrency:
        planned = options.closed_requests(concurrency)
        run = await closed_loop(send, planned, concurrency, options.duration_s)
        closed.append({"concurrency": concurrency, **_figures(run, planned, progress)})
    for rate in options.rates:
        planned = options.open_requests()
        run = await open_loop(send, planned, rate, f"{options.seed}/{rate}", options.duration_s)
        opened.append({"rate": rate, **_figures(run, planned, progress)})
    return {"closed": closed, "open": opened}


def _figures(run: LevelRun, planned: int, progress: tqdm) -> dict:
    progress.update(planned - len(run.outcomes))  # requests a --duration-s cap left unsent
    return level_figures(run)


def machine_info() -> dict:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
    }


def _config(examples: Sequence[RagExample], options: ServeBenchOptions, servers: ServerOptions, dataset: str) -> dict:
    server_flags = {k: v for k, v in asdict(servers).items() if k != "api_key"}
    return {"dataset": dataset, "questions": len(examples), **asdict(options), **server_flags}


def format_serve_table(summary: dict) -> str:
    config, machine = summary["config"], summary["machine"]
    header = (
        f"{'engine':<14} {'mode':<11} {'load':<12} {'reqs':>5} {'err':>4} {'req/s':>7} {'out tok/s':>9} "
        f"{'TTFT p50 s':>10} {'p99 s':>7} {'TPOT p50 ms':>11} {'p99 ms':>7}"
    )
    lines = [
        f"{config['questions']} questions x {config['docs']} documents, max_tokens {config['max_tokens']}; "
        f"{machine['cpus']} CPUs, {machine['platform']}",
        header,
        "-" * len(header),
    ]
    for engine, data in summary["engines"].items():
        lines.append(f"{engine}: {data['model']} at {data['url']}")
        for mode, runs in data["modes"].items():
            levels = [(f"c={row['concurrency']}", row) for row in runs["closed"]]
            levels += [(f"rate={row['rate']:g}/s", row) for row in runs["open"]]
            for load, row in levels:
                lines.append(
                    f"{engine:<14} {mode:<11} {load:<12} {row['requests']:>5} {row['errors']:>4} "
                    f"{row['requests_per_s']:>7.2f} {row['output_tokens_per_s']:>9.1f} {_s(row['ttft_p50_s']):>10} "
                    f"{_s(row['ttft_p99_s']):>7} {_ms(row['tpot_p50_s']):>11} {_ms(row['tpot_p99_s']):>7}"
                )
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1e3 * value:.1f}"
