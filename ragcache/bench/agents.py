"""`ragcache bench agents`: tool-aware KV pins against the store's LRU, on the real engine, over BFCL traces.

Programs (bfcl.py: one BFCL multi-turn entry each, all its user turns, or its first --turns)
arrive as a Poisson process (--arrival-rate programs/s) and run interleaved against an
in-process ragcache server, with real HTTP and OpenAI wire bodies. A program, per user turn:

    for each ground-truth call of the turn:
        POST /v1/chat/completions, tool_choice = that call's function (constrained decoding:
        the model makes a call of it, finish_reason "tool_calls", which starts the pin)
        append the trace's call (not the model's) and wait the call's simulated duration (when the
        model's reply was not that call, a program_id run sends a tool_start event first, as
        an agent's SDK does for a tool it runs)
        append the trace's simulated result (role "tool")
    POST once more with tool_choice "none" (the answer); append a fixed answer text
    ("Done: <the calls>", not the model's, so every policy sends the same prompts)
    wait the think time, then the next user turn

Waits (tool durations, think time) are multiplied by --time-scale; so are the fixed pin's
2 s and the predictor's cold-start TTL and cap, so the policies see the same time axis.
Policies, each on a fresh store, runtime and server over the one loaded model:

    lru         pin policy "none": the store's LRU alone
    fixed_ttl   every tool call pinned 2 s (× time scale), what Continuum's released code does
    tool_ttl    the predictor's TTL per tool (agents/predictor.py)

and, unless --no-prefix-runs, the same three with no program_id in the bodies ("by prefix":
the server finds the program from the conversation's token prefix).

Repeats (--repeats N): every policy runs N times over the same programs (--seed's). A repeat
draws the programs' tool durations and arrival times once (draw_repeat; repeat 0 with --seed
itself, repeat r with "seed/r") and every policy of the repeat gets that draw; the repeats
differ only in it. Policies run in turn within a repeat, so drift in the machine's load
spreads over all of them.

KV budget (--kv-budget-mb): the store's local KV, split evenly between its two tiers, both
LRU, no Redis below them: the device tier, where a turn's KV lands and pins hold it, and the
host tier, where what the device tier evicts (or an expired pin leaves) goes before it is
dropped, as in a deployment (with one local tier and nothing below it, the store drops an
expired pin's entry at once: every pin that expires would cost more than no pin). By default KV_SHARE of all programs' final KV, so it holds well
under all of them (and each program's system-prefix chunk takes room too). Pins may hold
budget_share (0.5) of the device tier and lower_budget_share (0.8) of the host tier
(pin_budget_bytes: the device tier's; pin_budget_bytes_by_tier: each), the device tier first; a pin that
fits neither is refused (or, under tool_ttl, displaces less valuable pins).

Measured, per policy:

    re-prefilled tokens   for each request that follows a tool result (a "returning" turn):
                          max(0, prompt tokens of the program's previous request − tokens reused
                          from stored KV). The previous request's prompt is the context the tool
                          call left behind; what this request reuses of it is the server's prefix
                          cache hit (ragcache.prefix_cached_tokens) when it reports one, else the
                          program's stored KV (ragcache.program_reused_tokens), or, when that was
                          lost, the system prefix's chunk if it was found rather than computed
                          (cached_tokens − recomputed_tokens when no chunk was computed for this request).
    TTFT                  ragcache.timings.ttft_ms: arrival at the server to the first token
    queueing delay        ragcache.timings.queue_ms of returning turns
    JCT                   per program: its last response minus its first request
    pins                  /admin/programs: created, expired, force-released (reclaimed),
                          displaced, the pinned-bytes high-water mark against the budget,
                          tokens prefetched back to the device tier (prefetched_tokens)
    noise                 each policy with and without program_id is the same work twice: how
                          far the two land apart is the run-to-run spread to read the others by

A policy's row over its repeats (repeat_figures): re-prefilled tokens and mean JCT are the
mean of the per-repeat values, with those values (*_repeats) and a 95% interval of the mean
(*_ci: mean ± t(0.975, n−1)·sd/√n, [x, x] for one repeat); everything else is pooled over all
repeats' records: percentiles and per-turn means over every request or program, counts
(programs, turns, pins, force_released, prefetched_tokens) summed, the pinned-bytes
high-water mark the highest, the pin hit rate and pin outcomes over every repeat's pins.
The targets ask tool_ttl's two intervals to lie wholly below LRU's.

`--workload chat` runs chat.py instead: multi-turn chats over MuSiQue passages, no tools.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import os
import platform
import random
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, NamedTuple, TypeVar

from ragcache.bench.bfcl import Trace, duration_stats, load_traces, with_durations
from ragcache.bench.metrics import percentile_or_none as _percentile
from ragcache.bench.serve_targets import free_port

KV_SHARE = 0.5  # default KV budget: this share of all programs' final KV
POLICIES = {"lru": "none", "fixed_ttl": "fixed_ttl", "tool_ttl": "tool_ttl"}  # bench name -> PinConfig.policy
FIXED_TTL_S = 2.0  # Continuum's released code; scaled by --time-scale
PIN_TIER = "device"
# Student's t 0.975 quantile for 1..30 degrees of freedom, when scipy is not installed (1.96 beyond)
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)  # fmt: skip

T = TypeVar("T")


class BenchAgentsError(ValueError):
    """The agents bench cannot run, or the server refused a request of it."""


def check_flags(checks: Sequence[tuple[bool, str, object, str]]) -> None:
    """(ok, flag, value, rule) per option: BenchAgentsError naming the first flag whose rule fails."""
    for ok, flag, value, rule in checks:
        if not ok:
            raise BenchAgentsError(f"{flag} {rule}, got {value!r}")


@dataclass(frozen=True)
class AgentsBenchOptions:
    programs: int = 12
    turns: int | None = None  # each program's first N user turns; None: all its trace has
    repeats: int = 3  # every policy this many times, each repeat with its own draw of durations and arrivals
    arrival_rate: float = 1.0  # programs/s
    time_scale: float = 1.0  # waits (tools, think time) and the pins' time constants are multiplied by it
    kv_budget_mb: float | None = None  # device + host tier; None: KV_SHARE of all programs' final KV
    max_tokens: int = 64  # per tool-call request
    answer_tokens: int = 16  # per tool_choice "none" request
    think_s: float = 1.0  # the user's next message, this long after the answer
    seed: int = 0
    prefix_runs: bool = True

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.programs <= 200, "--programs", self.programs, "must be in 1..200 (BFCL's base set)"),
            (self.turns is None or self.turns >= 1, "--turns", self.turns, "must be positive (or left out: all)"),
            (self.repeats >= 1, "--repeats", self.repeats, "must be positive"),
            (self.arrival_rate > 0, "--arrival-rate", self.arrival_rate, "must be positive programs/s"),
            (self.time_scale > 0, "--time-scale", self.time_scale, "must be positive"),
            (
                self.kv_budget_mb is None or self.kv_budget_mb > 0,
                "--kv-budget-mb",
                self.kv_budget_mb,
                "must be positive",
            ),
            (self.max_tokens >= 8, "--max-tokens", self.max_tokens, "must be >= 8 (a call needs room)"),
            (self.answer_tokens >= 1, "answer_tokens", self.answer_tokens, "must be positive"),
            (self.think_s >= 0, "think_s", self.think_s, "must be >= 0"),
        ]
        check_flags(checks)


class RequestRecord(NamedTuple):
    kind: str  # "call" or "answer"
    returning: bool  # it follows a tool result
    prompt_tokens: int
    reused_tokens: int
    reprefill_tokens: int | None  # returning turns only
    ttft_s: float
    queue_s: float
    latency_s: float  # sent to reply, at the client
    called: bool  # a call request that came back as a call of the asked tool


class ProgramRecord(NamedTuple):
    trace_id: str
    jct_s: float
    requests: list[RequestRecord]


class Run(NamedTuple):
    """One policy's run in one repeat: its programs' records and /admin/programs at its end."""

    programs: list[ProgramRecord]
    stats: dict
    wall_s: float


class Sizes(NamedTuple):
    device_bytes: int
    cpu_bytes: int
    expected_kv_bytes: int  # all programs' final contexts together


class Draw(NamedTuple):
    """One repeat's random part of the work, the same for every policy in the repeat."""

    traces: list[Trace]  # the programs, their tool durations drawn for this repeat
    arrivals_s: list[float]  # each program's arrival, seconds after the first's (not time-scaled)


