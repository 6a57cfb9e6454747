"""A request inside the engine: its state, its working KV and its answer so far.

    WAITING ─admit─▶ PREFILL ─prompt done─▶ DECODE ─eos / stop / max_tokens─▶ FINISHED
       ▲               │  ▲                   │  ▲
       └──(none: a     └──┴── preempt ──▶ SWAPPED ── resume ──┘
          sequence is never sent back)     (KV in host memory)
    any state ── client gone ──▶ CANCELLED (freed at the next step)

The scheduler moves sequences between states; the step computes their tokens; the
postprocess appends each sampled token here. Only the engine thread mutates a sequence,
except cancel(), which any thread may call.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ragcache.engine.blend import Prefill
from ragcache.engine.generate import SamplingParams, held_back
from ragcache.engine.lookup import Lookup
from ragcache.engine.prefill import BlendScan, PrefillProgress
from ragcache.engine.prompt import PromptParts
from ragcache.engine.toolformat import ends_in_repeated_call

if TYPE_CHECKING:
    from ragcache.engine.grammar import SequenceGrammar
    from ragcache.engine.request import TokenLogprob


class SeqState(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    SWAPPED = "swapped"
    FINISHED = "finished"
    CANCELLED = "cancelled"


class GenerationSink(Protocol):
    """Where a sequence's output goes. Called from engine threads, never concurrently for one sequence."""

    def on_text(self, piece: str) -> None: ...

    def on_finish(self, result: Any) -> None:
        """The finished Generation (after the program KV, if any, is stored)."""

    def on_error(self, error: BaseException) -> None: ...


@dataclass
class TextStream:
    """The answer's text as tokens arrive: stop strings cut it, pieces are released once safe to show."""

    stops: tuple[str, ...]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0

    def push(self, token: int, tokenizer) -> tuple[str, bool]:
        """Add token; returns (text now safe to emit, whether a stop string ended the answer)."""
        self.tokens.append(token)
        self.text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self.flush(), True
        safe = len(self.text) - held_back(self.text, self.stops)
        piece = self.text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return piece, False

    def flush(self) -> str:
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece


@dataclass(eq=False)  # sequences are compared by identity
class Sequence:
    request: Any  # RagRequest
    parts: PromptParts
    lookup: Lookup
    sink: GenerationSink
    eos_ids: frozenset[int]
    ticket: Any = None  # the admission order's ticket (agents: program-level FCFS)
    return_logprobs: bool = False
    background: bool = False  # a shadow check: runs only on spare capacity (scheduler.py)
    state: SeqState = SeqState.WAITING
    arrived_s: float = field(default_factory=time.perf_counter)
    progress: PrefillProgress | None = None  # the prompt's computation, piece by piece (set at submit)
    prefill: Prefill | None = None  # the working KV, set at admission
    scan: BlendScan | None = None  # a blend run's tensors between its pieces
    reserved_slots: int = 0  # working-KV slots the scheduler granted (the buffer's capacity)
    shared_key: Any = None  # the system prefix whose KV running sequences share (None: none shared)
    shared_len: int = 0  # its tokens: slots [0, shared_len) are not this sequence's own
    state_before_swap: SeqState = SeqState.PREFILL
    token_layers: int = 0  # (token, layer) K/V entries computed for the prompt
    chunk_compute_s: float = 0.0
    admitted_s: float | None = None
    first_token_s: float | None = None
    first_logprobs: torch.Tensor | None = None
    next_token: int | None = None  # sampled, not yet fed through the model
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    grammar: SequenceGrammar | None = None  # the output constraint's matcher (grammar.py); None: free text
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # per sampled token when sampling.logprobs
    stream: TextStream = field(init=False)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.stream = TextStream(self.sampling.stop)
        if self.sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling.seed)

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def prompt_len(self) -> int:
        return self.parts.num_tokens

    @property
    def max_len(self) -> int:
        """Slots the sequence may ever need: the prompt and every answer token but the last."""
        return self.prompt_len + self.sampling.max_tokens

    @property
    def kv_len(self) -> int:
        """Slots of working KV in use (0 before admission)."""
        return self.prefill.buffer.length if self.prefill is not None else 0

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """The client went away: the scheduler frees the sequence at its next step. Any thread."""
        self._cancelled.set()

    @property
    def done(self) -> bool:
        return self.state in (SeqState.FINISHED, SeqState.CANCELLED)

    def accept(self, token: int, tokenizer, context_len: int) -> None:
        """A sampled token: stream its text, or finish (end of turn, stop string, the grammar done, max_tokens,
        context full). eos is never fed to the grammar: its mask allowed eos only where the output may end."""
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter()
        if token in self.eos_ids:
            self._finish("stop")
            return
        if self.grammar is not None and not self.grammar.accept(token):  # outside its mask: sampling never picks one
            self._finish("stop", self.stream.flush())
            return
        piece, stopped = self.stream.push(token, tokenizer)
        if stopped or (self.grammar is not None and (self.grammar.ended or self._looping())):
            self._finish("stop", piece + self.stream.flush())
            return
        if piece:
            self.sink.on_text(piece)
        assert self.prefill is not None  # a sampled token: the sequence is running, its working KV placed
        fed = self.prefill.buffer.length
        if len(self.stream.tokens) >= self.sampling.max_tokens or fed >= context_len:
            self._finish("length", self.stream.flush())
        else:
            self.next_token = token

    def _looping(self) -> bool:
        """A tool call just closed that repeats an earlier one word for word: a small model under
        tool_choice "required" does that until max_tokens; the repeat adds nothing (it counts once)."""
        constraint = self.request.constraint
        return constraint.kind == "tool_calls" and constraint.parallel and ends_in_repeated_call(self.stream.text)

    def _finish(self, reason: str, piece: str = "") -> None:
        if piece:
            self.sink.on_text(piece)
        self.finish_reason = reason
        self.next_token = None
        self.state = SeqState.FINISHED


class BlockingSink:
    """A sink for generate(): forwards text to on_token, lets the caller wait for the result."""

    def __init__(self, on_token=None) -> None:
        self.on_token = on_token
        self.done = threading.Event()
        self._result = None  # the Generation
        self._error: BaseException | None = None

    def on_text(self, piece: str) -> None:
        if self.on_token is not None:
            self.on_token(piece)

    def on_finish(self, result) -> None:
        self._result = result
        self.done.set()

    def on_error(self, error: BaseException) -> None:
        self._error = error
        self.done.set()

    def wait(self):
        self.done.wait()
        if self._error is not None:
            raise self._error
        return self._result


if TYPE_CHECKING:  # the type checker holds BlockingSink to the GenerationSink contract
    _blocking_sink: type[GenerationSink] = BlockingSink
