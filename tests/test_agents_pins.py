"""Program pins over a real TieredStore on a hand-set clock: TTLs, returns, expiry, budget, reclaim, tenants."""

import pytest

from ragcache.agents.pins import Arrival, PinConfig, ProgramPins
from ragcache.agents.predictor import PredictorConfig, ToolDurationPredictor
from ragcache.agents.profile import PrefillProfile
from ragcache.kv import ChunkKey
from ragcache.storage.cpu import CpuTier
from ragcache.storage.gpu import GpuTier
from ragcache.storage.prefix import CachedPath, RadixPrefixCache
from ragcache.storage.tiered import TieredStore

from conftest import ManualClock as Clock
from conftest import kv_chunk as chunk

SIZE = chunk().nbytes  # 64 bytes for 4 tokens
SLOW_PREFILL = PrefillProfile(((4, 10.0),))  # re-prefilling a program costs 10 s: pins pay
PRESSURE = SIZE / (int(0.5 * 4 * SIZE) + int(0.8 * 16 * SIZE))  # one entry's share of make_pins' default pin budgets


def make_pins(profile=SLOW_PREFILL, device_entries=4, cpu_entries=16, **config):
    config.setdefault("memory_weight", 1.0)  # the values below are worked out at weight 1
    clock = Clock()
    device, cpu = GpuTier(device_entries * SIZE, device="cpu"), CpuTier(cpu_entries * SIZE)
    device.clock = cpu.clock = clock
    store = TieredStore([device, cpu], clock=clock)
    pins = ProgramPins(RadixPrefixCache(store, "fp", block_tokens=4), ToolDurationPredictor(PredictorConfig(min_samples=3)), profile, PinConfig(**config))
    return pins, store, device, cpu, clock


def stored(store, name, tokens=4) -> ChunkKey:
    store.put(ChunkKey(name), chunk(tokens))
    return ChunkKey(name)


def finish(pins, store, program, tool, tenant="t", name=None, tokens=4):
    key = stored(store, name or f"{tenant}-{program}", tokens)
    return pins.turn_finished(tenant, program, path(key, tokens), chunk(tokens).nbytes, tokens, tool=tool)


def path(key, tokens=4) -> CachedPath:
    """A one-block path (the pins see paths; how many blocks one has is the prefix cache's business)."""
    return CachedPath("t", (key,), tokens, chunk(tokens).nbytes)


def teach(pins, tool, durations, tenant="t"):
    for duration in durations:
        pins.predictor.record(tenant, tool, duration)


def test_a_tool_call_pins_the_programs_kv_for_the_predicted_ttl():
    pins, store, device, _, _ = make_pins()
    decision = finish(pins, store, "p1", "search")
    assert (decision.pinned, decision.reason, decision.tier, decision.source) == (True, "pinned", "device", "default")
    assert decision.ttl_s == 2.0 and decision.value_s == pytest.approx(0.5 * 10 - 2.0 * PRESSURE)
    for name in "abcdef":  # other work fills the tier: the pinned program stays
        stored(store, name)
    assert device.contains(ChunkKey("t-p1")) and device.is_pinned(ChunkKey("t-p1"))


def test_the_next_turn_releases_the_pin_and_records_the_tools_duration():
    pins, store, device, _, clock = make_pins()
    finish(pins, store, "p1", "search")
    clock.now += 1.5
    assert pins.turn_arrived("t", "p1") == Arrival(returning=True, pin_held=True, tool="search", tool_duration_s=1.5)
    assert not device.is_pinned(ChunkKey("t-p1")) and device.contains(ChunkKey("t-p1"))
    stats = pins.stats()
    assert stats["counters"]["returned_held"] == 1 and stats["pin_hit_rate"] == 1.0 and stats["active_pins"] == []
    outcome = stats["predictor"]["tools"]["t/search"]["predicted_vs_actual"]
    assert outcome == {"pins": 1, "mean_predicted_ttl_s": 2.0, "mean_actual_s": 1.5, "covered": 1.0}