class BenchServer(NamedTuple):
    """What every policy's fresh server is built from."""

    loaded: Any  # engine.loader.LoadedModel
    profile: Any  # agents.profile's prefill profile: what a re-prefill costs, for the pins' TTLs
    sizes: Sizes


def run_agents_bench(
    options: AgentsBenchOptions, progress: Callable[[str], None] = lambda line: None, loaded=None
) -> dict:
    """Every policy (with and without program_id) --repeats times on the same traces; the JSON-ready summary.

    loaded: the model (default: SmolLM2-135M on the CPU, loaded here). Runs the engine's step loop
    on this thread, the one that loads the model (see BlendEngine.run_loop)."""
    load_before = os.getloadavg()[0]
    traces = load_traces(options.programs, options.turns, options.seed)
    server = prepare_server(
        loaded, lambda tokenizer: [final_tokens(tokenizer, trace, options) for trace in traces], options.kv_budget_mb
    )
    progress("warm-up: one program, untimed (the first server's first requests pay one-off costs)")
    warm_up = partial(_drive, draw=draw_repeat(traces[:1], options, 0), options=options, identify=True, label="")
    serve_and_drive(server, "none", options.time_scale, 4, warm_up)
    identities = ("program_id", "prefix") if options.prefix_runs else ("program_id",)
    repeats: dict[str, dict[str, list[Run]]] = {identify: {name: [] for name in POLICIES} for identify in identities}
    draws = [draw_repeat(traces, options, repeat) for repeat in range(options.repeats)]
    for repeat, draw in enumerate(draws):
        for identify in identities:
            for name, policy in POLICIES.items():
                label = (
                    f"repeat {repeat + 1}/{options.repeats}, {name}{'' if identify == 'program_id' else ' by prefix'}"
                )
                drive = partial(
                    _drive,
                    draw=draw,
                    options=options,
                    identify=identify == "program_id",
                    label=label,
                    progress=progress,
                )
                started = time.perf_counter()
                programs, stats = serve_and_drive(server, policy, options.time_scale, 4 * len(traces), drive)
                repeats[identify][name].append(Run(programs, stats, time.perf_counter() - started))
                progress(f"{label}: done in {repeats[identify][name][-1].wall_s:.0f} s")
    runs: dict[str, dict] = {"program_id": {}, "prefix": {}}
    for identify, policies in repeats.items():
        runs[identify] = {name: repeat_figures(policy_runs) for name, policy_runs in policies.items()}
    summary = summarise(runs, [trace for draw in draws for trace in draw.traces], options, server.sizes)
    summary["machine"]["load_average_1m_before"] = load_before
    return summary


