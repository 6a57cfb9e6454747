"""The word lists the guards read: what may differ between two requests, and what may not.

Plain English vocabulary, no model: function words that never change an answer, opposite
pairs that always do, and a small table of synonyms ("update" = "change"). Each entry is
general English, but the lists were written while reading fow-cache's question pairs,
mostly the half whose ids end in an odd digit (the tuning half); `ragcache bench
semantic` reports the other half apart, and the gap between the two is the measure of
how much of this is fitted. Expect to extend the lists for another domain's vocabulary.
"""

from __future__ import annotations

# Words whose presence or absence never changes what is being asked: function words,
# auxiliaries, pronouns, question words, politeness and speech fillers, hedges.
IGNORABLE = frozenset(
    """
    a an the this that these those there here it its it's itself they them their theirs
    i me my mine myself we us our ours you your yours yourself he him his she her hers
    is are was were be been being am do does did doing done have has had having
    can could will would shall should may might must ought
    to from of in on at by for with about as into onto upon via per
    and or but if so then than too also just still even ever yet already
    what which who whom whose when where why how whats whos wheres hows
    please pls thanks thank thx ta cheers hi hello hey hiya morning afternoon evening greetings
    sorry bother quick question wondering wonder um uh er erm hmm ok okay yeah yes yep well oh
    like really actually basically usually typically normally generally currently kindly
    possible able way ways go going anyway anything something tell know let want wanted
    got much many time available offer provide need needs needed require required up
    somewhere anywhere someone anyone somebody anybody something
    s d ll re ve m t
    """.split()
)

# Words of greeting, apology and thanks: a run of them before the first or after the last
# comma or full stop is dropped ("Sorry to bother you, but how do I ...? Many thanks").
PLEASANTRIES = frozenset(
    """
    hi hello hey hiya morning good afternoon evening team there all everyone folks sorry silly quick
    question one just wondering um uh er erm so okay ok yeah well oh right hmm but and to bother you
    dumb stupid random thanks thank many cheers in advance please ta much lots appreciated
    """.split()
)

# Words after which the next content word is a verb ("how do I *cancel*", "I'd like to *end*"):
# two requests that differ only in a verb that is not an opposite ask the same thing.
VERB_CUES = frozenset("i you we they to please not".split())

# Verb + particle written as one word, so that "sign up" is a verb and "check in" a compound.
PHRASES = {
    "sign up": "signup",
    "signed up": "signup",
    "set up": "setup",
    "log in": "login",
    "sign in": "login",
    "check in": "check-in",
    "check out": "check-out",
    "opt in": "opt-in",
    "opt out": "opt-out",
    "turn on": "turn-on",
    "turn off": "turn-off",
    "switch on": "switch-on",
    "switch off": "switch-off",
    "top up": "top-up",
    "find out": "find",
    "fill in": "fill",
    "fill out": "fill",
}

# Negation words: an odd count flips what a sentence asks.
NEGATORS = frozenset("not no never without none nothing nobody nowhere neither nor cannot".split())

# Prefixes that negate the word they are attached to ("unsafe", "non-refundable").
NEGATING_PREFIXES = ("non-", "non", "un", "dis", "in", "im", "il", "ir", "de")

