"""The verifier seam, learned thresholds holding δ, shadow-check labels, invalidation by document."""

from __future__ import annotations

import math
import random
import sys

import msgspec
import pytest

from ragcache.semantic import SemanticCacheConfig, SemanticQuery, documents_hash
from ragcache.semantic.agreement import answers_agree
from ragcache.semantic.learned import LearnedConfig, LearnedThresholds, Observation, estimate, wilson_bounds
from ragcache.semantic.types import document_digest
from semantic_fixtures import embedder, make_cache, query  # noqa: F401  (embedder is a fixture)

SAFE = "Is ibuprofen safe to take with alcohol?"
UNSAFE = "Is ibuprofen unsafe to take with alcohol?"  # cosine 0.985 with SAFE
QUESTION = "How do I reset my password?"
PARAPHRASE = "Hi, how can I reset my password please?"  # cosine 0.99 once the greeting is stripped
LOOSER = "I forgot my password, what should I do?"  # cosine 0.83


def observations(category: str, points, tenant: str = "acme", entry_id: str | None = None) -> list[Observation]:
    return [Observation(tenant, category, entry_id, s, c) for s, c in points]


def clean_run(low: float, high: float, n: int) -> list[tuple[float, bool]]:
    return [(low + (high - low) * i / (n - 1), True) for i in range(n)]


# the seam


def test_verifiers_run_in_order_and_the_first_rejection_wins(embedder):
    wrong_above = observations("factual", [(0.99, False)] * 5 + clean_run(0.991, 1.0, 60))
    reasons = {}
    for order in (("guards", "learned"), ("learned", "guards")):
        cache = make_cache(embedder, verifiers={"factual": order})
        cache.learn(wrong_above)  # learned threshold ~0.991: the 0.985 trap is below it
        cache.store(query(SAFE), "No.")
        outcome = cache.lookup_outcome(query(UNSAFE))
        assert outcome.hit is None
        reasons[order] = [r.reason for r in outcome.rejections]
    assert reasons == {("guards", "learned"): ["negation"], ("learned", "guards"): ["threshold"]}


def test_facts_then_pair_is_the_default_and_names_show_in_stats(embedder):
    cache = make_cache(embedder)
    cache.store(query(QUESTION), "Use the link.")
    assert cache.lookup(query(PARAPHRASE)).answer == "Use the link."
    row = cache.stats().categories[0]
    assert row.verifiers == ("facts", "pair") and row.learned is None
    assert not SemanticCacheConfig().policies["conversation"].enabled  # no verifier measured safe there
    unguarded = make_cache(embedder, verifiers={"factual": ("guards", "learned")}, guards=_guards_off())
    unguarded.store(query(QUESTION), "x")
    assert unguarded.stats().categories[0].verifiers == ("learned",)


def test_unknown_and_unavailable_verifiers_are_refused(embedder, monkeypatch):
    with pytest.raises(ValueError, match="verifiers must be distinct names"):
        SemanticCacheConfig(verifiers={"factual": ("guards", "oracle")})
    monkeypatch.setitem(sys.modules, "ragcache.semantic.pair_verifier", None)  # the module is not importable
    with pytest.raises(ValueError, match="verifier 'pair' is unavailable"):
        make_cache(embedder, verifiers={"code": ("pair",)})


# the estimator


def test_wilson_bounds_bracket_the_rate():
    low, high = wilson_bounds(5, 100, 0.95)
    assert low < 0.05 < high and high == pytest.approx(0.0992, abs=1e-3)
    assert wilson_bounds(0, 60, 0.95)[1] == pytest.approx(0.0431, abs=1e-3)


def test_the_threshold_rises_when_wrong_answers_arrive_at_high_similarity():
    learned = LearnedThresholds(LearnedConfig(min_observations=30))
    learned.learn(observations("factual", clean_run(0.60, 0.99, 200)))
    assert learned.threshold("acme", "factual", 0.05, 0.5) == pytest.approx(0.60)
    learned.learn(observations("factual", [(0.70, False), (0.72, False), (0.74, False), (0.76, False), (0.78, False),
                                           (0.80, False)] * 2))
    raised = learned.threshold("acme", "factual", 0.05, 0.5)
    assert 0.80 < raised < 0.85  # above every wrong observation: the bound fails wherever one is included
    change = learned.stats("acme", "factual", 0.05, 0.5).last_change
    assert change.before == pytest.approx(0.60) and change.after == raised and "raised" in change.reason


