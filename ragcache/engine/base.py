"""The Engine seam: what the service runtime needs from a model runner.

Two implementations: BlendEngine (runner.py: in-process, batched, blending) and VLLMEngine
(ragcache/vllm/engine.py: vLLM OpenAI servers over HTTP, their prefix cache and ragcache's KV
connector inside them). The service runtime, shadow checks and agents see only this Protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable

    from ragcache.engine.request import DocumentInfo, RagRequest
    from ragcache.engine.scheduler import AdmissionOrder
    from ragcache.engine.sequence import GenerationSink
    from ragcache.kv import ChunkKey
    from ragcache.storage.base import KVStore


class Submitted(Protocol):
    """What submit() hands back: the one thing a caller may do with a queued request besides reading
    its sink. (BlendEngine returns its Sequence, which is this and much more; callers of the seam see
    only this, so an engine whose requests live elsewhere, on a model server, can stand behind it.)"""

    def cancel(self) -> None:
        """The client went away: stop generating and free what the request holds, as soon as the engine
        can (a no-op once it finished). Any thread; never blocks."""


class Engine(Protocol):
    model_name: str
    kv_bytes_per_token: int  # working KV of one token, every layer

    @property
    def store(self) -> KVStore:
        """The KV store the engine reads and writes (chunks, program KV, pins): the service reports,
        flushes and deletes from it directly, the agents pin in it; the engine passes none of that through."""

    def start(self) -> None:
        """Start serving submitted sequences (the step loop's thread); a no-op once claim_loop() was called."""

    def use_admission_order(self, order: AdmissionOrder) -> None:
        """Admit waiting requests in this order (the agents layer's program-level FCFS) instead of first come,
        first served. Called once, before the first submit(); an engine with a step loop raises RuntimeError
        once the loop runs (start() / claim_loop()). The order's methods are then called on the engine's
        own threads, with the tickets given to submit() (an engine whose server admits requests itself, as
        vLLM does, only tells the order each turn it sends: admitted(), never pick())."""

    def claim_loop(self) -> None:
        """The calling thread will drive the step loop (run_loop()); start() becomes a no-op.

        The server calls it on the main thread (the one that loaded the model) before the HTTP
        server starts, so that the runtime's start() leaves the loop to it."""

    def run_loop(self, alive: Callable[[], bool] = ...) -> None:
        """Drive the step loop on this thread until close() has finished the work, or alive() returns False.

        Blocks. The server calls it on the main thread, after claim_loop(), with alive = the HTTP
        thread's is_alive; default: until close()."""

    def submit(
        self,
        request: RagRequest,
        sink: GenerationSink,
        *,
        ticket: object = None,
        return_logprobs: bool = False,
        background: bool = False,
    ) -> Submitted:
        """Queue a request; its text and its Generation reach sink from engine threads.

        Blocks for tokenising and store lookups (call it off the event loop); raises
        InvalidRequestError for a request that can never be served. cancel() on what it returns
        frees it at the next step. ticket: the admission order's (agents) for this turn.
        background: run it on spare capacity only, never delaying a live request (shadow checks);
        it never enters the admission order."""

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

    def forget_program(self, namespace: str, program_id: str) -> bool:
        """The program ended: forget it (its label; its KV ages out)."""

    def tenant_blocks(self, namespace: str) -> list[ChunkKey]:
        """The tenant's prefix-cache blocks this engine knows of (a tenant's flush drops them); [] when the
        prompt KV is not in ragcache's store."""

    def prefix_stats(self) -> dict | None:
        """The prefix cache's tree (storage/prefix.py stats()); None when the model server keeps its own."""

    def prefetch_program(self, namespace: str, program_id: str) -> bool:
        """The program's tool returned: bring its KV to where its next turn will run (KVFlow's observation:
        an agent's next step is predictable), so the turn finds it there. Blocks for the store or server
        round trip (call it off the event loop); False when nothing of the program is known."""

    def program_records(self) -> list[tuple[str, str, int]]:
        """(tenant, program id, tokens of its stored KV) of every known program."""

    def stats(self) -> dict:
        """The scheduler's figures: running, waiting, swapped, working-KV bytes, tokens per step."""

    def upstream_health(self) -> list[dict]:
        """The model servers the engine sends requests to, each with url and up (True / False) and its
        load; [] for an engine that runs the model in this process."""

    def close(self) -> None:
        """Finish queued and running sequences, stop, write hot KV through and close the store."""
