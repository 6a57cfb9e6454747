"""A prompt's computation in pieces, so that no step carries more than the scheduler's token budget.

A plain run (full prefill, prefix, reuse, a program's new turn) is tokens [start, total)
through every layer: consecutive pieces are exact under the causal mask. A blend run is
cut in two phases, each in pieces, and gives what the one-pass blend gives:

    scan     every run token (candidates + question) through layers [0, check_layer); at
             check_layer its fresh K/V is written and each candidate's deviation from its
             cached KV scored (the question's queries kept for attention-weighted scores);
             the hidden state entering check_layer is kept
    select   after the last scan piece: the top-r candidates by score (EPIC's sink tokens
             first when asked), by the same rule as the one-pass selector (selection.py)
    finish   the chosen candidates + the question, from their kept hidden states, through
             layers [check_layer, num_layers), in slot order: a piece sees the fresh K/V
             of the pieces before it, as the one-pass run does within its single pass

Pieces are sized in full-token equivalents: a scan token costs (check_layer + 1) / L of a
full token, a finish token (L - check_layer) / L. PrefillProgress is the bookkeeping the
scheduler sizes pieces with (no tensors); BlendScan holds the tensors between pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ragcache.engine.blend import Prefill, kv_deviation, question_attention
from ragcache.engine.forward import BatchItem, RunOutput, Selector, TokenRun
from ragcache.engine.kvbuffer import KVBuffer
from ragcache.engine.selection import choose_candidates, recompute_count
from ragcache.engine.stack import DecoderStack

PLAIN, SCAN, FINISH = "plain", "scan", "finish"


@dataclass
class PrefillProgress:
    """How far a prompt's computation is, and what the next piece may take."""

    start: int  # the run's first slot
    total: int  # prompt tokens
    num_layers: int
    check_layer: int
    phase: str  # plain, scan or finish
    next: int = 0  # tokens of the current phase done
    finish_len: int = 0  # chosen candidates + question (known once the scan is done)
    num_candidates: int = 0
    ratio: float = 0.0

    @classmethod
    def plain(cls, start: int, total: int, num_layers: int) -> PrefillProgress:
        return cls(start, total, num_layers, 0, PLAIN)

    @classmethod
    def blend(
        cls, start: int, cached: int, total: int, num_layers: int, check_layer: int, ratio: float
    ) -> PrefillProgress:
        num_candidates = cached - start
        chosen = recompute_count(ratio, num_candidates)
        return cls(
            start,
            total,
            num_layers,
            check_layer,
            SCAN,
            finish_len=chosen + total - cached,
            num_candidates=num_candidates,
            ratio=ratio,
        )

    @property
    def phase_len(self) -> int:
        return self.total - self.start if self.phase in (PLAIN, SCAN) else self.finish_len

    @property
    def done(self) -> bool:
        return self.phase != SCAN and self.next >= self.phase_len

    def token_cost(self) -> float:
        """Full-token equivalents of one token of the current phase."""
        if self.phase == SCAN:
            return (self.check_layer + 1) / self.num_layers
        if self.phase == FINISH:
            return (self.num_layers - self.check_layer) / self.num_layers
        return 1.0

    def take(self, budget: float) -> tuple[int, float]:
        """(tokens, cost) of the next piece within budget; at least one token, so a step always moves on."""
        left = self.phase_len - self.next
        tokens = max(1, min(left, math.floor(budget / self.token_cost())))
        return tokens, tokens * self.token_cost()

    def advance(self, tokens: int) -> None:
        self.next += tokens
        if self.phase == SCAN and self.next >= self.phase_len:
            self.phase, self.next = FINISH, 0