def test_an_expired_pin_demotes_the_kv_and_its_return_is_a_miss():
    pins, store, device, cpu, clock = make_pins()
    finish(pins, store, "p1", "search")
    clock.now += 2.5
    assert pins.stats()["counters"]["expired"] == 1
    assert not device.contains(ChunkKey("t-p1")) and cpu.contains(ChunkKey("t-p1"))  # demoted, not dropped
    arrival = pins.turn_arrived("t", "p1")
    assert (arrival.pin_held, arrival.tool_duration_s) == (False, 2.5)
    stats = pins.stats()
    assert (stats["counters"]["returned_lost"], stats["pin_hit_rate"]) == (1, 0.0)
    assert stats["predictor"]["tools"]["t/search"]["predicted_vs_actual"]["covered"] == 0.0


def test_the_budget_share_holds_and_the_least_valuable_pin_gives_way():
    pins, store, device, _, _ = make_pins(budget_share=0.5, cpu_entries=1)  # 2 of the device's 4 entries, none of the cpu's
    teach(pins, "quick", [1.0, 1.0, 1.0])  # τ=1, worth 10·1 − 1 = 9 s
    teach(pins, "flaky", [0.5, 8.0, 8.0])  # τ=0.5, worth 10/3 − 0.5 = 2.83 s
    assert finish(pins, store, "p1", "flaky").pinned
    assert finish(pins, store, "p2", "quick").pinned
    third = finish(pins, store, "p3", "quick")
    assert (third.pinned, third.displaced) == (True, 1)
    assert not device.is_pinned(ChunkKey("t-p1")) and device.contains(ChunkKey("t-p1"))  # unpinned, still there
    fourth = finish(pins, store, "p4", "flaky")  # worth less than either pin it would displace
    assert (fourth.pinned, fourth.reason) == (False, "over_budget")
    assert not device.is_pinned(ChunkKey("t-p4"))
    assert pins.pinned_bytes("device") == device.stats().pinned_bytes == 2 * SIZE == pins.budget_bytes("device")
    assert pins.turn_arrived("t", "p1").pin_held is False
    counters = pins.stats()["counters"]
    assert (counters["displaced"], counters["over_budget"], counters["returned_lost"]) == (1, 1, 1)


def test_a_pin_larger_than_every_tiers_budget_is_refused():
    pins, store, device, cpu, _ = make_pins(budget_share=0.5, lower_budget_share=0.5, cpu_entries=4)
    decision = finish(pins, store, "big", "search", tokens=12)  # 3 entries' worth > 2 in either tier
    assert (decision.pinned, decision.reason) == (False, "over_budget")
    assert device.stats().pinned_bytes == cpu.stats().pinned_bytes == 0


def test_the_cpu_tiers_pin_budget_is_its_own_larger_share():
    pins, store, device, cpu, _ = make_pins(policy="fixed_ttl", budget_share=0.5, lower_budget_share=0.75, cpu_entries=4)
    assert (pins.budget_bytes("device"), pins.budget_bytes("cpu")) == (2 * SIZE, 3 * SIZE)
    tiers = [finish(pins, store, f"p{i}", "search").tier for i in range(5)]
    assert tiers == ["device", "device", "cpu", "cpu", "cpu"]
    sixth = finish(pins, store, "p5", "search")  # both budgets full: fixed TTL displaces nothing
    assert (sixth.pinned, sixth.reason) == (False, "over_budget")
    assert (device.stats().pinned_bytes, cpu.stats().pinned_bytes) == (2 * SIZE, 3 * SIZE)
    assert all(cpu.contains(ChunkKey(f"t-p{i}")) for i in (2, 3, 4))  # held below while the device churns


