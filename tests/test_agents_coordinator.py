"""The coordinator as the runtime drives it: turns, finishes, client events, reclaim, shutdown."""

import asyncio

import pytest

from ragcache.agents import AgentConfig, PinConfig, PrefillProfile, ProgramCoordinator
from ragcache.kv import ChunkKey
from ragcache.storage import CpuTier, GpuTier, TieredStore

from conftest import ManualClock as Clock
from conftest import kv_chunk as chunk

SIZE = chunk().nbytes


def make_coordinator(reload_s=10.0):
    clock = Clock()
    device, cpu = GpuTier(4 * SIZE, device="cpu"), CpuTier(16 * SIZE)
    device.clock = cpu.clock = clock
    store = TieredStore([device, cpu], clock=clock)
    coordinator = ProgramCoordinator(store, PrefillProfile(((4, reload_s),)), AgentConfig(pins=PinConfig()), clock)
    return coordinator, store, device, clock


async def turn(coordinator, store, program, tool=None, tenant="t", need_bytes=0, last=False):
    """One turn as the runtime runs it: admission, the engine's work (storing the KV), finish."""
    async with coordinator.turn(tenant, program, need_bytes) as admission:
        key = ChunkKey(f"{tenant}-{program}")
        store.put(key, chunk())
    return admission, coordinator.finish(tenant, program, key, SIZE, 4, tool=tool, is_last_step=last)


def test_a_tool_call_pins_until_the_next_turn_which_records_the_duration():
    async def scenario():
        coordinator, store, device, clock = make_coordinator()
        first, decision = await turn(coordinator, store, "p1", tool="search")
        assert not first.continuing and decision.pinned and device.is_pinned(ChunkKey("t-p1"))
        clock.now += 1.25
        async with coordinator.turn("t", "p1") as second:
            assert second.continuing and not device.is_pinned(ChunkKey("t-p1"))
        stats = coordinator.stats()
        assert stats["pins"]["pin_hit_rate"] == 1.0
        assert stats["pins"]["predictor"]["tools"]["t/search"]["mean_s"] == 1.25
        assert stats["scheduler"]["admitted"] == {"continuing": 1, "new": 1}

    asyncio.run(scenario())


def test_a_returning_program_without_its_kv_feeds_the_queueing_delay():
    async def scenario():
        coordinator, store, _, clock = make_coordinator(reload_s=0.0)  # never worth pinning
        await turn(coordinator, store, "p1", tool="search")
        release = asyncio.Event()

        async def blocker():
            async with coordinator.turn("t", None):
                await release.wait()

        blocking = asyncio.create_task(blocker())
        while not coordinator.scheduler.stats()["busy"]:
            await asyncio.sleep(0)
        returning = asyncio.create_task(turn(coordinator, store, "p1"))
        while coordinator.scheduler.depth < 1:
            await asyncio.sleep(0)
        clock.now += 3.0
        release.set()
        await asyncio.gather(blocking, returning)
        pins = coordinator.stats()["pins"]
        assert pins["queue_delay_s"] == 3.0 and pins["counters"]["returned_unpinned"] == 1

    asyncio.run(scenario())


def test_client_events_start_and_end_tools_and_end_the_program():
    async def scenario():
        coordinator, store, device, clock = make_coordinator()
        await turn(coordinator, store, "p1")  # no tool call in the answer
        assert coordinator.event("t", "p1", "tool_start", "search").pinned
        clock.now += 0.5
        assert coordinator.event("t", "p1", "tool_end") is None
        assert coordinator.stats()["pins"]["predictor"]["tools"]["t/search"]["samples"] == 1
        coordinator.event("t", "p1", "end")
        assert device.stats().pinned_bytes == 0 and coordinator.stats()["pins"]["programs"] == 0
        admission, _ = await turn(coordinator, store, "p1")
        assert not admission.continuing  # an ended program's id starts a new program
        coordinator.event("t", "unknown", "end")  # events may outlive their program
        with pytest.raises(ValueError, match="tool's name"):
            coordinator.event("t", "p1", "tool_start")
        with pytest.raises(ValueError, match="event type"):
            coordinator.event("t", "p1", "tool_pause", "search")

    asyncio.run(scenario())


def test_the_last_step_releases_and_the_next_turn_is_a_new_program():
    async def scenario():
        coordinator, store, device, _ = make_coordinator()
        await turn(coordinator, store, "p1", tool="search")
        await turn(coordinator, store, "p1", last=True)
        assert device.stats().pinned_bytes == 0
        admission, _ = await turn(coordinator, store, "p1")
        assert not admission.continuing

    asyncio.run(scenario())


def test_the_head_of_the_queue_reclaims_pinned_room_and_close_releases_all():
    async def scenario():
        coordinator, store, device, _ = make_coordinator()
        await turn(coordinator, store, "p1", tool="search")
        await turn(coordinator, store, "p2", tool="search")
        assert device.stats().pinned_bytes == 2 * SIZE
        async with coordinator.turn("t", None, need_bytes=3 * SIZE):
            assert device.stats().pinned_bytes == SIZE
        assert coordinator.stats()["pins"]["counters"]["reclaimed"] == 1
        assert coordinator.close() == 1 and device.stats().pinned_bytes == 0

    asyncio.run(scenario())
