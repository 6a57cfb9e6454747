"""Train and measure the pair verifier (pair_verifier.py) on the CPU, offline.

    python -m ragcache.semantic.pair_training --out ragcache/data/pair_verifier.npz

Data, all public and licensed for this (nothing else is read, nothing is downloaded):
    fow-cache's tuning half (PyPI fow_cache, CC BY 4.0): the question pairs and the positive
        conversation pairs (last user messages) whose id ends in an odd digit. Even ids are the
        held-out half: they are never trained on, only measured by `--report`.
    texts to augment: the tuning half's question texts and MuSiQue's dev questions and
        passage sentences (/work/shared/data/musique_dev.json or --musique, CC BY 4.0).
Augmentation (seeded): positives by typos, casing, punctuation, greetings and fillers,
contractions, interchangeable question openings and a phrase moved to the front; negatives
by swapping two names or nouns around (role swaps, PAWS-style), a negation added, a
name/word/number replaced by one from another text, and each text's nearest other text
(retrieval negatives).
Recipe: the features of pair_verifier.py (24 alignment scalars, and the unmatched vector
projected on its first 8 principal components), standardised; an MLP with one tanh layer
of 16 units (scikit-learn, L2 0.1, seeded); 20% of the source texts held out as
validation. The stored threshold is the lowest at which validation different-meaning
pairs are accepted at most `max_wrong` (8%) of the time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from ragcache.semantic.pair_verifier import FEATURE_NAMES, PairVerifier, TokenEncoder, pair_features

MUSIQUE = "/work/shared/data/musique_dev.json"

# closed-class English words (determiners, pronouns, auxiliaries, prepositions, conjunctions):
# what a "content word" is not. Grammar, not vocabulary of any benchmark.
FUNCTION_WORDS = frozenset(
    """
a an the this that these those my your his her its our their me you him them us i we he she it they
is are was were be been being am do does did doing have has had can could will would shall should may might must
of to from in on at by for with about into onto over under between than as and or but nor so if then
not no what which who whom whose when where why how there here some any all each every more most much many
up down out off also just very too s t""".split()
)
AUXILIARIES = (
    "is",
    "are",
    "was",
    "were",
    "do",
    "does",
    "did",
    "can",
    "could",
    "should",
    "will",
    "would",
    "has",
    "have",
)
RELATIONS = ("to", "from", "than", "vs", "with", "by", "for", "over", "against", "into", "before", "after")
FRONTABLE = ("in", "on", "at", "for", "with", "during", "after", "before", "from", "by")
OPENINGS = (
    "how do i",
    "how can i",
    "how could i",
    "how should i",
    "how would i",
    "how to",
    "what's the best way to",
    "what is the way to",
    "how does one",
    "how can someone",
    "what should i do to",
)
NOUN_CUES = frozenset(
    "the a an my your his her their its our this that of in on at from to with by for about into between".split()
)
PRONOUNS = frozenset("i you we he she it they someone one".split())
GREETINGS = ("hi,", "hey", "hello,", "quick question:", "ok so", "um,", "please,", "can you tell me")
FILLERS = ("um", "like", "just", "actually", "so", "really", "basically", "please", "exactly", "uh")
CLOSINGS = ("thanks", "thank you", "please", "?", "??", "thx", "pls")


class LabelledPair(NamedTuple):
    a: str
    b: str
    same: bool  # do they ask the same thing (fow-cache's same_answer)
    kind: str  # where it came from: "fow:<category>", "typo", "role_swap", ...
    group: str  # the source text or item it was made from; splits never cut a group


class PairFigures(NamedTuple):
    num_same: int
    num_different: int
    served: float  # share of same-meaning pairs accepted
    wrong: float  # share of different-meaning pairs accepted


def fow_pairs(held_out: bool) -> list[LabelledPair]:
    """fow-cache's question pairs and conversation pairs (last user messages) of one half."""
    import fow_cache

    def in_half(item) -> bool:
        return (int(item["id"][-1]) % 2 == 0) == held_out

    def last_user(messages) -> str:
        return [m["content"] for m in messages if m["role"] == "user"][-1]

    pairs = [
        LabelledPair(q["a"], q["b"], bool(q["same_answer"]), f"fow:{q['category']}", q["id"])
        for q in fow_cache.load_questions()
        if in_half(q)
    ]
    pairs += [
        LabelledPair(last_user(c["a"]), last_user(c["b"]), bool(c["same_answer"]), f"fow-conv:{c['subtype']}", c["id"])
        for c in fow_cache.load_conversations()
        if in_half(c)
    ]
    return pairs


