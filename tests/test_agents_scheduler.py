"""Program-level FCFS as the engine's admission order: continuing programs first by first arrival,
new ones after by arrival, never starved."""

import time
from dataclasses import dataclass

import pytest

from ragcache.agents.scheduler import ProgramScheduler, SchedulerConfig, Ticket
from ragcache.engine.generate import SamplingParams
from ragcache.engine.runner import RagRequest
from ragcache.engine.scheduler import SchedulerConfig as StepSchedulerConfig

from conftest import ManualClock as Clock


@dataclass(eq=False)  # compared by identity, as the engine's sequences are
class Item:
    """A waiting turn, as the engine's Sequence is to the admission order: a holder of its ticket."""

    name: str
    ticket: Ticket | None = None


class Harness:
    """A scheduler, the waiting list the engine's step scheduler keeps, and its admission loop."""

    def __init__(self, **config):
        self.clock = Clock()
        self.scheduler = ProgramScheduler(SchedulerConfig(**config), self.clock)
        self.waiting: list[Item] = []
        self.items: dict[str, Item] = {}

    def arrive(self, name, tenant="t", program_id=None) -> Item:
        item = self.items[name] = Item(name, self.scheduler.arrive(tenant, program_id))
        self.waiting.append(item)
        return item

    def admit_one(self) -> Item:
        """One admission as Scheduler._admit makes it: pick, remove from waiting, admitted."""
        item = self.scheduler.pick(self.waiting)
        self.waiting.remove(item)
        self.scheduler.admitted(item, self.waiting)
        return item

    def drain(self) -> list[str]:
        """Admit every waiting turn; the order they were admitted in."""
        order = []
        while self.waiting:
            order.append(self.admit_one().name)
        return order

    def seen(self, *program_ids, tenant="t"):
        """Each program has had a first turn, admitted alone, in this order."""
        for program_id in program_ids:
            self.arrive(f"{tenant}/{program_id}#1", tenant, program_id)
            self.admit_one()

    def ticket(self, name) -> Ticket:
        return self.items[name].ticket


def test_continuing_programs_go_first_by_first_arrival_then_new_ones_by_arrival():
    h = Harness()
    h.seen("p1", "p2")
    h.arrive("new-program", "t", "n1")
    h.arrive("p2 turn 2", "t", "p2")
    h.arrive("plain", "t", None)
    h.arrive("p1 turn 2", "t", "p1")
    assert h.scheduler.depth == 4
    assert h.drain() == ["p1 turn 2", "p2 turn 2", "new-program", "plain"]
    assert h.ticket("p1 turn 2").continuing and h.ticket("p2 turn 2").continuing
    assert not h.ticket("new-program").continuing and not h.ticket("plain").continuing
    assert h.ticket("p1 turn 2").rank == h.ticket("t/p1#1").seq  # ranked by the program's first arrival
    # new-program: overtaken by both continuing turns; plain only by p1's (p2's arrived before it)
    assert (h.ticket("new-program").bypassed, h.ticket("plain").bypassed) == (2, 1)
    assert not any(h.ticket(name).forced for name in h.items)
    assert all(h.ticket(name).waited_s == 0.0 for name in h.items)
    stats = h.scheduler.stats()
    assert stats["admitted"] == {"continuing": 2, "new": 4}  # p1#1, p2#1, new-program, plain
    assert stats["bypasses"] == 3 and stats["forced"] == 0 and stats["cancelled"] == 0
    assert stats["depth"] == 0 and h.scheduler.depth == 0 and stats["programs"] == 3
    assert stats["wait_s"]["continuing"]["count"] == 2 and stats["wait_s"]["new"]["count"] == 4


def test_a_new_program_is_overtaken_at_most_max_bypass_times():
    h = Harness(max_bypass=2)
    h.seen("p1", "p2", "p3")
    for name in ("new", "p1", "p2", "p3"):
        h.arrive(name, "t", "n1" if name == "new" else name)
    assert h.drain() == ["p1", "p2", "new", "p3"]
    assert h.ticket("new").forced and h.ticket("new").bypassed == 2
    assert not any(h.ticket(name).forced for name in ("p1", "p2", "p3"))
    stats = h.scheduler.stats()
    assert stats["forced"] == 1 and stats["bypasses"] == 2


