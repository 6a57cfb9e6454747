"""One batched step: the scheduler's plan computed in a single pass, then a token sampled per sequence.

    plan.decodes    each feeds its last sampled token at the next slot
    plan.prefills   each computes its next piece of prompt (prefill.py: plain, blend scan or finish)
    -> run_batch    row-wise work over every row at once, attention per sequence
    -> logits       for decodes and for prompts that just completed, in one lm_head call
    -> sample       per sequence: its own temperature, top_p and generator
"""

from __future__ import annotations

import torch

from ragcache.engine.forward import BatchItem, TokenRun, run_batch
from ragcache.engine.prefill import after_piece, piece_item
from ragcache.engine.generate import sample_token
from ragcache.engine.scheduler import StepPlan
from ragcache.engine.sequence import Sequence, SeqState
from ragcache.engine.stack import DecoderStack


def run_step(stack: DecoderStack, plan: StepPlan) -> list[tuple[Sequence, int]]:
    """Compute the plan's tokens; returns (sequence, sampled token) for each sequence that produced one."""
    items, owners, pieces = [], [], []
    for seq in plan.decodes:
        buffer = seq.prefill.buffer
        slot = buffer.length
        buffer.length += 1
        token = torch.tensor([seq.next_token], device=stack.device)
        items.append(BatchItem(buffer, TokenRun.contiguous(token, slot)))
        owners.append(seq)
        pieces.append(None)
    for seq, tokens in plan.prefills:
        items.append(piece_item(seq.prefill, seq.progress, tokens, seq.scan, stack.num_layers))
        owners.append(seq)
        pieces.append(tokens)
    if not items:
        return []
    outputs = run_batch(stack, items)
    sampling, last_rows = [], []
    for seq, out, tokens in zip(owners, outputs, pieces):
        if tokens is not None:
            seq.token_layers += after_piece(seq.progress, tokens, seq.scan, out, seq.prefill.buffer)
            if not seq.progress.done:
                continue
            seq.state = SeqState.DECODE
            seq.scan = None  # its scores and hidden states are no longer needed
        sampling.append(seq)
        last_rows.append(out.hidden[-1:])
    if not sampling:
        return []
    logits = stack.logits(torch.cat(last_rows))  # (sequences, vocab) float32
    tokens = []
    for seq, row in zip(sampling, logits):
        if seq.first_token_s is None and seq.return_logprobs:
            seq.first_logprobs = torch.log_softmax(row, -1)
        tokens.append((seq, sample_token(row, seq.sampling, seq.generator)))
    return tokens