def test_the_threshold_falls_when_correct_answers_arrive_below_it_but_never_under_the_floor():
    learned = LearnedThresholds(LearnedConfig(min_observations=30))
    learned.learn(observations("factual", [(0.79, False)] * 3 + clean_run(0.80, 0.99, 60)))
    assert learned.threshold("acme", "factual", 0.05, 0.5) == pytest.approx(0.80)
    learned.learn(observations("factual", clean_run(0.40, 0.79, 400)))  # correct answers below it
    lowered = learned.threshold("acme", "factual", 0.05, 0.5)
    assert 0.5 <= lowered < 0.79  # below the three wrong ones (now rare enough), bounded by the floor
    assert learned.threshold("acme", "factual", 0.05, 0.7) >= 0.7


def test_cold_until_enough_observations_then_closed_when_no_threshold_holds():
    learned = LearnedThresholds(LearnedConfig(min_observations=30))
    learned.learn(observations("code", clean_run(0.9, 1.0, 29)))
    assert learned.threshold("acme", "code", 0.05, 0.5) is None  # the policy's threshold applies
    assert learned.threshold("acme", "factual", 0.05, 0.5) is None
    noisy = LearnedThresholds(LearnedConfig(min_observations=30))
    noisy.learn(observations("code", [(0.5 + i / 200, i % 3 != 0) for i in range(100)]))
    assert noisy.threshold("acme", "code", 0.05, 0.5) == 1.0  # only identical texts


@pytest.mark.parametrize("delta", [0.05, 0.1])
def test_delta_holds_on_a_synthetic_stream(delta):
    """P(correct | s) rises from 0.1 at s = 0.6 to 0.99 at s = 1; learned on 4,000 observations,
    the wrong rate among 40,000 fresh ones above the threshold stays under δ and it serves."""
    rng = random.Random(7)

    def draw(n: int) -> list[tuple[float, bool]]:
        points = []
        for _ in range(n):
            s = rng.uniform(0.6, 1.0)
            p_correct = 1 / (1 + math.exp(-(s - 0.8) * 25))
            points.append((s, rng.random() < p_correct))
        return points

    found = estimate(draw(4000), delta, 0.95, 30, 0.6)
    fresh = [(s, c) for s, c in draw(40_000) if s >= found.threshold]
    wrong_rate = sum(not c for _, c in fresh) / len(fresh)
    assert wrong_rate <= delta and found.wrong_rate_high <= delta
    assert len(fresh) > 0.15 * 40_000  # a threshold, not a shutdown


def test_an_entry_gets_its_own_threshold_after_enough_observations():
    config = LearnedConfig(min_observations=30, entry_min_observations=40)
    learned = LearnedThresholds(config)
    learned.learn(observations("factual", [(0.85, False)] * 10 + clean_run(0.90, 1.0, 60)))
    assert learned.in_force("acme", "factual", "e1", 0.05, 0.5, cold=0.55) == pytest.approx(0.90)
    learned.learn(observations("factual", clean_run(0.70, 0.80, 39), entry_id="e1"))
    assert learned.in_force("acme", "factual", "e1", 0.05, 0.5, cold=0.55) == pytest.approx(0.90)  # 39 < 40
    learned.learn(observations("factual", clean_run(0.70, 0.80, 21), entry_id="e1"))
    assert learned.in_force("acme", "factual", "e1", 0.05, 0.5, cold=0.55) == pytest.approx(0.70)  # 60 clean
    assert learned.in_force("acme", "factual", "e2", 0.05, 0.5, cold=0.55) == pytest.approx(0.90)
    assert learned.stats("acme", "factual", 0.05, 0.5).entries_with_own_threshold == 1
    learned.learn(observations("factual", [(0.75, False)], entry_id="e1"))  # wrong once at 0.75
    assert learned.in_force("acme", "factual", "e1", 0.05, 0.5, cold=0.55) == 1.0  # 30 clean above it: too few
    learned.learn(observations("factual", [(0.95, True)] * 30, entry_id="e1"))
    assert 0.75 < learned.in_force("acme", "factual", "e1", 0.05, 0.5, cold=0.55) < 0.76


