"""Tool-duration predictor: empirical CDFs, cold start, Continuum's TTL choice and its cap."""

import pytest

from ragcache.agents.cdf import EmpiricalCDF
from ragcache.agents.predictor import PredictorConfig, ToolDurationPredictor


def learned(durations, tool="search", tenant="t", **config):
    predictor = ToolDurationPredictor(PredictorConfig(**config))
    for duration in durations:
        predictor.record(tenant, tool, duration)
    return predictor


SEARCH = [1.0] * 8 + [4.0] * 2  # 80% return in 1 s, the rest in 4 s


def test_the_cdf_is_the_share_of_samples_at_or_below():
    cdf, source = learned(SEARCH).distribution("t", "search")
    assert source == "tool" and len(cdf) == 10
    assert (cdf.at(0.5), cdf.at(1.0), cdf.at(3.9), cdf.at(4.0)) == (0.0, 0.8, 0.8, 1.0)
    assert cdf.between(1.0, 4.0) == 1.0 and cdf.between(4.0, 10.0) == 0.0  # nothing outlives 4 s
    assert cdf.quantile(0.5) == 1.0 and cdf.mean_s == pytest.approx(1.6)


def test_ttl_is_the_observed_duration_that_maximises_value():
    predictor = learned(SEARCH)
    # saving 2 s. mem 0.1: τ=1 -> 0.8·2 − 0.1 = 1.5; τ=4 -> 2 − 0.4 = 1.6
    cheap = predictor.choose("t", "search", reload_s=2.0, mem_ratio=0.1, queue_delay_s=0.0)
    assert (cheap.ttl_s, cheap.probability, cheap.source) == (4.0, 1.0, "tool")
    assert cheap.value_s == pytest.approx(1.6)
    # mem 0.2: τ=1 -> 1.4; τ=4 -> 1.2: holding for the slow tail no longer pays
    assert predictor.ttl_s("t", "search", reload_s=2.0, mem_ratio=0.2, queue_delay_s=0.0) == 1.0
    # the queueing delay (times η) counts as saving too: T=4, η=0.5 -> saving 4: τ=1 -> 3.0, τ=4 -> 3.2
    assert predictor.ttl_s("t", "search", reload_s=2.0, mem_ratio=0.2, queue_delay_s=4.0, eta=0.5) == 4.0


def test_ttl_is_zero_when_waiting_never_pays():
    predictor = learned(SEARCH)
    assert predictor.ttl_s("t", "search", reload_s=0.0, mem_ratio=1.0, queue_delay_s=0.0) == 0.0
    assert predictor.ttl_s("t", "search", reload_s=0.5, mem_ratio=1.0, queue_delay_s=0.0) == 0.0  # 0.4 − 1 < 0
    never = predictor.choose("t", "search", reload_s=0.5, mem_ratio=1.0, queue_delay_s=0.0)
    assert (never.probability, never.value_s) == (0.0, 0.0)


def test_cold_start_default_then_global_then_the_tools_own():
    predictor = ToolDurationPredictor(PredictorConfig(min_samples=3, default_ttl_s=2.0, default_probability=0.5))
    first = predictor.choose("t", "shell", reload_s=10.0, mem_ratio=1.0, queue_delay_s=0.0)
    assert (first.ttl_s, first.source, first.value_s) == (2.0, "default", 3.0)  # 0.5·10 − 2
    assert predictor.ttl_s("t", "shell", reload_s=1.0, mem_ratio=1.0, queue_delay_s=0.0) == 0.0  # default can't pay
    for duration in (0.5, 0.5, 3.0):
        predictor.record("t", "search", duration)
    via_global = predictor.choose("t", "shell", reload_s=10.0, mem_ratio=1.0, queue_delay_s=0.0)
    assert (via_global.ttl_s, via_global.source) == (3.0, "global")  # 10 − 3 beats 0.667·10 − 0.5
    for duration in (0.2, 0.2, 0.2):
        predictor.record("t", "shell", duration)
    own = predictor.choose("t", "shell", reload_s=10.0, mem_ratio=1.0, queue_delay_s=0.0)
    assert (own.ttl_s, own.source) == (0.2, "tool")


def test_max_ttl_drops_longer_durations_from_the_candidates():
    durations = [1.0] * 2 + [40.0] * 8
    uncapped = learned(durations, max_ttl_s=60.0)
    assert uncapped.ttl_s("t", "search", reload_s=100.0, mem_ratio=1.0, queue_delay_s=0.0) == 40.0
    capped = learned(durations, max_ttl_s=30.0)
    assert capped.ttl_s("t", "search", reload_s=100.0, mem_ratio=1.0, queue_delay_s=0.0) == 1.0


def test_history_is_bounded_and_follows_recent_behaviour():
    predictor = learned([10.0] * 6 + [1.0] * 4, max_samples=4, min_samples=2)
    cdf, _ = predictor.distribution("t", "search")
    assert cdf.durations_s == (1.0, 1.0, 1.0, 1.0)
    assert predictor.stats()["global_samples"] == 10


def test_tenants_learn_separately_but_share_the_global_cold_start():
    predictor = learned(SEARCH, tenant="alpha")
    assert predictor.distribution("alpha", "search")[1] == "tool"
    assert predictor.distribution("beta", "search")[1] == "global"


def test_hold_probability_of_a_pin_already_held():
    predictor = learned(SEARCH)
    assert predictor.hold_probability("t", "search", ttl_s=4.0, age_s=0.0) == 1.0
    assert predictor.hold_probability("t", "search", ttl_s=1.0, age_s=0.0) == 0.8
    assert predictor.hold_probability("t", "search", ttl_s=4.0, age_s=2.0) == 1.0  # the slow ones are still due
    cold = ToolDurationPredictor()
    assert cold.hold_probability("t", "x", ttl_s=2.0, age_s=1.0) == 0.5
    assert cold.hold_probability("t", "x", ttl_s=2.0, age_s=2.0) == 0.0


def test_stats_compare_predicted_ttls_with_actual_durations():
    predictor = ToolDurationPredictor()
    predictor.record("t", "search", 1.0, predicted_ttl_s=2.0)
    predictor.record("t", "search", 3.0, predicted_ttl_s=2.0)
    predictor.record("t", "search", 2.0)  # no pin was given: a sample, not an outcome
    tool = predictor.stats()["tools"]["t/search"]
    assert (tool["samples"], tool["mean_s"], tool["p50_s"]) == (3, 2.0, 2.0)
    assert tool["p90_s"] == pytest.approx(2.8)
    assert tool["predicted_vs_actual"] == {"pins": 2, "mean_predicted_ttl_s": 2.0, "mean_actual_s": 2.0, "covered": 0.5}


def test_bad_configs_and_samples_are_refused():
    with pytest.raises(ValueError, match="min_samples"):
        PredictorConfig(min_samples=0)
    with pytest.raises(ValueError, match="default_ttl_s"):
        PredictorConfig(default_ttl_s=60.0, max_ttl_s=30.0)
    with pytest.raises(ValueError, match="duration_s"):
        ToolDurationPredictor().record("t", "x", -1.0)
    with pytest.raises(ValueError, match="at least one"):
        EmpiricalCDF(())
