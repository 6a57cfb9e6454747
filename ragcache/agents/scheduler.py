"""ProgramScheduler: program-level first-come-first-serve as the engine's admission order.

An agent program alternates turns with tool calls. If its next turn queues behind programs
that arrived after it, the program stalls on every turn and its KV sits (pinned or not)
while it waits: Continuum's scheduling bubbles. So when the step scheduler admits the next
waiting sequence, among them:

    1. a starved new turn: a plain request or a new program's first turn that continuing
       turns have overtaken max_bypass times, or that has waited max_wait_s: oldest first
    2. a turn of a program already in flight: by the program's first arrival
    3. a plain request or a new program's first turn: by its own arrival

"In flight": the program had a turn before and neither ended nor sat idle program_idle_s.
Many turns run at once (the engine batches them); this only orders admissions.

    ticket = scheduler.arrive(tenant, program_id)     # when the request arrives (any thread)
    engine.submit(request, sink, ticket=ticket)       # the engine's scheduler calls pick / admitted
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from ragcache.agents.cdf import quantile

if TYPE_CHECKING:
    from ragcache.agents.pins import Arrival
    from ragcache.engine.scheduler import AdmissionOrder


@dataclass(frozen=True)
class SchedulerConfig:
    max_bypass: int = 8  # a new turn is overtaken by later continuing turns at most this many times
    max_wait_s: float = 10.0  # ... and goes first once it has waited this long
    program_idle_s: float = 600.0  # a program without a turn for this long counts as new again
    max_programs: int = 10_000  # programs remembered; the least recently active are forgotten first
    wait_window: int = 1024  # waits kept for stats

    def __post_init__(self) -> None:
        if self.max_bypass < 0 or self.max_wait_s <= 0 or self.program_idle_s <= 0:
            raise ValueError(
                f"need max_bypass >= 0, max_wait_s > 0 and program_idle_s > 0, got "
                f"{self.max_bypass}, {self.max_wait_s}, {self.program_idle_s}"
            )
        if self.max_programs < 1 or self.wait_window < 1:
            raise ValueError("max_programs and wait_window must be >= 1")


@dataclass(eq=False)  # tickets are compared by identity
class Ticket:
    """One turn's place in the admission order; the engine carries it on the turn's sequence."""

    tenant: str
    program_id: str | None
    seq: int  # arrival order
    rank: int  # the program's first arrival (its own seq for a new turn)
    continuing: bool  # a turn of a program already in flight
    arrived_s: float
    bypassed: int = 0  # later continuing turns admitted ahead of this one
    forced: bool = False  # admitted ahead of continuing turns because it had waited long enough
    waited_s: float | None = None  # set at admission
    arrival: Arrival | None = None  # the pins' Arrival of this turn (agents coordinator)


class Waiting(Protocol):
    ticket: Ticket | None


W = TypeVar("W", bound=Waiting)


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
    cancelled: int = 0  # turns that went away before admission


class ProgramScheduler:
    """The AdmissionOrder of ragcache.engine.scheduler: pick / admitted / dropped on the engine thread."""

    def __init__(
        self, config: SchedulerConfig = SchedulerConfig(), clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.clock = clock
        self.counters = SchedulerCounters()
        self._waits_s: dict[str, deque[float]] = {
            kind: deque(maxlen=config.wait_window) for kind in ("continuing", "new")
        }
        self._seq = itertools.count()
        self._programs: OrderedDict[tuple[str, str], _Program] = OrderedDict()
        self._waiting = 0
        self._lock = threading.RLock()  # admitted() may ticket a waiter (arrive) while holding it

    def arrive(self, tenant: str, program_id: str | None) -> Ticket:
        """A turn arrived (program_id None: a plain request); its ticket. Any thread."""
        with self._lock:
            now, seq = self.clock(), next(self._seq)
            self._waiting += 1
            if program_id is None:
                return Ticket(tenant, None, seq, seq, False, now)
            ref = (tenant, program_id)
            program = self._programs.get(ref)
            continuing = program is not None and now - program.last_seen_s < self.config.program_idle_s
            if program is None or not continuing:
                program = self._programs[ref] = _Program(seq, now)
                while len(self._programs) > self.config.max_programs:
                    self._programs.popitem(last=False)
            program.last_seen_s = now
            self._programs.move_to_end(ref)
            return Ticket(tenant, program_id, seq, program.first_seq, continuing, now)

    def pick(self, waiting: list[W]) -> W:
        """The next to admit among waiting (each with a ticket from arrive())."""
        now = self.clock()
        tickets = [self._ticket(item) for item in waiting]
        starved = [
            t
            for t in tickets
            if not t.continuing
            and (t.bypassed >= self.config.max_bypass or now - t.arrived_s >= self.config.max_wait_s)
        ]
        if starved:
            chosen = min(starved, key=lambda t: t.seq)
            chosen.forced = any(t.continuing for t in tickets)
        else:
            chosen = min(tickets, key=lambda t: (not t.continuing, t.rank, t.seq))
        return waiting[tickets.index(chosen)]

    def admitted(self, item: Waiting, waiting: Iterable[Waiting]) -> None:
        """item was admitted; the new turns that arrived before it and still wait were bypassed."""
        ticket = self._ticket(item)
        with self._lock:
            self._waiting -= 1
            ticket.waited_s = self.clock() - ticket.arrived_s
            if ticket.continuing:
                for other in map(self._ticket, waiting):
                    if not other.continuing and other.seq < ticket.seq:
                        other.bypassed += 1
                        self.counters.bypasses += 1
                self.counters.admitted_continuing += 1
            else:
                self.counters.admitted_new += 1
            self.counters.forced += ticket.forced
            self._waits_s["continuing" if ticket.continuing else "new"].append(ticket.waited_s)

    def dropped(self, item: Waiting) -> None:
        """item went away before admission (its client disconnected)."""
        self.abandon(item.ticket)

    def abandon(self, ticket: Ticket | None) -> None:
        """The ticket's turn will never be admitted (cancelled, or refused before reaching the engine)."""
        with self._lock:
            if ticket is not None:  # without a ticket it never counted as waiting
                self._waiting -= 1
            self.counters.cancelled += 1

    def forget(self, tenant: str, program_id: str) -> None:
        """The program ended: its next turn, if any, counts as a new program's."""
        with self._lock:
            self._programs.pop((tenant, program_id), None)

    @property
    def depth(self) -> int:
        """Turns that arrived and are not admitted yet."""
        return self._waiting

    def stats(self) -> dict:
        with self._lock:
            waits = {kind: _summary(list(values)) for kind, values in self._waits_s.items()}
            c = self.counters
            return {
                "depth": self._waiting,
                "programs": len(self._programs),
                "admitted": {"continuing": c.admitted_continuing, "new": c.admitted_new},
                "bypasses": c.bypasses,
                "forced": c.forced,
                "cancelled": c.cancelled,
                "wait_s": waits,
            }

    def _ticket(self, item: Waiting) -> Ticket:
        if item.ticket is None:  # submitted without arriving here (e.g. the engine used directly)
            item.ticket = self.arrive("", None)
        return item.ticket


def _summary(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {
        "count": len(values),
        "mean": sum(values) / len(values),
        "p50": quantile(ordered, 0.5),
        "p90": quantile(ordered, 0.9),
        "max": ordered[-1],
    }


if TYPE_CHECKING:  # the type checker holds ProgramScheduler to the engine's AdmissionOrder contract
    _order: type[AdmissionOrder] = ProgramScheduler