# the cache's API


def test_record_check_labels_known_entries_only_and_a_wrong_one_is_not_served_again(embedder):
    cache = make_cache(embedder, verifiers={"factual": ("guards", "learned")})
    cache.store(query(QUESTION), "Use the link.")
    hit = cache.lookup(query(PARAPHRASE))
    assert hit is not None
    assert not cache.record_check("acme", "no-such-entry", 0.9, True)
    assert not cache.record_check("globex", hit.entry_id, 0.9, True)
    assert not cache.record_check("acme", hit.entry_id, 0.9, True, category="code")
    assert cache.record_check("acme", hit.entry_id, hit.similarity, False)
    assert cache.lookup(query(PARAPHRASE)) is None  # this entry was wrong at this similarity
    assert cache.lookup(query(QUESTION)).answer == "Use the link."  # closer still serves
    row = cache.stats().categories[0]
    assert (row.checks, row.checks_wrong, row.learned.observations, row.learned.wrong) == (1, 1, 1, 1)


def test_a_reported_false_hit_is_a_wrong_observation_at_its_similarity(embedder):
    cache = make_cache(embedder, verifiers={"factual": ("guards", "learned")})
    cache.store(query(QUESTION), "Use the link.")
    hit = cache.lookup(query(PARAPHRASE))
    assert cache.report_false_hit("acme", hit.entry_id)
    learned = cache.stats().categories[0].learned
    assert (learned.observations, learned.wrong, learned.threshold) == (1, 1, None)  # still cold


def test_learned_thresholds_replace_the_policy_and_show_in_stats(embedder):
    cache = make_cache(embedder, verifiers={"factual": ("guards", "learned")})
    cache.learn(observations("factual", [(0.95, False)] * 3 + clean_run(0.96, 1.0, 80)))
    cache.store(query(QUESTION), "Use the link.")
    outcome = cache.lookup_outcome(query(LOOSER))  # 0.83: the policy's 0.55 would serve it
    assert outcome.hit is None and [r.reason for r in outcome.rejections] == ["threshold"]
    row = cache.stats().categories[0]
    assert row.threshold == pytest.approx(0.96) and row.learned.threshold == pytest.approx(0.96)
    assert row.learned.served == 80 and row.learned.wrong_rate_high <= 0.05
    assert row.learned.last_change.before is None and "learn" in row.learned.last_change.reason
    as_json = msgspec.json.decode(msgspec.json.encode(msgspec.to_builtins(cache.stats())))
    assert as_json["categories"][0]["learned"]["threshold"] == pytest.approx(0.96)


def test_a_lowered_learned_threshold_serves_below_the_policy(embedder):
    cache = make_cache(embedder, verifiers={"factual": ("guards", "learned")})
    cache.set_policy("factual", _policy(threshold=0.95, min_threshold=0.5))
    cache.store(query(QUESTION), "Use the link.")
    assert cache.lookup(query(LOOSER)) is None  # cold: the policy's 0.95
    cache.learn(observations("factual", clean_run(0.80, 1.0, 80)))
    assert cache.lookup(query(LOOSER)).answer == "Use the link."


# documents


def test_documents_hash_is_made_of_the_per_document_digests():
    texts = ["The Amazon flows into the Atlantic.", "The Danube flows into the Black Sea."]
    assert documents_hash(texts) == SemanticQuery("acme", "q", document_digests=[document_digest(t) for t in texts]
                                                  ).documents_hash
    assert document_digest(texts[0]) != document_digest(texts[0] + " ")


