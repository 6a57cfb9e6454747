"""The engine's request path: chunk lookup -> compute what is missing -> blend -> generate -> store.

    lookup        tokenize; content keys of the prefix and each document; store.get_many
    chunk compute missing prefix / chunks through one prepacked pass; store.put_many
    blend         fused KV with selective recomputation (blend.py)
    first token   sampled from the blended prompt's last logits: time to first token
    decode        the rest of the answer
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace

import torch

from ragcache.engine.blend import MODES, BlendConfig, BlendResult, blend
from ragcache.engine.chunks import compute_chunks
from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.generate import SamplingParams, TokenCallback, decode, sample_token
from ragcache.engine.loader import LoadedModel
from ragcache.engine.prompt import PromptLimits, PromptParts, build_rag_prompt, encode_documents, split_template
from ragcache.engine.programs import (
    ProgramIndex,
    ProgramMatch,
    ProgramRecord,
    common_prefix_len,
    extend_program,
    program_key,
    program_kv,
)
from ragcache.engine.prompt import DEFAULT_SYSTEM_PROMPT, encode
from ragcache.engine.stack import DecoderStack
from ragcache.kv import DEFAULT_NAMESPACE, ChunkKey, KVChunk, chunk_key
from ragcache.storage.base import KVTier


@dataclass(frozen=True)
class EngineConfig:
    blend: BlendConfig = BlendConfig()
    default_ratio: float = 0.15
    limits: PromptLimits = PromptLimits()
    max_pack_tokens: int = 4096
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    def __post_init__(self) -> None:
        if not 0.0 <= self.default_ratio <= 1.0:
            raise ValueError(f"default_ratio must be in [0, 1], got {self.default_ratio}")
        if self.max_pack_tokens <= 0:
            raise ValueError(f"max_pack_tokens must be positive, got {self.max_pack_tokens}")


@dataclass(frozen=True)
class RagRequest:
    question: str
    documents: tuple[str, ...] = ()
    mode: str = "blend"
    blend_ratio: float | None = None  # None: the engine's default_ratio
    sampling: SamplingParams = SamplingParams()
    system_prompt: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    history: tuple[tuple[str, str], ...] = ()  # earlier (role, content) turns of a chat, oldest first
    program_id: str | None = None  # an agent program: its conversation KV is kept and extended turn by turn

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidRequestError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.blend_ratio is not None and not 0.0 <= self.blend_ratio <= 1.0:
            raise InvalidRequestError(f"blend_ratio must be in [0, 1], got {self.blend_ratio}")


@dataclass(frozen=True)
class PhaseTimings:
    lookup_s: float = 0.0
    chunk_compute_s: float = 0.0
    blend_s: float = 0.0
    ttft_s: float = 0.0  # request start to first token, all phases above included
    decode_s: float = 0.0


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    recomputed_tokens: int
    recomputed_fraction: float
    chunk_hits: int
    chunk_misses: int
    timings: PhaseTimings
    first_token_logprobs: torch.Tensor | None = field(default=None, repr=False)
    program_key: ChunkKey | None = None  # where the program's KV now lives (agents pin it)
    program_reused_tokens: int = 0  # prompt tokens reused from the program's previous turn


@dataclass(frozen=True)
class DocumentInfo:
    key: ChunkKey
    num_tokens: int
    cached: bool  # already in the store before this call


class BlendEngine:
    """Serves RAG requests over one loaded model and one KV store. One request at a time."""

    def __init__(self, loaded: LoadedModel, store: KVTier, config: EngineConfig = EngineConfig()) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.stack = DecoderStack(loaded.model)
        if config.blend.check_layer >= self.stack.num_layers:
            raise ValueError(f"check_layer {config.blend.check_layer} >= the model's {self.stack.num_layers} layers")
        self.store = store
        self.config = config
        self.context_len = loaded.model.config.max_position_embeddings
        self.eos_ids = _eos_ids(loaded)
        self.programs = ProgramIndex()
        self._lock = threading.Lock()

    @torch.inference_mode()
    def add_documents(
        self, documents: list[str], system_prompt: str | None = None, namespace: str = DEFAULT_NAMESPACE
    ) -> list[DocumentInfo]:
        """Compute and store the KV of documents ahead of queries (already stored ones are skipped)."""
        chunk_ids = encode_documents(self.tokenizer, documents, self.config.limits)
        prefix_ids = encode(self.tokenizer, split_template(self.tokenizer, system_prompt or self.config.system_prompt, "", True)[0])
        with self._lock:
            prefix_key = chunk_key(self.loaded.fingerprint, prefix_ids, "", namespace)
            prefix_kv = self._prefix_kv(prefix_key, prefix_ids)
            keys = [chunk_key(self.loaded.fingerprint, ids, prefix_key, namespace) for ids in chunk_ids]
            cached = [self.store.contains(key) for key in keys]
            self._chunks(chunk_ids, keys, prefix_kv, [None] * len(keys))
        return [DocumentInfo(key, len(ids), hit) for key, ids, hit in zip(keys, chunk_ids, cached)]

    @torch.inference_mode()
    def generate(
        self, request: RagRequest, on_token: TokenCallback | None = None, return_logprobs: bool = False
    ) -> Generation:
        with self._lock:
            return self._generate(request, on_token, return_logprobs)

    def _generate(self, request: RagRequest, on_token, return_logprobs: bool) -> Generation:
        started = time.perf_counter()
        parts = build_rag_prompt(
            self.tokenizer,
            request.question,
            request.documents,
            request.system_prompt or self.config.system_prompt,
            self.config.limits,
            request.history,
        )
        if parts.num_tokens + request.sampling.max_tokens > self.context_len:
            raise InvalidRequestError(
                f"prompt ({parts.num_tokens} tokens) + max_tokens ({request.sampling.max_tokens}) "
                f"exceeds the model's context of {self.context_len}"
            )
        prefix_kv, chunk_kvs, hits, misses = None, [], 0, 0  # full prefill looks nothing up
        lookup_s = compute_s = 0.0
        program = self._match_program(request, parts) if request.program_id and request.mode != "full" else None
        if request.mode != "full" and program is None:
            prefix_kv, chunk_kvs, hits, lookup_s, compute_s = self._gather(parts, request.namespace)
            misses = len(chunk_kvs) - hits
        elif program is not None:
            lookup_s = time.perf_counter() - started
        blend_started = time.perf_counter()
        ratio = self.config.default_ratio if request.blend_ratio is None else request.blend_ratio
        if program is not None:
            fused = extend_program(self.stack, program, parts.all_ids, request.sampling.max_tokens)
        else:
            fused = blend(
                self.stack,
                parts,
                prefix_kv,
                chunk_kvs,
                mode=request.mode,
                ratio=ratio,
                config=self.config.blend,
                extra_capacity=request.sampling.max_tokens,
            )
        generator = None
        if request.sampling.seed is not None:
            generator = torch.Generator().manual_seed(request.sampling.seed)
        first = sample_token(fused.last_logits, request.sampling, generator)
        first_at = time.perf_counter()
        decoded = decode(self.stack, fused.buffer, first, request.sampling, self.tokenizer, self.eos_ids, generator, on_token)
        timings = PhaseTimings(lookup_s, compute_s, first_at - blend_started, first_at - started, decoded.decode_s)
        result = _generation(fused, decoded, hits, misses, timings, return_logprobs)
        if request.program_id:
            key = self._save_program(request, parts, fused, decoded)
            reused = program.reused_tokens if program is not None else 0
            result = replace(result, program_key=key, program_reused_tokens=reused)
        return result

    def _match_program(self, request: RagRequest, parts: PromptParts) -> ProgramMatch | None:
        """The program's stored KV if it covers at least the prompt's prefix and documents (else blend them)."""
        record = self.programs.latest(request.namespace, request.program_id)
        if record is None:
            return None
        ids = parts.all_ids
        reused = min(common_prefix_len(record.token_ids, ids), len(ids) - 1)  # the last token must run for logits
        if reused < len(parts.prefix_ids) + parts.num_chunk_tokens:
            return None
        kv = self.store.get(record.key)
        return ProgramMatch(record, kv, reused) if kv is not None else None

    def _save_program(self, request: RagRequest, parts: PromptParts, fused: BlendResult, decoded) -> ChunkKey:
        """Store the prompt + the answer tokens that went through the model as the program's latest entry."""
        fed = fused.buffer.length - fused.prompt_tokens
        token_ids = [*parts.all_ids, *decoded.token_ids[:fed]]
        fingerprint = self.loaded.fingerprint
        key = program_key(fingerprint, token_ids, request.namespace)
        self.store.put(key, program_kv(self.stack, fused.buffer, token_ids, fingerprint))
        previous = self.programs.remember(request.namespace, request.program_id, ProgramRecord(key, tuple(token_ids)))
        if previous is not None and previous.key != key:
            self.store.delete(previous.key)
        return key

    def _gather(self, parts: PromptParts, namespace: str):
        """Look up the prefix and chunks, compute and store what is missing.

        With a store that prefetches (TieredStore), all chunks start loading at once, in the
        background, while the prefix is looked up (and computed, on a first request).
        """
        started = time.perf_counter()
        fingerprint = self.loaded.fingerprint
        prefix_key = chunk_key(fingerprint, parts.prefix_ids, "", namespace)
        keys = [chunk_key(fingerprint, ids, prefix_key, namespace) for ids in parts.chunk_ids]
        prefetch = getattr(self.store, "prefetch", None)
        loading = prefetch(keys) if prefetch is not None and keys else None
        prefix_kv = self._prefix_kv(prefix_key, parts.prefix_ids)
        found = loading.result() if loading is not None else self.store.get_many(keys)
        lookup_s = time.perf_counter() - started
        chunk_kvs = self._chunks(parts.chunk_ids, keys, prefix_kv, found)
        hits = sum(kv is not None for kv in found)
        return prefix_kv, chunk_kvs, hits, lookup_s, time.perf_counter() - started - lookup_s

    def _prefix_kv(self, key: ChunkKey, prefix_ids) -> KVChunk:
        """The system prefix's KV from the store, computed and stored on its first use."""
        return self.store.get(key) or self._compute_and_store([prefix_ids], [key], None)[0]

    def _chunks(self, chunk_ids, keys, prefix_kv: KVChunk, found: list[KVChunk | None]) -> list[KVChunk]:
        """found with its gaps filled: missing chunks (each distinct one once) computed in one prepacked pass."""
        missing = list(dict.fromkeys(key for key, kv in zip(keys, found) if kv is None))
        if missing:
            ids_of = dict(zip(keys, chunk_ids))
            computed = dict(zip(missing, self._compute_and_store([ids_of[k] for k in missing], missing, prefix_kv)))
            found = [kv if kv is not None else computed[key] for key, kv in zip(keys, found)]
        return found

    def _compute_and_store(self, chunk_ids, keys, prefix_kv: KVChunk | None) -> list[KVChunk]:
        chunks = compute_chunks(self.stack, chunk_ids, prefix_kv, self.loaded.fingerprint, self.config.max_pack_tokens)
        self.store.put_many(list(zip(keys, chunks)))
        return chunks


def _generation(fused: BlendResult, decoded, hits: int, misses: int, timings, return_logprobs: bool):
    return Generation(
        text=decoded.text,
        token_ids=decoded.token_ids,
        finish_reason=decoded.finish_reason,
        prompt_tokens=fused.prompt_tokens,
        cached_tokens=fused.cached_tokens,
        recomputed_tokens=fused.recomputed_tokens,
        recomputed_fraction=fused.recomputed_fraction,
        chunk_hits=hits,
        chunk_misses=misses,
        timings=timings,
        first_token_logprobs=torch.log_softmax(fused.last_logits, -1) if return_logprobs else None,
    )


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids = {loaded.tokenizer.eos_token_id}
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}
