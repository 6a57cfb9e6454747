"""The learned pair verifier: shipped weights, its verdicts on three kinds of pair, training."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from semantic_fixtures import embedder  # noqa: F401

from ragcache.semantic import pair_training
from ragcache.semantic.pair_verifier import DEFAULT_WEIGHTS, PairModel, PairVerifier
from ragcache.semantic.text import features
from ragcache.semantic.verify import Candidate, Verifier

# none of these texts is in the training data
PARAPHRASE_WITH_TYPOS = ("How can I change my acount pasword?", "how do i change my account password")
ROLE_SWAP = ("Did Spain beat Italy in the 2012 final?", "Did Italy beat Spain in the 2012 final?")
NEGATION = ("Does the hostel allow dogs in the rooms?", "Does the hostel not allow dogs in the rooms?")


@pytest.fixture(scope="module")
def verifier(embedder):  # noqa: F811
    return PairVerifier(embedder)


def candidate(new_text: str, cached_text: str) -> Candidate:
    vector = np.zeros(384, dtype=np.float32)
    return Candidate("acme", "faq", "e1", new_text, cached_text, features(new_text), features(cached_text),
                     vector, vector, 0.9)


def test_shipped_weights_are_small_and_load_offline(verifier):
    assert os.path.getsize(DEFAULT_WEIGHTS) < 100_000
    assert isinstance(verifier, Verifier) and verifier.name == "pair"
    assert 0.0 < verifier.threshold < 1.0


def test_a_paraphrase_with_typos_is_the_same_request(verifier):
    assert verifier.probability(*PARAPHRASE_WITH_TYPOS) > 0.7


def test_a_role_swap_is_a_different_request(verifier):
    assert verifier.probability(*ROLE_SWAP) < 0.3


def test_a_negation_is_a_different_request(verifier):
    assert verifier.probability(*NEGATION) < 0.3


def test_probability_is_symmetric(verifier):
    a, b = ROLE_SWAP[0], PARAPHRASE_WITH_TYPOS[1]
    assert verifier.probability(a, b) == pytest.approx(verifier.probability(b, a), abs=1e-6)


def test_reject_reason_is_probability_below_threshold(verifier):
    for pair in (PARAPHRASE_WITH_TYPOS, ROLE_SWAP, NEGATION):
        below = verifier.probability(*pair) < verifier.threshold
        assert verifier.reject_reason(candidate(*pair)) == ("pair" if below else None)
    assert verifier.reject_reason(candidate(*PARAPHRASE_WITH_TYPOS)) is None
    assert verifier.reject_reason(candidate(*ROLE_SWAP)) == "pair"


def test_an_explicit_threshold_overrides_the_stored_one(embedder):  # noqa: F811
    strict = PairVerifier(embedder, threshold=1.0)
    assert strict.reject_reason(candidate(*PARAPHRASE_WITH_TYPOS)) == "pair"
    with pytest.raises(ValueError):
        PairVerifier(embedder, threshold=1.5)


def test_role_swap_keeps_the_words_and_changes_the_text():
    text = "Did Arsenal beat Chelsea in the final?"
    swapped = {pair_training.role_swap(text, random.Random(seed)) for seed in range(20)} - {None}
    assert "Did Chelsea beat Arsenal in the final?" in swapped
    assert all(sorted(s.split()) == sorted(text.split()) and s != text for s in swapped)


def test_training_on_a_tiny_set_writes_weights_that_load(embedder, tmp_path):  # noqa: F811
    texts = ["How do I reset my router?", "Did Arsenal beat Chelsea in the final?", "Is the pool open on Sundays?",
             "Can I move my booking from Friday to Monday?", "What is the capital of the county Pine Springs is in?"]
    pairs = pair_training.synthetic_pairs(texts, random.Random(0))
    assert {p.same for p in pairs} == {True, False}
    out = str(tmp_path / "tiny.npz")
    summary = pair_training.train(pairs, pair_training.TokenEncoder(embedder), out, hidden=4)
    assert summary["pairs"] == len(pairs) and 0.05 <= summary["threshold"] <= 0.95
    tiny = PairVerifier(embedder, weights_path=out)
    assert tiny.threshold == pytest.approx(summary["threshold"], abs=1e-6)
    assert 0.0 <= tiny.probability(*ROLE_SWAP) <= 1.0
    figures = pair_training.evaluate_pairs(tiny, pairs)
    assert figures.num_same + figures.num_different == len(pairs)


def test_weights_for_other_features_are_refused(tmp_path):
    with np.load(DEFAULT_WEIGHTS) as data:
        arrays = dict(data)
    arrays["feature_names"] = arrays["feature_names"][:-1]
    path = str(tmp_path / "old.npz")
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="other features"):
        PairModel(path)