def repeat_seed(seed: int, repeat: int) -> str:
    """Repeat 0 draws with --seed itself (what one run drew before there were repeats), repeat r with "seed/r"."""
    return str(seed) if repeat == 0 else f"{seed}/{repeat}"


def draw_repeat(traces: Sequence[Trace], options: AgentsBenchOptions, repeat: int) -> Draw:
    """The repeat's tool durations and arrivals: a function of --seed and the repeat alone, so every policy
    of a repeat gets the same, and each repeat its own."""
    seed = repeat_seed(options.seed, repeat)
    return Draw([with_durations(t, seed) for t in traces], poisson_arrivals(len(traces), options.arrival_rate, seed))


def poisson_arrivals(count: int, rate: float, seed: int | str) -> list[float]:
    """count arrival times of a Poisson process of this rate (per second), the first at 0."""
    rng = random.Random(f"{seed}/arrivals")
    arrivals, at = [], 0.0
    for _ in range(count):
        arrivals.append(at)
        at += rng.expovariate(rate)
    return arrivals


# the server side: one fresh store, engine, coordinator and runtime per policy


def prepare_server(loaded, final_kv_tokens: Callable[[Any], list[int]], kv_budget_mb: float | None) -> BenchServer:
    """The model (loaded here when None), its prefill profile, and the tiers' sizes (budget_sizes) from
    final_kv_tokens(tokenizer): each program's KV at its end, in tokens."""
    from ragcache.agents.profile import measure_prefill_profile, stack_prefill_fn
    from ragcache.engine.loader import ModelSpec, load_model

    loaded = loaded or load_model(ModelSpec(None, "cpu", "float32"))
    warm = _engine(loaded, Sizes(1 << 20, 1 << 20, 0))
    kv = [tokens * warm.kv_bytes_per_token for tokens in final_kv_tokens(loaded.tokenizer)]
    profile = measure_prefill_profile(stack_prefill_fn(warm.stack), (64, 256, 1024), repeats=1)
    warm.close()
    return BenchServer(loaded, profile, budget_sizes(kv, kv_budget_mb))


def _engine(loaded, sizes: Sizes):
    from ragcache.engine.prompt import PromptLimits
    from ragcache.engine.runner import BlendEngine, EngineConfig
    from ragcache.storage.cpu import CpuTier
    from ragcache.storage.eviction import make_policy
    from ragcache.storage.gpu import GpuTier
    from ragcache.storage.tiered import TieredStore

    store = TieredStore(
        [GpuTier(sizes.device_bytes, "cpu", make_policy("lru")), CpuTier(sizes.cpu_bytes, make_policy("lru"))]
    )
    limits = PromptLimits(max_prompt_tokens=loaded.model.config.max_position_embeddings)
    return BlendEngine(loaded, store, EngineConfig(limits=limits))


def _agent_config(policy: str, time_scale: float):
    from ragcache.agents import AgentConfig, PinConfig, PredictorConfig

    predictor = PredictorConfig(
        default_ttl_s=FIXED_TTL_S * time_scale, max_ttl_s=PredictorConfig.max_ttl_s * time_scale
    )
    return AgentConfig(predictor=predictor, pins=PinConfig(policy=policy, fixed_ttl_s=FIXED_TTL_S * time_scale))


