"""Answer and fidelity metrics: SQuAD-normalised token F1, first-token KL divergence, percentiles."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_f1(prediction: str, references: Sequence[str]) -> float:
    return max((token_f1(prediction, ref) for ref in references), default=0.0)


def kl_divergence(reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """KL(reference || other) of two (vocab,) log-probability vectors, in nats."""
    return float((reference_logprobs.exp() * (reference_logprobs - logprobs)).sum())


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation."""
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100.0))


def percentile_or_none(values: Sequence[float], q: float) -> float | None:
    """percentile(), or None for no values (a level or policy with nothing measured: a gap, not an error)."""
    return percentile(values, q) if values else None
