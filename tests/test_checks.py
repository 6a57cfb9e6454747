"""Shadow checks and the blend error budget: estimates, steering, and checks run on a real engine."""

import threading

import pytest
import torch

from ragcache.checks.blend_budget import BlendBudget, BlendBudgetConfig, BlendSetting, default_ladder, is_steerable
from ragcache.checks.estimate import Tally, wilson_interval
from ragcache.checks.shadow import ShadowChecks, ShadowConfig, compare_first_token
from ragcache.engine.generate import SamplingParams
from ragcache.engine.runner import RagRequest

from conftest import DOCUMENTS, QUESTION


def test_wilson_interval_contains_the_rate_and_narrows_with_more_observations():
    low, high = wilson_interval(1, 10)
    assert low < 0.1 < high
    low_more, high_more = wilson_interval(10, 100)
    assert low < low_more < 0.1 < high_more < high
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 50)[1] > 0  # a run of successes is not certainty


def test_a_tally_keeps_a_window():
    tally = Tally(window=4)
    for error in (True, True, False, False, False, False):
        tally.add(error, 0.5)
    assert tally.estimate().n == 4 and tally.estimate().errors == 0 and tally.mean_value() == 0.5


@pytest.mark.parametrize("name", ["prefix", "blend@0.3", "blend@0.3/attention", "blend@0.15/epic4",
                                  "blend@0.15/key+epic2"])
def test_a_setting_round_trips_through_its_name(name):
    assert BlendSetting.parse(name).name == name


@pytest.mark.parametrize("bad", ["blend@x", "blend@1.5", "fast", "prefix@0.3", "blend@0.3/median", "blend/key"])
def test_a_bad_setting_is_refused_by_name(bad):
    with pytest.raises(ValueError):
        BlendSetting.parse(bad)


def test_a_setting_applies_to_a_request_and_only_defaults_are_steered():
    request = RagRequest(QUESTION, DOCUMENTS)
    assert is_steerable(request)
    steered = BlendSetting.parse("blend@0.3/attention").apply(request)
    assert (steered.mode, steered.blend_ratio, steered.blend_deviation) == ("blend", 0.3, "attention")
    assert not is_steerable(RagRequest(QUESTION, DOCUMENTS, blend_ratio=0.5))
    assert not is_steerable(RagRequest(QUESTION, DOCUMENTS, mode="full"))
    assert default_ladder(0.5) == ("blend@0.5", "blend@0.5/attention", "prefix")


def _budget(**config):
    clock = iter(range(10_000))
    return BlendBudget(BlendBudgetConfig(**config), clock=lambda: float(next(clock)))


def test_the_budget_steps_up_when_disagreement_may_exceed_epsilon_and_says_why():
    budget = _budget(epsilon=0.1, min_checks=10, step_down_after=50, window=200)
    first = budget.setting_for("t", "factual").name
    for i in range(10):
        budget.observe("t", "factual", first, disagreed=i < 3, kl=0.2)
    state = budget.state()[0]
    assert state["setting"] != first and budget.setting_for("t", "factual").name == state["setting"]
    assert state["last_change"]["from"] == first and "epsilon" in state["last_change"]["reason"]
    assert state["estimates"][first]["n"] == 10 and state["estimates"][first]["errors"] == 3
    assert budget.setting_for("t", "code").name == first  # per (tenant, category)
    assert budget.setting_for("other", "factual").name == first


def test_the_budget_stays_while_the_upper_bound_holds_and_steps_back_down_when_well_inside():
    budget = _budget(epsilon=0.2, min_checks=10, step_down_after=40, window=200)
    ladder = [s.name for s in budget.ladder]
    for _ in range(10):
        budget.observe("t", "c", ladder[0], disagreed=True)
    assert budget.setting_for("t", "c").name == ladder[1]
    for _ in range(39):
        budget.observe("t", "c", ladder[1], disagreed=False)
    assert budget.setting_for("t", "c").name == ladder[1]  # not yet enough evidence to go faster
    budget.observe("t", "c", ladder[1], disagreed=False)
    assert budget.setting_for("t", "c").name == ladder[0]  # retried with a clean record
    assert budget.state()[0]["changes"] == 2


def test_a_clean_record_is_not_judged_before_it_could_bound_the_rate_within_epsilon():
    budget = _budget(epsilon=0.05, min_checks=5, step_down_after=100, window=200)
    first = budget.ladder[0].name
    for _ in range(19):
        budget.observe("t", "c", first, disagreed=False)
    assert budget.setting_for("t", "c").name == first  # 0 in 19: upper bound 5.0%, within
    budget.observe("t", "c", first, disagreed=True)
    assert budget.setting_for("t", "c").name != first  # 1 in 20: judged, and the upper bound exceeds 5%