def serve_and_drive(
    server: BenchServer,
    policy: str,
    time_scale: float,
    max_queue: int,
    drive: Callable[[str], Coroutine[Any, Any, T]],
) -> T:
    """Serve one policy over HTTP (a thread), run drive(url) (another), step the engine here; drive's result."""
    import uvicorn

    from ragcache.agents import ProgramCoordinator
    from ragcache.config import Settings
    from ragcache.service.app import create_app
    from ragcache.service.runtime import Runtime

    engine = _engine(server.loaded, server.sizes)
    engine.store.start_sweeper(0.1)
    coordinator = ProgramCoordinator(engine.prefix, server.profile, _agent_config(policy, time_scale))
    engine.use_admission_order(coordinator.scheduler)
    runtime = Runtime(engine, max_queue=max_queue, coordinator=coordinator)
    settings = Settings(port=free_port(), semantic_cache=False, shadow_fraction=0.0, semantic_shadow_fraction=0.0)
    http_server = uvicorn.Server(
        uvicorn.Config(create_app(settings, runtime), host="127.0.0.1", port=settings.port, log_level="warning")
    )
    engine.claim_loop()
    http = threading.Thread(target=http_server.run, name="bench-agents-http", daemon=True)
    http.start()
    outcome: dict = {}

    def client_side() -> None:
        try:
            while not http_server.started:
                if not http.is_alive():
                    raise BenchAgentsError("the bench's server did not start")
                time.sleep(0.01)
            outcome["run"] = asyncio.run(drive(f"http://127.0.0.1:{settings.port}"))
        except BaseException as exc:  # raised on the main thread below
            outcome["error"] = exc

    client = threading.Thread(target=client_side, name="bench-agents-client")
    client.start()
    engine.run_loop(alive=client.is_alive)
    client.join()
    http_server.should_exit = True
    http.join(timeout=60)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["run"]


# the client side: programs as agents run them


def http_client():
    """One client for a run's requests: long timeouts (a CPU prefill under load takes a while), no
    connection cap, and httpx's line per request silenced (it would bury the progress lines)."""
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)
    timeout = httpx.Timeout(900.0, connect=10.0)
    return httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None))


async def _drive(
    url: str,
    draw: Draw,
    options: AgentsBenchOptions,
    identify: bool,
    label: str,
    progress: Callable[[str], None] = lambda line: None,
) -> tuple[list[ProgramRecord], dict]:
    done = [0]

    async def one(index: int, trace: Trace) -> ProgramRecord:
        await asyncio.sleep(draw.arrivals_s[index])
        program_id = f"bench-{index}-{trace.id}" if identify else None
        record = await _program(client, url, trace, program_id, options)
        done[0] += 1
        progress(
            f"{label}: program {done[0]}/{len(draw.traces)} ({trace.id}) done: {len(record.requests)} requests, "
            f"JCT {record.jct_s:.1f} s"
        )
        return record

    async with http_client() as client:
        programs = list(await asyncio.gather(*(one(i, trace) for i, trace in enumerate(draw.traces))))
        stats = (await client.get(url + "/admin/programs")).json()
    return programs, stats


class Step(NamedTuple):
    """One request of a program's script and the wait after its reply (unscaled)."""

    body: dict  # the wire body, program_id aside
    tool: str | None  # the call it asks for; None: the answer (tool_choice "none")
    returning: bool  # its last message is a tool result
    wait_s: float  # the call's duration, the think time before the next user turn, or 0 at the end


def script(trace: Trace, options: AgentsBenchOptions) -> list[Step]:
    """The requests a program sends, in order: fixed by the trace alone, so every policy sends the same."""
    messages: list[dict] = []
    steps = []
    tools = list(trace.tools)
    for number, turn in enumerate(trace.turns):
        messages.append({"role": "user", "content": turn.message})
        for call in turn.calls:
            choice = {"type": "function", "function": {"name": call.name}}
            steps.append(
                Step(
                    _body(messages, tools, choice, options.max_tokens),
                    call.name,
                    messages[-1]["role"] == "tool",
                    call.duration_s,
                )
            )
            messages.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments},
                        }
                    ],
                }
            )
            messages.append({"role": "tool", "tool_call_id": call.id, "content": call.result})
        last = number == len(trace.turns) - 1
        steps.append(
            Step(
                _body(messages, tools, "none", options.answer_tokens, is_last_step=last),
                None,
                messages[-1]["role"] == "tool",
                0.0 if last else options.think_s,
            )
        )
        messages.append({"role": "assistant", "content": "Done: " + ", ".join(c.name for c in turn.calls) + "."})
    return steps


def _body(messages: list[dict], tools: list[dict], tool_choice, max_tokens: int, is_last_step: bool = False) -> dict:
    body = {
        "messages": list(messages),
        "tools": tools,
        "tool_choice": tool_choice,
        "max_tokens": max_tokens,
        "temperature": 0,
        "cache": False,
    }
    return body | {"is_last_step": True} if is_last_step else body


async def _program(
    client, url: str, trace: Trace, program_id: str | None, options: AgentsBenchOptions
) -> ProgramRecord:
    records: list[RequestRecord] = []
    previous_prompt = 0
    started = time.perf_counter()
    for step in script(trace, options):
        body = step.body | ({"program_id": program_id} if program_id is not None else {})
        sent = time.perf_counter()
        reply = await post_completion(client, url, body)
        finished = time.perf_counter()
        records.append(_record(step, reply, previous_prompt, finished - sent))
        previous_prompt = reply["usage"]["prompt_tokens"]
        if step.tool is not None and program_id is not None and not records[-1].called:
            await tool_started(client, url, program_id, step.tool)
        await asyncio.sleep(step.wait_s * options.time_scale)
    return ProgramRecord(trace.id, finished - started, records)


