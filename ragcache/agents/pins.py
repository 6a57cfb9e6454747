"""ProgramPins: each agent program's path in the prefix cache pinned while its tool runs, within a budget.

A program between two turns, as this class sees it (one record per (tenant, program id)):

    turn_finished(path, tool) the turn's KV is stored as path (storage/prefix.py) and it ended in a
                              call to tool: pin_for_tool pins the path for τ* (the predictor) if
                              that pays and fits
    tool_started(tool)        a client event: the same, for a turn that did not end in a tool call
    tool_ended()              a client event: the tool's duration is recorded; the pin stays (at
                              least resume_grace_s more) for the next turn, which is on its way
    turn_arrived()            the next turn: the duration is recorded unless tool_ended did; the
                              pin is released, and counted a hit if it still held
    end() / is_last_step      the program is over: release and forget it

Policies (PinConfig.policy), what pin_for_tool does with a tool call:

    tool_ttl    τ* from the tool's duration CDF (predictor.py), only when it pays; a pin that does
                not fit displaces less valuable ones
    fixed_ttl   every call pins for fixed_ttl_s whatever the tool or its value (the flat 2 s pin
                of Continuum's released code); within the budget, first come first served: a pin
                that does not fit is refused and displaces nothing (there is no value to rank by)
    none        never pin: the store's eviction policy alone decides (durations are still recorded)

Where a pin is held: in the fastest local tier whose pin budget has room (_place). A pin
keeps the program's KV from being dropped while its tool runs; the top tier is where the
next turn wants it, and a pin held lower (the CPU tier when the device's pin budget is
full) is brought back up by the prefetcher before the tool is predicted to return.

Budget (budget.py): program pins hold at most budget_share of the top tier's bytes and
lower_budget_share of each local tier below it, enforced by reclaim(): when no tier has
room, a tool_ttl pin force-releases held pins in a tier, least valuable per byte first, only
if it is worth more than all of them together (counted as reclaimed, and as displaced); a
released path is unpinned, so the store may evict or demote its blocks as it would any
entry. The prefix cache calls reclaim() too, when a live request's new blocks need more of
the top tier than pins leave unpinned (its reclaimer).

Deadlock freedom: a live request writes its KV only to the top tier. budget_share < 1
leaves it (1 − share) of its bytes that pins never hold, and reclaim() force-releases pins,
least valuable first, when a live request needs more room than is unpinned. The tiers
below take only demoted, pinned and prefetched entries, none of which a request waits on:
there a larger share (lower_budget_share, 0.8 by default) only means less room for what
the top tier demotes. Measured (README, "Agent pins on the prefix cache"): with the CPU
tier's pins at 0.8 instead of 0.5, tool_ttl re-prefilled half what LRU did, not 6% less.

Prefetch (KVFlow: an agent's next step is predictable): a program whose path is not held
on the top tier while its tool runs (pinned lower, not worth pinning, over budget, or its
pin expired) has its path brought back to the top tier from CPU or Redis once the tool has
run its predicted median duration, less prefetch_lead_s, so the next turn finds it there;
prefetched_tokens counts the tokens that had to move.

Renewal (tool_ttl): a pin about to run out while its tool still runs is judged again
(renew_expiring): τ* over the durations beyond the time waited, P(d <= τ | d > waited),
memory at the budget's pressure then; held on when that pays, left to expire when not.

Expiry is the store's: release_expired demotes an expired pin's blocks one tier down (the
bottom local tier keeps them when nothing is below it); this class notices a pin past its
expires_s and counts it as expired.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from ragcache.agents.budget import HeldPin, PinBudget, ProgramRef
from ragcache.agents.predictor import ToolDurationPredictor, TTLChoice
from ragcache.agents.profile import PrefillProfile

if TYPE_CHECKING:
    from ragcache.storage.base import PrefixCache
    from ragcache.storage.prefix import CachedPath


POLICIES = ("tool_ttl", "fixed_ttl", "none")


@dataclass(frozen=True)
class PinConfig:
    budget_share: float = 0.5  # of the top (device) tier's max_bytes that program pins may hold
    lower_budget_share: float = 0.8  # of each local tier below the top: no live request writes there
    eta: float = 1.0  # Continuum's η: how much of the queueing delay a held pin saves
    memory_weight: float = 0.25  # seconds of cost per second an average-sized program's KV is held with
    # the pin budget full (scaled by how full it would be: _mem_ratio). The cost model's one free
    # parameter: bench agents (program_id, 3 repeats) re-prefilled 4,853 / 3,269 / 4,227 tokens at
    # 0 / 0.25 / 1.0 (README, "Agent pins on the prefix cache")
    resume_grace_s: float = 2.0  # after tool_end, the pin holds at least this long for the next turn
    delay_window: int = 64  # queueing delays of returning programs averaged into T
    size_window: int = 256  # program KV sizes averaged into M
    max_programs: int = 10_000  # programs remembered between turns; the least recently active go first
    policy: str = "tool_ttl"  # one of POLICIES (see the module docstring)
    fixed_ttl_s: float = 2.0  # the pin of every tool call under policy "fixed_ttl"
    prefetch: bool = True  # bring an unheld path back before its tool's predicted return
    prefetch_lead_s: float = 0.2  # how long before the predicted return

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {self.policy!r}")
        if not self.fixed_ttl_s > 0:
            raise ValueError(f"fixed_ttl_s must be positive, got {self.fixed_ttl_s}")
        if not 0.0 < self.budget_share < 1.0:
            raise ValueError(
                f"budget_share must be in (0, 1) (a whole tier pinned could stall the queue), got {self.budget_share}"
            )
        if not 0.0 < self.lower_budget_share < 1.0:
            raise ValueError(
                "lower_budget_share must be in (0, 1) (a lower tier wholly pinned keeps nothing demoted to it), "
                f"got {self.lower_budget_share}"
            )
        if min(self.eta, self.memory_weight, self.resume_grace_s) < 0:
            raise ValueError(
                f"eta, memory_weight and resume_grace_s must be >= 0, got "
                f"{self.eta}, {self.memory_weight}, {self.resume_grace_s}"
            )
        if min(self.delay_window, self.size_window, self.max_programs) < 1:
            raise ValueError("delay_window, size_window and max_programs must be >= 1")


@dataclass(frozen=True)
class PinDecision:
    """What pin_for_tool did. reason: "pinned", "not_worth_it" (τ* = 0), "not_local" (no local
    tier holds the key), "over_budget" (it would not fit, or is worth less than what it displaces),
    "off" (policy "none")."""

    pinned: bool
    reason: str
    ttl_s: float
    value_s: float
    source: str  # the predictor's CDF: "tool", "global" or "default"; "fixed" or "off" by policy
    tier: str | None = None
    displaced: int = 0  # pins unpinned to make room for this one


@dataclass(frozen=True)
class Arrival:
    """What a program's next turn found when it arrived."""

    returning: bool  # the program was waiting on a tool call
    pin_held: bool  # its pin still held: its KV is where the last turn left it
    tool: str | None
    tool_duration_s: float | None  # recorded now (None: no tool, or tool_ended recorded it)


