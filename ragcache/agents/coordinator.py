"""ProgramCoordinator: the agents layer as the service runtime calls it, in four places.

    engine = BlendEngine(loaded, store, config)
    coordinator = ProgramCoordinator(engine.prefix, profile, AgentConfig())
    engine.use_admission_order(coordinator.scheduler)                # admission order

    ticket = coordinator.arrive(tenant, program_id)                  # every generation request
    result = await the engine (submit(request, sink, ticket=ticket))
    coordinator.finish(ticket, result.prefix_path, nbytes, num_tokens,
                       tool=called_tool, is_last_step=last)          # after a program's turn
    coordinator.event(tenant, program_id, "tool_start", "search")    # POST /v1/programs/{id}/events
    coordinator.close()                                              # at shutdown

arrive() does the arrival bookkeeping (the tool's duration ends when the next request
arrives, not when it is admitted; the pin is released then) and takes the turn's ticket
in the program-level FCFS order the engine admits by. Everything here is synchronous and
quick, and safe from any thread. One daemon thread renews pins that run out while their tool
still runs, when holding on pays (pins.py), and prefetches the paths of programs whose
tool is about to return, off every request's path; close() stops it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ragcache.agents.pins import PinConfig, PinDecision, ProgramPins
from ragcache.agents.predictor import PredictorConfig, ToolDurationPredictor
from ragcache.agents.profile import PrefillProfile
from ragcache.agents.scheduler import ProgramScheduler, SchedulerConfig, Ticket

if TYPE_CHECKING:
    from ragcache.storage.base import PrefixCache
    from ragcache.storage.prefix import CachedPath

EVENT_TYPES = ("tool_start", "tool_end", "end")


@dataclass(frozen=True)
class AgentConfig:
    predictor: PredictorConfig = PredictorConfig()
    pins: PinConfig = PinConfig()
    scheduler: SchedulerConfig = SchedulerConfig()


class ProgramCoordinator:
    def __init__(
        self,
        cache: PrefixCache,
        profile: PrefillProfile,
        config: AgentConfig = AgentConfig(),
        clock: Callable[[], float] = time.monotonic,
        prefetch_interval_s: float = 0.05,
    ) -> None:
        """cache: the prefix cache whose paths are pinned (the engine's); clock: the scheduler's (waits);
        pins run on the store's clock, as its pin expiries do."""
        self.config = config
        self.predictor = ToolDurationPredictor(config.predictor)
        self.pins = ProgramPins(cache, self.predictor, profile, config.pins)
        self.scheduler = ProgramScheduler(config.scheduler, clock)
        cache.reclaimer = self.pins.reclaim  # a live request that needs pinned room gets it
        self._closed = threading.Event()
        self._prefetcher = threading.Thread(
            target=self._prefetch_loop, args=(prefetch_interval_s,), name="ragcache-agent-prefetch", daemon=True
        )
        self._prefetcher.start()

    @classmethod
    def measured(cls, cache: PrefixCache, stack, config: AgentConfig = AgentConfig()) -> ProgramCoordinator:
        """A coordinator whose reload-cost profile is measured now on the model's decoder stack (about 1 s)."""
        from ragcache.agents.profile import measure_prefill_profile, stack_prefill_fn

        profile = measure_prefill_profile(stack_prefill_fn(stack), (64, 256, 1024), repeats=1)
        return cls(cache, profile, config)

    def arrive(self, tenant: str, program_id: str | None) -> Ticket:
        """A generation request arrived: record its tool's duration, release its pin, take its ticket."""
        arrival = self.pins.turn_arrived(tenant, program_id) if program_id is not None else None
        ticket = self.scheduler.arrive(tenant, program_id)
        ticket.arrival = arrival
        return ticket

    def abandon(self, ticket: Ticket) -> None:
        """The turn never reached the engine (its request was refused): it no longer waits."""
        self.scheduler.abandon(ticket)

    def finish(
        self,
        ticket: Ticket,
        path: CachedPath | None,
        nbytes: int,
        num_tokens: int,
        tool: str | None = None,
        is_last_step: bool = False,
    ) -> PinDecision | None:
        """A turn is done. For a program's turn, its KV is stored as path (Generation.prefix_path),
        nbytes for num_tokens; tool: the tool its answer called (finish_reason "tool_calls"), which
        pins the KV for that tool's TTL; is_last_step: the program is over, release and forget.
        A returning program whose KV was not held feeds its queueing delay to the TTL model."""
        arrival = ticket.arrival
        if arrival is not None and arrival.returning and not arrival.pin_held and ticket.waited_s is not None:
            self.pins.observe_queue_delay(ticket.waited_s)
        if ticket.program_id is None or path is None:
            return None
        decision = self.pins.turn_finished(
            ticket.tenant, ticket.program_id, path, nbytes, num_tokens, tool, is_last_step
        )
        if is_last_step:
            self.scheduler.forget(ticket.tenant, ticket.program_id)
        return decision

    def event(self, tenant: str, program_id: str, type: str, tool: str | None = None) -> PinDecision | None:
        """A client's program event: "tool_start" (tool required), "tool_end" or "end".
        Unknown programs are fine (an event may outlive its program); a bad event is a ValueError."""
        if type == "tool_start":
            if not tool:
                raise ValueError("a tool_start event needs the tool's name")
            return self.pins.tool_started(tenant, program_id, tool)
        if type == "tool_end":
            self.pins.tool_ended(tenant, program_id)
        elif type == "end":
            self.pins.end(tenant, program_id)
            self.scheduler.forget(tenant, program_id)
        else:
            raise ValueError(f"event type must be one of {list(EVENT_TYPES)}, got {type!r}")
        return None

    def reclaim(self, nbytes: int, tier: str | None = None) -> int:
        """Unpin program KV until nbytes of the tier (top local one by default) are unpinned; returns pins released."""
        return self.pins.reclaim(nbytes, tier)

    def stats(self) -> dict:
        """For /admin/programs: the scheduler's queue and the pins (active pins, budget, hit rate, predictor)."""
        return {"scheduler": self.scheduler.stats(), "pins": self.pins.stats()}

    def close(self) -> int:
        """Stop prefetching, release every pin; returns how many still held."""
        self._closed.set()
        self._prefetcher.join()
        return self.pins.close()

    def _prefetch_loop(self, interval_s: float) -> None:
        while not self._closed.wait(interval_s):
            self.pins.renew_expiring(2 * interval_s)
            for path in self.pins.due_prefetches():
                self.pins.prefetch(path)
