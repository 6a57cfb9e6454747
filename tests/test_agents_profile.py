"""reload(r): prefill time from a measured profile, or a lower tier's load time, whichever is less."""

import pytest

from ragcache.agents.profile import (
    LoadProfile,
    PrefillProfile,
    kv_bytes_per_token,
    measure_load_profile,
    measure_prefill_profile,
    stack_prefill_fn,
)

PROFILE = PrefillProfile.from_points([(1024, 0.6), (64, 0.064), (256, 0.2)])


class FakeClock:
    """Advanced only by the work being timed, so every measured duration is exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_prefill_interpolates_between_points_and_extrapolates_past_them():
    assert PROFILE.points == ((64, 0.064), (256, 0.2), (1024, 0.6))
    assert PROFILE.prefill_s(0) == 0.0
    assert PROFILE.prefill_s(32) == pytest.approx(0.032)  # from (0, 0) to the first point
    assert PROFILE.prefill_s(256) == pytest.approx(0.2)
    assert PROFILE.prefill_s(160) == pytest.approx(0.132)
    assert PROFILE.prefill_s(2048) == pytest.approx(0.6 + 0.4 / 768 * 1024)  # the last segment's slope


def test_reload_is_the_cheaper_of_prefill_and_load():
    assert PROFILE.reload_s(1024, nbytes=10 << 20) == pytest.approx(0.6)  # no load path: prefill
    fast_cpu = PROFILE.with_load(LoadProfile(bytes_per_s=1e9, latency_s=0.001))
    assert fast_cpu.reload_s(1024, nbytes=10_000_000) == pytest.approx(0.011)
    slow_remote = PROFILE.with_load(LoadProfile(bytes_per_s=1e6, latency_s=0.05))
    assert slow_remote.reload_s(1024, nbytes=10_000_000) == pytest.approx(0.6)


def test_measuring_times_each_length_and_keeps_the_profile_monotone():
    clock = FakeClock()
    calls = []
    cost = {64: 0.05, 256: 0.04, 1024: 0.5}  # 256 measured faster than 64: noise

    def prefill(num_tokens):
        calls.append(num_tokens)
        clock.now += cost[num_tokens]

    profile = measure_prefill_profile(prefill, (1024, 64, 256), repeats=2, clock=clock)
    assert calls == [64, 64, 64, 256, 256, 1024, 1024]  # one warm-up, then each length twice
    assert [n for n, _ in profile.points] == [64, 256, 1024]
    assert [s for _, s in profile.points] == pytest.approx([0.05, 0.05, 0.5])


def test_measuring_a_load_path_fits_latency_and_bandwidth():
    clock = FakeClock()

    def load(nbytes):
        clock.now += 0.002 + nbytes / 2e9

    fitted = measure_load_profile(load, [1 << 20, 8 << 20, 64 << 20], clock=clock)
    assert fitted.bytes_per_s == pytest.approx(2e9, rel=1e-6)
    assert fitted.latency_s == pytest.approx(0.002, abs=1e-9)


def test_bad_profiles_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        PrefillProfile(())
    with pytest.raises(ValueError, match="strictly increasing"):
        PrefillProfile(((256, 0.2), (64, 0.1)))
    with pytest.raises(ValueError, match="bytes_per_s"):
        LoadProfile(0.0)
    with pytest.raises(ValueError, match="two distinct sizes"):
        measure_load_profile(lambda n: None, [1, 1])


def test_stack_prefill_measures_the_real_layer_loop(stack, make_engine):
    profile = measure_prefill_profile(stack_prefill_fn(stack), (16, 64), repeats=1)
    assert [n for n, _ in profile.points] == [16, 64]
    assert 0 < profile.points[0][1] <= profile.points[1][1]
    # a program's stored path is exactly its tokens times kv_bytes_per_token
    from ragcache.engine.generate import SamplingParams
    from ragcache.engine.runner import RagRequest

    engine = make_engine()
    result = engine.generate(RagRequest("Ping?", program_id="p", sampling=SamplingParams(max_tokens=3)))
    path = result.prefix_path
    assert path.num_tokens > 0 and path.nbytes == kv_bytes_per_token(engine.stack) * path.num_tokens
