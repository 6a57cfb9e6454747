"""The verifier between a nearest neighbour and a hit: each trap rejected for its reason, paraphrases let through."""

from __future__ import annotations

import pytest

from ragcache.semantic.conversation import answers_reply, is_self_contained, split_messages
from ragcache.semantic.guards import check_question
from ragcache.semantic.text import features, strip_pleasantries


def verdict(cached: str, new: str, similarity: float = 0.9) -> str | None:
    return check_question(features(new), features(cached), similarity)


@pytest.mark.parametrize(
    "cached, new, reason",
    [
        ("Is ibuprofen safe to take with alcohol?", "Is ibuprofen unsafe to take with alcohol?", "negation"),
        ("Is the deposit refundable?", "Is the deposit non-refundable?", "negation"),
        ("Cancel my subscription", "Don't cancel my subscription", "negation"),
        ("How do I enable dark mode?", "How do I disable dark mode?", "negation"),
        ("Is the clinic open on Sundays?", "Is the clinic closed on Sundays?", "negation"),
        ("What are the opening hours of the Camden branch?", "What are the opening hours of the Brixton branch?", "entity"),
        ("Who is the CEO of Microsoft?", "Who is the CEO of Apple?", "entity"),
        ("Does the hotel have a pool?", "Does the hotel have a gym?", "entity"),
        ("What's the interest rate on a 2-year fixed mortgage?", "What's the interest rate on a 5-year fixed mortgage?", "number"),
        ("Remind me at 7am", "Remind me at 7pm", "number"),
        ("Track order 48213", "Track order 48231", "number"),
        ("How many calories are in one egg?", "How many calories are in three eggs?", "number"),
        ("Are you open on Saturday?", "Are you open on Sunday?", "date"),
        ("What was my bill in January?", "What was my bill in June?", "date"),
        ("What does my insurance cover?", "What does my car insurance cover?", "scope"),
        ("How much holiday do full-time staff get?", "How much holiday do part-time staff get?", "scope"),
        ("What's the check-in time?", "What's the check-out time?", "scope"),
        ("Transfer £50 from my savings to my current account", "Transfer £50 from my current account to my savings", "order"),
        ("How do I convert a Word document to PDF?", "How do I convert a PDF to a Word document?", "order"),
    ],
)
def test_traps_are_rejected_for_their_reason(cached, new, reason):
    assert verdict(cached, new) == reason


@pytest.mark.parametrize(
    "cached, new",
    [
        ("How do I change the email address on my account?", "How do I chnage the email adress on my acount?"),
        ("How do I order a replacement debit card?", "Hi, quick one: how do I order a replacement debit card?"),
        ("How do I register with a GP surgery?", "Could you tell me how I register with a GP surgery, please?"),
        ("How do I cancel my subscription?", "I'd like to end my subscription, how do I do that?"),
        ("What's the capital of Australia?", "Which city is Australia's capital?"),
        ("How do I update my online banking password?", "How do I change my online banking password?"),
        ("Transfer £50 from my savings to my current account", "Move fifty pounds from savings into my current account"),
        ("Do you accept Apple Pay?", "Do You Accept Apple Pay?"),
    ],
)
def test_paraphrases_and_near_repeats_pass(cached, new):
    assert verdict(cached, new, similarity=0.95) is None


def test_a_changed_ordinary_word_is_trusted_only_at_high_similarity():
    cached, new = "What's the excess on my contents insurance?", "What's the excess on my contents insurance policy?"
    assert verdict(cached, new, similarity=0.90) == "scope"
    assert verdict(cached, new, similarity=0.96) is None
    # the hard checks hold at any similarity
    assert verdict("Is ibuprofen safe with alcohol?", "Is ibuprofen unsafe with alcohol?", similarity=0.99) == "negation"


def test_numbers_dates_and_names_are_read_as_values():
    f = features("Book 2 seats for twenty one people at 7pm on Mondays, £1,350 total, order PB-5521 with Harbour Bank")
    assert f.numbers == {"2", "21", "19", "1350", "5521"}
    assert f.dates == {"monday"}
    assert {"harbour", "bank"} <= f.entities


def test_pleasantries_around_a_request_are_dropped():
    assert strip_pleasantries("Sorry to bother you, but how do I reset the app? Many thanks") == "How do I reset the app?"
    assert strip_pleasantries("so um can i change the name on my ticket") == "Can i change the name on my ticket"
    assert strip_pleasantries("What are the visiting hours, please?") == "What are the visiting hours?"


@pytest.mark.parametrize(
    "text, contained",
    [
        ("What's the cooling-off period for a new Kestrel broadband contract?", True),
        ("Is PulseFit open on Christmas Day?", True),
        ("How long do refunds take to show on my card?", True),
        ("cancel it", False),
        ("does that include breakfast?", False),
        ("yes please", False),
        ("the second one", False),
        ("book the first slot", False),
        ("so when's my first payday?", False),
        ("is there an early exit fee?", False),
        ("How do I verify?", False),
    ],
)
def test_last_messages_are_judged_self_contained_or_dependent(text, contained):
    assert is_self_contained(text) is contained


def test_bare_replies_are_recognised():
    assert answers_reply("Yes please") and answers_reply("go ahead") and answers_reply("the first one, thanks")
    assert not answers_reply("What's the cheapest plan?")


def test_messages_split_into_system_history_and_last_user_message():
    conversation = split_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "I have a Flixora plan"},
        {"role": "assistant", "content": "Would you like to cancel it?"},
        {"role": "user", "content": "yes"},
    ])
    assert conversation.system == "Be brief."
    assert [m.role for m in conversation.history] == ["user", "assistant"]
    assert conversation.text == "yes"