def test_a_pin_the_devices_budget_cannot_take_is_held_in_the_cpu_tier_and_prefetched_before_its_tool_returns():
    pins, store, device, cpu, clock = make_pins(budget_share=0.5, device_entries=4, cpu_entries=8)
    teach(pins, "search", [1.0, 1.0, 1.0])
    assert finish(pins, store, "p1", "search").tier == "device"
    assert finish(pins, store, "p2", "search").tier == "device"
    third = finish(pins, store, "p3", "search")  # the device's pin budget (2 entries) is full
    assert (third.pinned, third.tier, third.displaced) == (True, "cpu", 0)
    key = ChunkKey("t-p3")
    assert cpu.is_pinned(key) and not device.is_pinned(key)
    for name in "abcdefgh":  # other work churns through both tiers: the cpu pin holds
        stored(store, name)
    assert cpu.contains(key) and not device.contains(key)
    clock.now += 0.85  # the tool's median (1 s) less the 0.2 s lead has passed
    due = pins.due_prefetches()
    assert [p.keys for p in due] == [(key,)]  # held, but not where the next turn wants it
    assert pins.prefetch(due[0]) == 4 and device.contains(key) and cpu.is_pinned(key)
    assert pins.turn_arrived("t", "p3").pin_held


def test_a_pin_brings_the_path_up_to_the_top_tier_and_holds_it_there_within_that_tiers_budget():
    pins, store, device, cpu, _ = make_pins()
    key = stored(store, "old")
    for name in "abcd":
        stored(store, name)  # "old" is demoted to the cpu tier
    assert cpu.contains(key) and not device.contains(key)
    decision = pins.turn_finished("t", "p1", path(key), SIZE, 4, tool="search")
    assert (decision.pinned, decision.tier) == (True, "device") and device.is_pinned(key)
    assert pins.stats()["budget"]["device"] == {"budget_bytes": 2 * SIZE, "pinned_bytes": SIZE,
                                                "pinned_bytes_max": SIZE, "max_bytes": 4 * SIZE}


def test_no_pin_when_waiting_never_pays_or_the_kv_is_not_local():
    pins, store, device, _, _ = make_pins(profile=PrefillProfile(((4, 0.0),)))  # reload is free
    decision = finish(pins, store, "p1", "search")
    assert (decision.pinned, decision.reason, decision.ttl_s) == (False, "not_worth_it", 0.0)
    assert device.stats().pinned_bytes == 0
    pins, *_ = make_pins()
    gone = pins.turn_finished("t", "p2", path(ChunkKey("never-stored")), SIZE, 4, tool="search")
    assert (gone.pinned, gone.reason) == (False, "not_local")
    assert pins.turn_arrived("t", "p1") == Arrival(False, False, None, None)  # unknown here: nothing to do


def test_reclaim_unpins_least_valuable_first_until_the_head_of_the_queue_fits():
    pins, store, device, _, _ = make_pins(budget_share=0.5)
    teach(pins, "quick", [1.0, 1.0, 1.0])
    teach(pins, "flaky", [0.5, 8.0, 8.0])
    finish(pins, store, "p1", "quick")
    finish(pins, store, "p2", "flaky")
    assert pins.reclaim(2 * SIZE) == 0  # half the tier is unpinned already
    assert pins.reclaim(3 * SIZE) == 1 and not device.is_pinned(ChunkKey("t-p2"))
    assert device.is_pinned(ChunkKey("t-p1"))
    assert pins.reclaim(4 * SIZE) == 1 and device.stats().pinned_bytes == 0
    assert pins.stats()["counters"]["reclaimed"] == 2


def test_client_tool_events_time_the_tool_and_keep_the_pin_for_the_next_turn():
    pins, store, device, _, clock = make_pins(resume_grace_s=2.0)
    assert pins.tool_started("t", "p1", "search") is None  # no KV known yet: timed, not pinned
    clock.now += 0.25
    assert pins.tool_ended("t", "p1") == 0.25
    finish(pins, store, "p1", None)  # a turn without a tool call: nothing pinned
    assert device.stats().pinned_bytes == 0
    assert pins.tool_started("t", "p1", "search").pinned  # the client says a tool runs: pin now
    clock.now += 1.5
    assert pins.tool_ended("t", "p1") == 1.5
    [pin] = pins.stats()["active_pins"]
    assert pin["expires_in_s"] == 2.0 and pin["ttl_s"] == 3.5  # held on past the 2 s TTL for the next turn
    clock.now += 1.0  # past the original expiry
    arrival = pins.turn_arrived("t", "p1")
    assert (arrival.pin_held, arrival.tool_duration_s) == (True, None)  # tool_end already recorded it
    assert pins.stats()["counters"]["extended"] == 1


