"""The semantic cache's settings: one frozen dataclass per concern, validated when made."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ragcache.semantic.adaptive import LoadConfig
from ragcache.semantic.classifier import ClassifierConfig
from ragcache.semantic.index import IndexConfig
from ragcache.semantic.learned import LearnedConfig
from ragcache.semantic.policy import DEFAULT_POLICIES, CategoryPolicy


@dataclass(frozen=True)
class GuardConfig:
    """enabled: False serves on similarity alone (for comparison; never in production).
    near_overlap, min_matched, trust_similarity: see guards.check_question.
    context_threshold: cosine the recent turns of two conversations need; context_turns:
    how many messages before the last one are embedded as its context."""

    enabled: bool = True
    near_overlap: float = 0.5
    min_matched: int = 2
    trust_similarity: float = 0.93
    context_threshold: float = 0.50
    context_turns: int = 4

    def __post_init__(self) -> None:
        if not (0 < self.near_overlap <= 1 and self.min_matched >= 1 and 0 < self.trust_similarity <= 1):
            raise ValueError("need 0 < near_overlap <= 1, min_matched >= 1, 0 < trust_similarity <= 1")
        if not (0 < self.context_threshold <= 1 and self.context_turns >= 1):
            raise ValueError("need 0 < context_threshold <= 1 and context_turns >= 1")


@dataclass(frozen=True)
class SemanticCacheConfig:
    """verifiers: per category, the verifiers (verify.VERIFIERS) a candidate above the
    threshold must pass, in order, the first rejection winning; categories not named use
    default_verifiers. With "learned" among them the policy's threshold only applies while
    the category is cold (learned.py); GuardConfig.enabled False leaves "guards" out."""

    policies: Mapping[str, CategoryPolicy] = field(default_factory=lambda: dict(DEFAULT_POLICIES))
    index: IndexConfig = IndexConfig()
    load: LoadConfig = LoadConfig()
    guards: GuardConfig = GuardConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    candidates: int = 8  # nearest entries verified per lookup
    verifiers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default_verifiers: tuple[str, ...] = ("facts", "pair")  # measured: README, Results, Semantic cache
    learned: LearnedConfig = LearnedConfig()

    def __post_init__(self) -> None:
        from ragcache.semantic.verify import VERIFIERS

        for names in (self.default_verifiers, *self.verifiers.values()):
            unknown = [name for name in names if name not in VERIFIERS]
            if unknown or len(set(names)) != len(names):
                raise ValueError(f"verifiers must be distinct names among {', '.join(VERIFIERS)}; got {names}")
        if not self.policies:
            raise ValueError("at least one category policy is needed")
        if self.classifier.default not in self.policies or not set(self.classifier.examples) <= set(self.policies):
            raise ValueError("the classifier's default and example categories must all have policies")
        if self.candidates <= 0:
            raise ValueError("candidates must be positive")
