"""Shadow checks: a sample of fast-path answers answered again the slow way, off the live path.

    blend         the served answer's first-token distribution against full prefill's for
                  the same prompt: greedy-token agreement and KL(full || served)
    semantic hit  the cached answer against the engine's fresh answer to the new request
                  (semantic.agreement decides whether they agree)

Each check is a background sequence (scheduler.py): it runs only while no live request is
waiting or running, in small pieces, and is preempted first, so it never delays a live
request; its output never reaches a client. At most max_pending checks are outstanding: a
sample drawn while that many are queued is skipped (counted), so a busy service checks
less instead of building a backlog it can never run. Results go to the blend budget
(blend_budget.py) and to the semantic cache's learned thresholds, per (tenant, category).
"""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from ragcache.bench.metrics import kl_divergence
from ragcache.checks.blend_budget import BlendBudget
from ragcache.engine.generate import SamplingParams
from ragcache.engine.request import Generation, RagRequest

log = logging.getLogger("ragcache.checks")


@dataclass(frozen=True)
class ShadowConfig:
    blend_fraction: float = 0.1  # of steerable blended answers, checked against full prefill
    semantic_fraction: float = 0.1  # of semantic hits, checked against a fresh engine answer
    max_pending: int = 8
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (0.0 <= self.blend_fraction <= 1.0 and 0.0 <= self.semantic_fraction <= 1.0):
            raise ValueError("shadow fractions must be in [0, 1]")
        if self.max_pending <= 0:
            raise ValueError("max_pending must be positive")


@dataclass(frozen=True)
class FirstTokenCheck:
    agreed: bool  # the greedy first token is full prefill's
    kl: float  # KL(full || served) of the first-token distributions, nats


def compare_first_token(served: torch.Tensor, full: torch.Tensor) -> FirstTokenCheck:
    """served, full: (vocab,) first-token log-probabilities of the same prompt."""
    return FirstTokenCheck(int(served.argmax()) == int(full.argmax()), kl_divergence(full, served))


class _CheckSink:
    """A background sequence's sink: nothing streams; the result goes to on_done (called on the engine thread)."""

    def __init__(self, on_done: Callable[[Generation], None], on_failed: Callable[[BaseException], None]) -> None:
        self.on_finish, self.on_error = on_done, on_failed

    def on_text(self, piece: str) -> None:
        pass


class ShadowChecks:
    """Thread-safe. engine: where checks run (BlendEngine.submit with background=True);
    budget: told of every blend check; semantic: the SemanticCache told of every hit check
    (record_check), or None; agree: (cached, fresh) -> bool for semantic checks."""

    def __init__(
        self,
        engine,
        budget: BlendBudget,
        config: ShadowConfig = ShadowConfig(),
        semantic=None,
        agree: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.engine = engine
        self.budget = budget
        self.config = config
        self.semantic = semantic
        self._agree = agree
        self._random = random.Random(config.seed)
        self._lock = threading.Lock()
        self._pending = 0
        self.counts: Counter[str] = Counter()
        self._submitter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragcache-shadow")

    # sampling (on the request path: cheap, no I/O)

    def sample_blend(self) -> bool:
        """Check the blended answer about to be served? (Its first-token log-probs must then be kept.)"""
        return self._draw("blend", self.config.blend_fraction)

    def sample_semantic(self) -> bool:
        return (
            self.semantic is not None
            and self._agree is not None
            and self._draw("semantic", self.config.semantic_fraction)
        )

    # checks (return at once; the work is queued behind live traffic)

    def check_blend(self, tenant: str, category: str, setting: str, request: RagRequest, served: Generation) -> None:
        """served: the answer given for request at setting (a ladder name; first-token log-probs kept)."""
        served_logprobs = served.first_token_logprobs
        if served_logprobs is None:
            self._release("blend_unusable")
            return
        full = replace(
            request,
            mode="full",
            blend_ratio=None,
            blend_deviation=None,
            blend_sink_tokens=None,
            sampling=SamplingParams(max_tokens=1),
        )

        def done(result: Generation) -> None:
            assert result.first_token_logprobs is not None  # the check asked for them (return_logprobs=True)
            check = compare_first_token(served_logprobs, result.first_token_logprobs)
            self.budget.observe(tenant, category, setting, not check.agreed, check.kl)
            self._release("blend_done")

        self._submit(full, done)

    def check_semantic(
        self, tenant: str, request: RagRequest, cached_answer: str, entry_id: str, similarity: float
    ) -> None:
        """A hit was served: answer request with the engine and tell the cache whether it agreed."""
        self._submit(request, lambda result: self._label(tenant, entry_id, similarity, cached_answer, result.text))

    def check_rejected(self, tenant: str, entry_id: str, similarity: float, fresh_answer: str) -> None:
        """A candidate the learned threshold turned away, and the answer the engine gave instead:
        a label that costs no engine work (the threshold can learn to come down only from these)."""

        def label() -> None:
            try:
                cached = self.semantic.answers.answer(tenant, entry_id)
                if cached is None:
                    self._release("semantic_gone")
                    return
                self._label(tenant, entry_id, similarity, cached, fresh_answer)
            except Exception:
                log.exception("labelling a rejected candidate failed")
                self._release("failed")

        self._submitter.submit(label)

    def abandon(self) -> None:
        """A sampled answer never finished (an error, a client that went away): nothing to check."""
        self._release("abandoned")

    def stats(self) -> dict:
        with self._lock:
            return {
                "pending": self._pending,
                "max_pending": self.config.max_pending,
                "blend_fraction": self.config.blend_fraction,
                "semantic_fraction": self.config.semantic_fraction,
                "counts": dict(self.counts),
            }

    def close(self) -> None:
        self._submitter.shutdown(wait=True)

    # internals

    def _draw(self, kind: str, fraction: float) -> bool:
        with self._lock:
            if fraction <= 0.0 or self._random.random() >= fraction:
                return False
            if self._pending >= self.config.max_pending:
                self.counts[f"{kind}_skipped_busy"] += 1
                return False
            self._pending += 1
            self.counts[f"{kind}_sampled"] += 1
            return True

    def _label(self, tenant: str, entry_id: str, similarity: float, cached: str, fresh: str) -> None:
        assert self._agree is not None  # semantic checks are sampled only with it (sample_semantic)
        agreed = bool(self._agree(cached, fresh))
        self.semantic.record_check(tenant, entry_id, similarity, agreed)
        self._release("semantic_done" if agreed else "semantic_disagreed")

    def _release(self, outcome: str) -> None:
        with self._lock:
            self._pending -= 1
            self.counts[outcome] += 1

    def _submit(self, request: RagRequest, done: Callable[[Generation], None]) -> None:
        def compare(result: Generation) -> None:
            try:
                done(result)
            except Exception:  # a check must never hurt the service
                log.exception("a shadow check's comparison failed")
                self._release("failed")

        def finished(result: Generation) -> None:  # on the engine thread: compare (and embed) elsewhere
            try:
                self._submitter.submit(compare, result)
            except RuntimeError:  # closed: the last checks are compared here
                compare(result)

        def failed(error: BaseException) -> None:
            log.warning("a shadow check did not run: %s", error)
            self._release("failed")

        def submit() -> None:
            try:
                self.engine.submit(request, _CheckSink(finished, failed), return_logprobs=True, background=True)
            except Exception as exc:
                failed(exc)

        self._submitter.submit(submit)