def test_a_turn_ending_in_a_tool_call_and_the_clients_tool_start_pin_once():
    pins, store, _, _, clock = make_pins()
    finish(pins, store, "p1", "search")
    clock.now += 0.1
    assert pins.tool_started("t", "p1", "search") is None  # the same call: its clock restarts
    clock.now += 1.0
    assert pins.turn_arrived("t", "p1").tool_duration_s == 1.0
    assert pins.stats()["counters"]["created"] == 1


def test_a_new_tool_call_supersedes_the_programs_pin():
    pins, store, device, _, _ = make_pins()
    finish(pins, store, "p1", "search")
    finish(pins, store, "p1", "shell", name="t-p1-next")
    assert [p["tool"] for p in pins.stats()["active_pins"]] == ["shell"]
    assert not device.is_pinned(ChunkKey("t-p1")) and device.is_pinned(ChunkKey("t-p1-next"))


def test_the_last_step_releases_and_forgets_the_program():
    pins, store, device, _, _ = make_pins()
    finish(pins, store, "p1", "search")
    assert pins.turn_finished("t", "p1", path(ChunkKey("t-p1")), SIZE, 4, is_last_step=True) is None
    assert device.stats().pinned_bytes == 0 and pins.stats()["programs"] == 0


def test_the_same_program_id_in_two_tenants_is_two_programs():
    pins, store, device, _, clock = make_pins()
    finish(pins, store, "p", "search", tenant="alpha")
    finish(pins, store, "p", "search", tenant="beta")
    clock.now += 1.0
    assert pins.turn_arrived("alpha", "p").pin_held
    assert not device.is_pinned(ChunkKey("alpha-p")) and device.is_pinned(ChunkKey("beta-p"))
    assert [p["tenant"] for p in pins.stats()["active_pins"]] == ["beta"]
    tools = pins.stats()["predictor"]["tools"]
    assert set(tools) == {"alpha/search"}  # beta's tool has not returned yet


def test_close_releases_every_pin():
    pins, store, device, _, _ = make_pins()
    finish(pins, store, "p1", "search")
    finish(pins, store, "p2", "search")
    assert pins.close() == 2 and device.stats().pinned_bytes == 0


def test_a_share_of_the_whole_tier_is_refused():
    with pytest.raises(ValueError, match="budget_share"):
        PinConfig(budget_share=1.0)
    with pytest.raises(ValueError, match="lower_budget_share"):
        PinConfig(lower_budget_share=0.0)


def test_pinned_bytes_max_is_the_high_water_mark_of_the_budget():
    pins, store, device, _, clock = make_pins(budget_share=0.75)  # 3 of the device's 4 entries
    finish(pins, store, "p1", "search")
    finish(pins, store, "p2", "search")
    clock.now += 0.5
    pins.turn_arrived("t", "p1")
    pins.turn_arrived("t", "p2")
    finish(pins, store, "p3", "search")
    usage = pins.stats()["budget"]["device"]
    assert (usage["pinned_bytes"], usage["pinned_bytes_max"], usage["budget_bytes"]) == (SIZE, 2 * SIZE, 3 * SIZE)


def test_policy_none_never_pins_but_still_times_the_tools():
    pins, store, device, _, clock = make_pins(policy="none")
    decision = finish(pins, store, "p1", "search")
    assert (decision.pinned, decision.reason, decision.ttl_s, decision.source) == (False, "off", 0.0, "off")
    assert device.stats().pinned_bytes == 0
    clock.now += 1.25
    assert pins.turn_arrived("t", "p1") == Arrival(True, False, "search", 1.25)
    stats = pins.stats()
    assert stats["policy"] == "none" and stats["counters"]["off"] == 1 and stats["counters"]["created"] == 0
    assert stats["counters"]["returned_unpinned"] == 1 and stats["budget"]["device"]["pinned_bytes_max"] == 0