async def tool_started(client, url: str, program_id: str, tool: str) -> None:
    """The trace's call runs though the model's reply did not call it (cut off by max_tokens, say): tell the
    server, as an agent framework's SDK does for a tool it runs (sdk/programs.py), so the program's KV is
    treated as any other waiting on a tool. Without program_id there is no program to name: no event."""
    response = await client.post(url + f"/v1/programs/{program_id}/events", json={"type": "tool_start", "tool": tool})
    if response.status_code >= 300:
        raise BenchAgentsError(
            f"the server refused a tool_start event: HTTP {response.status_code}: {response.text[:300]}"
        )


async def post_completion(client, url: str, body: dict) -> dict:
    response = await client.post(url + "/v1/chat/completions", json=body)
    if response.status_code != 200:
        raise BenchAgentsError(f"the server refused a request: HTTP {response.status_code}: {response.text[:300]}")
    return response.json()


def _record(step: Step, reply: dict, previous_prompt: int, latency_s: float) -> RequestRecord:
    reused = reused_tokens(reply)
    timings = reply["ragcache"]["timings"]
    calls = reply["choices"][0]["message"].get("tool_calls") or []
    called = step.tool is not None and any(c["function"]["name"] == step.tool for c in calls)
    return RequestRecord(
        "answer" if step.tool is None else "call",
        step.returning,
        reply["usage"]["prompt_tokens"],
        reused,
        max(0, previous_prompt - reused) if step.returning else None,
        timings["ttft_ms"] / 1e3,
        timings.get("queue_ms", 0.0) / 1e3,
        latency_s,
        called,
    )


def reused_tokens(reply: dict) -> int:
    """Prompt tokens whose KV came from the store (see the module docstring): the prefix cache's hit when the
    server reports one, else the program's KV, else the system prefix's chunk when nothing was computed for it
    (cached_tokens also counts a prefix computed now). A server without the prefix cache omits its field."""
    report = reply["ragcache"]
    if report.get("prefix_cached_tokens"):
        return report["prefix_cached_tokens"]
    if report.get("program_reused_tokens"):
        return report["program_reused_tokens"]
    if report["timings"]["chunk_compute_ms"] > 0:
        return 0
    return max(0, report["cached_tokens"] - report["recomputed_tokens"])


# figures


def policy_figures(programs: Sequence[ProgramRecord], stats: dict) -> dict:
    """One policy's JSON row from its programs' records and the coordinator's stats at the end (one repeat,
    or all repeats' records with merge_stats of their stats)."""
    requests = [r for p in programs for r in p.requests]
    returning = [r for r in requests if r.returning]
    reprefill = sum(r.reprefill_tokens for r in returning if r.reprefill_tokens is not None)  # set on all of them
    calls = [r for r in requests if r.kind == "call"]
    pins = stats.get("pins", {})
    counters, budget = pins.get("counters", {}), pins.get("budget", {})
    tier = budget.get(PIN_TIER, {})
    return {
        "reprefill_tokens": reprefill,
        "reprefill_tokens_per_turn": reprefill / len(returning) if returning else None,
        "reused_tokens_per_turn": sum(r.reused_tokens for r in returning) / len(returning) if returning else None,
        "ttft_p50_s": _percentile([r.ttft_s for r in requests], 50),
        "ttft_p90_s": _percentile([r.ttft_s for r in requests], 90),
        "ttft_returning_p50_s": _percentile([r.ttft_s for r in returning], 50),
        "ttft_returning_p90_s": _percentile([r.ttft_s for r in returning], 90),
        "jct_mean_s": _mean([p.jct_s for p in programs]),
        "jct_p90_s": _percentile([p.jct_s for p in programs], 90),
        "queue_delay_mean_s": _mean([r.queue_s for r in returning]),
        "pinned_bytes_max": max((t.get("pinned_bytes_max", 0) for t in budget.values()), default=0),
        "pin_budget_bytes": tier.get("budget_bytes"),
        "pin_budget_bytes_by_tier": {name: t["budget_bytes"] for name, t in budget.items()},
        "within_pin_budget": all(t.get("pinned_bytes_max", 0) <= t["budget_bytes"] for t in budget.values()),
        "pins_created": counters.get("created", 0),
        "pins_expired": counters.get("expired", 0),
        "pins_force_released": counters.get("reclaimed", 0),
        "force_released": counters.get("reclaimed", 0),
        "prefetched_tokens": counters.get("prefetched_tokens", 0),
        "pins_displaced": counters.get("displaced", 0),
        "pins_over_budget": counters.get("over_budget", 0),
        "pins_not_worth_it": counters.get("not_worth_it", 0),
        "pins_not_local": counters.get("not_local", 0),
        "pins_renewed": counters.get("renewed", 0),
        "pin_hit_rate": pins.get("pin_hit_rate"),
        **pin_outcomes(pins.get("predictor", {}).get("tools", {})),
        "programs": len(programs),
        "turns": len(requests),
        "returning_turns": len(returning),
        "calls_made": sum(r.called for r in calls) / len(calls) if calls else None,
        "jct_s": [p.jct_s for p in programs],
    }


