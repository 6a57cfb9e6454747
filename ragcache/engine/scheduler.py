"""The step scheduler: which sequences run in the next batched pass, and how much of each.

Bookkeeping only (no tensors). Every step it plans, in this order:

    1. drop cancelled sequences, freeing their working KV;
    2. one decode token for every running sequence past its prompt, growing a full buffer
       by kv_block_tokens; when the budget cannot hold the growth, the most recently
       admitted sequence is preempted (its KV swapped to host memory) until it can;
    3. prefill work in admission order within step_tokens (decode tokens count against it,
       as in Sarathi-Serve): each prompt gets as big a next piece as fits (prefill.py: a
       blend run's pieces cost their share of the layers), so a long prefill spreads over
       several steps while decodes keep flowing;
    4. swapped sequences back in, oldest first, then waiting ones in the admission order
       (program-level FCFS when the agents layer supplies it), while their first working
       KV fits the budget and prefill budget is left.

Why swap rather than recompute on preemption: a blended prompt's KV is not what full
prefill would recompute, and decoded tokens' KV came one step at a time; a copy keeps the
answer exactly what it would have been, and costs a memcpy instead of seconds of prefill.
A sequence is admitted only if its whole need (prompt + max_tokens) fits the budget alone,
so preemption always ends with at least one sequence able to grow.

Background sequences (shadow checks: the slow path run again to measure a fast path's
error) use only spare capacity: they are admitted, stepped and resumed only while no live
sequence is waiting, running or swapped, in pieces of at most background_step_tokens so a
live request that arrives meanwhile waits for one small piece at most; when a live
sequence needs working KV, background ones are preempted first. They never enter the
admission order (which is the live requests' order).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ragcache.engine.sequence import SeqState, Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_working_kv_bytes: int = 4 << 30
    step_tokens: int = 512  # tokens per batched pass: decodes first, prefill chunks fill the rest
    kv_block_tokens: int = 128  # working KV is reserved and grown in blocks of this many slots
    max_running: int = 64
    background_step_tokens: int = 128  # a background (shadow) piece, run only when no live work exists

    def __post_init__(self) -> None:
        if (
            min(
                self.max_working_kv_bytes,
                self.step_tokens,
                self.kv_block_tokens,
                self.max_running,
                self.background_step_tokens,
            )
            <= 0
        ):
            raise ValueError(
                "max_working_kv_bytes, step_tokens, kv_block_tokens, max_running and "
                "background_step_tokens must be positive"
            )


class AdmissionOrder(Protocol):
    """Which waiting sequence is admitted next. Called on the engine thread only.

    waiting is the scheduler's own list of live waiting sequences (never a background one),
    lent: an order reads it, never adds to it or removes from it. An order may read and set a
    sequence's ticket (Sequence.ticket), as the agents' program-level FCFS does
    (ragcache.agents.scheduler.ProgramScheduler: pick is generic over what it is given)."""

    def pick(self, waiting: list[Sequence]) -> Sequence:
        """One of waiting (never empty); not yet removed from it."""

    def admitted(self, seq: Sequence, waiting: list[Sequence]) -> None:
        """seq was admitted; waiting are the ones still waiting (for bypass counting)."""

    def dropped(self, seq: Sequence) -> None:
        """seq left before admission (cancelled)."""


class FcfsOrder:
    """First come, first served."""

    def pick(self, waiting: list[Sequence]) -> Sequence:
        return min(waiting, key=lambda seq: seq.arrived_s)

    def admitted(self, seq: Sequence, waiting: list[Sequence]) -> None:
        pass

    def dropped(self, seq: Sequence) -> None:
        pass


if TYPE_CHECKING:  # the type checker holds FcfsOrder to the AdmissionOrder contract
    _fcfs_order: type[AdmissionOrder] = FcfsOrder


@dataclass
class StepPlan:
    dropped: list[Sequence] = field(default_factory=list)  # cancelled: free and report
    preempted: list[Sequence] = field(default_factory=list)  # swap out
    resumed: list[Sequence] = field(default_factory=list)  # swap in to reserved_slots
    grown: list[Sequence] = field(default_factory=list)  # resize to reserved_slots
    admitted: list[Sequence] = field(default_factory=list)  # place the prompt's KV (reserved_slots)
    decodes: list[Sequence] = field(default_factory=list)  # one token each
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, piece tokens this step)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    @property
    def has_work(self) -> bool:
        return bool(self.decodes or self.prefills)


@dataclass
class SchedulerCounters:
    steps: int = 0
    tokens: int = 0
    preemptions: int = 0
    resumptions: int = 0
    admitted: int = 0
    cancelled: int = 0
    last_step_tokens: int = 0
    background_steps: int = 0  # steps that ran background (shadow) work only


class Scheduler:
    def __init__(self, config: SchedulerConfig, bytes_per_token: int, order: AdmissionOrder | None = None) -> None:
        self.config = config
        self.bytes_per_token = bytes_per_token
        self.order = order or FcfsOrder()
        self.waiting: list[Sequence] = []  # live sequences waiting for admission
        self.background: list[Sequence] = []  # background sequences waiting, first come first served
        self.running: list[Sequence] = []  # admission order: the last is preempted first
        self.swapped: deque[Sequence] = deque()
        self.counters = SchedulerCounters()

    # bookkeeping the engine calls

    def budget_error(self, max_len: int) -> str | None:
        """Why a sequence of at most max_len slots can never run (more than the whole budget), or None."""
        need = max_len * self.bytes_per_token
        if need <= self.config.max_working_kv_bytes:
            return None
        return f"needs {need} bytes of working KV, more than max_working_kv_bytes ({self.config.max_working_kv_bytes})"

    def add(self, seq: Sequence) -> None:
        error = self.budget_error(seq.max_len)
        if error is not None:
            raise ValueError(f"the sequence {error}")
        (self.background if seq.background else self.waiting).append(seq)

    def finish(self, seq: Sequence) -> None:
        """seq is done (finished, cancelled or failed): its working KV is free."""
        for group in (self.running, self.waiting, self.background):
            if seq in group:
                group.remove(seq)
        if seq in self.swapped:
            self.swapped.remove(seq)
        seq.reserved_slots = 0

    @property
    def used_bytes(self) -> int:
        """Working KV reserved by running sequences, each shared system prefix counted once."""
        own = sum(seq.reserved_slots - seq.shared_len for seq in self.running)
        shared = {seq.shared_key: seq.shared_len for seq in self.running if seq.shared_key is not None}
        return (own + sum(shared.values())) * self.bytes_per_token

    def _admission_bytes(self, seq: Sequence, slots: int) -> int:
        """What running seq with slots reserved adds to used_bytes (its prefix, unless another shares it)."""
        shared_running = any(other.shared_key == seq.shared_key for other in self.running)
        prefix = 0 if seq.shared_key is None or shared_running else seq.shared_len
        return (slots - seq.shared_len + prefix) * self.bytes_per_token

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.background or self.running or self.swapped)

    @property
    def has_live(self) -> bool:
        """A live (not background) sequence is waiting, running or swapped."""
        return bool(self.waiting) or any(not seq.background for seq in (*self.running, *self.swapped))

    # the plan

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._drop_cancelled(plan)
        live = self.has_live
        self._plan_decodes(plan, live)
        budget: float = (self.config.step_tokens if live else self.config.background_step_tokens) - len(plan.decodes)
        prefilling = [s for s in self.running if s.state is SeqState.PREFILL and (not live or not s.background)]
        budget = self._plan_prefills(plan, prefilling, budget)
        self._admit(plan, budget, live)
        self.counters.steps += plan.has_work
        self.counters.background_steps += plan.has_work and not live
        self.counters.tokens += plan.num_tokens
        self.counters.last_step_tokens = plan.num_tokens
        return plan

    def _drop_cancelled(self, plan: StepPlan) -> None:
        for seq in [s for s in (*self.waiting, *self.background, *self.running, *self.swapped) if s.cancelled]:
            if seq in self.waiting:
                self.order.dropped(seq)
            self.finish(seq)
            plan.dropped.append(seq)
            self.counters.cancelled += 1

    def _plan_decodes(self, plan: StepPlan, live: bool) -> None:
        for seq in [s for s in self.running if s.state is SeqState.DECODE and (not live or not s.background)]:
            if seq not in self.running:  # preempted to make room for an earlier one
                continue
            if seq.kv_len + 1 > seq.reserved_slots and not self._grow(seq, plan):
                continue
            plan.decodes.append(seq)

    def _grow(self, seq: Sequence, plan: StepPlan) -> bool:
        """Reserve another block for seq, preempting the latest admitted until it fits; False if seq itself went."""
        target = min(seq.reserved_slots + self.config.kv_block_tokens, seq.max_len)
        extra = (target - seq.reserved_slots) * self.bytes_per_token
        while self.used_bytes + extra > self.config.max_working_kv_bytes:
            victim = self._victim()
            self._preempt(victim, plan)
            if victim is seq:
                return False
        seq.reserved_slots = target
        plan.grown.append(seq)
        return True

    def _victim(self) -> Sequence:
        """Who is preempted next: the latest admitted background sequence, else the latest admitted."""
        background = [seq for seq in self.running if seq.background]
        return background[-1] if background else self.running[-1]

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        seq.state_before_swap = seq.state
        seq.state = SeqState.SWAPPED
        seq.reserved_slots = 0
        self.swapped.append(seq)
        if seq in plan.decodes:
            plan.decodes.remove(seq)
        if seq in plan.grown:
            plan.grown.remove(seq)
        plan.preempted.append(seq)
        self.counters.preemptions += 1

    def _plan_prefills(self, plan: StepPlan, seqs: list[Sequence], budget: float) -> float:
        for seq in seqs:
            if budget <= 0 and plan.prefills:
                break
            assert seq.progress is not None  # set by submit() before the sequence reaches the scheduler
            tokens, cost = seq.progress.take(max(budget, 0.0))
            plan.prefills.append((seq, tokens))
            budget -= cost
        return budget

    def _admit(self, plan: StepPlan, budget: float, live: bool) -> None:
        free = self.config.max_working_kv_bytes - self.used_bytes
        while len(self.running) < self.config.max_running:
            seq = next((s for s in self.swapped if not (live and s.background)), None)  # background waits for idle
            if seq is None:
                break
            slots = min(max(seq.kv_len, seq.prompt_len) + self.config.kv_block_tokens, seq.max_len)
            need = self._admission_bytes(seq, slots)
            if need > free:
                return  # the oldest preempted goes first: nothing new overtakes it
            self.swapped.remove(seq)
            seq.reserved_slots, seq.state = slots, seq.state_before_swap
            free -= need
            self.running.append(seq)
            plan.resumed.append(seq)
            self.counters.resumptions += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            seq = self.order.pick(self.waiting)
            slots = min(seq.prompt_len + self.config.kv_block_tokens, seq.max_len)
            need = self._admission_bytes(seq, slots)
            while need > free and any(s.background for s in self.running):
                victim = self._victim()  # live work takes the room background work holds
                self._preempt(victim, plan)
                free = self.config.max_working_kv_bytes - self.used_bytes
                need = self._admission_bytes(seq, slots)
            if need > free:
                return  # in order: a smaller later request does not overtake
            self.waiting.remove(seq)
            self.order.admitted(seq, self.waiting)
            budget, free = self._start(seq, slots, need, free, plan, budget)
        while not live and self.background and budget > 0 and len(self.running) < self.config.max_running:
            seq = self.background[0]
            slots = min(seq.prompt_len + self.config.kv_block_tokens, seq.max_len)
            need = self._admission_bytes(seq, slots)
            if need > free:
                return
            self.background.pop(0)
            budget, free = self._start(seq, slots, need, free, plan, budget)

    def _start(
        self, seq: Sequence, slots: int, need: int, free: int, plan: StepPlan, budget: float
    ) -> tuple[float, int]:
        seq.reserved_slots, seq.state = slots, SeqState.PREFILL
        self.running.append(seq)
        plan.admitted.append(seq)
        self.counters.admitted += 1
        return self._plan_prefills(plan, [seq], budget), free - need