def test_policy_fixed_ttl_pins_every_call_for_the_fixed_ttl_whatever_it_is_worth():
    pins, store, device, _, clock = make_pins(profile=PrefillProfile(((4, 0.0),)), policy="fixed_ttl",
                                              fixed_ttl_s=3.0)  # reload is free: tool_ttl would never pin
    teach(pins, "search", [0.1, 0.1, 0.1])  # and the tool is always quick
    decision = finish(pins, store, "p1", "search")
    assert (decision.pinned, decision.ttl_s, decision.source) == (True, 3.0, "fixed")
    assert decision.value_s == pytest.approx(-3.0 * PRESSURE)  # P(3 s) = 1, saving 0, 3 s at mem ratio 1 x pressure
    clock.now += 3.0
    assert pins.stats()["counters"]["expired"] == 1 and not device.is_pinned(ChunkKey("t-p1"))


def test_policy_fixed_ttl_stays_within_the_budget_and_displaces_nothing():
    pins, store, device, _, _ = make_pins(policy="fixed_ttl", budget_share=0.5, cpu_entries=1)  # 2 of 4 entries
    assert finish(pins, store, "p1", "search").pinned and finish(pins, store, "p2", "search").pinned
    third = finish(pins, store, "p3", "search")
    assert (third.pinned, third.reason, third.displaced) == (False, "over_budget", 0)
    assert device.is_pinned(ChunkKey("t-p1")) and device.is_pinned(ChunkKey("t-p2"))
    counters = pins.stats()["counters"]
    assert (counters["created"], counters["over_budget"], counters["displaced"]) == (2, 1, 0)
    assert pins.stats()["budget"]["device"]["pinned_bytes_max"] == 2 * SIZE == pins.budget_bytes("device")


def test_policy_tool_ttl_is_the_default_and_an_unknown_policy_is_refused():
    assert PinConfig().policy == "tool_ttl"
    with pytest.raises(ValueError, match="policy must be one of"):
        PinConfig(policy="lru")
    with pytest.raises(ValueError, match="fixed_ttl_s"):
        PinConfig(fixed_ttl_s=0.0)


def test_the_settings_name_the_pin_policy_and_refuse_an_unknown_one():
    from ragcache.config import SettingsError, load_settings
    from ragcache.service.server import _pin_config

    env = {"RAGCACHE_PIN_POLICY": "fixed_ttl", "RAGCACHE_PIN_FIXED_TTL_S": "0.5", "RAGCACHE_PIN_LOWER_BUDGET_SHARE": "0.7",
           "RAGCACHE_PIN_MEMORY_WEIGHT": "1.5"}
    config = _pin_config(load_settings(env=env))
    assert (config.policy, config.fixed_ttl_s, config.lower_budget_share, config.memory_weight) == ("fixed_ttl", 0.5, 0.7, 1.5)
    assert _pin_config(load_settings(env={})) == PinConfig()  # the settings' defaults are the pins' own
    with pytest.raises(SettingsError, match="pin_policy"):
        load_settings(env={"RAGCACHE_PIN_POLICY": "lru"})
    with pytest.raises(SettingsError, match="pin_fixed_ttl_s"):
        load_settings(flags={"pin_fixed_ttl_s": 0})
    with pytest.raises(SettingsError, match="pin_lower_budget_share"):
        load_settings(flags={"pin_lower_budget_share": 1.0})
    with pytest.raises(SettingsError, match="pin_memory_weight"):
        load_settings(flags={"pin_memory_weight": -1})


def test_a_fuller_pin_budget_prices_memory_higher_and_shortens_the_ttl():
    """Tool durations 1, 2 and 8 s, re-prefill 3 s: with the budget nearly free, covering the 8 s tail pays;
    once other pins hold most of it, the TTL falls back to the durations that return most."""
    profile = PrefillProfile(((4, 3.0),))
    free, store, _, _, _ = make_pins(profile=profile, device_entries=64, cpu_entries=64)
    teach(free, "shell", [1.0, 2.0, 8.0])
    assert finish(free, store, "p1", "shell").ttl_s == 8.0
    full, store, _, _, _ = make_pins(profile=profile, device_entries=4, cpu_entries=1)
    teach(full, "shell", [1.0, 2.0, 8.0])
    assert finish(full, store, "p1", "other").pinned  # the default TTL: one of the budget's two entries
    assert finish(full, store, "p2", "shell").ttl_s == 2.0