def musique_texts(path: str = MUSIQUE, num_sentences: int = 1000, seed: int = 0) -> tuple[list[str], list[str]]:
    """(questions, passage sentences of 6-30 words) from a MuSiQue file in CacheBlend's shape."""
    with open(path) as handle:
        items = json.load(handle)
    questions = [item["question"] for item in items]
    unique = {s.strip() for item in items for ctx in item["ctxs"] for s in re.split(r"(?<=[.!?])\s+", ctx["text"])}
    sentences = sorted(s for s in unique if 6 <= len(s.split()) <= 30 and s[:1].isalpha())
    return questions, random.Random(seed).sample(sentences, min(num_sentences, len(sentences)))


def _words(text: str) -> list[str]:
    return text.split()


def _core(word: str) -> str:
    return re.sub(r"^\W+|\W+$", "", word).lower()


def _is_content(word: str) -> bool:
    core = _core(word)
    return len(core) >= 3 and core.isalpha() and core not in FUNCTION_WORDS


def typo(word: str, rng: random.Random) -> str:
    """One keyboard slip inside a word: swap, drop, double or replace a letter."""
    if len(word) < 4:
        return word
    i = rng.randrange(1, len(word) - 1)
    edit = rng.randrange(4)
    if edit == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if edit == 1:
        return word[:i] + word[i + 1 :]
    if edit == 2:
        return word[:i] + word[i] + word[i:]
    return word[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + word[i + 1 :]


def noisy(text: str, rng: random.Random) -> str:
    """The same request typed differently: typos, case, punctuation, greetings, openings, contractions."""
    words = _words(text)
    for i in rng.sample(range(len(words)), k=min(len(words), rng.choice((0, 1, 1, 2)))):
        if _is_content(words[i]):
            words[i] = typo(words[i], rng)
    if len(words) >= 3 and rng.random() < 0.25:
        words.insert(rng.randrange(1, len(words)), rng.choice(FILLERS))
    out = " ".join(words)
    lowered = out.lower()
    for opening in OPENINGS:
        if lowered.startswith(opening + " ") and rng.random() < 0.7:
            out = rng.choice([o for o in OPENINGS if o != opening]) + out[len(opening) :]
            break
    swaps = (
        (r"\bdo not\b", "don't"),
        (r"\bdon't\b", "do not"),
        (r"\bwhat is\b", "what's"),
        (r"\bwhat's\b", "what is"),
        (r"\bI am\b", "I'm"),
        (r"\bcan not\b", "can't"),
        (r"\bcannot\b", "can't"),
    )
    for pattern, replacement in swaps:
        if rng.random() < 0.5:
            out = re.sub(pattern, replacement, out, flags=re.I)
    if rng.random() < 0.3:
        out = rng.choice(GREETINGS) + " " + out[:1].lower() + out[1:]
    if rng.random() < 0.4:
        out = out.rstrip("?.!")
    if rng.random() < 0.2:
        out = out + " " + rng.choice(CLOSINGS)
    if rng.random() < 0.4:
        out = out.lower()
    return out


def front_phrase(text: str, rng: random.Random) -> str | None:
    """'How do I X on the app?' -> 'On the app, how do I X?': the same question, another order."""
    words = _words(text.rstrip("?.!"))
    spots = [i for i, w in enumerate(words) if i >= 3 and w.lower() in FRONTABLE and len(words) - i <= 5]
    if not spots:
        return None
    i = rng.choice(spots)
    phrase, rest = " ".join(words[i:]), " ".join(words[:i])
    end = "?" if text.rstrip().endswith("?") else ""
    return phrase[:1].upper() + phrase[1:] + ", " + rest[:1].lower() + rest[1:] + end


def role_swap(text: str, rng: random.Random) -> str | None:
    """Swap two names, the nouns either side of a relation word, or two nouns: the same
    words in other roles ("X beat Y" -> "Y beat X"); a noun is a content word after a
    determiner or preposition."""
    words = _words(text)
    names = _name_spans(words)
    nouns = [(i, i + 1) for i in range(1, len(words)) if _is_content(words[i]) and _core(words[i - 1]) in NOUN_CUES]
    relations = [k for k in range(1, len(words) - 1) if words[k].lower() in RELATIONS]
    pivots = [
        ((k - 1, k), (k + 1, k + 2)) for k in relations if _is_content(words[k - 1]) and _is_content(words[k + 1])
    ]
    choice = rng.random()
    if len(names) >= 2 and choice < 0.5:
        first, second = sorted(rng.sample(names, 2))
    elif pivots and choice < 0.75:
        first, second = rng.choice(pivots)
    elif len(nouns) >= 2:
        first, second = sorted(rng.sample(nouns, 2))
    else:
        return None
    if first[1] > second[0] or [_core(w) for w in words[slice(*first)]] == [_core(w) for w in words[slice(*second)]]:
        return None
    a, b = words[slice(*first)], words[slice(*second)]
    a_new, b_new = _respell(a, b), _respell(b, a)
    return " ".join(words[: first[0]] + a_new + words[first[1] : second[0]] + b_new + words[second[1] :])


def _name_spans(words: list[str]) -> list[tuple[int, int]]:
    """[start, end) of each run of capitalised content words that does not open the text."""
    spans, i = [], 1
    while i < len(words):
        if words[i][:1].isupper() and _is_content(words[i]):
            j = i + 1
            while (
                j < len(words)
                and words[j][:1].isupper()
                and _core(words[j]).isalpha()
                and not re.search(r"\W$", words[j - 1])
            ):
                j += 1
            spans.append((i, j))
            i = j
        else:
            i += 1
    return spans


def _respell(into: list[str], source: list[str]) -> list[str]:
    """source's words with into's leading and trailing punctuation."""
    lead_match, trail_match = re.match(r"^\W*", into[0]), re.search(r"\W*$", into[-1])
    assert lead_match is not None and trail_match is not None  # \W* matches even the empty string
    lead, trail = lead_match.group(0), trail_match.group(0)
    cores = [re.sub(r"^\W+|\W+$", "", w) for w in source]
    cores[0] = lead + cores[0]
    cores[-1] = cores[-1] + trail
    return cores


def negate(text: str, rng: random.Random) -> str | None:
    """'Is the shop open?' -> 'Is the shop not open?' / 'Isn't the shop open?' is not this: the
    negation goes on the predicate ('How do I pay?' -> 'How do I never pay?', 'It is' -> 'It isn't')."""
    words = _words(text)
    spots = [i for i, w in enumerate(words[:-1]) if w.lower() in AUXILIARIES]
    if not spots:
        return None
    i = rng.choice(spots)
    if i > 0 and _core(words[i + 1]) not in PRONOUNS and rng.random() < 0.4:
        aux = words[i].lower()
        words[i] = {"can": "can't", "will": "won't"}.get(aux, aux + "n't")
        return " ".join(words)
    if _core(words[i + 1]) in PRONOUNS:
        at = i + 2
    elif i == 0:
        at = 1
        while at < len(words) - 1 and not _is_content(words[at]):
            at += 1
        at += 1
    else:
        at = i + 1
    return " ".join(words[:at] + [rng.choice(("not", "not", "never"))] + words[at:]) if at < len(words) else None


def substitute(text: str, donors: Sequence[str], rng: random.Random) -> str | None:
    """One name, word or number replaced by another text's: 'learn Python' -> 'learn Java'."""
    words = _words(text)
    numbers = [i for i, w in enumerate(words) if any(ch.isdigit() for ch in w)]
    if numbers and rng.random() < 0.5:
        i = rng.choice(numbers)
        words[i] = re.sub(r"\d+", lambda m: str(int(m.group(0)) + rng.choice((1, 2, 5, 10, 100))), words[i], count=1)
        return " ".join(words)
    content = [i for i, w in enumerate(words) if _is_content(w)]
    if not content:
        return None
    i = rng.choice(content)
    capital = words[i][:1].isupper()
    pool = [w for w in _words(rng.choice(donors)) if _is_content(w) and w[:1].isupper() == capital]
    present = {_core(w) for w in words}
    pool = [w for w in pool if _core(w) not in present]
    if not pool:
        return None
    words[i] = _respell([words[i]], [rng.choice(pool)])[0]
    return " ".join(words)


def synthetic_pairs(texts: Sequence[str], rng: random.Random, kind_prefix: str = "") -> list[LabelledPair]:
    """For each text: two noisy positives, a reordered positive, and one of each negative that applies."""
    pairs = []
    for text in texts:
        made = [
            (noisy(text, rng), True, "noise"),
            (noisy(text, rng), True, "noise"),
            (front_phrase(text, rng), True, "front_phrase"),
            (role_swap(text, rng), False, "role_swap"),
            (role_swap(text, rng), False, "role_swap"),
            (negate(text, rng), False, "negation"),
            (substitute(text, texts, rng), False, "substitute"),
        ]
        for other, same, kind in made:
            if other is not None and other != text:
                if not same and rng.random() < 0.3:
                    other = noisy(other, rng)  # a wrong pair with typos is still wrong
                pairs.append(LabelledPair(text, other, same, kind_prefix + kind, text))
    return pairs


def retrieval_negatives(texts: Sequence[str], encoder: TokenEncoder, max_cosine: float = 0.9) -> list[LabelledPair]:
    """Each text with its nearest other text (below max_cosine, so not a duplicate): different questions."""
    vectors = np.stack([view.sentence for view in encoder.encode(list(texts))])
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -1.0)
    sims[sims >= max_cosine] = -1.0
    return [
        LabelledPair(texts[i], texts[int(sims[i].argmax())], False, "retrieval", texts[i]) for i in range(len(texts))
    ]


