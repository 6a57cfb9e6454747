"""The learned pair verifier: do two requests ask the same thing, judged from the texts.

Sentence cosine alone cannot tell "X beat Y" from "Y beat X" (MiniLM puts them at 0.98),
and word lists cannot tell "avoid laziness" from "reduce laziness" without having seen
those words. This verifier reads MiniLM's contextual token embeddings of both texts,
aligns every token with its best match on the other side, and summarises the alignment
in a few numbers a small network (pair_training.py) learned to weigh:

    coverage      how well each side's tokens are matched on the other (mean, worst, count below a floor)
    order         whether matched tokens keep their order (discordant pairs, kept bigrams, displacement):
                  a role swap keeps the words but not where they align
    context       how similar the same word is on both sides: "Y" as subject vs object differs
    mutual        how many alignments are one-to-one
    length, cosine, digits

Every feature is symmetric, so probability(a, b) == probability(b, a). Token embeddings
are kept per text in a small LRU, so a cached entry is encoded once while it stays hot.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ragcache.semantic.text import typo_equal
from ragcache.semantic.verify import Candidate, Verifier

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "pair_verifier.npz")

FEATURE_NAMES = (
    "cosine",
    "coverage_min",
    "coverage_max",
    "worst_min",
    "worst_max",
    "second_worst_min",
    "second_worst_max",
    "below_05_min",
    "below_05_max",
    "below_07_min",
    "below_07_max",
    "unmatched_mass_min",
    "unmatched_mass_max",
    "anchor_share",
    "discordant",
    "kept_order",
    "displacement",
    "same_word_sim_mean",
    "same_word_sim_min",
    "spelled_min",
    "spelled_max",
    "spelled_discordant",
    "spelled_kept_order",
    "length_ratio",
    "length_diff",
    "digits_differ",
)


class TokenView(NamedTuple):
    """One text as the features see it: its words (word pieces pooled; no punctuation)."""

    words: tuple[str, ...]  # lower case, as the tokenizer split them
    vectors: np.ndarray  # (words, dim) float32, each row of unit length: the mean of the word's pieces
    sentence: np.ndarray  # (dim,) float32 unit mean-pooled embedding, as the embedder makes it
    digits: tuple[str, ...]  # the words holding a digit, sorted


def token_view(pieces: Sequence[str], word_ids: Sequence[int | None], hidden: np.ndarray) -> TokenView:
    """A TokenView from one text's word pieces, their word numbers and hidden states (pieces, dim).

    Pieces of one word are averaged: a typo splits a word into odd pieces ("perscription"
    -> per ##sc ##ript ##ion), and their mean lies nearer the intended word than any piece.
    """
    sentence = hidden.mean(axis=0)
    groups: dict[int, list[int]] = {}
    for position, word_id in enumerate(word_ids):
        if word_id is not None:
            groups.setdefault(word_id, []).append(position)
    words, rows = [], []
    for positions in groups.values():
        word = "".join(pieces[i].removeprefix("##") for i in positions)
        if any(ch.isalnum() for ch in word):
            words.append(word)
            rows.append(hidden[positions].mean(axis=0))
    if not rows:  # only punctuation: keep the special tokens' states
        words, rows = ["[CLS]"], [hidden[0]]
    vectors = np.stack(rows)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    digits = tuple(sorted(word for word in words if any(ch.isdigit() for ch in word)))
    return TokenView(
        tuple(words), vectors.astype(np.float32), (sentence / np.linalg.norm(sentence)).astype(np.float32), digits
    )


class TokenEncoder:
    """Text -> TokenView with MiniLM, offline, one forward pass per text not already cached.

    Shares the model object the embedder loaded (one copy per process and path). Encoding
    holds a lock and runs small batches on `threads` torch threads (restored afterwards),
    as the embedder does. `cache_size` TokenViews are kept, least recently used evicted.
    """

    def __init__(self, embedder=None, cache_size: int = 4096, threads: int = 1) -> None:
        from ragcache.semantic.embedder import SentenceTransformerEmbedder, _load

        if not hasattr(embedder, "model_path"):  # weights were trained on the packaged MiniLM's token states,
            embedder = SentenceTransformerEmbedder()  # whatever embedder the index itself uses
        self._device = getattr(embedder, "device", "cpu")
        model = _load(embedder.model_path, self._device)
        self._tokenizer, self._bert = model.tokenizer, model[0].auto_model
        self._cache: OrderedDict[str, TokenView] = OrderedDict()
        self._cache_size, self._threads = cache_size, threads
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> list[TokenView]:
        with self._lock:
            missing = list(dict.fromkeys(text for text in texts if text not in self._cache))
            for start in range(0, len(missing), 32):
                chunk = missing[start : start + 32]
                for text, raw in zip(chunk, self.hidden_states(chunk)):
                    self._cache[text] = token_view(*raw)
            views = []
            for text in texts:
                self._cache.move_to_end(text)
                views.append(self._cache[text])
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return views

    def clear(self) -> None:
        """Forget every cached TokenView."""
        with self._lock:
            self._cache.clear()

    def hidden_states(self, texts: list[str]) -> list[tuple[list[str], list[int | None], np.ndarray]]:
        """(pieces, word ids, hidden states (pieces, dim)) per text, [CLS] and [SEP] included."""
        import torch

        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        threads = torch.get_num_threads()
        torch.set_num_threads(min(threads, self._threads) if len(texts) <= 8 else threads)
        try:
            with torch.inference_mode():
                hidden = self._bert(**batch.to(self._device)).last_hidden_state.float().cpu().numpy()
        finally:
            torch.set_num_threads(threads)
        out = []
        for row, (ids, mask) in enumerate(zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())):
            length = sum(mask)
            pieces = self._tokenizer.convert_ids_to_tokens(ids[:length])
            out.append((pieces, batch.word_ids(row)[:length], hidden[row, :length]))
        return out


def pair_features(a: TokenView, b: TokenView) -> np.ndarray:
    """(len(FEATURE_NAMES) + dim,) float32, symmetric in a and b: the scalar features, then
    the unmatched vector, each word's state weighted by how badly it is matched (1 - best
    similarity), summed over both sides. It tells the model *what* is unmatched: an extra
    "not" or a different name is not an extra "um" or "usually"."""
    sims = a.vectors @ b.vectors.T  # (a words, b words)
    unmatched = (1.0 - sims.max(axis=1)) @ a.vectors + (1.0 - sims.max(axis=0)) @ b.vectors  # (dim,)
    return np.concatenate([_scalar_features(a, b, sims), unmatched]).astype(np.float32)


def _scalar_features(a: TokenView, b: TokenView, sims: np.ndarray) -> np.ndarray:
    side_a, side_b = _coverage(sims), _coverage(sims.T)
    order = _order(sims)
    same = np.array([[typo_equal(x, y) for y in b.words] for x in a.words])  # (a words, b words)
    same_sims = np.where(same, sims, -1.0).max(axis=1)[same.any(axis=1)]
    spelled = (same.any(axis=1).mean(), same.any(axis=0).mean())
    n_a, n_b = len(a.words), len(b.words)
    pairs = [(min(x, y), max(x, y)) for x, y in zip(side_a, side_b)]
    return np.array(
        [
            float(a.sentence @ b.sentence),
            *[value for pair in pairs for value in pair],
            *order,
            same_sims.mean() if len(same_sims) else 0.0,
            same_sims.min() if len(same_sims) else 0.0,
            min(spelled),
            max(spelled),
            *_spelled_order(same),
            min(n_a, n_b) / max(n_a, n_b),
            abs(np.log(n_a / n_b)),
            float(a.digits != b.digits),
        ],
        dtype=np.float32,
    )


def _coverage(sims: np.ndarray) -> tuple[float, ...]:
    """How well the rows' words are matched among the columns: mean, worst, second worst,
    share below 0.5 and 0.7, unmatched mass (sum of 1 - best)."""
    best = np.sort(sims.max(axis=1))
    return (
        float(best.mean()),
        float(best[0]),
        float(best[min(1, len(best) - 1)]),
        float((best < 0.5).mean()),
        float((best < 0.7).mean()),
        float((1.0 - best).sum()),
    )


def _spelled_order(same: np.ndarray) -> tuple[float, float]:
    """(share of pairs of words spelled alike on both sides that appear in opposite order,
    share of consecutive such words kept in order); words matched more than once are skipped.
    Typos leave it alone where they scramble MiniLM's token states."""
    unique = [
        (i, int(np.flatnonzero(same[i])[0]))
        for i in range(same.shape[0])
        if same[i].sum() == 1 and same[:, same[i].argmax()].sum() == 1
    ]
    if len(unique) < 2:
        return 0.0, 1.0
    positions = np.array([j for _, j in unique])
    later = positions[None, :] - positions[:, None]
    return float((later[np.triu_indices(len(positions), k=1)] < 0).mean()), float((np.diff(positions) > 0).mean())


