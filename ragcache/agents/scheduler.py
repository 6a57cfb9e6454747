"""ProgramScheduler: program-level first-come-first-serve in front of the one engine worker.

An agent program alternates turns with tool calls. If its next turn queues behind programs
that arrived after it, the program stalls on every turn and its KV sits (pinned or not)
while it waits: Continuum's scheduling bubbles. So among waiting turns:

    1. a starved new turn: a plain request or a new program's first turn that continuing
       turns have overtaken max_bypass times, or that has waited max_wait_s: oldest first
    2. a turn of a program already in flight: by the program's first arrival
    3. a plain request or a new program's first turn: by its own arrival

"In flight": the program had a turn before and neither ended nor sat idle program_idle_s.
One turn is admitted at a time (the engine serves one request at a time); the next is
picked when it leaves. Runs on one asyncio event loop; not thread-safe.

    async with scheduler.turn(tenant, program_id) as admission:   # program_id None: a plain request
        result = await run_on_the_worker(...)
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from ragcache.agents.cdf import quantile


@dataclass(frozen=True)
class SchedulerConfig:
    max_bypass: int = 8  # a new turn is overtaken by later continuing turns at most this many times
    max_wait_s: float = 10.0  # ... and goes first once it has waited this long
    program_idle_s: float = 600.0  # a program without a turn for this long counts as new again
    max_programs: int = 10_000  # programs remembered; the least recently active are forgotten first
    wait_window: int = 1024  # waits kept for stats

    def __post_init__(self) -> None:
        if self.max_bypass < 0 or self.max_wait_s <= 0 or self.program_idle_s <= 0:
            raise ValueError(f"need max_bypass >= 0, max_wait_s > 0 and program_idle_s > 0, got "
                             f"{self.max_bypass}, {self.max_wait_s}, {self.program_idle_s}")
        if self.max_programs < 1 or self.wait_window < 1:
            raise ValueError("max_programs and wait_window must be >= 1")


@dataclass(frozen=True)
class Admission:
    continuing: bool  # a turn of a program already in flight
    waited_s: float
    bypassed: int  # later continuing turns admitted ahead of this one
    forced: bool  # admitted ahead of continuing turns because it had waited long enough


@dataclass(eq=False)  # waiters are compared by identity
class _Waiter:
    seq: int  # arrival order
    rank: int  # the program's first arrival (its own seq for a new turn)
    continuing: bool
    arrived_s: float
    future: asyncio.Future
    bypassed: int = 0
    forced: bool = False


@dataclass
class _Program:
    first_seq: int
    last_seen_s: float


@dataclass
class SchedulerCounters:
    admitted_continuing: int = 0
    admitted_new: int = 0
    bypasses: int = 0  # times a continuing turn went ahead of an earlier new one
    forced: int = 0  # new turns admitted by the starvation bound
    cancelled: int = 0  # waiters that went away before their turn


class ProgramScheduler:
    def __init__(self, config: SchedulerConfig = SchedulerConfig(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.counters = SchedulerCounters()
        self._waits_s = {kind: deque(maxlen=config.wait_window) for kind in ("continuing", "new")}
        self._seq = itertools.count()
        self._programs: OrderedDict[tuple[str, str], _Program] = OrderedDict()
        self._waiting: list[_Waiter] = []
        self._busy = False

    @asynccontextmanager
    async def turn(self, tenant: str, program_id: str | None) -> AsyncIterator[Admission]:
        """Wait for this turn's admission; hold it for the body of the `async with`."""
        waiter = self._arrive(tenant, program_id)
        if not self._busy and not self._waiting:
            self._busy = True
            waiter.future.set_result(None)
        else:
            self._waiting.append(waiter)
            try:
                await waiter.future
            except asyncio.CancelledError:
                self._leave(waiter)
                raise
        admission = Admission(waiter.continuing, self.clock() - waiter.arrived_s, waiter.bypassed, waiter.forced)
        self._count(admission)
        try:
            yield admission
        finally:
            self._busy = False
            self._dispatch()

    def forget(self, tenant: str, program_id: str) -> None:
        """The program ended: its next turn, if any, counts as a new program's."""
        self._programs.pop((tenant, program_id), None)

    @property
    def depth(self) -> int:
        """Turns waiting for admission (not counting the one admitted)."""
        return len(self._waiting)

    def stats(self) -> dict:
        waits = {kind: _summary(list(values)) for kind, values in self._waits_s.items()}
        c = self.counters
        return {
            "depth": len(self._waiting),
            "waiting_continuing": sum(w.continuing for w in self._waiting),
            "waiting_new": sum(not w.continuing for w in self._waiting),
            "busy": self._busy,
            "programs": len(self._programs),
            "admitted": {"continuing": c.admitted_continuing, "new": c.admitted_new},
            "bypasses": c.bypasses,
            "forced": c.forced,
            "cancelled": c.cancelled,
            "wait_s": waits,
        }

    # internals

    def _arrive(self, tenant: str, program_id: str | None) -> _Waiter:
        now, seq = self.clock(), next(self._seq)
        future = asyncio.get_running_loop().create_future()
        if program_id is None:
            return _Waiter(seq, seq, False, now, future)
        ref = (tenant, program_id)
        program = self._programs.get(ref)
        continuing = program is not None and now - program.last_seen_s < self.config.program_idle_s
        if not continuing:
            program = self._programs[ref] = _Program(seq, now)
            while len(self._programs) > self.config.max_programs:
                self._programs.popitem(last=False)
        program.last_seen_s = now
        self._programs.move_to_end(ref)
        return _Waiter(seq, program.first_seq, continuing, now, future)

    def _dispatch(self) -> None:
        """Admit the next waiter, if the worker is free and anyone waits."""
        if self._busy or not self._waiting:
            return
        now = self.clock()
        starved = [w for w in self._waiting if not w.continuing
                   and (w.bypassed >= self.config.max_bypass or now - w.arrived_s >= self.config.max_wait_s)]
        if starved:
            chosen = min(starved, key=lambda w: w.seq)
            chosen.forced = any(w.continuing for w in self._waiting)
        else:
            chosen = min(self._waiting, key=lambda w: (not w.continuing, w.rank, w.seq))
        self._waiting.remove(chosen)
        if chosen.continuing:
            for waiter in self._waiting:
                if not waiter.continuing and waiter.seq < chosen.seq:
                    waiter.bypassed += 1
                    self.counters.bypasses += 1
        self._busy = True
        chosen.future.set_result(None)

    def _leave(self, waiter: _Waiter) -> None:
        """A waiter was cancelled: drop it, or hand on the admission it had just been given."""
        self.counters.cancelled += 1
        if waiter in self._waiting:
            self._waiting.remove(waiter)
        elif waiter.future.done() and not waiter.future.cancelled():
            self._busy = False
            self._dispatch()

    def _count(self, admission: Admission) -> None:
        kind = "continuing" if admission.continuing else "new"
        if admission.continuing:
            self.counters.admitted_continuing += 1
        else:
            self.counters.admitted_new += 1
        self.counters.forced += admission.forced
        self._waits_s[kind].append(admission.waited_s)


def _summary(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {"count": len(values), "mean": sum(values) / len(values), "p50": quantile(ordered, 0.5),
            "p90": quantile(ordered, 0.9), "max": ordered[-1]}