def repeat_figures(runs: Sequence[Run]) -> dict:
    """One policy's JSON row over its repeats: figures of all repeats' records pooled, then re-prefilled tokens
    and mean JCT as the mean of the per-repeat values, with those values and a 95% interval of their mean."""
    rows = [policy_figures(run.programs, run.stats) for run in runs]
    pooled = policy_figures([p for run in runs for p in run.programs], merge_stats([run.stats for run in runs]))
    row = pooled | {"repeats": len(runs), "wall_s": sum(run.wall_s for run in runs)}
    for figure in ("reprefill_tokens", "jct_mean_s"):
        values = [r[figure] for r in rows]
        row |= {figure: _mean(values), f"{figure}_ci": mean_ci(values), f"{figure}_repeats": values}
    return row


def merge_stats(stats: Sequence[dict]) -> dict:
    """Several runs' /admin/programs as one, for policy_figures: counters summed, each tier's pinned-bytes
    high-water mark the highest, the pin hit rate over all returns, every run's per-tool pin outcomes."""
    pins = [s.get("pins", {}) for s in stats]
    counters: dict[str, int] = {}
    budget: dict[str, dict] = {}
    for run in pins:
        for name, count in run.get("counters", {}).items():
            counters[name] = counters.get(name, 0) + count
        for tier, use in run.get("budget", {}).items():
            seen = budget.setdefault(tier, dict(use))
            seen["pinned_bytes_max"] = max(seen.get("pinned_bytes_max", 0), use.get("pinned_bytes_max", 0))
    returns = counters.get("returned_held", 0) + counters.get("returned_lost", 0)
    tools = {
        f"{i}/{name}": tool
        for i, run in enumerate(pins)
        for name, tool in run.get("predictor", {}).get("tools", {}).items()
    }
    return {
        "pins": {
            "counters": counters,
            "budget": budget,
            "pin_hit_rate": counters.get("returned_held", 0) / returns if returns else None,
            "predictor": {"tools": tools},
        }
    }


def t_975(df: int) -> float:
    """Student's t 0.975 quantile: scipy's when it is installed, else T_975, and the normal's 1.96 past 30."""
    try:
        stats = importlib.import_module("scipy.stats")
    except ImportError:
        return T_975[df - 1] if df <= len(T_975) else 1.96
    return float(stats.t.ppf(0.975, df))


def mean_ci(values: Sequence[float]) -> list[float] | None:
    """95% interval of the mean of per-repeat values: mean ± t(0.975, n−1)·sd/√n; [x, x] for one value."""
    n = len(values)
    if n == 0:
        return None
    mean = sum(values) / n
    if n == 1:
        return [mean, mean]
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_975(n - 1) * sd / math.sqrt(n)
    return [mean - half, mean + half]


def pin_outcomes(tools: dict) -> dict:
    """Over every tool's pins (the predictor's stats): the mean TTL given, and the share whose tool returned in time."""
    rows = [tool["predicted_vs_actual"] for tool in tools.values() if tool["predicted_vs_actual"]["pins"]]
    pins = sum(row["pins"] for row in rows)
    if not pins:
        return {"pin_ttl_mean_s": None, "pins_covering": None}
    return {
        "pin_ttl_mean_s": sum(row["mean_predicted_ttl_s"] * row["pins"] for row in rows) / pins,
        "pins_covering": sum(row["covered"] * row["pins"] for row in rows) / pins,
    }


def summarise(runs: dict[str, dict], traces: Sequence[Trace], options: AgentsBenchOptions, sizes: Sizes) -> dict:
    """The JSON summary: per identification, per policy, with re-prefill cuts against LRU and the targets.
    traces: every repeat's (the durations pooled over the repeats' draws)."""
    for policies in runs.values():
        lru = policies.get("lru", {}).get("reprefill_tokens")
        for name in ("fixed_ttl", "tool_ttl"):
            if name in policies:
                own = policies[name]["reprefill_tokens"]
                policies[name]["reprefill_cut_vs_lru"] = 1.0 - own / lru if lru else None
    durations = [call.duration_s for trace in traces for call in trace.calls]
    summary = {
        "policies": runs["program_id"],
        "by_prefix": {"policies": runs["prefix"]},
        "pin_budget_bytes": runs["program_id"]["lru"]["pin_budget_bytes"] if runs["program_id"] else None,
        "pin_budget_bytes_by_tier": runs["program_id"]["lru"]["pin_budget_bytes_by_tier"] if runs["program_id"] else {},
        "config": {
            **asdict(options),
            "device_tier_bytes": sizes.device_bytes,
            "cpu_tier_bytes": sizes.cpu_bytes,
            "expected_kv_bytes": sizes.expected_kv_bytes,
            "fixed_ttl_s": FIXED_TTL_S * options.time_scale,
            "traces": list(dict.fromkeys(trace.id for trace in traces)),
            "user_turns": sum({trace.id: len(trace.turns) for trace in traces}.values()),
        },
        "durations": {
            "all": duration_stats(durations),
            **{
                kind: duration_stats([c.duration_s for t in traces for c in t.calls if c.kind == kind])
                for kind in ("web", "shell")
            },
        },
        "machine": machine_info(),
    }
    summary["targets"] = {identify: targets(policies) for identify, policies in runs.items() if policies}
    if runs["prefix"]:
        summary["noise"] = noise(runs["program_id"], runs["prefix"])
    return summary


