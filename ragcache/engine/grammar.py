"""Constrained decoding: an OutputConstraint compiled to a grammar, a matcher per sequence, a mask per step.

    submit   ConstraintCompiler.matcher(constraint)   compiled once per distinct constraint → SequenceGrammar
    step     mask_logits(logits, constrained)          one bitmask for the constrained rows, applied in place
    accept   SequenceGrammar.accept(token); .ended     the grammar is done: the answer finishes ("stop")

Why xgrammar rather than llguidance: it is the structured-output backend vLLM and SGLang
ship by default; its masks are CPU bitmasks (a bit per token) with a CPU apply path as well
as a GPU kernel, so the CPU install constrains the same way; it compiles SmolLM2's 49k
vocabulary in about 0.1 s and a tool set in about 10 ms; and its structural tags say
toolformat.py's call format directly (a fixed begin, a JSON-schema body, a fixed end,
separated, or triggered inside free text), where llguidance would need a Lark grammar
written and escaped here.

When the answer ends. A grammar with a definite end (one JSON value that cannot run on,
exactly one required call) ends at its last character: its matcher terminates without a stop
token, so no step is spent on eos. Otherwise (free text around calls, more calls allowed)
the model ends the answer with eos, which the mask allows once the grammar is complete.

xgrammar is imported on first use, so an engine that never sees a constraint never loads it.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ragcache.engine.chat import OutputConstraint, ToolSpec
from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.toolformat import CALL_END, CALL_SEPARATOR, CALL_TRIGGER, call_begin

if TYPE_CHECKING:
    import xgrammar as xgr

MAX_COMPILED = 256  # distinct constraints kept compiled (each ~0.1-0.2 MB for a 49k vocabulary)
MAX_WHITESPACE = 1  # per run of whitespace in JSON: a random or weak model cannot pad forever
_DEFINITE_JSON_TYPES = frozenset({"object", "array", "string", "boolean", "null"})  # nothing can follow them
_XGRAMMAR_PREFIX = re.compile(r"^(\[[^\]]*\]\s*)?(\S+\.cc:\d+:\s*)?(Check failed: .*? is false:\s*)?")


class SequenceGrammar:
    """One sequence's position in its grammar. After submit only the engine thread touches it
    (xgrammar matchers are not thread-safe); it lives on the Sequence, so a swap keeps it."""

    def __init__(self, compiled: xgr.CompiledGrammar, definite_end: bool) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=definite_end)

    def accept(self, token: int) -> bool:
        """Advance past a sampled token; False (state unchanged) if the grammar refuses it."""
        return self.matcher.accept_token(token)

    @property
    def ended(self) -> bool:
        """The grammar is done: nothing may follow (a definite end reached, or a stop token accepted)."""
        return self.matcher.is_terminated()


class ConstraintCompiler:
    """Compiles OutputConstraints for one engine's tokenizer; thread-safe (submit runs on callers' threads).

    The xgrammar tokenizer info and compiler are built on the first compile: vocab_size is the
    model's logits width (it may exceed the tokenizer's; the extra ids are never allowed), and
    stop_ids are the engine's eos ids, the only tokens a complete grammar allows besides its own.
    tokenizer_lock guards the Hugging Face tokenizer while its vocabulary is read."""

    def __init__(
        self, tokenizer, vocab_size: int, stop_ids: Sequence[int], tokenizer_lock: threading.Lock | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = tuple(sorted(stop_ids))
        self._tokenizer_lock = tokenizer_lock or threading.Lock()
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None
        self._compiled: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()  # least recently used first

    def matcher(self, constraint: OutputConstraint) -> SequenceGrammar:
        """A fresh matcher for one sequence. Raises InvalidRequestError for a schema that cannot be compiled."""
        return SequenceGrammar(self.compile(constraint), definite_end(constraint))

    def compile(self, constraint: OutputConstraint) -> xgr.CompiledGrammar:
        """The constraint's grammar, from the cache when an equal constraint was compiled before.

        Raises InvalidRequestError naming the field: response_format.json_schema, or the tool's parameters."""
        key = constraint_key(constraint)
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return compiled
        compiler = self._compiler_once()
        compiled = (
            _compile_tool_calls(compiler, constraint)
            if constraint.kind == "tool_calls"
            else _compile_json(compiler, constraint.schema)
        )
        with self._lock:  # two threads may compile the same constraint; either result is the same grammar
            self._compiled[key] = compiled
            while len(self._compiled) > MAX_COMPILED:
                self._compiled.popitem(last=False)
        return compiled

    def stats(self) -> dict:
        with self._lock:
            return {"loaded": self._compiler is not None, "compiled": len(self._compiled)}

    def _compiler_once(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                with self._tokenizer_lock:
                    info = xgr.TokenizerInfo.from_huggingface(
                        self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=list(self.stop_ids)
                    )
                # one cache, bounded here by MAX_COMPILED: xgrammar's own is unbounded by default
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            return self._compiler


def constraint_key(constraint: OutputConstraint) -> str:
    """What makes two constraints the same grammar (tool descriptions do not), as stable text."""
    try:
        return json.dumps(
            [
                constraint.kind,
                [[tool.name, tool.parameters] for tool in constraint.tools],
                constraint.require_call,
                constraint.parallel,
                constraint.schema,
            ],
            sort_keys=True,
        )
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"tools.function.parameters: not a JSON schema ({exc})") from exc


def definite_end(constraint: OutputConstraint) -> bool:
    """Whether the grammar's first complete output is its last: then the answer ends there, without eos."""
    if constraint.kind == "tool_calls":
        return constraint.require_call and not constraint.parallel
    if constraint.schema is None:
        return True  # any JSON object
    root = json.loads(constraint.schema)  # compile() parsed it first
    types = root.get("type") if isinstance(root, dict) else None
    types = types if isinstance(types, list) else [types]
    return all(kind in _DEFINITE_JSON_TYPES for kind in types)  # a number could always take another digit


