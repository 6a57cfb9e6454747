"""The coordinator as the runtime drives it: arrivals, admissions, finishes, client events, reclaim, shutdown."""

from dataclasses import dataclass

import pytest

from ragcache.agents import AgentConfig, PinConfig, PrefillProfile, ProgramCoordinator, Ticket
from ragcache.kv import ChunkKey
from ragcache.storage.cpu import CpuTier
from ragcache.storage.gpu import GpuTier
from ragcache.storage.prefix import CachedPath, RadixPrefixCache
from ragcache.storage.tiered import TieredStore

from conftest import ManualClock as Clock
from conftest import kv_chunk as chunk

SIZE = chunk().nbytes


@dataclass(eq=False)
class Item:
    """A waiting turn as the engine's Sequence is to the admission order: a holder of its ticket."""

    ticket: Ticket


def make_store():
    clock = Clock()
    device, cpu = GpuTier(4 * SIZE, device="cpu"), CpuTier(16 * SIZE)
    device.clock = cpu.clock = clock
    return TieredStore([device, cpu], clock=clock), device, clock


def make_coordinator(reload_s=10.0):
    store, device, clock = make_store()
    coordinator = ProgramCoordinator(RadixPrefixCache(store, "fp"), PrefillProfile(((4, reload_s),)), AgentConfig(pins=PinConfig()), clock)
    return coordinator, store, device, clock


def admit(coordinator, ticket, *others):
    """The engine admits the turn (its scheduler's pick and admitted), others still waiting."""
    item, waiting = Item(ticket), [Item(other) for other in others]
    assert coordinator.scheduler.pick([item, *waiting]) is item
    coordinator.scheduler.admitted(item, waiting)


def run_turn(coordinator, store, ticket, tool=None, last=False):
    """The engine's work for an admitted turn (storing the program's KV), then finish."""
    key = ChunkKey(f"{ticket.tenant}-{ticket.program_id}")
    store.put(key, chunk())
    return coordinator.finish(ticket, CachedPath(ticket.tenant, (key,), 4, SIZE), SIZE, 4, tool=tool, is_last_step=last)


def turn(coordinator, store, program, tool=None, tenant="t", last=False):
    """One turn as the runtime runs it: arrive, admission, the engine's work, finish."""
    ticket = coordinator.arrive(tenant, program)
    admit(coordinator, ticket)
    return ticket, run_turn(coordinator, store, ticket, tool, last)


def test_a_tool_call_pins_until_the_next_turn_which_records_the_duration():
    coordinator, store, device, clock = make_coordinator()
    first, decision = turn(coordinator, store, "p1", tool="search")
    assert not first.continuing and first.arrival.returning is False
    assert decision.pinned and decision.reason == "pinned" and device.is_pinned(ChunkKey("t-p1"))
    clock.now += 1.25
    second = coordinator.arrive("t", "p1")
    # the pin goes and the duration is recorded at arrival, before the turn is admitted
    assert second.continuing and not device.is_pinned(ChunkKey("t-p1"))
    assert second.arrival.returning and second.arrival.pin_held
    assert second.arrival.tool == "search" and second.arrival.tool_duration_s == 1.25
    assert coordinator.scheduler.depth == 1
    admit(coordinator, second)
    assert run_turn(coordinator, store, second) is None  # no tool call: nothing pinned
    stats = coordinator.stats()
    assert stats["pins"]["pin_hit_rate"] == 1.0 and stats["pins"]["counters"]["returned_held"] == 1
    assert stats["pins"]["predictor"]["tools"]["t/search"]["mean_s"] == 1.25
    assert stats["pins"]["queue_delay_s"] == 0.0  # its KV was held: no queueing delay fed
    assert stats["scheduler"]["admitted"] == {"continuing": 1, "new": 1} and stats["scheduler"]["depth"] == 0


def test_a_returning_program_without_its_kv_feeds_the_queueing_delay():
    coordinator, store, _, clock = make_coordinator(reload_s=0.0)  # never worth pinning
    _, decision = turn(coordinator, store, "p1", tool="search")
    assert not decision.pinned and decision.reason == "not_worth_it"
    plain = coordinator.arrive("t", None)  # waits too, behind the continuing turn
    returning = coordinator.arrive("t", "p1")
    assert returning.arrival.returning and not returning.arrival.pin_held
    clock.now += 3.0  # the engine is busy
    admit(coordinator, returning, plain)
    assert returning.waited_s == 3.0 and plain.bypassed == 1
    assert coordinator.stats()["pins"]["queue_delay_s"] == 0.0  # fed when the turn finishes
    run_turn(coordinator, store, returning)
    pins = coordinator.stats()["pins"]
    assert pins["queue_delay_s"] == 3.0 and pins["counters"]["returned_unpinned"] == 1
    clock.now += 1.0
    admit(coordinator, plain)
    assert coordinator.finish(plain, None, 0, 0) is None  # a plain request: nothing of the pins'
    assert coordinator.stats()["pins"]["queue_delay_s"] == 3.0 and coordinator.stats()["pins"]["programs"] == 1


