"""The chat values an agent's turn carries into the engine: tools, tool calls, turns, output constraints.

The service turns OpenAI's wire messages into these; the prompt renders them (prompt.py,
through toolformat.py when the model's chat template knows no tools); the sampler holds
the output to an OutputConstraint (grammar.py). Plain values: no wire format, no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call: OpenAI's `function` object (parameters: a JSON schema)."""

    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def as_openai(self) -> dict:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass(frozen=True)
class ToolCall:
    """One call the model made (or, in history, had made): arguments is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


Role = Literal["user", "assistant", "tool"]


@dataclass(frozen=True)
class ChatTurn:
    """An earlier turn of the conversation: a user message, an assistant answer (text, calls or both),
    or a tool's result for the call tool_call_id."""

    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None  # a tool result's function name, when the client gave it

    @property
    def about_tools(self) -> bool:
        """A tool's result, or an assistant turn that called tools."""
        return self.role == "tool" or bool(self.tool_calls)


@dataclass(frozen=True)
class OutputConstraint:
    """What the sampler must keep the output to (grammar.py compiles it with xgrammar).

    kind "tool_calls": the tool-call format of toolformat.py over `tools`; require_call:
    nothing but calls, at least one (tool_choice "required" or a named function, which
    passes that one tool) — otherwise ("auto") free text, where a call the model starts must
    be a valid call; parallel: more than one call allowed.
    kind "json": one JSON value matching `schema` (JSON text of a JSON schema; None: any
    JSON object, OpenAI's response_format json_object).
    """

    kind: Literal["tool_calls", "json"]
    tools: tuple[ToolSpec, ...] = ()
    require_call: bool = False
    parallel: bool = True
    schema: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("tool_calls", "json"):
            raise ValueError(f"constraint kind must be 'tool_calls' or 'json', got {self.kind!r}")
        if self.kind == "tool_calls" and not self.tools:
            raise ValueError("a tool_calls constraint needs at least one tool")
