"""Turn a question and its documents into token ids: system prefix, one chunk per document, suffix.

The model's chat template is rendered once with a marker where the documents go and split
there, and each piece is tokenised on its own, so a document's tokens never depend on its
neighbours: that is what lets its KV be reused anywhere. Full prefill uses the very same
ids, so modes differ only in how KV is obtained, never in the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from ragcache.engine import toolformat
from ragcache.engine.chat import ChatTurn, Role, ToolSpec
from ragcache.engine.errors import InvalidRequestError

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer the question using the documents below. Answer briefly."
_DOCUMENTS_MARK = "\x00ragcache-documents\x00"


@dataclass(frozen=True)
class PromptLimits:
    max_documents: int = 64
    max_chunk_tokens: int = 4096
    max_prompt_tokens: int = 8192

    def __post_init__(self) -> None:
        for name in ("max_documents", "max_chunk_tokens", "max_prompt_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class PromptParts:
    """Token ids of a RAG prompt in the order the model reads them: prefix, chunks..., suffix."""

    prefix_ids: tuple[int, ...]
    chunk_ids: tuple[tuple[int, ...], ...]
    suffix_ids: tuple[int, ...]

    @property
    def all_ids(self) -> list[int]:
        return [*self.prefix_ids, *(t for chunk in self.chunk_ids for t in chunk), *self.suffix_ids]

    @property
    def num_tokens(self) -> int:
        return len(self.prefix_ids) + self.num_chunk_tokens + len(self.suffix_ids)

    @property
    def num_chunk_tokens(self) -> int:
        return sum(len(chunk) for chunk in self.chunk_ids)


def check_fits_context(prompt_tokens: int, max_tokens: int, context_len: int) -> None:
    """InvalidRequestError unless the prompt and the longest answer asked for fit the model's context."""
    if prompt_tokens + max_tokens > context_len:
        raise InvalidRequestError(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's context of {context_len}"
        )


def document_text(document: str) -> str:
    """How a document appears in the prompt: stripped, followed by a blank line."""
    return document.strip() + "\n\n"


def encode(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def encode_documents(tokenizer, documents: Sequence[str], limits: PromptLimits) -> list[tuple[int, ...]]:
    """Token ids of each document as a chunk; empty or over-long documents are refused by index."""
    if len(documents) > limits.max_documents:
        raise InvalidRequestError(f"documents: {len(documents)} given, at most {limits.max_documents} allowed")
    chunks = []
    for index, document in enumerate(documents):
        if not isinstance(document, str) or not document.strip():
            raise InvalidRequestError(f"documents[{index}] is empty")
        ids = encode(tokenizer, document_text(document))
        if len(ids) > limits.max_chunk_tokens:
            raise InvalidRequestError(
                f"documents[{index}] has {len(ids)} tokens, more than the limit of {limits.max_chunk_tokens}"
            )
        chunks.append(ids)
    return chunks


Turn = tuple[str, str] | ChatTurn  # (role, content) with role "user" or "assistant", or a ChatTurn
ROLES = ("user", "assistant")


def as_chat_turn(turn: Turn) -> ChatTurn:
    """A (role, content) pair's role is the caller's string: build_rag_prompt checks it (_valid_turn)."""
    return turn if isinstance(turn, ChatTurn) else ChatTurn(cast(Role, turn[0]), turn[1])


def template_knows_tools(tokenizer) -> bool:
    """Whether the model's chat template renders `tools` and tool turns itself (Qwen2.5, Llama 3.1, ...)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template and "tool_calls" in template


def split_template(
    tokenizer,
    system_prompt: str,
    question: str,
    has_documents: bool,
    history: Sequence[Turn] = (),
    tools: Sequence[ToolSpec] = (),
) -> tuple[str, str]:
    """The rendered chat prompt before and after the documents.

    Documents close the system message, so everything before them is the system prompt
    alone: chunk caches computed after it serve every conversation with that system
    prompt, single questions and multi-turn chats alike. Tools and tool turns go through
    the chat template when it knows them, otherwise through toolformat.py (the tools listed
    in the system message before the documents, calls and results as text turns).
    question "" ends the prompt after the history (an agent's turn after a tool result).
    """
    header = "\n\nDocuments:\n\n" if has_documents else ""
    turns = [as_chat_turn(turn) for turn in history]
    native = bool(tools or any(turn.about_tools for turn in turns)) and template_knows_tools(tokenizer)
    if tools and not native:
        system_prompt = f"{system_prompt}\n\n{toolformat.tools_text(tools)}"
    system = f"{system_prompt}{header}{_DOCUMENTS_MARK}"
    if native:
        messages = [_native_message(turn) for turn in turns]
    else:
        messages = [
            {"role": role, "content": content}
            for role, content in toolformat.merge_tool_results([toolformat.turn_text(t) for t in turns])
        ]
    messages = [{"role": "system", "content": system}, *messages]
    if question:
        messages.append({"role": "user", "content": question})
    if getattr(tokenizer, "chat_template", None):
        extra = {"tools": [tool.as_openai() for tool in tools]} if native and tools else {}
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    else:
        rendered = "".join(f"{m['role'].title()}: {m['content']}\n\n" for m in messages) + "Assistant:"
    before, _, after = rendered.partition(_DOCUMENTS_MARK)
    return before, after


def _native_message(turn: ChatTurn) -> dict:
    message: dict = {"role": turn.role, "content": turn.content}
    if turn.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": json.loads(call.arguments)},
            }
            for call in turn.tool_calls
        ]
    if turn.tool_call_id is not None:
        message["tool_call_id"] = turn.tool_call_id
    if turn.name is not None:
        message["name"] = turn.name
    return message


def _valid_turn(turn: ChatTurn) -> bool:
    if turn.role not in (*ROLES, "tool") or not isinstance(turn.content, str):
        return False
    return bool(turn.content.strip() or turn.tool_calls or turn.role == "tool")


def build_rag_prompt(
    tokenizer,
    question: str,
    documents: Sequence[str] = (),
    system_prompt: str | None = None,
    limits: PromptLimits = PromptLimits(),
    history: Sequence[Turn] = (),
    tools: Sequence[ToolSpec] = (),
) -> PromptParts:
    """question "" is allowed only after a tool result (the model answers the result, not a new message)."""
    turns = [as_chat_turn(turn) for turn in history]
    after_tool = bool(turns) and turns[-1].role == "tool"
    if not isinstance(question, str) or not (question.strip() or after_tool):
        raise InvalidRequestError("question is empty")
    for index, turn in enumerate(turns):
        if not _valid_turn(turn):
            raise InvalidRequestError(f"history[{index}] must be a non-empty user, assistant or tool turn")
    chunks = encode_documents(tokenizer, documents, limits)
    system = system_prompt or DEFAULT_SYSTEM_PROMPT
    before, after = split_template(tokenizer, system, question.strip(), bool(chunks), turns, tools)
    parts = PromptParts(encode(tokenizer, before), tuple(chunks), encode(tokenizer, after))
    if parts.num_tokens > limits.max_prompt_tokens:
        raise InvalidRequestError(
            f"prompt has {parts.num_tokens} tokens, more than the limit of {limits.max_prompt_tokens}"
        )
    return parts