@dataclass
class PinCounters:
    created: int = 0
    returned_held: int = 0  # the next turn arrived while the pin held: a hit
    returned_lost: int = 0  # it arrived after the pin expired, was displaced or was reclaimed
    returned_unpinned: int = 0  # it followed a tool call that was never pinned
    expired: int = 0
    displaced: int = 0  # force-released for a more valuable pin (also counted in reclaimed)
    reclaimed: int = 0  # force-released by reclaim(): the pin budget or a live request needed the room
    released: int = 0  # by end, is_last_step, a newer tool call, forgetting or shutdown
    not_worth_it: int = 0
    not_local: int = 0
    over_budget: int = 0
    extended: int = 0  # pins held on past tool_end for the next turn
    off: int = 0  # tool calls not pinned because the policy is "none"
    renewed: int = 0  # pins running out while their tool ran, held on for a τ* judged then (tool_ttl)
    prefetches: int = 0  # paths brought back to the top tier before their tool's predicted return
    prefetched_tokens: int = 0  # tokens those prefetches moved up (already-resident blocks not counted)


@dataclass
class _Program:
    """A program between turns (internal, mutable under the lock)."""

    path: CachedPath | None = None
    nbytes: int = 0
    num_tokens: int = 0
    tool: str | None = None  # the last tool call since the program's last turn
    tool_started_s: float | None = None  # None once the tool returned
    predicted_ttl_s: float | None = None
    pinned: bool = False  # a pin was made for this tool call (it may be gone since)
    prefetch_at_s: float | None = None  # when to bring the path back, if it is not held then


