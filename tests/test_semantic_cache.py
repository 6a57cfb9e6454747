"""SemanticCache with the real MiniLM embedder and answers in process memory: one scenario per test."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from ragcache.semantic import DEFAULT_POLICIES, CategoryPolicy, LoadConfig, Message, SemanticQuery, documents_hash
from ragcache.semantic.adaptive import ThresholdController
from ragcache.semantic.classifier import CategoryClassifier
from semantic_fixtures import Clock, embedder, make_cache, query  # noqa: F401  (embedder is a fixture)

QUESTION = "How do I reset my password?"
PARAPHRASE = "Hi, how can I reset my password please?"
FLIXORA = (
    Message("user", "I've got a Flixora subscription I barely use anymore."),
    Message("assistant", "Your Flixora Standard plan renews on the 14th at £10.99. Would you like to cancel or change plan?"),
)
PULSEFIT = (
    Message("user", "My PulseFit gym membership is costing me too much, I'm hardly going."),
    Message("assistant", "Your PulseFit Off-Peak membership is £24.99 a month. Would you like to cancel or freeze it?"),
)


@pytest.fixture
def cache(embedder):
    return make_cache(embedder)


def test_a_paraphrase_hits_with_its_similarity_and_entry(cache):
    assert cache.lookup(query(QUESTION)) is None
    assert cache.store(query(QUESTION), "Use the 'Forgot password' link.")
    hit = cache.lookup(query(PARAPHRASE))
    assert hit is not None and hit.answer == "Use the 'Forgot password' link."
    assert hit.category == "factual" and 0.9 < hit.similarity <= 1.0 and hit.context_similarity is None
    row = cache.stats().categories[0]
    assert (row.tenant, row.category, row.entries, row.lookups, row.hits, row.stores) == ("acme", "factual", 1, 2, 1, 1)


def test_guards_turn_down_one_word_traps(cache):
    cache.store(query("Is ibuprofen safe to take with alcohol?"), "No.")
    outcome = cache.lookup_outcome(query("Is ibuprofen unsafe to take with alcohol?"))
    assert outcome.hit is None and [r.reason for r in outcome.rejections] == ["negation"]
    assert cache.lookup(query("Is paracetamol safe to take with alcohol?")) is None
    assert cache.stats().categories[0].rejections["negation"] == 1


def test_tenants_never_see_each_other(cache):
    cache.store(query(QUESTION, tenant="acme"), "acme's answer")
    assert cache.lookup(query(QUESTION, tenant="globex")) is None
    cache.store(query(QUESTION, tenant="globex"), "globex's answer")
    assert cache.lookup(query(QUESTION, tenant="acme")).answer == "acme's answer"
    assert cache.lookup(query(QUESTION, tenant="globex")).answer == "globex's answer"


def test_documents_model_and_system_prompt_must_match(cache):
    docs = documents_hash(["The Amazon flows into the Atlantic."])
    cache.store(query("Which river flows into the Atlantic?", documents_hash=docs, model="m1"), "The Amazon.")
    assert cache.lookup(query("Which river flows into the Atlantic?", documents_hash=docs, model="m1")) is not None
    other_docs = documents_hash(["The Danube flows into the Black Sea."])
    assert cache.lookup(query("Which river flows into the Atlantic?", documents_hash=other_docs, model="m1")) is None
    assert cache.lookup(query("Which river flows into the Atlantic?", documents_hash=docs, model="m2")) is None
    assert cache.lookup(query("Which river flows into the Atlantic?", documents_hash=docs, model="m1",
                              system="Answer in French.")) is None


def test_each_category_applies_its_own_threshold(embedder):
    cache = make_cache(embedder, default_verifiers=("guards",))
    cache.set_policy("code", dataclasses.replace(DEFAULT_POLICIES["code"], threshold=0.95, max_threshold=0.97))
    cache.store(query("How do I reverse a list in Python?", category="code"), "lst[::-1]")
    cache.store(query("How do I reverse a list in Python?", category="factual"), "lst[::-1]")
    reworded = "How can a Python list be reversed?"  # cosine 0.91 with the stored question
    factual_hit = cache.lookup(query(reworded, category="factual"))
    assert factual_hit is not None and 0.45 < factual_hit.similarity < 0.95
    assert cache.lookup(query(reworded, category="code")) is None
    assert {row.category: row.threshold for row in cache.stats().categories} == {"code": 0.95, "factual": 0.45}


def test_expired_entries_are_never_served(embedder):
    clock = Clock()
    cache = make_cache(embedder, clock=clock)
    cache.set_policy("factual", CategoryPolicy(0.55, ttl_s=60.0, max_entries=10))
    cache.store(query(QUESTION), "answer")
    clock.advance(59.0)
    assert cache.lookup(query(QUESTION)) is not None
    clock.advance(1.0)
    assert cache.lookup(query(QUESTION)) is None
    assert cache.stats().categories[0].entries == 0  # swept at its hard expiry


def test_a_shorter_ttl_set_at_run_time_applies_to_existing_entries(embedder):
    clock = Clock()
    cache = make_cache(embedder, clock=clock)
    cache.store(query(QUESTION), "answer")
    clock.advance(120.0)
    assert cache.lookup(query(QUESTION)) is not None
    cache.set_policy("factual", CategoryPolicy(0.55, ttl_s=60.0, max_entries=10))
    assert cache.lookup(query(QUESTION)) is None


def test_quota_evicts_fewest_hits_then_oldest(embedder):
    clock = Clock()
    cache = make_cache(embedder, clock=clock)
    cache.set_policy("factual", CategoryPolicy(0.55, ttl_s=3600.0, max_entries=3))
    texts = ["What are your opening hours?", "How much does delivery cost?", "Do you sell gift vouchers?"]
    for text in texts:
        cache.store(query(text), text)
        clock.advance(1.0)
    assert cache.lookup(query(texts[0])) is not None  # the oldest now has a hit
    cache.store(query("Where is my nearest store?"), "store")
    remaining = {text for text in texts + ["Where is my nearest store?"] if cache.lookup(query(text)) is not None}
    assert remaining == {texts[0], texts[2], "Where is my nearest store?"}  # the oldest without hits went
    assert cache.stats().categories[0].evictions == 1


def test_the_same_words_after_different_conversations_never_match(cache):
    cache.store(query("cancel it", history=FLIXORA), "Your Flixora plan is cancelled.")
    assert cache.lookup(query("Cancel it.", history=FLIXORA)).answer == "Your Flixora plan is cancelled."
    outcome = cache.lookup_outcome(query("Cancel it.", history=PULSEFIT))
    assert outcome.hit is None and [r.reason for r in outcome.rejections] == ["context"]


def test_a_self_contained_question_ignores_unrelated_history(cache):
    question = "What's the cooling-off period for a new Kestrel broadband contract?"
    cache.store(query(question, history=FLIXORA), "14 days.")
    assert cache.lookup(query(question, history=PULSEFIT)).answer == "14 days."


def test_sampled_and_opted_out_requests_bypass_unless_asked(cache):
    cache.store(query(QUESTION), "answer")
    assert cache.lookup_outcome(query(QUESTION, temperature=0.7)).bypass == "sampled"
    assert cache.lookup_outcome(query(QUESTION, use_cache=False)).bypass == "disabled"
    assert cache.lookup(query(QUESTION, temperature=0.7, cache_sampled=True)) is not None
    assert not cache.store(query("Another question about delivery?", temperature=0.7), "x")
    assert cache.stats().bypasses == {"acme:disabled": 1, "acme:sampled": 1}


def test_a_disabled_category_neither_serves_nor_stores(cache):
    cache.set_policy("factual", dataclasses.replace(DEFAULT_POLICIES["factual"], enabled=False))
    assert not cache.store(query(QUESTION), "answer")
    assert cache.lookup_outcome(query(QUESTION)).bypass == "category_off"


def test_reporting_a_false_hit_removes_it_counts_it_and_tightens(cache):
    cache.store(query(QUESTION), "answer")
    hit = cache.lookup(query(PARAPHRASE))
    before = cache.stats().categories[0].threshold
    assert cache.report_false_hit("acme", hit.entry_id)
    assert not cache.report_false_hit("acme", hit.entry_id)
    assert not cache.report_false_hit("globex", hit.entry_id)
    assert cache.lookup(query(PARAPHRASE)) is None
    row = cache.stats().categories[0]
    assert (row.false_hits, row.entries) == (1, 0)
    assert row.threshold == pytest.approx(before + 0.02)


def test_invalidate_by_tenant_category_and_entry(cache):
    cache.store(query(QUESTION), "a")
    cache.store(query("How do I sort a dict by value in Python?", category="code"), "b")
    cache.store(query(QUESTION, tenant="globex"), "c")
    entry = cache.lookup(query(QUESTION)).entry_id
    assert cache.invalidate("acme", entry_id=entry) == 1
    assert cache.invalidate("acme", category="code") == 1
    assert cache.invalidate("acme") == 0
    assert cache.invalidate("globex") == 1


def test_load_relaxes_thresholds_and_ttls_within_bounds_then_idle_tightens():
    seconds = [0.0]
    control = ThresholdController(LoadConfig(idle_half_life_s=10.0), clock=lambda: seconds[0])
    policy = CategoryPolicy(0.80, ttl_s=60.0, max_entries=10, min_threshold=0.70, max_ttl_s=300.0)
    assert control.threshold("t", "factual", policy) == 0.80 and control.ttl_s(policy) == 60.0
    for _ in range(50):
        control.update_load(queue_depth=100, ttft_s=30.0)
    assert control.pressure() == pytest.approx(1.0, abs=1e-6)
    assert control.threshold("t", "factual", policy) == pytest.approx(0.70)
    assert control.ttl_s(policy) == pytest.approx(300.0)
    seconds[0] += 10.0  # one idle half-life
    assert control.threshold("t", "factual", policy) == pytest.approx(0.75, abs=1e-6)
    seconds[0] += 200.0
    assert control.threshold("t", "factual", policy) == pytest.approx(0.80, abs=1e-6)
    off = ThresholdController(LoadConfig(enabled=False))
    off.update_load(queue_depth=100)
    assert off.threshold("t", "factual", policy) == 0.80 and off.state().pressure == 0.0


def test_load_lets_a_looser_match_hit_and_shows_in_stats(embedder):
    cache = make_cache(embedder, default_verifiers=("guards",))  # thresholds under load, not a verifier's verdict
    cache.set_policy("factual", CategoryPolicy(0.90, ttl_s=60.0, max_entries=10, min_threshold=0.60, max_ttl_s=60.0))
    cache.store(query("How do I reset my password?"), "answer")
    looser = query("I forgot my password, what should I do?")
    assert cache.lookup(looser) is None
    for _ in range(30):
        cache.update_load(queue_depth=64, ttft_s=20.0)
    assert cache.lookup(looser) is not None
    stats = cache.stats()
    assert stats.load.pressure > 0.99 and stats.thresholds["factual"] == pytest.approx(0.60, abs=0.01)


def test_classifier_rules_then_centroids(embedder):
    classifier = CategoryClassifier(embedder)

    def category(text: str, self_contained: bool = True) -> str:
        return classifier.classify(text, embedder.embed([text])[0], self_contained).category

    assert category("Why does this fail?\n```python\nprint(x\n```") == "code"
    assert category('Traceback (most recent call last):\n  File "app.py", line 3') == "code"
    assert category("What's the weather in Paris today?") == "volatile"
    assert category("What is the current price of Bitcoin right now?") == "volatile"
    assert category("cancel it", self_contained=False) == "conversation"
    assert category("How do I read a CSV file with pandas and drop empty rows?") == "code"
    assert category("What documents do I need to open a bank account?") == "factual"


def test_an_unknown_category_is_refused(cache):
    with pytest.raises(ValueError, match="unknown category"):
        cache.lookup(query(QUESTION, category="gossip"))


def test_concurrent_stores_and_lookups_lose_nothing(embedder):
    cache = make_cache(embedder)
    texts = [f"What is the opening time of branch number {i}?" for i in range(24)]
    errors: list[BaseException] = []

    def work(part: list[str]) -> None:
        try:
            for text in part:
                assert cache.store(query(text), text)
                cache.lookup(query(texts[0]))
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(texts[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert cache.stats().categories[0].entries == 24
    assert all(cache.lookup(query(text)).answer == text for text in texts)


def test_faiss_index_serves_the_same_way(embedder):
    pytest.importorskip("faiss")
    from ragcache.semantic import IndexConfig

    cache = make_cache(embedder, index=IndexConfig(kind="faiss"))
    cache.store(query(QUESTION), "answer")
    assert cache.lookup(query(PARAPHRASE)).answer == "answer"
    assert cache.stats().index == "faiss"


def test_from_messages_keys_on_the_last_user_message(cache):
    messages = [{"role": "system", "content": "Be brief."}, *[m._asdict() for m in FLIXORA],
                {"role": "user", "content": "cancel it"}]
    q = SemanticQuery.from_messages("acme", messages)
    assert (q.text, q.system, len(q.history)) == ("cancel it", "Be brief.", 2)
    cache.store(q, "cancelled")
    assert cache.lookup(SemanticQuery.from_messages("acme", messages)).answer == "cancelled"
