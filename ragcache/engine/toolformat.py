"""How tool calls look in the prompt and in the model's output when its chat template knows no tools.

The Hermes / Qwen2.5 convention, which small instruction-tuned models have seen most:
the tools are listed as JSON inside <tools></tools> at the end of the system message; a
call is one JSON object inside <tool_call></tool_call>; a tool's result comes back in a
user turn inside <tool_response></tool_response>. SmolLM2's template has no tools, so
ragcache renders them this way; grammar.py constrains output to exactly CALL_BEGIN(name)
+ JSON arguments + CALL_END, and parse_tool_calls reads it back.

An assistant turn with calls is re-rendered with the arguments text exactly as the model
wrote it (the client echoes it back), so the next turn's prompt repeats the previous
answer's tokens and its KV is reused as a prefix (storage/prefix.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ragcache.engine.chat import ChatTurn, ToolSpec
from ragcache.engine.generate import held_back

CALL_TRIGGER = "<tool_call>"
CALL_END = "}\n</tool_call>"
CALL_SEPARATOR = "\n"

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def call_begin(name: str) -> str:
    """The text before a call's arguments object (the grammar forces it verbatim)."""
    return CALL_TRIGGER + '\n{"name": ' + json.dumps(name) + ', "arguments": '


def render_call(name: str, arguments: str) -> str:
    """A call as the model writes it; arguments is JSON text of an object."""
    return call_begin(name) + arguments.strip() + CALL_END


def tools_text(tools: Sequence[ToolSpec]) -> str:
    """The block appended to the system message listing the tools."""
    listed = "\n".join(json.dumps(tool.as_openai(), ensure_ascii=False) for tool in tools)
    return TOOLS_HEADER + listed + TOOLS_FOOTER


def turn_text(turn: ChatTurn) -> tuple[str, str]:
    """(role, content) of an earlier turn for a template without tools: calls written out, a tool's
    result as a user turn wrapped in <tool_response>."""
    if turn.role == "tool":
        return "user", f"<tool_response>\n{turn.content}\n</tool_response>"
    if turn.role == "assistant" and turn.tool_calls:
        calls = CALL_SEPARATOR.join(render_call(call.name, call.arguments) for call in turn.tool_calls)
        return "assistant", f"{turn.content}\n{calls}" if turn.content else calls
    return turn.role, turn.content


