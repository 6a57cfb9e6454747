"""One batched step: the scheduler's plan computed in a single pass, then a token sampled per sequence.

    plan.decodes    each feeds its last sampled token at the next slot
    plan.prefills   each computes its next piece of prompt (prefill.py: plain, blend scan or finish)
    -> run_batch    row-wise work over every row at once, attention per sequence
    -> logits       for decodes and for prompts that just completed, in one lm_head call
    -> logprobs     the model's, for the rows that report them (before any mask)
    -> mask         grammar.py: the constrained rows' disallowed tokens to -inf, one bitmask for the batch
    -> sample       per sequence: its own temperature, top_p and generator

A sequence that asks for neither logprobs nor a constraint costs what it did before both.
"""

from __future__ import annotations

import torch

from ragcache.engine.forward import BatchItem, TokenRun, run_batch
from ragcache.engine.generate import sample_token
from ragcache.engine.grammar import mask_logits
from ragcache.engine.prefill import after_piece, piece_item
from ragcache.engine.request import TokenLogprob
from ragcache.engine.scheduler import StepPlan
from ragcache.engine.sequence import SeqState, Sequence
from ragcache.engine.stack import DecoderStack


def run_step(stack: DecoderStack, plan: StepPlan) -> list[tuple[Sequence, int]]:
    """Compute the plan's tokens; returns (sequence, sampled token) for each sequence that produced one."""
    items: list[BatchItem] = []
    owners: list[Sequence] = []
    pieces: list[int | None] = []  # prompt tokens of each item, None for a decode
    for seq in plan.decodes:
        assert seq.prefill is not None  # a planned sequence is admitted: its working KV is placed
        buffer = seq.prefill.buffer
        slot = buffer.length
        buffer.length += 1
        token = torch.tensor([seq.next_token], device=stack.device)
        items.append(BatchItem(buffer, TokenRun.contiguous(token, slot)))
        owners.append(seq)
        pieces.append(None)
    for seq, tokens in plan.prefills:
        assert seq.prefill is not None and seq.progress is not None  # admitted (prefill), submitted (progress)
        items.append(piece_item(seq.prefill, seq.progress, tokens, seq.scan, stack.num_layers))
        owners.append(seq)
        pieces.append(tokens)
    if not items:
        return []
    outputs = run_batch(stack, items)
    sampling, last_rows = [], []
    for seq, out, piece in zip(owners, outputs, pieces):
        if piece is not None:
            assert seq.prefill is not None and seq.progress is not None  # as above: a prefill item's sequence
            seq.token_layers += after_piece(seq.progress, piece, seq.scan, out, seq.prefill.buffer)
            if not seq.progress.done:
                continue
            seq.state = SeqState.DECODE
            seq.scan = None  # its scores and hidden states are no longer needed
        sampling.append(seq)
        last_rows.append(out.hidden[-1:])
    if not sampling:
        return []
    logits = stack.logits(torch.cat(last_rows))  # (sequences, vocab) float32
    return sample(sampling, logits)


def sample(seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, int]]:
    """A token for each row of logits (sequences, vocab), its sequence's log-probabilities recorded; masks logits."""
    model_logprobs = _model_logprobs(seqs, logits)
    constrained = [(row, seq.grammar) for row, seq in enumerate(seqs) if seq.grammar is not None]
    if constrained:
        mask_logits(logits, constrained)
    tokens = []
    for row, (seq, row_logits) in enumerate(zip(seqs, logits)):
        token = sample_token(row_logits, seq.sampling, seq.generator)
        if seq.sampling.logprobs:
            seq.token_logprobs.append(token_logprob(model_logprobs[row], token, seq.sampling.top_logprobs))
        tokens.append((seq, token))
    return tokens


def _model_logprobs(seqs: list[Sequence], logits: torch.Tensor) -> dict[int, torch.Tensor]:
    """Row -> (vocab,) log_softmax of the rows that report log-probabilities; first_logprobs set here.

    Taken before the grammar's mask and at temperature 1: the model's own distribution (what
    OpenAI's logprobs report, vLLM's default), so a constrained token's logprob says how
    likely the model found it, and alternatives may include tokens the grammar forbade."""
    rows = [
        row
        for row, seq in enumerate(seqs)
        if seq.sampling.logprobs or (seq.return_logprobs and seq.first_token_s is None)
    ]
    if not rows:
        return {}
    logprobs = torch.log_softmax(logits[rows], -1)  # (rows, vocab), a copy: masking logits leaves it be
    for row, row_logprobs in zip(rows, logprobs):
        seq = seqs[row]
        if seq.return_logprobs and seq.first_token_s is None:
            seq.first_logprobs = row_logprobs
    return dict(zip(rows, logprobs))


def token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The sampled token's log-probability in (vocab,) logprobs and the `top` most likely tokens, most likely first."""
    alternatives: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = logprobs.topk(top)  # sorted, largest first
        alternatives = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), alternatives)
