"""ProgramCoordinator: the agents layer as the service runtime calls it, in four places.

    coordinator = ProgramCoordinator(store, profile, AgentConfig())

    async with coordinator.turn(tenant, program_id) as admission:    # every generation request
        result = await run_on_the_engine_worker(request)
    coordinator.finish(tenant, program_id, result.program_key, nbytes, num_tokens,
                       tool=called_tool, is_last_step=last)          # after a program's turn
    coordinator.event(tenant, program_id, "tool_start", "search")    # POST /v1/programs/{id}/events
    coordinator.close()                                              # at shutdown

turn() does the arrival bookkeeping before queueing (the tool's duration ends when the
next request arrives, not when it is admitted; the pin is released then) and holds the
program-level FCFS slot for its body. Everything but turn() is synchronous and quick.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Callable

from ragcache.agents.pins import PinConfig, PinDecision, ProgramPins
from ragcache.agents.predictor import PredictorConfig, ToolDurationPredictor
from ragcache.agents.profile import PrefillProfile
from ragcache.agents.scheduler import Admission, ProgramScheduler, SchedulerConfig

if TYPE_CHECKING:
    from ragcache.kv import ChunkKey
    from ragcache.storage.tiered import TieredStore

EVENT_TYPES = ("tool_start", "tool_end", "end")


@dataclass(frozen=True)
class AgentConfig:
    predictor: PredictorConfig = PredictorConfig()
    pins: PinConfig = PinConfig()
    scheduler: SchedulerConfig = SchedulerConfig()


class ProgramCoordinator:
    def __init__(self, store: TieredStore, profile: PrefillProfile, config: AgentConfig = AgentConfig(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        """clock: the scheduler's (waits); pins run on the store's clock, as its pin expiries do."""
        self.config = config
        self.predictor = ToolDurationPredictor(config.predictor)
        self.pins = ProgramPins(store, self.predictor, profile, config.pins)
        self.scheduler = ProgramScheduler(config.scheduler, clock)

    @asynccontextmanager
    async def turn(self, tenant: str, program_id: str | None, need_bytes: int = 0) -> AsyncIterator[Admission]:
        """Arrive (record the tool's duration, release the pin), wait for admission, hold it.

        need_bytes: room the request needs in the top local tier, when known; pins give way
        (least valuable first) if less than that is unpinned once it is admitted."""
        arrival = self.pins.turn_arrived(tenant, program_id) if program_id is not None else None
        async with self.scheduler.turn(tenant, program_id) as admission:
            if arrival is not None and arrival.returning and not arrival.pin_held:
                self.pins.observe_queue_delay(admission.waited_s)
            if need_bytes > 0:
                self.pins.reclaim(need_bytes)
            yield admission

    def finish(self, tenant: str, program_id: str, key: ChunkKey, nbytes: int, num_tokens: int,
               tool: str | None = None, is_last_step: bool = False) -> PinDecision | None:
        """A program's turn is done and its KV stored under key (Generation.program_key), nbytes
        for num_tokens. tool: the tool its answer called (finish_reason "tool_calls"), which
        pins the KV for that tool's TTL. is_last_step: the program is over; release, forget."""
        decision = self.pins.turn_finished(tenant, program_id, key, nbytes, num_tokens, tool, is_last_step)
        if is_last_step:
            self.scheduler.forget(tenant, program_id)
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
        """Release every pin; returns how many still held."""
        return self.pins.close()