def test_answers_built_on_a_document_are_dropped_with_it(embedder):
    cache = make_cache(embedder)
    amazon, danube = document_digest("The Amazon..."), document_digest("The Danube...")
    cache.store(query("Which river flows into the Atlantic?", document_digests=(amazon, danube)), "The Amazon.")
    cache.store(query("Which river flows into the Black Sea?", document_digests=(danube,)), "The Danube.")
    cache.store(query("Where is the Amazon?", document_digests=(amazon,), tenant="globex"), "Brazil.")
    cache.store(query(QUESTION), "Use the link.")
    assert cache.invalidate_documents("acme", [amazon]) == 1
    assert cache.lookup(query("Which river flows into the Atlantic?", document_digests=(amazon, danube))) is None
    assert cache.lookup(query("Which river flows into the Black Sea?", document_digests=(danube,))) is not None
    assert cache.invalidate_documents("acme", [danube, "unknown"]) == 1
    assert cache.lookup(query(QUESTION)) is not None  # built on no document
    assert cache.lookup(query("Where is the Amazon?", document_digests=(amazon,), tenant="globex")) is not None
    assert cache.stats().categories[0].invalidated_by_document == 2


# answer agreement


@pytest.mark.parametrize(
    "cached, fresh, agree, rule",
    [
        ("The Amazon.", "amazon", True, "normalised"),
        ("14 days", "30 days", False, "numbers"),
        ("Your plan costs £10.99 a month, billed on the 14th.", "Your plan costs £24.99 a month, billed on the 14th.",
         False, "numbers"),
        ("Yes.", "No, it is not.", False, "short"),
        ("You can cancel your subscription at any time from the account page, and you keep access until the end "
         "of the billing period.", "You cannot cancel your subscription from the account page; you must phone us "
         "and access stops at once.", False, "negation"),
        ("You can cancel your subscription at any time from the account page, and you keep access until the end "
         "of the billing period.", "Cancel whenever you like in your account settings; access continues until the "
         "current billing period ends.", True, "cosine"),
        ("Paris is the capital of France and its largest city by population.", "The weather in Paris is mild in "
         "spring and crowded in summer with tourists visiting the museums.", False, "cosine"),
    ],
)
def test_answer_agreement(embedder, cached, fresh, agree, rule):
    verdict = answers_agree(cached, fresh, embedder)
    assert (verdict.agree, verdict.rule) == (agree, rule)
    assert (verdict.similarity is not None) == (rule == "cosine")


def _guards_off():
    from ragcache.semantic import GuardConfig

    return GuardConfig(enabled=False)


def _policy(threshold: float, min_threshold: float):
    from ragcache.semantic import CategoryPolicy

    return CategoryPolicy(threshold, 3600.0, 100, min_threshold=min_threshold)


def test_facts_checks_negation_numbers_and_dates_and_leaves_words_to_a_learned_verifier():
    from ragcache.semantic.guards import check_facts, check_question
    from ragcache.semantic.text import features

    def facts(a, b):
        return check_facts(features(a), features(b))

    assert facts("Can I cancel online?", "Can I not cancel online?") == "negation"
    assert facts("Is the 2-year plan cheaper?", "Is the 5-year plan cheaper?") == "number"
    assert facts("Is the shop open on Saturday?", "Is the shop open on Sunday?") == "date"
    swapped = ("How do I get from Camden to Brixton?", "How do I get from Brixton to Camden?")
    assert facts(*swapped) is None  # roles are the pair verifier's job, not a word list's
    assert check_question(features(swapped[0]), features(swapped[1]), 0.98) is not None  # the guards' order check


def test_the_facts_verifier_is_known_by_name(embedder):  # noqa: F811
    cache = make_cache(embedder, default_verifiers=("facts",))
    assert cache.store(query("Can I cancel my plan online?"), "Yes, under Settings.")
    assert cache.lookup(query("Can I not cancel my plan online?")) is None
    assert cache.lookup(query("Can I cancel my plan online?")).answer == "Yes, under Settings."


@pytest.mark.parametrize("verifier", ["guards", "facts"])
def test_a_dependent_message_is_served_only_in_the_same_context(embedder, verifier):  # noqa: F811
    cache = make_cache(embedder, default_verifiers=(verifier,))

    def chat(context):
        messages = [{"role": "user", "content": context}, {"role": "assistant", "content": "Sure, I can help."},
                    {"role": "user", "content": "how do I cancel it?"}]
        return SemanticQuery.from_messages("t", messages, category="conversation")

    assert cache.store(chat("My Flixora streaming plan costs too much."), "Settings > Plan > Cancel.")
    assert cache.lookup(chat("My Flixora streaming plan costs too much.")) is not None
    assert cache.lookup(chat("My PulseFit gym membership at 24.99 a month is too dear.")) is None