def noise(first: dict, second: dict) -> dict:
    """How far two runs of the same work land apart, per policy: with and without program_id a policy gets the
    same requests at the same times (the server finds the program either way), so mostly timing jitter —
    which entry is least recently used when room is needed — tells them apart."""

    def spread(a: float | None, b: float | None) -> float | None:
        return abs(a - b) / ((a + b) / 2) if a is not None and b is not None and a + b else None

    return {
        name: {
            f"{figure}_rel_diff": spread(first[name][figure], second[name][figure])
            for figure in ("reprefill_tokens", "jct_mean_s", "ttft_p50_s")
        }
        for name in first
        if name in second
    }


def machine_info() -> dict:
    """The machine, and how busy it was: a 2-core box shared with other work measures slower and noisier."""
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1m": os.getloadavg()[0],
    }


def targets(policies: dict) -> dict:
    """The done-line, checked: tool_ttl cuts re-prefill after tool calls by >= 80% against LRU and has the lowest
    mean JCT of the three (on the means over repeats), the 95% intervals of both lie wholly below LRU's (the
    difference is not run-to-run noise), and no policy's pins ever held more than the budget."""
    tool, lru = policies["tool_ttl"], policies["lru"]
    cut = tool.get("reprefill_cut_vs_lru")
    lowest = min(policies, key=lambda name: policies[name]["jct_mean_s"])
    checks = {
        "reprefill_cut_ge_80pct": cut is not None and cut >= 0.8,
        "lowest_jct_mean": lowest == "tool_ttl",
        "reprefill_ci_separate_from_lru": below(tool.get("reprefill_tokens_ci"), lru.get("reprefill_tokens_ci")),
        "jct_ci_separate_from_lru": below(tool.get("jct_mean_s_ci"), lru.get("jct_mean_s_ci")),
        "within_pin_budget": all(row["within_pin_budget"] for row in policies.values()),
    }
    return checks | {"met": all(checks.values())}


def below(interval: Sequence[float] | None, other: Sequence[float] | None) -> bool:
    """Whether an interval lies wholly below another: they do not overlap, and it is the lower one."""
    return interval is not None and other is not None and interval[1] < other[0]


def budget_sizes(kv_bytes: Sequence[int], kv_budget_mb: float | None) -> Sizes:
    """Each tier half the budget: kv_budget_mb, or KV_SHARE of all programs' final KV (kv_bytes), but never a
    device tier smaller than the largest program's KV (a turn's KV must fit where it is stored)."""
    total = kv_budget_mb * 2**20 if kv_budget_mb else max(KV_SHARE * sum(kv_bytes), 2 * max(kv_bytes))
    return Sizes(int(total / 2), int(total / 2), sum(kv_bytes))


def final_tokens(tokenizer, trace: Trace, options: AgentsBenchOptions) -> int:
    """A program's KV at its end: its last request's prompt, rendered as the server renders it, and the answer."""
    return prompt_tokens(tokenizer, script(trace, options)[-1].body) + options.answer_tokens


def prompt_tokens(tokenizer, body: dict) -> int:
    """The prompt tokens of a chat completion body (its documents included), rendered as the server renders it."""
    import msgspec

    from ragcache.engine.prompt import DEFAULT_SYSTEM_PROMPT, build_rag_prompt
    from ragcache.schemas import ChatCompletionRequest
    from ragcache.service.convert import chat_request

    documents = [document["text"] for document in body.get("documents") or ()]
    request = chat_request(msgspec.convert(body, ChatCompletionRequest), documents, "default", body["max_tokens"])
    parts = build_rag_prompt(
        tokenizer,
        request.question,
        request.documents,
        request.system_prompt or DEFAULT_SYSTEM_PROMPT,
        history=request.history,
        tools=request.tools,
    )
    return parts.num_tokens


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# output