def test_a_starved_new_turn_alone_is_not_counted_as_forced():
    h = Harness(max_bypass=0)  # every new turn is starved at once
    h.seen("p1")
    h.arrive("new", "t", "n1")
    assert h.drain() == ["new"]
    assert not h.ticket("new").forced and h.scheduler.stats()["forced"] == 0  # nothing continuing to go ahead of


@pytest.mark.parametrize("waited, order", [(9.0, ["p1", "new"]), (10.0, ["new", "p1"]), (11.0, ["new", "p1"])])
def test_a_new_program_waits_at_most_max_wait_s(waited, order):
    h = Harness(max_wait_s=10.0)
    h.seen("p1")
    h.arrive("new", "t", "n1")
    h.clock.now += waited
    h.arrive("p1", "t", "p1")
    assert h.drain() == order
    new = h.ticket("new")
    assert new.waited_s == waited and h.ticket("p1").waited_s == 0.0
    assert new.forced is (waited >= 10.0) and new.bypassed == (0 if new.forced else 1)
    stats = h.scheduler.stats()
    assert stats["forced"] == int(new.forced)
    assert stats["wait_s"]["new"]["max"] == waited and stats["wait_s"]["continuing"]["max"] == 0.0


def test_the_same_program_id_in_another_tenant_is_a_new_program():
    h = Harness()
    h.seen("p", tenant="alpha")
    h.arrive("beta/p", "beta", "p")
    h.arrive("alpha/p", "alpha", "p")
    assert h.drain() == ["alpha/p", "beta/p"]
    assert h.ticket("alpha/p").continuing and not h.ticket("beta/p").continuing
    assert h.scheduler.stats()["programs"] == 2


def test_forgotten_and_idle_programs_count_as_new_again():
    h = Harness(program_idle_s=60.0)
    h.seen("ended", "idle", "active")
    h.scheduler.forget("t", "ended")
    h.scheduler.forget("t", "never-seen")  # forgetting an unknown program is fine
    h.clock.now += 30.0
    h.arrive("active#2", "t", "active")  # active again at 30 s
    assert h.drain() == ["active#2"] and h.ticket("active#2").continuing
    h.clock.now += 40.0  # idle: 70 s since its last turn; active: 40 s
    for name in ("ended", "idle", "active"):
        h.arrive(name, "t", name)
    assert h.drain() == ["active", "ended", "idle"]
    assert h.ticket("active").continuing
    assert not h.ticket("ended").continuing and not h.ticket("idle").continuing
    assert h.ticket("idle").rank == h.ticket("idle").seq  # a new program again: ranked by this arrival


def test_the_least_recently_active_programs_are_forgotten_past_max_programs():
    h = Harness(max_programs=2)
    h.seen("a", "b")
    h.arrive("a#2", "t", "a")  # a is now the most recently active
    h.drain()
    h.seen("c")  # over the limit: b goes
    assert h.scheduler.stats()["programs"] == 2
    h.arrive("a", "t", "a")
    h.arrive("b", "t", "b")  # a new program again (and now c, the least recently active, goes)
    assert h.drain() == ["a", "b"]
    assert h.ticket("a").continuing and not h.ticket("b").continuing


def test_a_dropped_waiter_is_counted_and_leaves_and_the_next_one_goes():
    h = Harness()
    gone, kept = h.arrive("gone", "t", "a"), h.arrive("kept", "t", "b")
    assert h.scheduler.depth == 2
    h.waiting.remove(gone)  # as Scheduler._drop_cancelled: dropped, then no longer waiting
    h.scheduler.dropped(gone)
    assert h.scheduler.depth == 1
    assert h.drain() == ["kept"]
    stats = h.scheduler.stats()
    assert stats["cancelled"] == 1 and stats["depth"] == 0 and stats["admitted"] == {"continuing": 0, "new": 1}
    assert gone.ticket.waited_s is None  # never admitted
    h.arrive("after", "t", None)
    assert h.drain() == ["after"] and h.scheduler.depth == 0