def training_pairs(
    seed: int = 0, musique: str = MUSIQUE, num_sentences: int = 1000, encoder: TokenEncoder | None = None
) -> list[LabelledPair]:
    """Everything trained on: fow-cache's tuning half, synthetic pairs, retrieval negatives."""
    rng = random.Random(seed)
    fow = [p for p in fow_pairs(held_out=False) if p.same or p.kind.startswith("fow:")]
    fow_texts = sorted({t for p in fow if p.kind.startswith("fow:") for t in (p.a, p.b)})
    questions, sentences = musique_texts(musique, num_sentences, seed) if musique else ([], [])
    pairs = list(fow) + [LabelledPair(p.a, noisy(p.b, rng), True, "fow+noise", p.group) for p in fow if p.same]
    pairs += synthetic_pairs(fow_texts + questions, rng) + synthetic_pairs(sentences, rng, "sentence:")
    if encoder is not None:
        pairs += retrieval_negatives(fow_texts + questions, encoder)
    return pairs


def featurise(pairs: Sequence[LabelledPair], encoder: TokenEncoder) -> np.ndarray:
    views = encoder.encode([text for pair in pairs for text in (pair.a, pair.b)])
    return np.stack([pair_features(views[2 * i], views[2 * i + 1]) for i in range(len(pairs))])