def _order(sims: np.ndarray) -> tuple[float, float, float, float]:
    """Anchors are mutual best matches above 0.6; returns (share of words that are anchors,
    on the shorter side; share of anchor pairs in opposite order; share of consecutive
    anchors kept in order; mean displacement of anchors in relative position)."""
    rows, cols = sims.argmax(axis=1), sims.argmax(axis=0)
    anchors_a = [i for i in range(sims.shape[0]) if cols[rows[i]] == i and sims[i, rows[i]] > 0.6]
    anchor_share = len(anchors_a) / min(sims.shape)
    if len(anchors_a) < 2:
        return anchor_share, 0.0, 1.0, 0.0
    positions = rows[anchors_a]  # anchors' columns, in row order
    later = positions[None, :] - positions[:, None]  # (anchors, anchors): > 0 where order kept
    upper = np.triu(np.ones_like(later, dtype=bool), k=1)
    discordant = float((later[upper] < 0).mean())
    kept = float((np.diff(positions) > 0).mean())
    relative_a = np.array(anchors_a) / max(sims.shape[0] - 1, 1)
    relative_b = positions / max(sims.shape[1] - 1, 1)
    return anchor_share, discordant, kept, float(np.abs(relative_a - relative_b).mean())


class PairModel:
    """Features -> standardised scalars and the unmatched vector's coordinates on a learned
    basis (PCA of the training pairs') -> one tanh hidden layer -> logistic output; from an .npz."""

    def __init__(self, path: str) -> None:
        with np.load(path, allow_pickle=False) as data:
            names = tuple(str(name) for name in data["feature_names"])
            if names != FEATURE_NAMES:
                raise ValueError(f"{path} was trained on other features: {names}")
            self.basis = data["basis"]  # (components, dim)
            self.mean, self.scale = data["mean"], data["scale"]
            self.hidden_w, self.hidden_b = data["hidden_w"], data["hidden_b"]
            self.out_w, self.out_b = data["out_w"], float(data["out_b"])
            self.threshold = float(data["threshold"])

    def inputs(self, features: np.ndarray) -> np.ndarray:
        """(pairs, features) -> (pairs, scalars + components), before standardising."""
        scalars = len(FEATURE_NAMES)
        return np.concatenate([features[:, :scalars], features[:, scalars:] @ self.basis.T], axis=1)

    def probability(self, features: np.ndarray) -> np.ndarray:
        """(pairs, features) -> (pairs,) probability that the two texts ask the same thing."""
        hidden = np.tanh(((self.inputs(features) - self.mean) / self.scale) @ self.hidden_w + self.hidden_b)
        return 1.0 / (1.0 + np.exp(-(hidden @ self.out_w + self.out_b)))