# Opposites: one side asking about the first and the other about the second never share an
# answer. Groups: every word of a group is opposite to every word of the other group.
OPPOSITES: tuple[tuple[frozenset[str], frozenset[str]], ...] = tuple(
    (frozenset(left.split()), frozenset(right.split()))
    for left, right in (
        ("open opened opening", "closed close shut"),
        ("add adding added", "remove removing removed delete take"),
        ("increase increased raise higher more bigger larger", "decrease decreased reduce lower less smaller"),
        ("enable enabled activate", "disable disabled deactivate"),
        ("include included including", "exclude excluded excluding"),
        ("allow allowed permit permitted", "ban banned prohibit prohibited forbid forbidden"),
        ("accept accepted approve approved", "decline declined reject rejected refuse refused deny denied"),
        ("upgrade", "downgrade"),
        ("safe suitable", "unsafe unsuitable dangerous harmful"),
        (
            "benefit benefits advantage advantages pro pros upside upsides",
            "drawback drawbacks disadvantage disadvantages con cons downside downsides risk risks",
        ),
        ("best", "worst"),
        ("most", "least"),
        ("maximum max", "minimum min"),
        ("hot warm", "cold cool"),
        ("before within", "after"),
        ("under below", "over above"),
        ("first", "last"),
        ("early earlier", "late later"),
        ("start begin", "stop end finish"),
        ("join enrol enroll subscribe", "leave withdraw unsubscribe quit"),
        ("pause", "resume"),
        ("grant", "revoke"),
        ("lock", "unlock"),
        ("mute", "unmute"),
        ("archive", "unarchive"),
        ("eat", "avoid"),
        ("take", "avoid"),
        ("pass", "fail"),
        ("success successful", "unsuccessful failure"),
        ("compulsory mandatory required", "optional"),
        ("spicy", "mild"),
        ("busy", "quiet"),
        ("import", "export"),
        ("upload", "download"),
        ("buy purchase", "sell"),
        ("send", "receive"),
        ("deposit", "withdraw"),
        ("credit", "debit"),
        ("win won", "lose lost"),
        ("legal lawful", "illegal unlawful"),
        ("cover covered", "exclude excluded"),
        ("public", "private hide hidden"),
        ("improve boost", "damage harm hurt worsen"),
        ("submit claim request apply", "approve"),
        ("popular", "unpopular"),
        ("employed", "unemployed"),
        ("adult adults", "child children kid kids baby babies infant toddler"),
        ("men", "women"),
        ("landlord", "tenant"),
        ("employer", "employee"),
        ("buyer", "seller"),
        ("domestic", "international long-haul"),
    )
)

# Words that ask the same thing: each set maps to its first word before two requests are compared.
SYNONYMS: tuple[tuple[str, ...], ...] = tuple(
    tuple(group.split())
    for group in (
        "change update modify edit amend alter switch",
        "start begin commence",
        "get obtain receive acquire",
        "make submit file lodge create generate setup",
        "cancel terminate",
        "need require",
        "find locate",
        "book reserve",
        "price cost charge fee pricing",
        "buy purchase",
        "register signup enrol",
        "order request",
        "send email",
        "fix repair mend",
        "choose select pick",
        "delete erase",
        "close shut",
        "big large",
        "quick fast quickest fastest speedy",
        "shop store",
        "atm cashpoint",
        "street road",
        "agent agency",
        "kid kids child children",
        "contact call phone ring",
        "move transfer",
        "refund reimbursement",
        "parcel package",
        "allowed permitted",
        "issue problem",
        "deadline due",
        "renew renewal",
    )
)

NUMBER_WORDS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
    "hundred": 100,
    "thousand": 1000,
    "million": 1_000_000,
    "dozen": 12,
}

# Words that name when: two requests about different days or periods need different answers.
DATE_WORDS = frozenset(
    """
    monday tuesday wednesday thursday friday saturday sunday weekday weekdays weekend weekends
    january february march april may june july august september october november december
    today tonight tomorrow yesterday morning afternoon evening night midnight noon
    daily weekly monthly yearly annually annual spring summer autumn fall winter
    """.split()
) - {"may"}  # "may" is far more often the verb

# Currency and unit words read as part of the number they follow ("fifty pounds" = "£50").
UNIT_WORDS = frozenset("pound pounds quid dollar dollars euro euros percent p".split())

# Prepositions whose object says which way something goes: "from A to B" is not "from B to A".
ROLE_PREPOSITIONS = {"from": "from", "to": "to", "into": "to", "than": "than", "vs": "vs", "versus": "vs"}
