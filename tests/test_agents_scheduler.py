"""Program-level FCFS: continuing programs first by first arrival, new ones after, never starved."""

import asyncio

import pytest

from ragcache.agents.scheduler import ProgramScheduler, SchedulerConfig


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


async def settle(condition, rounds=200):
    """Yield to the loop until condition() holds (tasks reach their await points)."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the tasks did not get there")


class Harness:
    """A scheduler, a turn that holds the worker until released, and the order turns were admitted in."""

    def __init__(self, **config):
        self.clock = Clock()
        self.scheduler = ProgramScheduler(SchedulerConfig(**config), self.clock)
        self.order: list[str] = []
        self.admissions = {}

    async def run(self, name, tenant="t", program_id=None):
        async with self.scheduler.turn(tenant, program_id) as admission:
            self.order.append(name)
            self.admissions[name] = admission

    async def seen(self, *program_ids, tenant="t"):
        """Each program has had a first turn, in this order."""
        for program_id in program_ids:
            await self.run(f"{tenant}/{program_id}#1", tenant, program_id)

    async def hold_worker(self):
        """A plain request holds the worker until the returned event is set; returns (event, its task)."""
        release = asyncio.Event()

        async def blocker():
            async with self.scheduler.turn("t", None):
                await release.wait()

        blocking = asyncio.create_task(blocker())
        await settle(lambda: self.scheduler.stats()["busy"])
        return release, blocking

    async def queued_behind_a_blocker(self, arrivals):
        """Start `arrivals` (name, tenant, program id) while a plain request holds the worker; release it."""
        release, blocking = await self.hold_worker()
        self.order.clear()
        tasks = []
        for name, tenant, program_id in arrivals:
            tasks.append(asyncio.create_task(self.run(name, tenant, program_id)))
            await settle(lambda: self.scheduler.depth == len(tasks))
        release.set()
        await asyncio.gather(blocking, *tasks)
        return self.order


def test_continuing_programs_go_first_by_first_arrival_then_new_ones_by_arrival():
    async def scenario():
        h = Harness()
        await h.seen("p1", "p2")
        order = await h.queued_behind_a_blocker([
            ("new-program", "t", "n1"), ("p2 turn 2", "t", "p2"), ("plain", "t", None), ("p1 turn 2", "t", "p1"),
        ])
        assert order == ["p1 turn 2", "p2 turn 2", "new-program", "plain"]
        assert h.admissions["p1 turn 2"].continuing and not h.admissions["new-program"].continuing
        assert (h.admissions["new-program"].bypassed, h.admissions["plain"].bypassed) == (2, 1)
        stats = h.scheduler.stats()
        assert stats["admitted"] == {"continuing": 2, "new": 5}  # p1, p2, the blocker, new, plain and stats["bypasses"] == 3
        assert stats["depth"] == 0 and stats["programs"] == 3

    asyncio.run(scenario())


def test_a_new_program_is_overtaken_at_most_max_bypass_times():
    async def scenario():
        h = Harness(max_bypass=2)
        await h.seen("p1", "p2", "p3")
        order = await h.queued_behind_a_blocker([
            ("new", "t", "n1"), ("p1", "t", "p1"), ("p2", "t", "p2"), ("p3", "t", "p3"),
        ])
        assert order == ["p1", "p2", "new", "p3"]
        assert h.admissions["new"].forced and h.admissions["new"].bypassed == 2
        assert h.scheduler.stats()["forced"] == 1

    asyncio.run(scenario())


def test_a_new_program_waits_at_most_max_wait_s():
    async def scenario():
        h = Harness(max_wait_s=10.0)
        await h.seen("p1")
        release, blocking = await h.hold_worker()
        h.order.clear()
        new = asyncio.create_task(h.run("new", "t", "n1"))
        await settle(lambda: h.scheduler.depth == 1)
        h.clock.now += 11.0
        returning = asyncio.create_task(h.run("p1", "t", "p1"))
        await settle(lambda: h.scheduler.depth == 2)
        release.set()
        await asyncio.gather(blocking, new, returning)
        assert h.order == ["new", "p1"]
        assert h.admissions["new"].waited_s == 11.0 and h.admissions["new"].forced
        assert h.scheduler.stats()["wait_s"]["new"]["max"] == 11.0

    asyncio.run(scenario())


def test_the_same_program_id_in_another_tenant_is_a_new_program():
    async def scenario():
        h = Harness()
        await h.seen("p", tenant="alpha")
        order = await h.queued_behind_a_blocker([("beta/p", "beta", "p"), ("alpha/p", "alpha", "p")])
        assert order == ["alpha/p", "beta/p"]
        assert h.admissions["alpha/p"].continuing and not h.admissions["beta/p"].continuing

    asyncio.run(scenario())


def test_forgotten_and_idle_programs_count_as_new_again():
    async def scenario():
        h = Harness(program_idle_s=60.0)
        await h.seen("ended", "idle", "active")
        h.scheduler.forget("t", "ended")
        h.clock.now += 30.0
        await h.run("active#2", "t", "active")  # active again at 30 s
        h.clock.now += 40.0  # idle: 70 s since its last turn; active: 40 s
        order = await h.queued_behind_a_blocker([("ended", "t", "ended"), ("idle", "t", "idle"),
                                                 ("active", "t", "active")])
        assert order == ["active", "ended", "idle"]
        assert not h.admissions["ended"].continuing and not h.admissions["idle"].continuing

    asyncio.run(scenario())


def test_a_cancelled_waiter_leaves_the_queue_and_the_next_one_goes():
    async def scenario():
        h = Harness()
        release, blocking = await h.hold_worker()
        gone = asyncio.create_task(h.run("gone", "t", "a"))
        kept = asyncio.create_task(h.run("kept", "t", "b"))
        await settle(lambda: h.scheduler.depth == 2)
        gone.cancel()
        await settle(lambda: h.scheduler.depth == 1)
        release.set()
        await asyncio.gather(blocking, kept)
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert h.order == ["kept"] and h.scheduler.stats()["cancelled"] == 1
        await h.run("after", "t", None)  # the slot was handed on, not lost
        assert h.order == ["kept", "after"]

    asyncio.run(scenario())


def test_an_error_inside_a_turn_frees_the_worker():
    async def scenario():
        h = Harness()
        with pytest.raises(RuntimeError):
            async with h.scheduler.turn("t", "p"):
                raise RuntimeError("the engine failed")
        await h.run("next", "t", None)
        assert h.order == ["next"] and not h.scheduler.stats()["busy"]

    asyncio.run(scenario())


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="max_wait_s"):
        SchedulerConfig(max_wait_s=0)
