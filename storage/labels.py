"""Conversations found by their token prefix: which earlier turn a new prompt continues.

A plain OpenAI-protocol client (an agent loop, a multi-turn chat) names no program: each
turn re-sends the whole conversation. After a turn, its prompt is labelled here with the
program (an implicit one) whose path the prefix cache stored (prefix.py); a new turn
whose prompt starts with a whole labelled prompt continues that conversation, and the
longest such prompt wins. The prefix cache gives its KV either way (it matches blocks by
content); the label is what lets the agents layer pin the path while the turn's tool runs.

Requiring the whole earlier prompt (not just a common prefix) is what keeps two
conversations apart: every conversation shares the system prompt, none shares another's
user turns. "Whole" spares the prompt's last BOUNDARY_TOKENS (indexed_prompt): they are the
generation prompt ("<|im_start|>assistant\n"), where the next turn's re-rendering continues
with the answer and a tokenizer may merge across the boundary.

The labels are a radix tree over token ids, one per tenant, beside the prefix cache's tree
of blocks: a prompt ends at any token, a block only at a multiple of the block size. Each
program has one labelled prompt, its latest turn's; past max_conversations the least
recently labelled is forgotten.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

BOUNDARY_TOKENS = 4


def indexed_prompt(prompt_ids: Sequence[int]) -> tuple[int, ...]:
    """What of a turn's prompt is indexed: all but its last BOUNDARY_TOKENS (never less than one token)."""
    return tuple(prompt_ids[: max(1, len(prompt_ids) - BOUNDARY_TOKENS)])


class _Node:
    __slots__ = ("children", "edge", "program")

    def __init__(self, edge: tuple[int, ...] = (), program: str | None = None) -> None:
        self.edge = edge  # the token ids on the way in from the parent
        self.children: dict[int, _Node] = {}  # first token of the child's edge -> child
        self.program = program  # the program whose latest prompt ends here


class PromptLabels:
    """(tenant, prompt token ids) -> program id; longest whole-prompt prefix match. Thread-safe."""

    def __init__(self, max_conversations: int = 10_000) -> None:
        if max_conversations < 1:
            raise ValueError(f"max_conversations must be >= 1, got {max_conversations}")
        self.max_conversations = max_conversations
        self._roots: dict[str, _Node] = {}
        self._prompts: OrderedDict[tuple[str, str], tuple[int, ...]] = OrderedDict()  # (tenant, program) -> ids
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._prompts)

    def match(self, namespace: str, ids: Sequence[int]) -> tuple[str, int] | None:
        """(program, its indexed prompt's length) of the longest indexed prompt that ids strictly extends."""
        with self._lock:
            node, depth, best = self._roots.get(namespace), 0, None
            while node is not None:
                if node.program is not None and depth < len(ids):
                    best = (node.program, depth)
                child = node.children.get(ids[depth]) if depth < len(ids) else None
                if child is None or tuple(ids[depth : depth + len(child.edge)]) != child.edge:
                    break
                node, depth = child, depth + len(child.edge)
            return best

    def index(self, namespace: str, program: str, ids: Sequence[int]) -> list[tuple[str, str]]:
        """program's latest prompt is ids (its earlier one is dropped); returns the (tenant, program)
        pairs forgotten to stay within max_conversations."""
        ids = tuple(ids)
        with self._lock:
            self._drop(namespace, program)
            if ids:
                self._insert(self._roots.setdefault(namespace, _Node()), ids, program)
                self._prompts[(namespace, program)] = ids
            forgotten = []
            while len(self._prompts) > self.max_conversations:
                (ns, pid), _ = next(iter(self._prompts.items()))
                self._drop(ns, pid)
                forgotten.append((ns, pid))
            return forgotten

    def forget(self, namespace: str, program: str) -> None:
        with self._lock:
            self._drop(namespace, program)

    def _insert(self, node: _Node, ids: tuple[int, ...], program: str) -> None:
        depth = 0
        while depth < len(ids):
            child = node.children.get(ids[depth])
            if child is None:
                node.children[ids[depth]] = _Node(ids[depth:], program)
                return
            shared = _shared_len(child.edge, ids, depth)
            if shared < len(child.edge):  # split the edge where the two part
                middle = _Node(child.edge[:shared])
                child.edge = child.edge[shared:]
                middle.children[child.edge[0]] = child
                node.children[ids[depth]] = middle
                child = middle
            node, depth = child, depth + shared
        node.program = program  # a prompt that ends on an existing node (another's prefix, or the same)

    def _drop(self, namespace: str, program: str) -> None:
        ids = self._prompts.pop((namespace, program), None)
        root = self._roots.get(namespace)
        if ids is None or root is None:
            return
        path, node, depth = [root], root, 0
        while depth < len(ids):
            node = node.children[ids[depth]]
            depth += len(node.edge)
            path.append(node)
        if node.program == program:
            node.program = None
        for parent, child in zip(reversed(path[:-1]), reversed(path[1:])):  # prune what leads nowhere
            if child.program is None and not child.children:
                del parent.children[child.edge[0]]
        if not root.children:
            del self._roots[namespace]


def _shared_len(edge: tuple[int, ...], ids: tuple[int, ...], start: int) -> int:
    n = min(len(edge), len(ids) - start)
    for i in range(n):
        if edge[i] != ids[start + i]:
            return i
    return n
