"""The Engine seam: what the service runtime needs from a model runner.

Today's implementation is BlendEngine (runner.py: in-process, batched, blending); a vLLM +
LMCache runner can stand behind the same Protocol without the service changing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ragcache.engine.runner import DocumentInfo, RagRequest
    from ragcache.engine.sequence import GenerationSink, Sequence
    from ragcache.kv import ChunkKey


class Engine(Protocol):
    model_name: str
    kv_bytes_per_token: int  # working KV of one token, every layer

    def start(self) -> None:
        """Start serving submitted sequences (the step loop's thread)."""

    def submit(
        self, request: RagRequest, sink: GenerationSink, *, ticket=None, return_logprobs: bool = False
    ) -> Sequence:
        """Queue a request; its text and its Generation reach sink from engine threads.

        Blocks for tokenising and store lookups (call it off the event loop); raises
        InvalidRequestError for a request that can never be served. Sequence.cancel()
        frees it at the next step. ticket: the admission order's (agents) for this turn."""

    def conversation_of(self, request: RagRequest) -> str | None:
        """The program whose stored conversation the request's prompt continues (matched by token
        prefix), or None. Blocks for tokenising (call it off the event loop)."""

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's own text."""

    def ratio_of(self, request: RagRequest) -> float:
        """The blend ratio the request gets (its own or the engine's default)."""

    def add_documents(
        self, documents: list[str], system_prompt: str | None = None, namespace: str = ...
    ) -> list[DocumentInfo]:
        """Compute and store documents' KV ahead of queries (blocking)."""

    def forget_chunk(self, key: ChunkKey) -> bool:
        """Drop a chunk's KV from every tier."""

    def forget_program(self, namespace: str, program_id: str) -> bool:
        """The program ended: forget it and drop its KV."""

    def program_records(self) -> list[tuple[str, str, int]]:
        """(tenant, program id, tokens of its stored KV) of every known program."""

    @property
    def tier_names(self) -> list[str]: ...

    def flush(self, tier: str | None = None, keys: list[ChunkKey] | None = None) -> int:
        """Drop cached KV from every tier or one, every key or the given ones; entries dropped."""

    def stats(self) -> dict:
        """The scheduler's figures: running, waiting, swapped, working-KV bytes, tokens per step."""

    def store_stats(self) -> dict:
        """The KV store's snapshot (KVStore.stats())."""

    def close(self) -> None:
        """Finish queued and running sequences, stop, write hot KV through and close the store."""