def format_agents_table(summary: dict) -> str:
    """Re-prefill and mean JCT as mean ± the 95% interval's half-width over the repeats; the rest pooled."""
    config, durations = summary["config"], summary["durations"]["all"]
    header = (
        f"{'found by':<10} {'policy':<10} {'re-prefill ± 95%':>17} {'/turn':>6} {'cut':>5} {'TTFT p50':>8} "
        f"{'p90':>6} {'JCT mean ± 95%':>15} {'p90':>6} {'queue':>6} {'pins c/e/f/d':>13} {'pinned max':>10}"
    )
    turns = "all" if config["turns"] is None else f"first {config['turns']}"
    lines = [
        f"{config['programs']} BFCL programs, {turns} turns ({config.get('user_turns', '?')} user turns), "
        f"{config['repeats']} repeats, arrivals {config['arrival_rate']:g}/s, time scale {config['time_scale']:g}; "
        f"tools {_f(durations['mean_s'], 2)} ± {_f(durations['sd_s'], 2)} s, slowest 10% "
        f"{_f(100 * (durations['slowest_10pct_share'] or 0), 0)}% of the delay; KV device + host "
        f"{2 * config['device_tier_bytes'] / 2**20:.0f} MiB of {config['expected_kv_bytes'] / 2**20:.0f}, pins "
        f"{_tier_budgets(summary)}",
        header,
        "-" * len(header),
    ]
    for identify, policies in (("program_id", summary["policies"]), ("prefix", summary["by_prefix"]["policies"])):
        for name, row in policies.items():
            cut = row.get("reprefill_cut_vs_lru")
            pins = f"{row['pins_created']}/{row['pins_expired']}/{row['pins_force_released']}/{row['pins_displaced']}"
            lines.append(
                f"{identify:<10} {name:<10} {_pm(row, 'reprefill_tokens', 0):>17} "
                f"{_f(row['reprefill_tokens_per_turn'], 0):>6} "
                f"{'-' if cut is None else f'{cut:.0%}':>5} {_f(row['ttft_p50_s'], 2):>8} "
                f"{_f(row['ttft_p90_s'], 2):>6} {_pm(row, 'jct_mean_s', 1):>15} {_f(row['jct_p90_s'], 1):>6} "
                f"{_f(row['queue_delay_mean_s'], 2):>6} {pins:>13} {row['pinned_bytes_max'] / 2**20:>9.0f}M"
            )
    if "noise" in summary:
        spreads = ", ".join(
            f"{name} {_f(100 * (row['reprefill_tokens_rel_diff'] or 0), 0)}% / "
            f"{_f(100 * (row['jct_mean_s_rel_diff'] or 0), 0)}%"
            for name, row in summary["noise"].items()
        )
        lines.append(f"noise, each policy by program_id vs by prefix (the same work), re-prefill / mean JCT: {spreads}")
    for identify, check in summary["targets"].items():
        lines.append(f"targets ({identify}): " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in check.items()))
    return "\n".join(lines)


def _tier_budgets(summary: dict) -> str:
    """What pins may hold, per tier ("device 91 + cpu 146 MiB"); a summary from before the per-tier key: the
    device tier's."""
    tiers = summary.get("pin_budget_bytes_by_tier") or {PIN_TIER: summary["pin_budget_bytes"] or 0}
    return " + ".join(f"{name} {nbytes / 2**20:.0f}" for name, nbytes in tiers.items()) + " MiB"


def _pm(row: dict, figure: str, digits: int) -> str:
    """'mean ± half-width' of a figure's 95% interval over the repeats ('mean' alone when it has none)."""
    mean, ci = row.get(figure), row.get(f"{figure}_ci")
    if mean is None or ci is None:
        return _f(mean, digits)
    return f"{mean:.{digits}f} ± {(ci[1] - ci[0]) / 2:.{digits}f}"


def _f(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot_agents(summary: dict, path) -> None:
    """Job completion time per policy: each program's JCT (every repeat's) as a dot, the mean over repeats as a
    bar with its 95% interval; with and without program_id."""
    from ragcache.bench.serve_plot import pyplot

    plt = pyplot()
    groups = [("program_id", summary["policies"]), ("prefix", summary["by_prefix"]["policies"])]
    groups = [(label, policies) for label, policies in groups if policies]
    figure, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False, sharey=True)
    for axis, (label, policies) in zip(axes[0], groups):
        names = list(policies)
        means = [policies[n]["jct_mean_s"] for n in names]
        halves = [(policies[n]["jct_mean_s_ci"][1] - policies[n]["jct_mean_s_ci"][0]) / 2 for n in names]
        axis.bar(names, means, yerr=halves, capsize=6, color="#9ab", label="mean, 95% interval over repeats")
        for x, name in enumerate(names):
            axis.plot([x] * len(policies[name]["jct_s"]), policies[name]["jct_s"], "k.", alpha=0.6)
        axis.set(title=f"programs identified by {label}", ylabel="job completion time, s")
        axis.grid(axis="y", alpha=0.3)
    config = summary["config"]
    figure.suptitle(
        f"ragcache bench agents: {config['programs']} BFCL programs, {config.get('user_turns', '?')} user turns, "
        f"{config['repeats']} repeats, {config['arrival_rate']:g} programs/s, time scale {config['time_scale']:g}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