class BlendScan:
    """The tensors a blend run keeps between its pieces: scores, question queries, hidden at check_layer.

    Acts as the scan pieces' selector at check_layer: scores the candidates among the
    piece's rows (fresh vs cached, before the write) and keeps the question's queries.
    """

    def __init__(self, prefill: Prefill, stack: DecoderStack) -> None:
        selector = prefill.selector
        assert selector is not None  # only a selective (blend) prefill is scanned in pieces
        self.prefill = prefill
        self.layer = selector.layer
        self.ratio = selector.ratio
        self.deviation = selector.deviation
        self.sink_tokens = selector.sink_tokens
        self.chunk_lens = selector.chunk_lens
        self.num_candidates = selector.num_candidates
        num_run = prefill.ids.shape[0] - prefill.start
        device = prefill.ids.device
        self.scores = torch.zeros(self.num_candidates, device=device)
        self.hidden = torch.empty(num_run, stack.embed_tokens.weight.shape[1], device=device, dtype=stack.dtype)
        self.question_queries: list[torch.Tensor] = []
        self.finish_slots: torch.Tensor | None = None
        self.chosen_slots: torch.Tensor | None = None

    def select(
        self,
        layer: int,
        buffer: KVBuffer,
        slots: torch.Tensor,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> None:
        """Score the piece's candidates at the check layer; every token goes on (None)."""
        if layer != self.layer:
            return None
        index = slots - self.prefill.start  # into the run
        candidate = index < self.num_candidates
        if candidate.any():
            rows = candidate.nonzero()[:, 0]
            self.scores[index[rows]] = kv_deviation(
                buffer, layer, slots[rows], keys[:, rows], values[:, rows], self.deviation
            )
        if not candidate.all():
            self.question_queries.append(queries[:, (~candidate).nonzero()[:, 0]])
        return None

    def choose(self, buffer: KVBuffer) -> None:
        """After the last scan piece: the chosen candidates, then the question, as the finish phase's slots."""
        start, n = self.prefill.start, self.num_candidates
        total = self.prefill.ids.shape[0]
        scores = self.scores
        question_slots = torch.arange(start + n, total, device=scores.device)
        if self.deviation == "attention":
            queries = torch.cat(self.question_queries, dim=1)
            keys = buffer.layer(self.layer, total)[0]
            candidate_slots = torch.arange(start, start + n, device=scores.device)
            scores = scores * question_attention(keys, queries, question_slots, candidate_slots)
        chosen = choose_candidates(scores, recompute_count(self.ratio, n), self.chunk_lens, self.sink_tokens)
        self.chosen_slots = chosen + start
        assert self.prefill.selector is not None  # __init__ took its settings from it
        self.prefill.selector.chosen_slots = self.chosen_slots  # what Prefill.recomputed_tokens() counts
        self.finish_slots = torch.cat([self.chosen_slots, question_slots])
        self.question_queries = []


if TYPE_CHECKING:  # the type checker holds BlendScan to the Selector contract (forward.py)
    _scan_selector: type[Selector] = BlendScan


def piece_item(
    prefill: Prefill, progress: PrefillProgress, tokens: int, scan: BlendScan | None, num_layers: int
) -> BatchItem:
    """The BatchItem that computes the next `tokens` of the prompt in its current phase."""
    buffer, ids, a = prefill.buffer, prefill.ids, progress.next
    if progress.phase == PLAIN:
        end = progress.start + a + tokens
        buffer.length = max(buffer.length, end)
        return BatchItem(buffer, TokenRun.contiguous(ids[progress.start + a : end], progress.start + a))
    buffer.length = ids.shape[0]  # a blend run sees its placed chunks and, causally, the question
    assert scan is not None  # scan and finish pieces belong to a blend run, which has its BlendScan
    if progress.phase == SCAN:
        first = progress.start + a
        run = TokenRun.contiguous(ids[first : first + tokens], first)
        return BatchItem(buffer, run, selector=scan, layers=(0, scan.layer + 1), write_only_last=True)
    assert scan.finish_slots is not None  # chosen after the last scan piece (after_piece), before any finish piece
    slots = scan.finish_slots[a : a + tokens]
    hidden = scan.hidden[slots - progress.start]
    return BatchItem(buffer, TokenRun(ids[slots], slots, slots), layers=(scan.layer, num_layers), hidden=hidden)


def after_piece(
    progress: PrefillProgress, tokens: int, scan: BlendScan | None, out: RunOutput, buffer: KVBuffer
) -> int:
    """Record a computed piece; returns the (token, layer) K/V entries it added to the prompt's work."""
    work = out.token_layers
    if progress.phase == SCAN:
        assert scan is not None  # a blend run's scan piece
        scan.hidden[out.slots - progress.start] = out.hidden
    elif progress.phase == FINISH:
        work -= tokens  # check_layer was already counted by the scan
    progress.advance(tokens)
    if progress.phase == FINISH and progress.next == 0:
        assert scan is not None  # only a blend run has a finish phase
        if scan.finish_slots is None:
            scan.choose(buffer)
    return work