def test_observations_of_another_setting_do_not_steer_the_one_in_force():
    budget = _budget(epsilon=0.1, min_checks=5, step_down_after=5, window=50)
    ladder = [s.name for s in budget.ladder]
    for _ in range(20):
        budget.observe("t", "c", ladder[2], disagreed=True)
        budget.observe("t", "c", "blend@0.99", disagreed=True)  # not a rung: ignored
    assert budget.setting_for("t", "c").name == ladder[0]


def test_the_last_rung_is_never_left_upwards():
    budget = _budget(epsilon=0.1, min_checks=5, step_down_after=5, window=50, ladder=("blend@0.15", "prefix"))
    for _ in range(10):
        budget.observe("t", "c", "blend@0.15", disagreed=True)
    for _ in range(3):
        budget.observe("t", "c", "prefix", disagreed=True)
    assert budget.setting_for("t", "c").name == "prefix"


def test_first_token_comparison():
    full = torch.log_softmax(torch.tensor([3.0, 1.0, 0.0]), -1)
    same = compare_first_token(full.clone(), full)
    assert same.agreed and abs(same.kl) < 1e-6
    other = compare_first_token(torch.log_softmax(torch.tensor([0.0, 3.0, 0.0]), -1), full)
    assert not other.agreed and other.kl > 0.5


def test_a_blend_check_runs_full_prefill_in_the_background_and_reaches_the_budget(make_engine):
    engine = make_engine()
    engine.add_documents(list(DOCUMENTS))
    budget = BlendBudget(BlendBudgetConfig(ladder=("blend@0.5", "prefix")))
    shadow = ShadowChecks(engine, budget, ShadowConfig(blend_fraction=1.0))
    setting = budget.setting_for("t", "c")
    request = setting.apply(RagRequest(QUESTION, DOCUMENTS, sampling=SamplingParams(max_tokens=4)))
    assert shadow.sample_blend()
    served = engine.generate(request, return_logprobs=True)
    full = engine.generate(RagRequest(QUESTION, DOCUMENTS, mode="full", sampling=SamplingParams(max_tokens=1)),
                           return_logprobs=True)
    shadow.check_blend("t", "c", setting.name, request, served)
    shadow.close()  # the submission has happened: step the background sequence to its end
    while shadow.stats()["pending"]:
        engine.step()
    estimate = budget.state()[0]["estimates"]["blend@0.5"]
    expected = compare_first_token(served.first_token_logprobs, full.first_token_logprobs)
    assert estimate["n"] == 1 and estimate["errors"] == int(not expected.agreed)
    assert estimate["mean_first_token_kl"] == pytest.approx(expected.kl, abs=1e-4)
    assert shadow.stats()["counts"] == {"blend_sampled": 1, "blend_done": 1} and shadow.stats()["pending"] == 0


def test_sampling_respects_the_fraction_and_the_pending_bound(make_engine):
    shadow = ShadowChecks(None, BlendBudget(), ShadowConfig(blend_fraction=1.0, max_pending=2, seed=1))
    assert [shadow.sample_blend() for _ in range(3)] == [True, True, False]
    assert shadow.stats()["counts"]["blend_skipped_busy"] == 1
    shadow.abandon()
    assert shadow.sample_blend()
    half = ShadowChecks(None, BlendBudget(), ShadowConfig(blend_fraction=0.5, max_pending=10_000, seed=3))
    drawn = sum(half.sample_blend() for _ in range(1000))
    assert 400 < drawn < 600
    never = ShadowChecks(None, BlendBudget(), ShadowConfig(blend_fraction=0.0))
    assert not any(never.sample_blend() for _ in range(100))


def test_the_budget_is_thread_safe():
    budget = BlendBudget(BlendBudgetConfig(min_checks=10, step_down_after=10, window=10_000))

    def observe():
        for i in range(500):
            budget.observe("t", "c", budget.setting_for("t", "c").name, disagreed=i % 2 == 0)

    threads = [threading.Thread(target=observe) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(row["n"] for row in budget.state()[0]["estimates"].values()) == 2000


def test_answer_agreement_is_scored_on_labelled_pairs(make_engine):
    from ragcache.bench.agreement import measure_agreement
    from ragcache.semantic.embedder import SentenceTransformerEmbedder

    report = measure_agreement(make_engine(), SentenceTransformerEmbedder(), pairs=4, max_tokens=4)
    assert report["pairs"] == 4 and sum(report["by_rule"].values()) == 4
    assert sum(n for key, n in report["by_rule"].items() if key.startswith("same:")) == 2
    assert 0.0 <= report["same_meaning_agree"] <= 1.0 and 0.0 <= report["trap_agree"] <= 1.0