def merge_tool_results(turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Consecutive tool results (now user turns) become one user turn, as Qwen2.5's template renders them."""
    merged: list[tuple[str, str]] = []
    for role, content in turns:
        if (
            merged
            and role == "user"
            and merged[-1][0] == "user"
            and content.startswith("<tool_response>")
            and merged[-1][1].endswith("</tool_response>")
        ):
            merged[-1] = ("user", merged[-1][1] + "\n" + content)
        else:
            merged.append((role, content))
    return merged


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object, as the model wrote it


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None  # the text outside the calls (None when there is none)
    calls: tuple[ParsedCall, ...]
    malformed: int  # <tool_call> blocks that were not a JSON call of a listed tool (unconstrained output)


def parse_tool_calls(text: str, tools: Sequence[ToolSpec]) -> ParsedOutput:
    """The model's output split into prose and calls of listed tools; a block that is not one is left as text."""
    names = {tool.name for tool in tools}
    calls, kept, malformed, last = [], [], 0, 0
    for match in _CALL.finditer(text):
        call = _call_of(match.group(1), names)
        if call is None:
            malformed += 1
            continue
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append(call)
    kept.append(text[last:])
    content = "".join(kept).strip() if calls else text.strip()
    return ParsedOutput(content or None, tuple(calls), malformed)


def _call_of(body: str, names: set[str]) -> ParsedCall | None:
    try:
        payload, end = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError:
        return None
    if body[end:].strip() or not isinstance(payload, dict):
        return None
    name, arguments = payload.get("name"), payload.get("arguments", {})
    if isinstance(arguments, str):  # some models quote the object
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if name not in names or not isinstance(arguments, dict):
        return None
    raw = _arguments_text(body)
    return ParsedCall(name, raw if raw is not None else json.dumps(arguments, ensure_ascii=False))


def _arguments_text(body: str) -> str | None:
    """The arguments object's text exactly as written (so a re-rendered turn repeats the model's tokens)."""
    start = body.find('"arguments"')
    if start < 0:
        return None
    start = body.find(":", start) + 1
    start += len(body[start:]) - len(body[start:].lstrip())  # raw_decode takes no leading whitespace
    try:
        _, end = json.JSONDecoder().raw_decode(body, start)
    except json.JSONDecodeError:
        return None
    text = body[start:end]
    return text if text.startswith("{") else None


def ends_in_repeated_call(text: str) -> bool:
    """Whether text has just closed a call identical to an earlier one: a small model looping on the
    same call under tool_choice "required" (the engine ends the answer there; the repeat counts once)."""
    if not text.endswith("</tool_call>"):
        return False
    blocks = [block.strip() for block in _CALL.findall(text)]
    return len(blocks) > 1 and blocks[-1] in blocks[:-1]


def parses_tool_calls(request) -> bool:
    """Whether a request's answer is read for tool calls: it lists tools and is held to the call format
    (tool_choice "none" is not)."""
    constraint = request.constraint
    return bool(request.tools) and constraint is not None and constraint.kind == "tool_calls"


def with_tool_calls(result, request):
    """The Generation with its content and tool calls split out (when parses_tool_calls(request)).
    finish_reason becomes "tool_calls" when the answer ends in calls; under require_call also when
    max_tokens cut a further call short (the complete ones are valid calls)."""
    if not parses_tool_calls(request):
        return replace(result, content=result.text)
    constraint = request.constraint
    parsed = parse_tool_calls(result.text, request.tools)
    if not parsed.calls:
        return replace(result, content=parsed.content)
    calls = tuple(dict.fromkeys(parsed.calls))  # a call repeated word for word is one call
    content = parsed.content
    if result.finish_reason == "length" and constraint.require_call:
        # nothing but calls was allowed: the text left is an unfinished call, not an answer
        content = None
    elif result.finish_reason == "length":
        return replace(result, tool_calls=calls, content=content)
    return replace(result, tool_calls=calls, content=content, finish_reason="tool_calls")


class CallStream:
    """Splits streamed answer text into prose and tool calls as it arrives, for OpenAI's streamed deltas.

    push(piece) returns events: ("text", s), ("call", index, name) when a call's name is known,
    ("arguments", index, s) for pieces of its arguments text. Text that may be the start of
    <tool_call> (or of a call's end) is held back until it is known not to be. The format is
    the exact one grammar.py enforces; output that strays from it streams as text.

    A call repeated word for word is one call (as with_tool_calls counts it): a later call is
    held back while it is still a prefix of an earlier one of the same tool, and dropped if it
    ends up identical; otherwise it streams from the point it differs.
    """

    _NAME = re.compile(r'^\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')

    def __init__(self) -> None:
        self.buffer = ""
        self.in_call = False  # inside <tool_call>, name not yet read
        self.in_arguments = False
        self.calls: list[tuple[str, str]] = []  # (name, arguments) of the calls streamed so far
        self.current: list[str] | None = None  # [name, arguments so far] of the call being read
        self.released = False  # the current call's events have gone out

    def push(self, piece: str) -> list[tuple]:
        self.buffer += piece
        events: list[tuple] = []
        while True:
            if self.in_arguments:
                end = self.buffer.find(CALL_END)
                if end >= 0:
                    self._arguments(events, self.buffer[:end])
                    self.buffer = self.buffer[end + len(CALL_END) :]
                    self.in_arguments = False
                    self._end_call(events)
                    continue
                safe = len(self.buffer) - held_back(self.buffer, (CALL_END,))
                self._arguments(events, self.buffer[:safe])
                self.buffer = self.buffer[safe:]
                return events
            if self.in_call:
                match = self._NAME.match(self.buffer)
                if match is None:
                    return events  # wait for more (flush() gives it back as text if it never comes)
                self.current, self.released = [json.loads(match.group(1)), ""], False
                self._release_if_new(events)
                self.buffer = self.buffer[match.end() :]
                self.in_call, self.in_arguments = False, True
                continue
            start = self.buffer.find(CALL_TRIGGER)
            if start >= 0:
                self._text(events, self.buffer[:start])
                self.buffer = self.buffer[start + len(CALL_TRIGGER) :]
                self.in_call = True
                continue
            safe = len(self.buffer) - held_back(self.buffer, (CALL_TRIGGER,))
            self._text(events, self.buffer[:safe])
            self.buffer = self.buffer[safe:]
            return events

    def flush(self) -> list[tuple]:
        """The end of the answer: text held back goes out as text. In a call cut short (max_tokens), what is
        held back is a partial end marker and goes nowhere; a held-back repeat stays out."""
        events: list[tuple] = []
        if not self.in_arguments:
            self._text(events, (CALL_TRIGGER if self.in_call else "") + self.buffer)
        self.buffer, self.in_call, self.in_arguments, self.current = "", False, False, None
        return events

    def _text(self, events: list, text: str) -> None:
        if text and (text.strip() or not self.calls):  # the separator between calls is not content
            events.append(("text", text))

    def _arguments(self, events: list, text: str) -> None:
        if not text:
            return
        assert self.current is not None  # in_arguments: the call's name was read
        self.current[1] += text
        if self.released:
            events.append(("arguments", len(self.calls), text))
        else:
            self._release_if_new(events)

    def _release_if_new(self, events: list) -> None:
        assert self.current is not None  # called while a call is being read
        name, arguments = self.current
        if not any(n == name and a.startswith(arguments) for n, a in self.calls):
            self._release(events)

    def _release(self, events: list) -> None:
        assert self.current is not None  # called while a call is being read
        name, arguments = self.current
        events.append(("call", len(self.calls), name))
        if arguments:
            events.append(("arguments", len(self.calls), arguments))
        self.released = True

    def _end_call(self, events: list) -> None:
        assert self.current is not None  # the end of the call being read
        name, arguments = self.current
        call = (name, arguments)
        if not self.released and call not in self.calls:
            self._release(events)
        if self.released:
            self.calls.append(call)
        self.current, self.released = None, False