def test_a_sequence_submitted_without_a_ticket_is_ordered_as_a_plain_request():
    h = Harness()
    h.seen("p1")
    direct = Item("direct")  # the engine used directly (generate()): no ticket from arrive()
    h.waiting.append(direct)
    h.arrive("p1#2", "t", "p1")
    assert h.drain() == ["p1#2", "direct"]
    assert direct.ticket is not None and direct.ticket.program_id is None and not direct.ticket.continuing
    assert direct.ticket.bypassed == 0  # given its ticket at the pick, after p1#2 arrived
    assert h.scheduler.depth == 0 and h.scheduler.stats()["admitted"] == {"continuing": 1, "new": 2}


@pytest.mark.parametrize("config, match", [
    (dict(max_wait_s=0), "max_wait_s"),
    (dict(max_bypass=-1), "max_bypass"),
    (dict(program_idle_s=0), "program_idle_s"),
    (dict(max_programs=0), "max_programs"),
    (dict(wait_window=0), "wait_window"),
])
def test_bad_configs_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(**config)


class CollectingSink:
    """Collects the names of finished turns in the order the engine finished them."""

    def __init__(self, name, finished, errors):
        self.name, self.finished, self.errors = name, finished, errors

    def on_text(self, piece):
        pass

    def on_finish(self, result):
        self.finished.append(self.name)

    def on_error(self, error):
        self.errors.append((self.name, error))


def test_the_engine_admits_turns_in_program_level_fcfs_order(make_engine):
    """The real step scheduler with the ProgramScheduler as its order, one sequence running at a time."""
    engine = make_engine(scheduler=StepSchedulerConfig(max_running=1))
    clock = Clock()
    order = ProgramScheduler(SchedulerConfig(), clock)
    engine.use_admission_order(order)
    finished, errors, tickets, seqs = [], [], {}, []

    def submit(name, program_id=None):
        tickets[name] = order.arrive("t", program_id)
        request = RagRequest(f"Question {name}?", program_id=program_id, sampling=SamplingParams(max_tokens=3))
        seqs.append(engine.submit(request, CollectingSink(name, finished, errors), ticket=tickets[name]))

    def run_until(count):
        deadline = time.monotonic() + 120
        while len(finished) + len(errors) < count:
            assert time.monotonic() < deadline, "the engine did not finish its sequences"
            if not engine.step():
                time.sleep(0.001)  # the writer thread is delivering the last results

    try:
        for program_id in ("p1", "p2"):  # each program's first turn, alone
            submit(f"{program_id}#1", program_id)
            run_until(len(finished) + 1)
        finished.clear()
        submit("blocker")  # holds the one running slot while the others arrive
        assert engine.step() and engine.scheduler.running == [seqs[-1]]
        submit("new-program", "n1")
        submit("p2 turn 2", "p2")
        submit("plain")
        submit("p1 turn 2", "p1")
        run_until(5)
    finally:
        engine.close()
    assert errors == []
    assert finished == ["blocker", "p1 turn 2", "p2 turn 2", "new-program", "plain"]
    assert tickets["p1 turn 2"].continuing and tickets["p2 turn 2"].continuing
    assert not tickets["new-program"].continuing
    assert (tickets["new-program"].bypassed, tickets["plain"].bypassed) == (2, 1)
    assert all(ticket.waited_s == 0.0 for ticket in tickets.values())  # the manual clock never moved
    stats = order.stats()
    assert stats["admitted"] == {"continuing": 2, "new": 5} and stats["bypasses"] == 3 and stats["depth"] == 0
    assert engine.scheduler.counters.admitted == 7 and not engine.scheduler.has_unfinished
