"""Decoding after the prompt's KV is built: sampling, stop conditions, streaming."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ragcache.engine.forward import TokenRun, run_tokens
from ragcache.engine.kvbuffer import KVBuffer
from ragcache.engine.stack import DecoderStack

MAX_NEW_TOKENS = 4096
MAX_STOP_STRINGS = 16

TokenCallback = Callable[[str], None]  # receives each new piece of answer text


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; seed makes sampled output repeatable."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_tokens must be in [1, {MAX_NEW_TOKENS}], got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 10.0:
            raise ValueError(f"temperature must be in [0, 10], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings")


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from (vocab,) logits: argmax, or temperature + nucleus sampling."""
    if params.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might start a stop string (or are a partial UTF-8 character)."""
    if text.endswith("\ufffd"):
        return 1
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


@dataclass(frozen=True)
class Decoded:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    decode_s: float


def decode(
    stack: DecoderStack,
    buffer: KVBuffer,
    first_token: int,
    params: SamplingParams,
    tokenizer,
    eos_ids: set[int],
    generator: torch.Generator | None = None,
    on_token: TokenCallback | None = None,
) -> Decoded:
    """Generate from first_token on, appending to buffer, until end of turn, a stop string or max_tokens."""
    started = time.perf_counter()
    tokens: list[int] = []
    text, emitted, finish = "", 0, "length"
    token = first_token
    while True:
        if token in eos_ids:
            finish = "stop"
            break
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
            break
        safe = len(text) - held_back(text, params.stop)
        if on_token is not None and safe > emitted:
            on_token(text[emitted:safe])
            emitted = safe
        if len(tokens) >= params.max_tokens or buffer.length >= buffer.capacity:
            break
        token = _next_token(stack, buffer, token, params, generator)
    if on_token is not None and len(text) > emitted:
        on_token(text[emitted:])
    return Decoded(tokens, text, finish, time.perf_counter() - started)


def _next_token(stack, buffer: KVBuffer, token: int, params, generator) -> int:
    slot = buffer.length
    buffer.length += 1
    run = TokenRun.contiguous(torch.tensor([token], device=stack.device), slot)
    out = run_tokens(stack, buffer, run)
    return sample_token(stack.logits(out.hidden)[0], params, generator)
