"""Agent programs: tool-aware KV pinning (Continuum's TTL cost model) and program-level scheduling.

predictor.py    ToolDurationPredictor: per (tenant, tool) duration CDFs -> TTL τ*
profile.py      PrefillProfile: reload(r) = min(prefill time for r's tokens, load time for its bytes)
pins.py         ProgramPins: pin a program's KV while its tool runs, within a budget per tier
budget.py       PinBudget: the pins held, their value now, which give way when a tier's share is full
scheduler.py    ProgramScheduler: program-level FCFS with a bounded wait for new programs
coordinator.py  ProgramCoordinator: the four calls the service runtime makes
"""

from ragcache.agents.budget import HeldPin, PinBudget
from ragcache.agents.coordinator import EVENT_TYPES, AgentConfig, ProgramCoordinator
from ragcache.agents.pins import Arrival, PinConfig, PinDecision, ProgramPins
from ragcache.agents.predictor import PredictorConfig, ToolDurationPredictor, TTLChoice
from ragcache.agents.profile import (
    LoadProfile,
    PrefillProfile,
    kv_bytes_per_token,
    measure_load_profile,
    measure_prefill_profile,
    stack_prefill_fn,
)
from ragcache.agents.scheduler import ProgramScheduler, SchedulerConfig, Ticket

__all__ = [
    "EVENT_TYPES",
    "AgentConfig",
    "Arrival",
    "HeldPin",
    "LoadProfile",
    "PinBudget",
    "PinConfig",
    "PinDecision",
    "PredictorConfig",
    "PrefillProfile",
    "ProgramCoordinator",
    "ProgramPins",
    "ProgramScheduler",
    "SchedulerConfig",
    "TTLChoice",
    "Ticket",
    "ToolDurationPredictor",
    "kv_bytes_per_token",
    "measure_load_profile",
    "measure_prefill_profile",
    "stack_prefill_fn",
]