def test_a_finish_without_an_admission_feeds_no_queueing_delay():
    coordinator, store, _, _ = make_coordinator(reload_s=0.0)
    turn(coordinator, store, "p1", tool="search")
    returning = coordinator.arrive("t", "p1")  # the engine never admitted it by this order: waited_s None
    assert returning.waited_s is None
    run_turn(coordinator, store, returning)
    pins = coordinator.stats()["pins"]
    assert pins["queue_delay_s"] == 0.0 and pins["counters"]["returned_unpinned"] == 1


def test_client_events_start_and_end_tools_and_end_the_program():
    coordinator, store, device, clock = make_coordinator()
    turn(coordinator, store, "p1")  # no tool call in the answer
    assert coordinator.event("t", "p1", "tool_start", "search").pinned
    clock.now += 0.5
    assert coordinator.event("t", "p1", "tool_end") is None
    assert coordinator.stats()["pins"]["predictor"]["tools"]["t/search"]["samples"] == 1
    assert coordinator.event("t", "p1", "end") is None
    assert device.stats().pinned_bytes == 0 and coordinator.stats()["pins"]["programs"] == 0
    ticket, _ = turn(coordinator, store, "p1")
    assert not ticket.continuing and not ticket.arrival.returning  # an ended program's id starts a new program
    coordinator.event("t", "unknown", "end")  # events may outlive their program
    with pytest.raises(ValueError, match="tool's name"):
        coordinator.event("t", "p1", "tool_start")
    with pytest.raises(ValueError, match="event type"):
        coordinator.event("t", "p1", "tool_pause", "search")


def test_the_last_step_releases_and_the_next_turn_is_a_new_program():
    coordinator, store, device, _ = make_coordinator()
    _, decision = turn(coordinator, store, "p1", tool="search")
    assert decision.pinned
    second, decision = turn(coordinator, store, "p1", last=True)
    assert second.continuing and decision is None
    assert device.stats().pinned_bytes == 0 and coordinator.stats()["pins"]["programs"] == 0
    assert coordinator.stats()["scheduler"]["programs"] == 0
    third, _ = turn(coordinator, store, "p1")
    assert not third.continuing and not third.arrival.returning


def test_an_abandoned_turn_no_longer_waits():
    coordinator, store, _, _ = make_coordinator()
    refused = coordinator.arrive("t", "p1")  # its request is refused before it reaches the engine
    assert coordinator.scheduler.depth == 1
    coordinator.abandon(refused)
    scheduler = coordinator.stats()["scheduler"]
    assert scheduler["depth"] == 0 and scheduler["cancelled"] == 1
    turn(coordinator, store, "p2")
    assert coordinator.stats()["scheduler"]["admitted"] == {"continuing": 0, "new": 1}


def test_reclaim_releases_pinned_room_and_close_releases_all():
    coordinator, store, device, _ = make_coordinator()
    turn(coordinator, store, "p1", tool="search")
    turn(coordinator, store, "p2", tool="search")
    assert device.stats().pinned_bytes == 2 * SIZE
    assert coordinator.reclaim(2 * SIZE) == 0  # already unpinned: nothing released
    assert coordinator.reclaim(3 * SIZE) == 1
    assert device.stats().pinned_bytes == SIZE
    assert coordinator.stats()["pins"]["counters"]["reclaimed"] == 1
    assert coordinator.close() == 1 and device.stats().pinned_bytes == 0
    assert coordinator.close() == 0


def test_a_measured_coordinator_profiles_the_model_stack(stack):
    store, _, _ = make_store()
    coordinator = ProgramCoordinator.measured(RadixPrefixCache(store, "fp"), stack)
    points = coordinator.pins.profile.points
    assert [n for n, _ in points] == [64, 256, 1024]
    assert all(b >= a >= 0 for (_, a), (_, b) in zip(points, points[1:]))  # made non-decreasing
    assert coordinator.scheduler.config == AgentConfig().scheduler
