"""VLLMEngine: the Engine seam (ragcache.engine.base) over vLLM OpenAI-compatible servers.

    submit   (caller's thread) render the prompt here, as token ids, in the canonical layout
             (system prefix, documents, conversation: prompt.py), so a repeated prefix is a vLLM
             prefix-cache hit wherever it recurs; pick the server (upstreams.py); POST
             /v1/completions with the ids, streaming, under the tenant's cache_salt; wait for the
             response's status, so a request vLLM refuses is an InvalidRequestError here (a 400),
             and a server that is down is skipped for the next
    stream   (a reader thread per request) text pieces to the sink as vLLM streams them; the
             finished Generation (tool calls parsed as the own engine does) at the end
    cancel   closes the stream: vLLM aborts a request whose client disconnected

What vLLM does not do the own engine's way is refused by name, never silently changed: blending
(blend_ratio, blend_deviation, blend_sink_tokens: vLLM prefills every token, reusing its prefix
cache instead) and the first token's full distribution (shadow checks of blending). Output
constraints go to vLLM's structured outputs as the xgrammar grammar the own engine would compile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import httpx

from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.grammar import grammar_text
from ragcache.engine.prompt import (
    DEFAULT_SYSTEM_PROMPT,
    PromptLimits,
    build_rag_prompt,
    check_fits_context,
    encode,
    encode_documents,
    split_template,
)
from ragcache.engine.request import (
    DocumentInfo,
    Generation,
    PhaseTimings,
    RagRequest,
    SequenceCancelled,
    TokenLogprob,
)
from ragcache.engine.toolformat import with_tool_calls
from ragcache.kv import DEFAULT_NAMESPACE, ChunkKey, chunk_key
from ragcache.vllm.upstreams import NoUpstreamError, Upstream, Upstreams

if TYPE_CHECKING:
    from ragcache.engine.base import Engine
    from ragcache.engine.scheduler import AdmissionOrder
    from ragcache.engine.sequence import GenerationSink
    from ragcache.storage.tiered import TieredStore

log = logging.getLogger("ragcache.vllm")

_CONNECT_S = 5.0
_READ_S = 600.0  # the longest silence in a stream (a first-sight prefill on a slow CPU took 2 minutes)
MAX_PREFETCH_PROGRAMS = 4096  # programs whose last turn's token ids are kept (4 bytes a token)
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}


@dataclass(frozen=True)
class VLLMEngineConfig:
    limits: PromptLimits = PromptLimits()
    system_prompt: str = DEFAULT_SYSTEM_PROMPT


@dataclass
class VLLMCall:
    """One request on a vLLM server: what submit() returns (cancel()), and the ticket the admission order reads."""

    request: RagRequest
    ticket: object = None
    arrived_s: float = field(default_factory=time.perf_counter)
    background: bool = False
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _response: httpx.Response | None = None

    def cancel(self) -> None:
        self._cancelled.set()
        response = self._response
        if response is not None:
            response.close()  # the reader thread's iteration ends; vLLM sees the disconnect and aborts

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class VLLMEngine:
    """Serves RAG requests and agent turns on one or more vLLM servers of the same model."""

    def __init__(
        self,
        urls: list[str],
        tokenizer,
        model_config,
        store: TieredStore,
        config: VLLMEngineConfig = VLLMEngineConfig(),
        *,
        served_model: str | None = None,
        upstreams: Upstreams | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config
        # the agents layer's store, admin's flush and stats; vLLM and its connector keep the prompt KV, so
        # pins made here hold nothing of vLLM's (README, "Agent programs on vLLM")
        self.store = store
        self.upstreams = upstreams or Upstreams(urls)
        self.context_len: int = model_config.max_position_embeddings
        layers, heads = model_config.num_hidden_layers, model_config.num_key_value_heads
        head_dim = (
            getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
        )
        self.kv_bytes_per_token = layers * 2 * heads * head_dim * 2  # vLLM's KV in 16-bit
        self._served_model = served_model
        self.model_name = served_model or "vllm"
        self._fingerprint = hashlib.sha256(f"vllm:{self.model_name}".encode()).hexdigest()[:16]
        self._tokenizer_lock = threading.Lock()
        self._client = httpx.Client(
            timeout=httpx.Timeout(_CONNECT_S, read=_READ_S), limits=httpx.Limits(max_connections=512)
        )
        self._order: AdmissionOrder | None = None
        self._lock = threading.Lock()
        self._running = 0
        self._counters = dict.fromkeys(
            ("served", "cancelled", "failed_over", "upstream_errors", "prefetches", "prefetched_tokens"), 0
        )
        self._closed = threading.Event()
        self._started = False
        # (tenant, program) -> its last turn's prompt and answer token ids
        self._programs: OrderedDict[tuple[str, str], array] = OrderedDict()

    # lifecycle

    def start(self) -> None:
        """Probe the servers (and keep probing); learn the served model's name from the first one up."""
        if self._started:
            return
        self._started = True
        self.upstreams.start()
        if self._served_model is None:
            for server in self.upstreams.servers:
                if server.models:
                    self.model_name = self._served_model = server.models[0]
                    break

    def use_admission_order(self, order: AdmissionOrder) -> None:
        """vLLM admits requests itself; the order is told of each turn as it is sent (its counters and
        program bookkeeping stay right), it does not reorder them. There is no step loop to race with,
        so it may be set after start(), before the first submit()."""
        self._order = order

    def claim_loop(self) -> None:
        self.start()

    def run_loop(self, alive: Callable[[], bool] = lambda: True) -> None:
        """Nothing to step here (vLLM steps): block until close() or until alive() turns false."""
        self.start()
        while alive() and not self._closed.wait(0.2):
            pass

    def close(self) -> None:
        self._closed.set()
        self.upstreams.close()
        self._client.close()
        self.store.close()

    # requests

    def submit(
        self,
        request: RagRequest,
        sink: GenerationSink,
        *,
        ticket: object = None,
        return_logprobs: bool = False,
        background: bool = False,
    ) -> VLLMCall:
        """Render, choose a server, send; returns once vLLM accepted the request (its stream then feeds sink)."""
        started = time.perf_counter()
        self.start()
        _refuse_blending(request, return_logprobs)
        ids = self._prompt_ids(request)
        check_fits_context(len(ids), request.sampling.max_tokens, self.context_len)
        body = self._body(request, ids)
        call = VLLMCall(request, ticket, started, background)
        server, response = self._send(body, request)
        call._response = response
        if self._order is not None and ticket is not None:
            self._order.admitted(cast(Any, call), [])
        with self._lock:
            self._running += 1
        threading.Thread(
            target=self._read,
            args=(call, server, response, sink, ids, started),
            name="ragcache-vllm-stream",
            daemon=True,
        ).start()
        return call

    def generate(self, request: RagRequest) -> Generation:
        """submit() and wait (benchmarks, tests)."""
        from ragcache.engine.sequence import BlockingSink

        sink = BlockingSink(None)
        self.submit(request, sink)
        return sink.wait()

    def conversation_of(self, request: RagRequest) -> str | None:
        return None  # vLLM's prefix cache continues a conversation without being told which one it is

    def token_texts(self, token_ids: list[int]) -> list[str]:
        with self._tokenizer_lock:
            return [cast(str, self.tokenizer.decode([token])) for token in token_ids]

    def ratio_of(self, request: RagRequest) -> float:
        return 0.0  # every prompt token is prefilled by vLLM (or found in its prefix cache)

    def add_documents(
        self, documents: list[str], system_prompt: str | None = None, namespace: str = DEFAULT_NAMESPACE
    ) -> list[DocumentInfo]:
        """Prefill each document after the system prefix on its server (one token generated, discarded), so
        a question over it finds prefix + document in vLLM's cache (and, with the connector, in Redis)."""
        self.start()
        with self._tokenizer_lock:
            chunk_ids = encode_documents(self.tokenizer, documents, self.config.limits)
            system = split_template(self.tokenizer, system_prompt or self.config.system_prompt, "", True)[0]
            prefix_ids = encode(self.tokenizer, system)
        prefix_key = chunk_key(self._fingerprint, prefix_ids, "", namespace)
        infos = []
        for ids in chunk_ids:
            key = chunk_key(self._fingerprint, ids, prefix_key, namespace)
            self._complete_once([*prefix_ids, *ids], _salt(namespace), RagRequest("-", namespace=namespace), key)
            infos.append(DocumentInfo(key, len(ids), False))
        return infos

    def forget_program(self, namespace: str, program_id: str) -> bool:
        """The program ended: its turns no longer go to one server. Its blocks stay in vLLM's cache and
        Redis, shared prefix blocks with them, until evicted (or their ttl_s): there is nothing of its own to drop."""
        self.upstreams.forget_program(namespace, program_id)
        with self._lock:
            return self._programs.pop((namespace, program_id), None) is not None

    def program_records(self) -> list[tuple[str, str, int]]:
        """(tenant, program, tokens of its last turn's prompt and answer), the KV its next turn starts from."""
        with self._lock:
            return [(ns, pid, len(tokens)) for (ns, pid), tokens in self._programs.items()]

    def tenant_blocks(self, namespace: str) -> list[ChunkKey]:
        return []  # the prompt KV is vLLM's (and its connector's, under vLLM's block hashes)

    def prefix_stats(self) -> dict | None:
        return None  # vLLM's prefix cache: its /metrics say how it does

    def prefetch_program(self, namespace: str, program_id: str) -> bool:
        """Send the program's last prompt and answer, for one token, to the server its next turn goes to:
        vLLM finds the blocks in its cache, or its RagcacheConnector loads them from Redis (the server
        evicted them while the tool ran), so the turn's prefix is in the server's cache when it comes.
        vLLM has no call that loads KV without computing: this computes the last token only."""
        with self._lock:
            tokens = self._programs.get((namespace, program_id))
        if tokens is None or len(tokens) < 2:
            return False
        request = RagRequest("-", namespace=namespace, program_id=program_id)
        try:
            usage = self._complete_once(list(tokens[:-1]), _salt(namespace), request).get("usage") or {}
        except (InvalidRequestError, NoUpstreamError, httpx.HTTPError, ValueError) as exc:
            log.warning("prefetching program %s/%s failed: %s", namespace, program_id, exc)
            return False
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        with self._lock:
            self._counters["prefetches"] += 1
            self._counters["prefetched_tokens"] += cached
        return True

    def stats(self) -> dict:
        with self._lock:
            running, counters = self._running, dict(self._counters)
        zero = dict.fromkeys(("waiting", "swapped", "working_kv_bytes", "max_working_kv_bytes", "preemptions"), 0)
        return {
            "running": running,
            **zero,
            "tokens_per_step": 0.0,
            "steps": counters["served"],
            "cancelled": counters["cancelled"],
            "engine": "vllm",
            "upstreams": self.upstreams.snapshot(),
            **counters,
        }

    def prefill_seconds(self, num_tokens: int) -> float:
        """Prefill num_tokens new tokens on a server (one generated; a fresh cache_salt, so nothing is
        cached) and return the wall time: what losing a program's KV costs it (the agents' pins)."""
        self.start()
        salt = f"ragcache-probe:{time.time_ns()}"
        ids = [(i * 7919) % 1000 + 1000 for i in range(num_tokens)]
        started = time.perf_counter()
        self._complete_once(ids, salt, RagRequest("-"), salt)
        return time.perf_counter() - started

    def upstream_health(self) -> list[dict]:
        return self.upstreams.snapshot()

    # internals

    def _prompt_ids(self, request: RagRequest) -> list[int]:
        with self._tokenizer_lock:
            parts = build_rag_prompt(
                self.tokenizer,
                request.question,
                request.documents,
                request.system_prompt or self.config.system_prompt,
                self.config.limits,
                request.history,
                request.tools,
            )
        return parts.all_ids

    def _body(self, request: RagRequest, ids: list[int]) -> dict:
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": self.model_name,
            "prompt": ids,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
            "cache_salt": _salt(request.namespace),
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.logprobs:
            body["logprobs"] = sampling.top_logprobs
            body["return_tokens_as_token_ids"] = True
        if request.constraint is not None:
            body["structured_outputs"] = {"grammar": grammar_text(request.constraint)}
        return body

    def _send(self, body: dict, request: RagRequest, affinity: str | None = None) -> tuple[Upstream, httpx.Response]:
        """POST to the chosen server, failing over to the next while servers are down; the open response."""
        program = (request.namespace, request.program_id) if request.program_id else None
        key = affinity or _affinity_key(request)
        tried: set[str] = set()
        while True:
            server = self.upstreams.choose(key, program)
            if server.url in tried:  # every server that is up failed this request just now
                self.upstreams.release(server)
                raise NoUpstreamError(f"every vLLM server failed the request ({', '.join(sorted(tried))})")
            tried.add(server.url)
            try:
                response = self._client.send(
                    self._client.build_request("POST", f"{server.url}/v1/completions", json=body), stream=True
                )
            except httpx.HTTPError as exc:
                self._failed(server, f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code < 400:
                return server, response
            detail = _error_text(response)
            if response.status_code >= 500:
                self._failed(server, f"HTTP {response.status_code}: {detail}")
                continue
            self.upstreams.release(server)
            raise InvalidRequestError(f"vLLM refused the request: {detail}")

    def _complete_once(self, ids: list[int], salt: str, request: RagRequest, affinity: str | None = None) -> dict:
        """One token after ids, not streamed (prefills that warm a server's cache); vLLM's JSON answer."""
        body = {"model": self.model_name, "prompt": ids, "max_tokens": 1, "stream": False, "cache_salt": salt}
        server, response = self._send(body, request, affinity)
        try:
            return json.loads(response.read())
        finally:
            response.close()
            self.upstreams.release(server)

    def _failed(self, server: Upstream, error: str) -> None:
        log.warning("vLLM server %s failed: %s; trying the next", server.url, error)
        self.upstreams.release(server, error)
        with self._lock:
            self._counters["failed_over"] += 1

    def _read(
        self,
        call: VLLMCall,
        server: Upstream,
        response: httpx.Response,
        sink: GenerationSink,
        prompt_ids: list[int],
        started: float,
    ) -> None:
        text: list[str] = []
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        finish, usage, first_s = None, None, None
        error: str | None = None
        try:
            for chunk in _events(response):
                if call.cancelled:  # cancel() came before the stream was handed over: stop reading
                    break
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    piece = choice.get("text") or ""
                    token_ids.extend(choice.get("token_ids") or ())
                    logprobs.extend(_logprobs(choice.get("logprobs")))
                    if piece:
                        first_s = first_s if first_s is not None else time.perf_counter()
                        text.append(piece)
                        sink.on_text(piece)
                    finish = choice.get("finish_reason") or finish
        except (httpx.HTTPError, ValueError) as exc:
            if not call.cancelled:
                error = f"{type(exc).__name__}: {exc}"
        finally:
            response.close()
            self.upstreams.release(server, error)
            with self._lock:
                self._running -= 1
                self._counters["cancelled" if call.cancelled else "upstream_errors" if error else "served"] += 1
        if call.cancelled:
            sink.on_error(SequenceCancelled())
            return
        if error is not None or finish is None:
            sink.on_error(RuntimeError(f"vLLM server {server.url} broke off the answer: {error or 'no finish'}"))
            return
        now = time.perf_counter()
        cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        prompt = (usage or {}).get("prompt_tokens") or len(prompt_ids)
        first = first_s if first_s is not None else now
        result = Generation(
            text="".join(text),
            token_ids=token_ids,
            finish_reason=_FINISH_REASONS.get(finish, finish),
            prompt_tokens=prompt,
            cached_tokens=cached,
            recomputed_tokens=prompt - cached,
            recomputed_fraction=(prompt - cached) / prompt if prompt else 0.0,
            chunk_hits=0,
            chunk_misses=0,
            timings=PhaseTimings(ttft_s=first - started, decode_s=now - first),
            prefix_cached_tokens=cached,  # vLLM's prefix cache (and its connector's loads)
            mode="full",
            token_logprobs=tuple(logprobs),
        )
        if call.request.program_id is not None:
            with self._lock:
                ref = (call.request.namespace, call.request.program_id)
                self._programs[ref] = array("i", [*prompt_ids, *token_ids])
                self._programs.move_to_end(ref)
                while len(self._programs) > MAX_PREFETCH_PROGRAMS:
                    self._programs.popitem(last=False)
        try:
            sink.on_finish(with_tool_calls(result, call.request))
        except Exception as exc:  # the sink's own failure: the client sees an error, never a hang
            log.exception("delivering a vLLM answer failed")
            sink.on_error(exc)


def _refuse_blending(request: RagRequest, return_logprobs: bool) -> None:
    for name in ("blend_ratio", "blend_deviation", "blend_sink_tokens"):
        if getattr(request, name) is not None:
            raise InvalidRequestError(
                f"{name}: the vllm engine does not blend (vLLM prefills every token, reusing its prefix cache); "
                "leave it out or serve with --engine own"
            )
    if return_logprobs:
        raise InvalidRequestError("the first token's distribution (blend shadow checks) is not available from vLLM")


def _affinity_key(request: RagRequest) -> str:
    """A RAG request's placement key: tenant, system prefix and documents, the part of the prompt that recurs."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (request.namespace, request.system_prompt or "", *request.documents):
        digest.update(part.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def _salt(namespace: str) -> str:
    """vLLM's cache_salt for a tenant: its blocks' hashes start from it, so no tenant reuses another's KV."""
    return "ragcache:" + namespace


def _events(response: httpx.Response) -> Iterator[dict]:
    """The JSON objects of an SSE stream (data: lines) up to [DONE]."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _logprobs(block: dict | None) -> list[TokenLogprob]:
    """vLLM's completions logprobs (tokens as "token_id:N") as TokenLogprobs."""
    if not block:
        return []
    out = []
    tops = block.get("top_logprobs") or [None] * len(block.get("tokens") or ())
    for token, logprob, top in zip(block.get("tokens") or (), block.get("token_logprobs") or (), tops):
        alternatives = sorted(((_token_id(t), lp) for t, lp in (top or {}).items()), key=lambda pair: -pair[1])
        out.append(TokenLogprob(_token_id(token), float(logprob), tuple(alternatives)))
    return out


def _token_id(token: str) -> int:
    return int(token.rpartition(":")[2])


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.read()
        response.close()
        parsed = json.loads(body)
        message = (
            parsed.get("error", {}).get("message") if isinstance(parsed.get("error"), dict) else parsed.get("message")
        )
        return str(message or body[:500])
    except (ValueError, httpx.HTTPError):
        return f"HTTP {response.status_code}"


def make_vllm_engine(
    urls: list[str],
    model: str | None,
    store: TieredStore,
    max_documents: int = 64,
    max_document_tokens: int = 4096,
    served_model: str | None = None,
) -> VLLMEngine:
    """The tokenizer and config of the model the servers run (the same folder or default), then the engine."""
    from ragcache.engine.loader import load_tokenizer

    tokenizer, model_config = load_tokenizer(model)
    limits = PromptLimits(max_documents, max_document_tokens, model_config.max_position_embeddings)
    return VLLMEngine(urls, tokenizer, model_config, store, VLLMEngineConfig(limits), served_model=served_model)


if TYPE_CHECKING:  # the type checker holds VLLMEngine to the Engine contract
    _engine: type[Engine] = VLLMEngine
