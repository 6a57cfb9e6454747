"""One batched step: the scheduler's plan computed in a single pass, then a token sampled per sequence.

    plan.decodes    each feeds its last sampled token at the next slot
    plan.prefills   each computes its next piece of prompt (a blend run whole, with its selector)
    -> run_batch    row-wise work over every row at once, attention per sequence
    -> logits       for decodes and for prompts that just completed, in one lm_head call
    -> sample       per sequence: its own temperature, top_p and generator
"""

from __future__ import annotations

import torch

from ragcache.engine.forward import BatchItem, TokenRun, run_batch
from ragcache.engine.generate import sample_token
from ragcache.engine.scheduler import StepPlan
from ragcache.engine.sequence import Sequence, SeqState
from ragcache.engine.stack import DecoderStack


def run_step(stack: DecoderStack, plan: StepPlan) -> list[tuple[Sequence, int]]:
    """Compute the plan's tokens; returns (sequence, sampled token) for each sequence that produced one."""
    items, owners, ends = [], [], []
    for seq in plan.decodes:
        buffer = seq.prefill.buffer
        slot = buffer.length
        buffer.length += 1
        token = torch.tensor([seq.next_token], device=stack.device)
        items.append(BatchItem(buffer, TokenRun.contiguous(token, slot)))
        owners.append(seq)
        ends.append(None)
    for seq, count in plan.prefills:
        prefill = seq.prefill
        end = seq.computed + count
        prefill.buffer.length = max(prefill.buffer.length, end)
        run = TokenRun.contiguous(prefill.ids[seq.computed : end], seq.computed)
        items.append(BatchItem(prefill.buffer, run, selector=prefill.selector))
        owners.append(seq)
        ends.append(end)
    if not items:
        return []
    outputs = run_batch(stack, items)
    sampling, last_rows = [], []
    for seq, out, end in zip(owners, outputs, ends):
        if end is not None:
            seq.token_layers += out.token_layers  # the prompt's work (decode tokens are not counted)
            seq.computed = end
            if end < seq.prompt_len:
                continue
            seq.state = SeqState.DECODE
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