def train(
    pairs: Sequence[LabelledPair],
    encoder: TokenEncoder,
    out: str,
    seed: int = 0,
    hidden: int = 16,
    max_wrong: float = 0.08,
    components: int = 8,
) -> dict:
    """Fit the pair model, choose its threshold on a validation split, save the .npz; returns a summary."""
    features, labels = featurise(pairs, encoder), np.array([p.same for p in pairs])
    return fit(pairs, features, labels, out, seed, hidden, max_wrong, components)


def fit(
    pairs: Sequence[LabelledPair],
    features: np.ndarray,
    labels: np.ndarray,
    out: str,
    seed: int = 0,
    hidden: int = 16,
    max_wrong: float = 0.08,
    components: int = 8,
    alpha: float = 0.1,
) -> dict:
    """train() on features already made (featurise)."""
    from sklearn.neural_network import MLPClassifier

    scalars = len(FEATURE_NAMES)
    groups = sorted({p.group for p in pairs})
    held = set(random.Random(seed).sample(groups, max(1, len(groups) // 5)))
    is_val = np.array([p.group in held for p in pairs])
    unmatched = features[~is_val, scalars:]
    components = min(components, len(unmatched), unmatched.shape[1])
    basis = np.linalg.svd(unmatched - unmatched.mean(axis=0), full_matrices=False)[2][:components]  # (components, dim)
    inputs = np.concatenate([features[:, :scalars], features[:, scalars:] @ basis.T], axis=1)
    mean, scale = inputs[~is_val].mean(axis=0), inputs[~is_val].std(axis=0) + 1e-6
    mlp = MLPClassifier(hidden_layer_sizes=(hidden,), activation="tanh", alpha=alpha, max_iter=3000, random_state=seed)
    mlp.fit((inputs[~is_val] - mean) / scale, labels[~is_val])
    probability = mlp.predict_proba((inputs[is_val] - mean) / scale)[:, 1]
    threshold = _threshold(probability, labels[is_val], max_wrong)
    np.savez(
        out,
        feature_names=np.array(FEATURE_NAMES),
        basis=basis.astype(np.float32),
        mean=mean.astype(np.float32),
        scale=scale.astype(np.float32),
        hidden_w=mlp.coefs_[0].astype(np.float32),
        hidden_b=mlp.intercepts_[0].astype(np.float32),
        out_w=mlp.coefs_[1][:, 0].astype(np.float32),
        out_b=np.float32(mlp.intercepts_[1][0]),
        threshold=np.float32(threshold),
    )
    accepted = probability >= threshold
    val_labels = labels[is_val]
    return {
        "pairs": len(pairs),
        "train": int((~is_val).sum()),
        "validation": int(is_val.sum()),
        "threshold": threshold,
        "validation_served": float(accepted[val_labels].mean()),
        "validation_wrong": float(accepted[~val_labels].mean()),
    }


def _threshold(probability: np.ndarray, labels: np.ndarray, max_wrong: float) -> float:
    """The lowest threshold (from 0.05 up in 0.01 steps) accepting at most max_wrong of the negatives."""
    negatives = probability[~labels]
    for threshold in np.arange(0.05, 0.96, 0.01):
        if len(negatives) == 0 or (negatives >= threshold).mean() <= max_wrong:
            return round(float(threshold), 2)
    return 0.95


def evaluate_pairs(
    verifier: PairVerifier, pairs: Sequence[LabelledPair], cosine_floor: float | None = None
) -> PairFigures:
    """served: same-meaning pairs accepted; wrong: different-meaning pairs accepted (shares)."""
    probability = verifier.probabilities([(p.a, p.b) for p in pairs])
    accepted = probability >= verifier.threshold
    if cosine_floor is not None:
        views = verifier.encoder.encode([text for p in pairs for text in (p.a, p.b)])
        cosines = np.array([views[2 * i].sentence @ views[2 * i + 1].sentence for i in range(len(pairs))])
        accepted &= cosines >= cosine_floor
    same = np.array([p.same for p in pairs], dtype=bool)
    return PairFigures(
        int(same.sum()),
        int((~same).sum()),
        float(accepted[same].mean()) if same.any() else 0.0,
        float(accepted[~same].mean()) if (~same).any() else 0.0,
    )


def report(verifier: PairVerifier, seed: int = 1, musique: str = MUSIQUE) -> list[tuple[str, PairFigures]]:
    """Figures on what was never trained on: fow-cache's held-out half and synthetic pairs of its texts."""
    held = fow_pairs(held_out=True)
    questions = [p for p in held if p.kind.startswith("fow:")]
    conversations = [p for p in held if p.kind.startswith("fow-conv:")]
    texts = sorted({t for p in questions for t in (p.a, p.b)})
    synthetic = synthetic_pairs(texts, random.Random(seed))
    rows = [
        ("fow held-out questions", evaluate_pairs(verifier, questions)),
        ("fow held-out questions, cosine >= 0.5", evaluate_pairs(verifier, questions, 0.5)),
        ("fow held-out conversations (last messages)", evaluate_pairs(verifier, conversations)),
        ("fow held-out conversations, cosine >= 0.5", evaluate_pairs(verifier, conversations, 0.5)),
    ]
    for kind in sorted({p.kind for p in held}):
        rows.append((f"  {kind}", evaluate_pairs(verifier, [p for p in held if p.kind == kind])))
    for kind in sorted({p.kind for p in synthetic}):
        rows.append(
            (f"synthetic on held-out texts: {kind}", evaluate_pairs(verifier, [p for p in synthetic if p.kind == kind]))
        )
    return rows


def latency_ms(verifier: PairVerifier, pairs: Sequence[LabelledPair]) -> tuple[float, float]:
    """(ms for a pair whose cached side is encoded and new side is not: a lookup's first
    candidate; ms for a pair with both sides encoded: each further candidate), means."""
    first, further = [], []
    for pair in pairs:
        verifier.encoder.clear()
        verifier.encoder.encode([pair.b])
        start = time.perf_counter()
        verifier.probability(pair.a, pair.b)
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        verifier.probability(pair.a, pair.b)
        further.append(time.perf_counter() - start)
    return 1000 * float(np.mean(first)), 1000 * float(np.mean(further))


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="where to write the weights (.npz)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--musique", default=MUSIQUE if os.path.exists(MUSIQUE) else "", help="MuSiQue JSON or ''")
    parser.add_argument("--sentences", type=int, default=1000, help="MuSiQue passage sentences to augment")
    parser.add_argument("--limit", type=int, default=0, help="train on at most this many pairs (0: all)")
    parser.add_argument(
        "--max-wrong", type=float, default=0.08, help="validation wrong-accept share the threshold allows"
    )
    parser.add_argument("--report", action="store_true", help="then measure on fow-cache's held-out half")
    args = parser.parse_args(argv)
    encoder = TokenEncoder(threads=2)
    pairs = training_pairs(args.seed, args.musique, args.sentences, encoder)
    if args.limit:
        pairs = random.Random(args.seed).sample(pairs, min(args.limit, len(pairs)))
    print(json.dumps(train(pairs, encoder, args.out, args.seed, max_wrong=args.max_wrong)))
    if args.report:
        verifier = PairVerifier(weights_path=args.out)
        for name, figures in report(verifier):
            print(
                f"{name:60s} same {figures.num_same:4d} served {figures.served:6.1%}   "
                f"different {figures.num_different:4d} wrong {figures.wrong:6.1%}"
            )
        first, further = latency_ms(verifier, fow_pairs(held_out=True)[:100])
        print(f"latency: {first:.1f} ms first candidate (new text encoded), {further:.2f} ms each further candidate")


if __name__ == "__main__":
    main()