def test_a_live_requests_blocks_that_need_pinned_room_make_the_prefix_cache_call_reclaim():
    pins, store, device, _, _ = make_pins(budget_share=0.5)
    pins.cache.reclaimer = pins.reclaim  # what ProgramCoordinator wires
    teach(pins, "search", [1.0, 1.0, 1.0])
    finish(pins, store, "p1", "search")
    finish(pins, store, "p2", "search")
    assert device.stats().pinned_bytes == 2 * SIZE
    blocks = [chunk(4), chunk(4), chunk(4)]  # a request's 3 new blocks: more than the 2 unpinned
    ids = list(range(12))
    pins.cache.insert("t", "exact", pins.cache.block_keys("t", "exact", ids, tail=True), len(ids), 0, blocks)
    assert pins.stats()["counters"]["reclaimed"] == 1 and device.stats().pinned_bytes == SIZE


def test_an_unheld_path_is_prefetched_to_the_top_tier_before_its_tool_is_predicted_to_return():
    pins, store, device, cpu, clock = make_pins(policy="none", prefetch_lead_s=0.5)
    teach(pins, "search", [2.0, 2.0, 2.0])
    finish(pins, store, "p1", "search")  # not pinned: the policy is "none"
    for name in "abcd":
        stored(store, name)  # other work pushes the program's KV down to the cpu tier
    assert cpu.contains(ChunkKey("t-p1")) and not device.contains(ChunkKey("t-p1"))
    clock.now += 1.0
    assert pins.due_prefetches() == []  # the median is 2 s: not yet
    clock.now += 0.6
    due = pins.due_prefetches()
    assert [p.keys for p in due] == [(ChunkKey("t-p1"),)]
    assert pins.prefetch(due[0]) == 4 and device.contains(ChunkKey("t-p1"))
    assert pins.due_prefetches() == []  # once per tool call
    counters = pins.stats()["counters"]
    assert (counters["prefetches"], counters["prefetched_tokens"]) == (1, 4)


def test_a_held_pin_needs_no_prefetch():
    pins, store, device, _, clock = make_pins()
    teach(pins, "search", [2.0, 2.0, 2.0])
    assert finish(pins, store, "p1", "search").pinned
    clock.now += 1.9
    assert pins.due_prefetches() == []


def test_a_pin_running_out_while_its_tool_runs_is_held_on_when_the_tail_pays_and_left_to_expire_when_not():
    pins, store, device, _, clock = make_pins()
    teach(pins, "search", [1.0] * 9 + [20.0])  # τ* = 1 s: the 20 s tail does not pay at the start
    decision = finish(pins, store, "p1", "search")
    assert (decision.pinned, decision.ttl_s) == (True, 1.0)
    clock.now += 0.95
    assert pins.renew_expiring(0.1) == 1  # past 1 s only the tail is left, and a reload costs 10 s
    clock.now += 0.2
    assert device.is_pinned(ChunkKey("t-p1")) and pins.stats()["counters"]["expired"] == 0
    assert pins.turn_arrived("t", "p1").pin_held

    pins, store, device, _, clock = make_pins(profile=PrefillProfile(((4, 1.0),)))  # a reload costs 1 s
    teach(pins, "search", [1.0] * 9 + [20.0])
    assert finish(pins, store, "p1", "search").ttl_s == 1.0
    clock.now += 0.95
    assert pins.renew_expiring(0.1) == 0  # 19 s more of memory for a 1 s reload: let it go
    clock.now += 0.2
    assert pins.stats()["counters"]["expired"] == 1 and not device.is_pinned(ChunkKey("t-p1"))


def test_only_tool_ttl_renews_pins():
    pins, store, device, _, clock = make_pins(policy="fixed_ttl")
    teach(pins, "search", [1.0] * 9 + [20.0])
    finish(pins, store, "p1", "search")
    clock.now += 1.95
    assert pins.renew_expiring(0.1) == 0
