"""The engine: requests become sequences, one engine thread steps them in batches.

    submit        (caller's thread) tokenize; content keys; store lookups (the prefix, every
                  chunk, the agent program's KV): store I/O never runs on the step loop
    admit         (engine thread, scheduler.py) within the working-KV budget, in admission order;
                  missing prefix / chunks computed in one prepacked pass, stored by a writer
                  thread; cached KV placed into the sequence's buffer (blend.place_prompt)
    step          (step.py) decode tokens of every running sequence + a budget of prompt
                  tokens, one batched pass; blend selection per sequence at its check layer
    finish        the KV of the prompt and answer cut into blocks (engine thread); the new ones
                  stored in the prefix cache, the Generation handed to the sink (writer thread)

submit() returns the Sequence at once; generate() is submit + wait, and drives the steps
itself when no engine thread was started (benchmarks, the demo, tests).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, cast

import torch

from ragcache.engine.blend import BlendConfig, PromptLayout, place_prompt, prompt_layout
from ragcache.engine.chunks import compute_chunks
from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.generate import TokenCallback
from ragcache.engine.grammar import ConstraintCompiler
from ragcache.engine.kvbuffer import KVBuffer, SharedPrefix
from ragcache.engine.loader import LoadedModel
from ragcache.engine.lookup import look_up
from ragcache.engine.postprocess import SavedPath, generation_of, saved_path
from ragcache.engine.prefill import BlendScan, PrefillProgress
from ragcache.engine.prefix_kv import kv_variant, place_hit
from ragcache.engine.prompt import (
    DEFAULT_SYSTEM_PROMPT,
    PromptLimits,
    build_rag_prompt,
    check_fits_context,
    encode,
    encode_documents,
    split_template,
)
from ragcache.engine.request import DocumentInfo, Generation, RagRequest, SequenceCancelled
from ragcache.engine.scheduler import AdmissionOrder, Scheduler, SchedulerConfig
from ragcache.engine.sequence import BlockingSink, GenerationSink, SeqState, Sequence
from ragcache.engine.stack import DecoderStack
from ragcache.engine.step import run_step
from ragcache.engine.toolformat import with_tool_calls
from ragcache.kv import DEFAULT_NAMESPACE, ChunkKey, KVChunk, chunk_key
from ragcache.storage.base import KVStore, PrefixCache
from ragcache.storage.prefix import DEFAULT_BLOCK_TOKENS, RadixPrefixCache

if TYPE_CHECKING:
    from ragcache.engine.base import Engine

log = logging.getLogger("ragcache.engine")


@dataclass(frozen=True)
class EngineConfig:
    blend: BlendConfig = BlendConfig()
    default_ratio: float = 0.15
    limits: PromptLimits = PromptLimits()
    max_pack_tokens: int = 4096
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    scheduler: SchedulerConfig = SchedulerConfig()
    prefix_block_tokens: int = DEFAULT_BLOCK_TOKENS  # tokens per prefix-cache block (a store entry)

    def __post_init__(self) -> None:
        if not 0.0 <= self.default_ratio <= 1.0:
            raise ValueError(f"default_ratio must be in [0, 1], got {self.default_ratio}")
        if self.max_pack_tokens <= 0:
            raise ValueError(f"max_pack_tokens must be positive, got {self.max_pack_tokens}")


class BlendEngine:
    """Serves RAG requests and agent turns over one loaded model and one KV store, batched."""

    def __init__(
        self,
        loaded: LoadedModel,
        store: KVStore,
        config: EngineConfig = EngineConfig(),
        order: AdmissionOrder | None = None,
        prefix: PrefixCache | None = None,
    ) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.stack = DecoderStack(loaded.model)
        if config.blend.check_layer >= self.stack.num_layers:
            raise ValueError(f"check_layer {config.blend.check_layer} >= the model's {self.stack.num_layers} layers")
        self.store = store
        self.config = config
        self.model_name = loaded.name
        self.context_len: int = loaded.model.config.max_position_embeddings
        self.eos_ids = frozenset(_eos_ids(loaded))
        # every request's KV as paths of blocks in the store; programs and conversations are labelled paths
        self.prefix = prefix or RadixPrefixCache(store, loaded.fingerprint, config.prefix_block_tokens)
        self.kv_bytes_per_token = KVBuffer.bytes_per_token(self.stack)
        self.scheduler = Scheduler(config.scheduler, self.kv_bytes_per_token, order)
        self._inbox: deque = deque()  # Sequences and (callable, Future) pairs from other threads
        self._wake = threading.Condition()
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer must not encode and decode at once
        # output constraints: xgrammar is loaded, and the vocabulary read, on the first constrained request
        self.grammars = ConstraintCompiler(
            self.tokenizer, loaded.model.config.vocab_size, sorted(self.eos_ids), self._tokenizer_lock
        )
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragcache-store-writer")
        self._thread: threading.Thread | None = None  # the one that runs the step loop
        self._loop_done = threading.Event()
        self._prefixes: dict[ChunkKey, SharedPrefix] = {}  # system prefixes shared by running sequences
        self._step_lock = threading.Lock()  # generate() without the engine thread may step from several threads
        self._closing = False

    # the public surface (any thread)

    def ratio_of(self, request: RagRequest) -> float:
        """The blend ratio a request gets: its own, or the engine's default."""
        return self.config.default_ratio if request.blend_ratio is None else request.blend_ratio

    def blend_of(self, request: RagRequest) -> BlendConfig:
        """The selection a request gets: the engine's BlendConfig with the request's deviation / sink tokens, if any."""
        blend = self.config.blend
        return replace(
            blend,
            deviation=blend.deviation if request.blend_deviation is None else request.blend_deviation,
            sink_tokens=blend.sink_tokens if request.blend_sink_tokens is None else request.blend_sink_tokens,
        )

    def submit(
        self,
        request: RagRequest,
        sink: GenerationSink,
        *,
        ticket: object = None,
        return_logprobs: bool = False,
        background: bool = False,
    ) -> Sequence:
        """Check and look up the request here, then queue it for the engine thread.

        background: run it only on spare capacity, never delaying a live request (shadow checks).

        Raises InvalidRequestError at once for a request that can never be served."""
        started = time.perf_counter()
        parts = self._prompt(request)
        check_fits_context(parts.num_tokens, request.sampling.max_tokens, self.context_len)
        too_big = self.scheduler.budget_error(parts.num_tokens + request.sampling.max_tokens)
        if too_big is not None:
            raise InvalidRequestError(
                f"prompt ({parts.num_tokens} tokens) + max_tokens ({request.sampling.max_tokens}) {too_big}"
            )
        grammar = self.grammars.matcher(request.constraint) if request.constraint is not None else None
        variant = kv_variant(request.mode, len(parts.chunk_ids), self.ratio_of(request), self.blend_of(request))
        lookup = look_up(self.store, self.prefix, self.loaded.fingerprint, request, parts, variant, started)
        layout = (
            PromptLayout(lookup.cached_tokens, lookup.cached_tokens, False)
            if lookup.cached is not None
            else prompt_layout(parts, request.mode, self.ratio_of(request))
        )
        seq = Sequence(
            request,
            parts,
            lookup,
            sink,
            self.eos_ids,
            ticket,
            return_logprobs,
            background,
            arrived_s=started,
            grammar=grammar,
        )
        num_layers = self.stack.num_layers
        if request.mode != "full" and lookup.cached is None:
            seq.shared_key, seq.shared_len = lookup.prefix_key, len(parts.prefix_ids)
        seq.progress = (
            PrefillProgress.blend(
                layout.start,
                layout.cached_tokens,
                parts.num_tokens,
                num_layers,
                self.config.blend.check_layer,
                self.ratio_of(request),
            )
            if layout.selective
            else PrefillProgress.plain(layout.start, parts.num_tokens, num_layers)
        )
        self._post(seq)
        return seq

    def conversation_of(self, request: RagRequest) -> str | None:
        """The program of the earlier conversation this request's prompt continues (storage/labels.py), if any.

        It tokenises the prompt, which submit() then does again: the service needs the program
        before it takes the turn's admission ticket, which submit() is given."""
        return self.prefix.continued(request.namespace, self._prompt(request).all_ids)

    def _prompt(self, request: RagRequest):
        """The request's prompt as token ids (PromptParts); InvalidRequestError for one that cannot be built."""
        with self._tokenizer_lock:
            return build_rag_prompt(
                self.tokenizer,
                request.question,
                request.documents,
                request.system_prompt or self.config.system_prompt,
                self.config.limits,
                request.history,
                request.tools,
            )

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's own text (for logprobs on the wire)."""
        with self._tokenizer_lock:
            # decode's str | list[str] covers a batch of id lists; one id list decodes to one str
            return [cast(str, self.tokenizer.decode([token])) for token in token_ids]

    def generate(
        self, request: RagRequest, on_token: TokenCallback | None = None, return_logprobs: bool = False
    ) -> Generation:
        """submit() and wait for the answer; steps the engine here when its thread is not running."""
        sink = BlockingSink(on_token)
        self.submit(request, sink, return_logprobs=return_logprobs)
        if self._thread is None:
            while not sink.done.is_set():
                if not self.step():
                    sink.done.wait(0.001)  # the writer thread is storing the last KV
        return sink.wait()

    def call(self, work: Callable):
        """Run work on the engine thread between two steps (model work that is not a sequence); its result."""
        if self._thread is None:
            return work()
        future: Future = Future()
        self._post((work, future))
        return future.result()

    @torch.inference_mode()
    def add_documents(
        self, documents: list[str], system_prompt: str | None = None, namespace: str = DEFAULT_NAMESPACE
    ) -> list[DocumentInfo]:
        """Compute and store the KV of documents ahead of queries (already stored ones are skipped)."""
        with self._tokenizer_lock:
            chunk_ids = encode_documents(self.tokenizer, documents, self.config.limits)
            system = split_template(self.tokenizer, system_prompt or self.config.system_prompt, "", True)[0]
            prefix_ids = encode(self.tokenizer, system)
        prefix_key = chunk_key(self.loaded.fingerprint, prefix_ids, "", namespace)
        keys = [chunk_key(self.loaded.fingerprint, ids, prefix_key, namespace) for ids in chunk_ids]
        cached = [self.store.contains(key) for key in keys]
        prefix_kv = self.store.get(prefix_key)
        missing = [(key, ids) for key, ids, hit in zip(keys, chunk_ids, cached) if not hit]
        computed = self.call(lambda: self._compute(prefix_key, prefix_ids, prefix_kv, missing))
        self.store.put_many(computed)
        return [DocumentInfo(key, len(ids), hit) for key, ids, hit in zip(keys, chunk_ids, cached)]

    def use_admission_order(self, order: AdmissionOrder) -> None:
        """Admit waiting sequences in this order (the agents layer's program-level FCFS); before start()."""
        if self._thread is not None:
            raise RuntimeError("the admission order is set before the engine starts")
        self.scheduler.order = order

    def start(self) -> None:
        """Run the step loop on its own thread, unless run_loop() drives it (generate() alone needs neither)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ragcache-engine", daemon=True)
            self._thread.start()

    def claim_loop(self) -> None:
        """This thread will drive the step loop (run_loop); start() becomes a no-op."""
        self._thread = threading.current_thread()

    def run_loop(self, alive: Callable[[], bool] = lambda: True) -> None:
        """Drive the step loop on this thread until close() (or until alive() turns false).

        `ragcache serve` runs it on the main thread, the one that loaded the model: small torch
        ops (every decode step is made of them) run 1.5x slower on any other thread, whose
        OpenMP team competes with the first one's; measured 68 vs 45 ms per decode step here."""
        self.claim_loop()
        self._loop(alive)

    def close(self) -> None:
        """Finish every queued and running sequence, stop the step loop, wait for the store writes, close the store."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._loop_done.wait()
        self._writer.shutdown(wait=True)
        self.store.close()

    def forget_program(self, namespace: str, program_id: str) -> bool:
        """The program ended: forget its label (its blocks, shared with other paths, age out)."""
        return self.prefix.forget(namespace, program_id)

    def tenant_blocks(self, namespace: str) -> list[ChunkKey]:
        return self.prefix.tenant_blocks(namespace)

    def prefix_stats(self) -> dict | None:
        return self.prefix.stats()

    def prefetch_program(self, namespace: str, program_id: str) -> bool:
        """Bring the program's latest path up to the device tier from CPU or Redis."""
        path = self.prefix.program_path(namespace, program_id)
        if path is None:
            return False
        self.prefix.promote(path)
        return True

    def program_records(self) -> list[tuple[str, str, int]]:
        return self.prefix.programs()

    def upstream_health(self) -> list[dict]:
        return []  # the model runs here

    def stats(self) -> dict:
        """Running / waiting / swapped sequences, working-KV bytes, tokens per step; the store's own stats."""
        scheduler = self.scheduler
        counters = scheduler.counters
        return {
            "running": sum(not seq.background for seq in list(scheduler.running)),
            "waiting": len(scheduler.waiting) + sum(isinstance(item, Sequence) for item in list(self._inbox)),
            "swapped": len(scheduler.swapped),
            "working_kv_bytes": scheduler.used_bytes,
            "shared_prefixes": len(self._prefixes),
            "max_working_kv_bytes": scheduler.config.max_working_kv_bytes,
            "swapped_kv_bytes": sum(seq.kv_len for seq in list(scheduler.swapped)) * self.kv_bytes_per_token,
            "steps": counters.steps,
            "tokens": counters.tokens,
            "tokens_per_step": counters.tokens / counters.steps if counters.steps else 0.0,
            "last_step_tokens": counters.last_step_tokens,
            "preemptions": counters.preemptions,
            "resumptions": counters.resumptions,
            "admitted": counters.admitted,
            "cancelled": counters.cancelled,
            "background": {
                "waiting": len(scheduler.background),
                "running": sum(seq.background for seq in list(scheduler.running)),
                "steps": counters.background_steps,
            },
        }

    # the engine thread

    def step(self) -> bool:
        """Plan and run one batched step; False when there was nothing to do."""
        with self._step_lock, torch.inference_mode():
            return self._step()

    def _step(self) -> bool:
        calls = self._take_inbox()
        for work, future in calls:
            _run_call(work, future)
        plan = self.scheduler.schedule()
        for seq in plan.dropped:
            self._fail(seq, SequenceCancelled("the request was cancelled"))
        # preempted, resumed and grown sequences were admitted: their working KV (prefill) is placed
        for seq in plan.preempted:
            assert seq.prefill is not None
            seq.prefill.buffer.swap_out()
        for seq in plan.resumed:
            assert seq.prefill is not None
            seq.prefill.buffer.swap_in(seq.reserved_slots)
        for seq in plan.grown:
            assert seq.prefill is not None
            seq.prefill.buffer.resize(seq.reserved_slots)
        for seq in plan.admitted:
            self._admit(seq, plan)
        try:
            sampled = run_step(self.stack, plan)
        except Exception as exc:  # a failed pass fails its sequences, never the engine
            log.exception("a batched step failed")
            for seq in {*plan.decodes, *(s for s, _ in plan.prefills)}:
                self._fail(seq, exc)
            return True
        with self._tokenizer_lock:
            for seq, token in sampled:
                seq.accept(token, self.tokenizer, self.context_len)
        for seq, _ in sampled:
            if seq.state is SeqState.FINISHED:
                self._finish(seq)
        return bool(calls or plan.has_work or plan.dropped)

    def _loop(self, alive: Callable[[], bool] = lambda: True) -> None:
        try:
            while alive():
                with self._wake:
                    if not self._inbox and not self.scheduler.has_unfinished and not self._closing:
                        self._wake.wait(0.5)
                        continue
                    if self._closing and not self._inbox and not self.scheduler.has_unfinished:
                        return
                if not self.step():
                    with self._wake:  # waiting sequences that cannot be admitted yet: wait for news
                        self._wake.wait(0.01)
        finally:
            self._loop_done.set()

    def _post(self, item) -> None:
        with self._wake:
            self._inbox.append(item)
            self._wake.notify()

    def _take_inbox(self) -> list:
        calls = []
        with self._wake:
            items, self._inbox = list(self._inbox), deque()
        for item in items:
            if not isinstance(item, Sequence):
                calls.append(item)
                continue
            try:
                self.scheduler.add(item)
            except ValueError as exc:  # submit() refuses these first; never let one stop the loop
                self._fail(item, InvalidRequestError(str(exc)))
        return calls

    def _admit(self, seq: Sequence, plan) -> None:
        """Place the sequence's cached KV (computing what is missing) into its working buffer."""
        seq.admitted_s = time.perf_counter()
        request, lookup = seq.request, seq.lookup
        capacity = seq.reserved_slots
        try:
            if lookup.cached is not None:
                seq.prefill = place_hit(self.stack, lookup.cached, lookup.cached_tokens, seq.parts.all_ids, capacity)
            elif request.mode == "full":
                seq.prefill = place_prompt(self.stack, seq.parts, None, [], mode="full", capacity=capacity)
            else:
                prefix_kv, chunk_kvs = self._fill_missing(seq)
                assert lookup.prefix_key is not None  # looked up: not full mode, no prefix-cache hit
                shared = self._share_prefix(lookup.prefix_key, prefix_kv)
                seq.prefill = place_prompt(
                    self.stack,
                    seq.parts,
                    prefix_kv,
                    chunk_kvs,
                    mode=request.mode,
                    ratio=self.ratio_of(request),
                    config=self.blend_of(request),
                    capacity=capacity,
                    shared=shared,
                )
            if seq.prefill.selector is not None:
                seq.scan = BlendScan(seq.prefill, self.stack)
        except Exception as exc:
            log.exception("admitting a sequence failed")
            plan.prefills = [(s, n) for s, n in plan.prefills if s is not seq]
            self._fail(seq, exc)

    def _share_prefix(self, key: ChunkKey, prefix_kv: KVChunk) -> SharedPrefix:
        """The running sequences' one copy of this system prefix's KV; one more user of it."""
        shared = self._prefixes.get(key)
        if shared is None:
            shared = self._prefixes[key] = SharedPrefix.of(self.stack, key, prefix_kv)
        shared.users += 1
        return shared

    def _release(self, seq: Sequence) -> None:
        """The sequence's working KV is free; its shared prefix too when it was the last user."""
        shared = seq.prefill.buffer.shared if seq.prefill is not None else None
        if shared is not None:
            shared.users -= 1
            if shared.users == 0:
                del self._prefixes[shared.key]
        seq.prefill = None

    def _fill_missing(self, seq: Sequence) -> tuple[KVChunk, list[KVChunk]]:
        """The prompt's prefix and chunk KV, the missing ones computed now (each distinct one once), stored later."""
        started = time.perf_counter()
        lookup, parts = seq.lookup, seq.parts
        assert lookup.prefix_key is not None  # only a looked-up prompt (not full, no prefix-cache hit) is filled
        missing = lookup.missing(parts.chunk_ids)
        computed = self._compute(lookup.prefix_key, parts.prefix_ids, lookup.prefix_kv, missing)
        if computed:
            self._writer.submit(self.store.put_many, computed)
        found = dict(computed)
        prefix_kv = lookup.prefix_kv or found[lookup.prefix_key]
        chunks = [kv if kv is not None else found[key] for key, kv in zip(lookup.chunk_keys, lookup.chunk_kvs)]
        seq.chunk_compute_s = time.perf_counter() - started
        return prefix_kv, chunks

    def _compute(
        self,
        prefix_key: ChunkKey,
        prefix_ids,
        prefix_kv: KVChunk | None,
        missing: list[tuple[ChunkKey, tuple[int, ...]]],
    ) -> list[tuple[ChunkKey, KVChunk]]:
        """(key, KV) of the prefix (when not given) and of the missing chunks: the model work of chunk caching."""
        computed = []
        fingerprint = self.loaded.fingerprint
        if prefix_kv is None:
            prefix_kv = compute_chunks(self.stack, [prefix_ids], None, fingerprint, self.config.max_pack_tokens)[0]
            computed.append((prefix_key, prefix_kv))
        if missing:
            kvs = compute_chunks(
                self.stack, [ids for _, ids in missing], prefix_kv, fingerprint, self.config.max_pack_tokens
            )
            computed.extend(zip([key for key, _ in missing], kvs))
        return computed

    def _finish(self, seq: Sequence) -> None:
        """A finished sequence: its Generation, its new blocks (tensor work here, the store write off-thread)."""
        self.scheduler.finish(seq)
        result = with_tool_calls(
            generation_of(seq, self.stack.num_layers, self.ratio_of(seq.request), self.blend_of(seq.request)),
            seq.request,
        )
        keep = seq.request.prefix_cache and not seq.background
        saved = saved_path(seq, self.prefix, self.loaded.fingerprint) if keep else None
        self._release(seq)
        self._writer.submit(self._deliver, seq, result, saved)

    def _deliver(self, seq: Sequence, result: Generation, saved: SavedPath | None) -> None:
        try:
            if saved is not None:
                request = seq.request
                path = self.prefix.insert(
                    request.namespace, seq.lookup.variant, saved.keys, len(saved.ids), saved.start, saved.blocks
                )
                if request.program_id:
                    self.prefix.label(request.namespace, request.program_id, path)
                if request.implicit_program:
                    forgotten = self.prefix.label_prompt(
                        request.namespace, request.program_id, saved.ids[: seq.prompt_len]
                    )
                    for namespace, program_id in forgotten:
                        self.forget_program(namespace, program_id)
                result = replace(result, prefix_path=path, program_tokens=path.num_tokens)
            seq.sink.on_finish(result)
        except Exception as exc:
            log.exception("storing a finished sequence failed")
            seq.sink.on_error(exc)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        self.scheduler.finish(seq)
        if seq.done:
            return
        seq.state = SeqState.CANCELLED if isinstance(error, SequenceCancelled) else SeqState.FINISHED
        self._release(seq)
        self._writer.submit(seq.sink.on_error, error)


def _run_call(work: Callable, future: Future) -> None:
    try:
        future.set_result(work())
    except BaseException as exc:  # handed to the caller, who raises it
        future.set_exception(exc)


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids = {loaded.tokenizer.eos_token_id}
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


if TYPE_CHECKING:  # the type checker holds BlendEngine to the Engine contract
    _engine: type[Engine] = BlendEngine