class PairVerifier:
    """Turns a candidate down ("pair") when the pair model's probability is below threshold.

    threshold=None takes the one stored with the weights (chosen on the training data's
    validation split). Safe to share between threads: the encoder locks, the model is read-only.
    """

    name = "pair"

    def __init__(self, embedder=None, weights_path: str | None = None, threshold: float | None = None) -> None:
        self.model = PairModel(weights_path or DEFAULT_WEIGHTS)
        self.threshold = self.model.threshold if threshold is None else float(threshold)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1]: {self.threshold}")
        self.encoder = TokenEncoder(embedder)

    def reject_reason(self, candidate: Candidate) -> str | None:
        return "pair" if self.probability(candidate.new_text, candidate.cached_text) < self.threshold else None

    def probability(self, a: str, b: str) -> float:
        view_a, view_b = self.encoder.encode([a, b])
        return float(self.model.probability(pair_features(view_a, view_b)[None, :])[0])

    def probabilities(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """probability() for many pairs, encoding each distinct text once."""
        views = self.encoder.encode([text for pair in pairs for text in pair])
        if not pairs:
            return np.zeros(0)
        features = np.stack([pair_features(views[2 * i], views[2 * i + 1]) for i in range(len(pairs))])
        return self.model.probability(features)


if TYPE_CHECKING:  # the type checker holds PairVerifier to the Verifier contract
    _verifier: type[Verifier] = PairVerifier