class ProgramPins:
    """Pins, budgets and the per-program bookkeeping around them. Thread-safe."""

    def __init__(
        self,
        cache: PrefixCache,
        predictor: ToolDurationPredictor,
        profile: PrefillProfile,
        config: PinConfig = PinConfig(),
    ) -> None:
        if not cache.room():
            raise ValueError("program pins need a store with at least one local (memory) tier")
        self.cache = cache
        self.predictor = predictor
        self.profile = profile
        self.config = config
        self.clock = cache.clock  # pin expiries are on the store's clock
        self.counters = PinCounters()
        self._programs: OrderedDict[ProgramRef, _Program] = OrderedDict()
        self.budget = PinBudget(cache.room, predictor, config.budget_share, config.lower_budget_share)
        self._delays: deque[float] = deque(maxlen=config.delay_window)
        self._sizes: deque[int] = deque(maxlen=config.size_window)
        self._lock = threading.RLock()

    # the program's life

    def turn_arrived(self, tenant: str, program_id: str) -> Arrival:
        """The program's next turn arrived: record its tool's duration, release its pin."""
        with self._lock:
            self._sweep()
            ref = (tenant, program_id)
            program = self._programs.get(ref)
            if program is None:
                return Arrival(False, False, None, None)
            tool, duration = program.tool, self.tool_returned(tenant, program_id)
            held = self._release(ref, "returned")
            if held:
                self.counters.returned_held += 1
            elif program.pinned:
                self.counters.returned_lost += 1
            elif tool is not None:
                self.counters.returned_unpinned += 1
            program.tool, program.pinned, program.predicted_ttl_s, program.prefetch_at_s = None, False, None, None
            return Arrival(tool is not None, held, tool, duration)

    def turn_finished(
        self,
        tenant: str,
        program_id: str,
        path: CachedPath,
        nbytes: int,
        num_tokens: int,
        tool: str | None = None,
        is_last_step: bool = False,
    ) -> PinDecision | None:
        """The turn's KV is stored as path; tool: the tool it called (finish_reason "tool_calls"), if any."""
        with self._lock:
            if is_last_step:
                self.end(tenant, program_id)
                return None
            self._set_kv(self._program((tenant, program_id)), path, nbytes, num_tokens)
            return self.pin_for_tool(tenant, program_id, path, tool, nbytes, num_tokens) if tool else None

    def tool_started(self, tenant: str, program_id: str, tool: str) -> PinDecision | None:
        """A client says tool starts now. The same tool already pending (the turn ended in a call to
        it) only restarts its clock; otherwise the program's latest KV is pinned for it (None: no
        KV known yet, or nothing new to pin)."""
        with self._lock:
            self._sweep()
            ref = (tenant, program_id)
            program = self._program(ref)
            if program.tool == tool and program.tool_started_s is not None:
                program.tool_started_s = self.clock()
                return None
            if program.path is None:
                program.tool, program.tool_started_s = tool, self.clock()
                return None
            return self.pin_for_tool(tenant, program_id, program.path, tool, program.nbytes, program.num_tokens)

    def tool_returned(self, tenant: str, program_id: str) -> float | None:
        """Record the pending tool's duration (now − its start) in the predictor; None if none is pending."""
        with self._lock:
            program = self._programs.get((tenant, program_id))
            if program is None or program.tool is None or program.tool_started_s is None:
                return None
            duration = max(0.0, self.clock() - program.tool_started_s)
            self.predictor.record(tenant, program.tool, duration, program.predicted_ttl_s)
            program.tool_started_s, program.prefetch_at_s = None, None
            return duration

    def tool_ended(self, tenant: str, program_id: str) -> float | None:
        """A client says the tool returned: record its duration; keep the pin resume_grace_s at least."""
        with self._lock:
            self._sweep()
            duration = self.tool_returned(tenant, program_id)
            pin = self.budget.held.get((tenant, program_id))
            now = self.clock()
            grace_s = self.config.resume_grace_s
            if pin is not None and grace_s > 0 and pin.handle.expires_s - now < grace_s:
                handle = self.cache.extend_pin(pin.handle, grace_s)
                if handle is not None:
                    self.budget.held[pin.ref] = replace(pin, handle=handle, ttl_s=handle.expires_s - pin.pinned_s)
                    self.counters.extended += 1
            return duration

    def end(self, tenant: str, program_id: str) -> bool:
        """The program is over (is_last_step, or an end event): release its pin and forget it."""
        with self._lock:
            held = self._release((tenant, program_id), "released")
            self._programs.pop((tenant, program_id), None)
            return held

    # pins

    def pin_for_tool(
        self, tenant: str, program_id: str, path: CachedPath, tool: str, nbytes: int, num_tokens: int
    ) -> PinDecision:
        """A call of tool starts now: pin path (the program's KV, nbytes for num_tokens) for τ*, within the budget.

        Any pin the program still holds is released first: the new call supersedes it."""
        with self._lock:
            self._sweep()
            ref = (tenant, program_id)
            program = self._program(ref)
            self._release(ref, "released")
            self._set_kv(program, path, nbytes, num_tokens)
            now = self.clock()
            program.tool, program.tool_started_s, program.pinned = tool, now, False
            program.prefetch_at_s = self._prefetch_time(tenant, tool, now)
            if self.config.policy == "none":
                self.counters.off += 1
                return PinDecision(False, "off", 0.0, 0.0, "off")
            reload_s, mem_ratio = self.profile.reload_s(num_tokens, nbytes), self._mem_ratio(nbytes)
            choice = self._choose(tenant, tool, reload_s, mem_ratio)
            program.predicted_ttl_s = choice.ttl_s or None
            decision = PinDecision(False, "not_worth_it", choice.ttl_s, choice.value_s, choice.source)
            if choice.ttl_s <= 0:
                self.counters.not_worth_it += 1
                return decision
            tier, victims = self._place(nbytes, choice.value_s, now)
            if tier is None:
                self.counters.over_budget += 1
                return replace(decision, reason="over_budget")
            handle = self.cache.pin_path(path, choice.ttl_s, tier)
            if handle is None:
                self.counters.not_local += 1
                return replace(decision, reason="not_local", tier=tier)
            for victim in victims:
                self._release(victim.ref, "displaced")
            self.budget.add(
                HeldPin(tenant, program_id, tool, handle, nbytes, choice.ttl_s, now, choice.saving_s, mem_ratio)
            )
            program.pinned = True
            self.counters.created += 1
            return PinDecision(True, "pinned", choice.ttl_s, choice.value_s, choice.source, handle.tier, len(victims))

    def renew_expiring(self, within_s: float) -> int:
        """tool_ttl: pins that run out within within_s while their tool still runs are held on for the τ* the
        predictor judges now, on the durations beyond the time the tool will have run when the pin runs out
        and the budget's pressure now (none that pays: let it expire). Returns how many were renewed; the
        coordinator calls it every prefetch interval."""
        if self.config.policy != "tool_ttl":
            return 0
        with self._lock:
            self._sweep()
            now, renewed = self.clock(), 0
            for ref, pin in list(self.budget.held.items()):
                program = self._programs.get(ref)
                if pin.handle.expires_s - now > within_s or program is None or program.tool_started_s is None:
                    continue
                running_s = pin.handle.expires_s - program.tool_started_s  # how long it will have run by then
                reload_s = self.profile.reload_s(program.num_tokens, pin.nbytes)
                mem_ratio = self._mem_ratio(pin.nbytes, held=True)
                eta, delay_s = self.config.eta, self.queue_delay_s
                choice = self.predictor.choose(pin.tenant, pin.tool, reload_s, mem_ratio, delay_s, eta, running_s)
                until_s = program.tool_started_s + choice.ttl_s
                handle = self.cache.extend_pin(pin.handle, until_s - now) if choice.ttl_s > running_s else None
                if handle is None:
                    continue
                self.budget.held[ref] = replace(pin, handle=handle, ttl_s=handle.expires_s - pin.pinned_s)
                program.predicted_ttl_s = choice.ttl_s
                self.counters.renewed += 1
                renewed += 1
            return renewed

    def release(self, tenant: str, program_id: str, reason: str = "released") -> bool:
        """Unpin the program's KV now; True if its pin still held. reason: "released", "displaced" or "reclaimed"."""
        with self._lock:
            return self._release((tenant, program_id), reason)

    def reclaim(self, nbytes: int, tier: str | None = None) -> int:
        """Make sure nbytes of a local tier (the top one by default) are not pinned, force-releasing
        program pins there, least valuable per byte first. Returns how many were released.

        The scheduler's escape hatch: call it when the request at the head of the queue needs
        more room than the tier has unpinned, so pinned memory can never stall the queue."""
        with self._lock:
            self._sweep()
            name = tier if tier is not None else self.budget.tiers[0]
            unpinned = self.budget.unpinned_bytes(name)
            released = 0
            for pin in self.budget.by_value(name, self.clock()):
                if unpinned >= nbytes:
                    break
                self._release(pin.ref, "reclaimed")
                unpinned += pin.nbytes
                released += 1
            return released

    def observe_queue_delay(self, waited_s: float) -> None:
        """A returning program whose KV was not kept waited waited_s in the queue: feeds T."""
        with self._lock:
            self._delays.append(max(0.0, waited_s))

    @property
    def queue_delay_s(self) -> float:
        """T: the sliding mean of observe_queue_delay's samples (0 before any)."""
        return sum(self._delays) / len(self._delays) if self._delays else 0.0

    def close(self) -> int:
        """Release every pin (at shutdown); returns how many still held."""
        with self._lock:
            return sum(self._release(ref, "released") for ref in list(self.budget.held))

    # accounting

    def pinned_bytes(self, tier: str) -> int:
        with self._lock:
            return self.budget.pinned_bytes(tier)

    def budget_bytes(self, tier: str) -> int:
        return self.budget.budget_bytes(tier)

    def stats(self) -> dict:
        """The policy, active pins (program, tool, ttl, age, bytes, value), budget use per tier (with each
        tier's pinned-bytes high-water mark), counters (created, expired, displaced, reclaimed = force-released,
        ...), hit rate."""
        with self._lock:
            self._sweep()
            now = self.clock()
            c = self.counters
            returns = c.returned_held + c.returned_lost
            return {
                "policy": self.config.policy,
                "active_pins": self.budget.describe(now),
                "budget": self.budget.usage(),
                "counters": asdict(c),
                "pin_hit_rate": c.returned_held / returns if returns else None,
                "programs": len(self._programs),
                "queue_delay_s": self.queue_delay_s,
                "mean_program_bytes": sum(self._sizes) / len(self._sizes) if self._sizes else 0.0,
                "predictor": self.predictor.stats(),
            }

    # internals

    def _choose(self, tenant: str, tool: str, reload_s: float, mem_ratio: float) -> TTLChoice:
        """The pin's TTL as the policy says: the predictor's τ*, or fixed_ttl_s with the value the
        predictor gives that hold (kept with the pin: it orders reclaim; it never refuses the pin)."""
        eta, delay_s = self.config.eta, self.queue_delay_s
        if self.config.policy == "tool_ttl":
            return self.predictor.choose(tenant, tool, reload_s, mem_ratio, delay_s, eta)
        ttl_s = self.config.fixed_ttl_s
        value = self.predictor.value_of(tenant, tool, ttl_s, reload_s, mem_ratio, delay_s, eta)
        return replace(value, source="fixed")

    def _place(self, nbytes: int, value_s: float, now: float) -> tuple[str | None, list[HeldPin]]:
        """The local tier a new pin of nbytes goes to, and the pins it displaces there: the fastest tier whose
        budget has room for it as it is; else, under tool_ttl, the fastest where displacing less valuable pins
        makes room (a fixed pin displaces nothing: there is no value to rank by). (None, []): over budget.

        Why lower tiers: a pin's job is that the program's KV is not dropped while its tool runs, so it
        need not be re-prefilled; the top tier is where a turn wants it, and the prefetcher brings a pin
        held lower back up before the tool is predicted to return."""
        for tier in self.budget.tiers:
            if self.budget.room_for(tier, nbytes, value_s, now) == []:
                return tier, []
        if self.config.policy == "tool_ttl":
            for tier in self.budget.tiers:
                victims = self.budget.room_for(tier, nbytes, value_s, now)
                if victims is not None:
                    return tier, victims
        return None, []

    def _program(self, ref: ProgramRef) -> _Program:
        program = self._programs.get(ref)
        if program is None:
            program = self._programs[ref] = _Program()
            while len(self._programs) > self.config.max_programs:
                oldest = next(iter(self._programs))
                self._release(oldest, "released")
                del self._programs[oldest]
        self._programs.move_to_end(ref)
        return program

    def _set_kv(self, program: _Program, path: CachedPath, nbytes: int, num_tokens: int) -> None:
        if path != program.path:
            self._sizes.append(nbytes)
        program.path, program.nbytes, program.num_tokens = path, nbytes, num_tokens

    def _mem_ratio(self, nbytes: int, held: bool = False) -> float:
        """mem / M, priced by how full the pin budget would be: this program's KV against the mean of recent
        programs' (1.0 before any), times memory_weight, times the share of the local tiers' pin budget
        that pins would hold with this one (held: a pin already in the budget, counted once).

        Why the pressure factor: a second of pinned memory costs what the memory would do otherwise.
        While the budget is mostly free nothing waits for it (the budget keeps the rest of each tier
        for everything else), so a hold that covers the tool's tail is cheap; as the budget fills, each
        second held costs up to memory_weight, and τ* shortens toward the durations that return most.
        Without it, a CPU deployment, whose re-prefill costs about as much as a second of an average
        program's memory, never holds a pin longer than its fastest tool calls (bench agents measured
        TTLs of 0.05 s against tools of 2 s: every pin expired)."""
        mean = sum(self._sizes) / len(self._sizes) if self._sizes else 0.0
        budget = sum(self.budget.budget_bytes(name) for name in self.budget.tiers)
        pinned = sum(pin.nbytes for pin in self.budget.held.values())
        pressure = min(1.0, (pinned + (0 if held else nbytes)) / budget) if budget > 0 else 1.0
        return self.config.memory_weight * (nbytes / mean if mean > 0 else 1.0) * pressure

    def _release(self, ref: ProgramRef, reason: str) -> bool:
        pin = self.budget.held.pop(ref, None)
        if pin is None:
            return False
        held = self.cache.unpin_path(pin.handle)
        if reason in ("displaced", "reclaimed"):
            self.counters.reclaimed += 1
            self.counters.displaced += reason == "displaced"
        elif reason != "returned":
            self.counters.released += 1
        return held

    def _sweep(self) -> None:
        """Let the store demote entries whose pins expired, and forget those pins here."""
        self.cache.release_expired()
        self.counters.expired += len(self.budget.expired(self.clock()))

    def _prefetch_time(self, tenant: str, tool: str, now: float) -> float | None:
        """When to prefetch this call's path if it is not held then: the tool's median so far, less the lead."""
        cdf, _ = self.predictor.distribution(tenant, tool)
        if not self.config.prefetch or cdf is None:
            return None
        return now + max(0.0, cdf.quantile(0.5) - self.config.prefetch_lead_s)

    def due_prefetches(self) -> list[CachedPath]:
        """Paths whose tool is about to return and that no pin holds on the top tier: prefetch them (prefetch()
        each)."""
        with self._lock:
            self._sweep()
            now, due, top = self.clock(), [], self.budget.tiers[0]
            for ref, program in self._programs.items():
                at, pin = program.prefetch_at_s, self.budget.held.get(ref)
                if (
                    at is not None
                    and at <= now
                    and program.path is not None
                    and (pin is None or pin.handle.tier != top)
                ):
                    program.prefetch_at_s = None
                    due.append(program.path)
            return due

    def prefetch(self, path: CachedPath) -> int:
        """Bring path up to the top tier (store I/O: call it off the request path); the tokens moved."""
        moved = self.cache.promote(path)
        with self._lock:
            self.counters.prefetches += 1
            self.counters.prefetched_tokens += moved
        return moved