def mask_logits(logits: torch.Tensor, constrained: list[tuple[int, SequenceGrammar]]) -> None:
    """Forbid, in place, each constrained row's tokens its grammar does not allow next; other rows untouched.

    logits: (rows, vocab) float32, on any device; constrained: (row, grammar) pairs, rows distinct.
    A row whose grammar allows nothing (not seen in practice: a complete grammar allows eos, an
    ended one has finished its sequence) is given the stop tokens, so no row is ever all -inf
    and its sequence ends there."""
    import xgrammar as xgr

    rows = [row for row, _ in constrained]
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[-1])  # (rows, ceil(vocab / 32)) int32, all ones
    for row, grammar in constrained:
        if grammar.ended:  # its sequence finishes before another step; xgrammar refuses to fill an ended matcher
            bitmask[row] = 0
        else:
            grammar.matcher.fill_next_token_bitmask(bitmask, row)
    for (row, grammar), allows_any in zip(constrained, bitmask[rows].any(-1).tolist()):
        if not allows_any:
            _allow(bitmask, row, grammar.matcher.stop_token_ids)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)


def _allow(bitmask: torch.Tensor, row: int, token_ids: Sequence[int]) -> None:
    for token in token_ids:
        bit = 1 << (token % 32)
        bitmask[row, token // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit  # int32: bit 31 is the sign


def grammar_text(constraint: OutputConstraint) -> str:
    """The constraint as xgrammar EBNF: what a model server with xgrammar (vLLM's structured outputs,
    `grammar`) is given to constrain the same way. InvalidRequestError as compile() for a bad schema."""
    import xgrammar as xgr

    if constraint.kind == "json":
        parsed = _json_schema(constraint.schema)
        try:
            grammar = xgr.Grammar.from_json_schema(
                json.dumps(parsed), any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE
            )
        except (RuntimeError, ValueError) as exc:
            raise InvalidRequestError(f"response_format.json_schema: {_reason(exc)}") from exc
        return str(grammar)
    try:
        return str(xgr.Grammar.from_structural_tag(_tool_call_tag(constraint)))
    except (RuntimeError, ValueError) as exc:
        raise _tool_error(constraint, exc, lambda schema: xgr.Grammar.from_json_schema(json.dumps(schema))) from exc


def _tool_call_tag(constraint: OutputConstraint) -> Any:
    """toolformat.py's call format over the constraint's tools, as an xgrammar structural tag."""
    from xgrammar.structural_tag import (
        JSONSchemaFormat,
        StructuralTag,
        TagFormat,
        TagsWithSeparatorFormat,
        TriggeredTagsFormat,
    )

    for tool in constraint.tools:
        _check_schema(tool.parameters, _tool_field(tool))
    tags = [
        TagFormat(
            begin=call_begin(tool.name),
            content=JSONSchemaFormat(json_schema=tool.parameters, max_whitespace_cnt=MAX_WHITESPACE),
            end=CALL_END,
        )
        for tool in constraint.tools
    ]
    once = not constraint.parallel
    if constraint.require_call:  # nothing but calls, at least one
        tag_format: Any = TagsWithSeparatorFormat(
            tags=tags, separator=CALL_SEPARATOR, at_least_one=True, stop_after_first=once
        )
    else:  # free text; a call starts at the trigger and must then be a valid call
        tag_format = TriggeredTagsFormat(triggers=[CALL_TRIGGER], tags=tags, at_least_one=False, stop_after_first=once)
    return StructuralTag(format=tag_format)


def _tool_error(constraint: OutputConstraint, exc: BaseException, compile_schema: Any) -> InvalidRequestError:
    """Which tool's schema xgrammar refused (each compiled alone), or the whole grammar's reason."""
    for tool in constraint.tools:
        try:
            compile_schema(tool.parameters)
        except (RuntimeError, ValueError) as tool_exc:
            return InvalidRequestError(f"{_tool_field(tool)}: {_reason(tool_exc)}")
    return InvalidRequestError(f"tools: the tool-call grammar cannot be compiled: {_reason(exc)}")


def _compile_tool_calls(compiler: xgr.GrammarCompiler, constraint: OutputConstraint) -> xgr.CompiledGrammar:
    tag = _tool_call_tag(constraint)
    try:
        return compiler.compile_structural_tag(tag)
    except (RuntimeError, ValueError) as exc:
        raise _tool_error(constraint, exc, compiler.compile_json_schema) from exc


def _json_schema(schema: str | None) -> Any:
    """The parsed schema (None: any object, OpenAI's json_object); InvalidRequestError naming the field."""
    if schema is None:
        return {"type": "object"}  # json_object: any object, not any JSON value
    try:
        parsed = json.loads(schema)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"response_format.json_schema: not valid JSON ({exc})") from exc
    _check_schema(parsed, "response_format.json_schema")
    return parsed


def _compile_json(compiler: xgr.GrammarCompiler, schema: str | None) -> xgr.CompiledGrammar:
    parsed = _json_schema(schema)
    try:
        return compiler.compile_json_schema(json.dumps(parsed), any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE)
    except (RuntimeError, ValueError) as exc:
        raise InvalidRequestError(f"response_format.json_schema: {_reason(exc)}") from exc


def _check_schema(schema: Any, field: str) -> None:
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{field}: a JSON schema is an object, got {type(schema).__name__}")


def _tool_field(tool: ToolSpec) -> str:
    return f"tools.function.parameters of {tool.name!r}"


def _reason(exc: BaseException) -> str:
    """xgrammar's message without its C++ source location."""
    return _XGRAMMAR_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
