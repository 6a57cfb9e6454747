"""The engines `ragcache bench serve` measures: ragcache (its own engine, and in front of vLLM with
--engine vllm), and the peers alone: llama.cpp's server (the CPU peer), vLLM's (--peer vllm).

Each target says how to make itself warm and what body a request of a mode carries; the
load generator does the rest. Servers the bench starts run as subprocesses on a free
loopback port and are stopped with SIGTERM when their measurements are done.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from ragcache.bench.rag import RagExample
from ragcache.bench.serve_load import BenchServeError
from ragcache.engine.prompt import DEFAULT_SYSTEM_PROMPT, document_text

CHAT_PATH = "/v1/chat/completions"
DOCUMENTS_PER_CALL = 16  # well under the service's max_documents


@dataclass(frozen=True)
class ServerOptions:
    url: str | None = None  # a running ragcache; None: start `ragcache serve`
    api_key: str | None = None
    model: str | None = None  # passed to the started `ragcache serve`, with device, dtype, redis_url
    device: str | None = None
    dtype: str | None = None
    redis_url: str | None = None
    peer: str = "auto"  # auto (llamacpp when llama_cpp is installed), llamacpp, vllm, none
    engine: str = "own"  # vllm: also measure `ragcache serve --engine vllm` in front of vllm_urls
    vllm_urls: str | None = None  # running vLLM OpenAI servers (--engine vllm, --peer vllm)
    peer_url: str | None = None  # a running llama.cpp server; None: start one
    peer_model: str | None = None  # its GGUF; None: --model when it is a .gguf, else the default model's
    peer_threads: int | None = None  # None: torch's thread count (llama.cpp's own default is half the CPUs)
    start_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.peer not in ("auto", "llamacpp", "vllm", "none"):
            raise BenchServeError(f"--peer must be auto, llamacpp, vllm or none, got {self.peer!r}")
        if self.engine not in ("own", "vllm"):
            raise BenchServeError(f"--engine must be own or vllm, got {self.engine!r}")
        if (self.engine == "vllm" or self.peer == "vllm") and not (self.vllm_urls or self.peer_url):
            raise BenchServeError(
                "--engine vllm and --peer vllm need --vllm-url URL (a running vLLM server: scripts/vllm-serve.sh)"
            )
        if self.peer_threads is not None and self.peer_threads <= 0:
            raise BenchServeError(f"--peer-threads must be positive, got {self.peer_threads}")
        if self.start_timeout_s <= 0:
            raise BenchServeError(f"--start-timeout-s must be positive, got {self.start_timeout_s}")


class Target(ABC):
    """One engine under test, as the load generator sees it."""

    name: str
    url: str
    modes: tuple[str, ...]
    model: str | None = None  # the served model's id, read in prepare()

    @property
    def headers(self) -> dict[str, str]:
        return {}

    @abstractmethod
    async def prepare(self, client: httpx.AsyncClient, examples: Sequence[RagExample]) -> None:
        """Make the engine warm for examples (documents registered, model id read); once, before any timing."""

    @abstractmethod
    def body(self, example: RagExample, mode: str, max_tokens: int) -> dict:
        """The streamed chat-completion body for example in mode: greedy, usage included, the same every call."""

    def _common(self, messages: list[dict], max_tokens: int) -> dict:
        return {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def _read_model(self, client: httpx.AsyncClient) -> None:
        response = await _call(client, "GET", f"{self.url}/v1/models", self.name, headers=self.headers)
        self.model = response.json()["data"][0]["id"]


class RagcacheTarget(Target):
    """ragcache with each document registered by id first, so requests find its KV stored (warm)."""

    name = "ragcache"

    def __init__(self, url: str, modes: Sequence[str], api_key: str | None) -> None:
        self.url, self.modes, self._api_key = url.rstrip("/"), tuple(modes), api_key

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    async def prepare(self, client: httpx.AsyncClient, examples: Sequence[RagExample]) -> None:
        await self._read_model(client)
        texts = list(dict.fromkeys(text for example in examples for text in example.documents))
        for start in range(0, len(texts), DOCUMENTS_PER_CALL):
            batch = [{"id": document_id(text), "text": text} for text in texts[start : start + DOCUMENTS_PER_CALL]]
            await _call(
                client, "POST", f"{self.url}/v1/documents", self.name, headers=self.headers, json={"documents": batch}
            )

    def body(self, example: RagExample, mode: str, max_tokens: int) -> dict:
        kind, _, ratio = mode.partition("@")
        body = self._common([{"role": "user", "content": example.question}], max_tokens)
        body.update(cache=False, mode=kind, document_ids=[document_id(text) for text in example.documents])
        if ratio:
            body["blend_ratio"] = float(ratio)
        return body


class LlamaCppTarget(Target):
    """llama.cpp's OpenAI server: documents in the prompt text, laid out as ragcache lays them out.

    It keeps the previous prompt's KV and reuses its longest common token prefix, so each
    request computes everything past the shared system prompt: its own "full" mode.
    """

    name = "llamacpp"
    modes = ("full",)

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    async def prepare(self, client: httpx.AsyncClient, examples: Sequence[RagExample]) -> None:
        await self._read_model(client)

    def body(self, example: RagExample, mode: str, max_tokens: int) -> dict:
        return self._common(rag_messages(example.question, example.documents), max_tokens)


class VLLMTarget(Target):
    """vLLM's OpenAI server alone: the same chat messages as llama.cpp gets, rendered by vLLM's chat template,
    under a cache_salt of its own so it reuses only the prefixes its own requests left (automatic prefix
    caching), never those ragcache's requests left on the same server."""

    name = "vllm"
    modes = ("full",)

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._salt = f"bench-peer-{time.time_ns()}"

    async def prepare(self, client: httpx.AsyncClient, examples: Sequence[RagExample]) -> None:
        await self._read_model(client)

    def body(self, example: RagExample, mode: str, max_tokens: int) -> dict:
        return self._common(rag_messages(example.question, example.documents), max_tokens) | {"cache_salt": self._salt}


def rag_messages(question: str, documents: Sequence[str]) -> list[dict]:
    """Plain chat messages for ragcache's layout: the documents close the system message."""
    header = "\n\nDocuments:\n\n" if documents else ""
    system = DEFAULT_SYSTEM_PROMPT + header + "".join(document_text(text) for text in documents)
    return [{"role": "system", "content": system}, {"role": "user", "content": question.strip()}]


def document_id(text: str) -> str:
    return "bench-" + hashlib.sha256(text.encode()).hexdigest()[:16]


@contextmanager
def ragcache_target(servers: ServerOptions, modes: Sequence[str], engine: str = "own") -> Iterator[RagcacheTarget]:
    """ragcache at --url, or a started `ragcache serve` (engine vllm: in front of --vllm-url, mode full only)."""
    if servers.url and engine == "own":
        yield RagcacheTarget(servers.url, modes, servers.api_key)
        return
    port = free_port()
    command = [sys.executable, "-m", "ragcache.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if engine == "vllm":
        command += ["--engine", "vllm", "--vllm-url", servers.vllm_urls or servers.peer_url or ""]
    for flag, value in (
        ("--model", servers.model),
        ("--device", servers.device),
        ("--dtype", servers.dtype),
        ("--redis-url", servers.redis_url),
    ):
        command += [flag, value] if value else []
    # every request bypasses the semantic cache: do not load MiniLM; a run's registrations are its own
    env = {**os.environ, "RAGCACHE_SEMANTIC_CACHE": "false", "RAGCACHE_REGISTRY": "memory"}
    if servers.api_key:
        env["RAGCACHE_API_KEYS"] = f"{servers.api_key}:bench"
    with launched("ragcache serve", command, env, f"http://127.0.0.1:{port}", "/ready", servers.start_timeout_s) as url:
        target = RagcacheTarget(url, modes if engine == "own" else ("full",), servers.api_key)
        if engine == "vllm":
            target.name = "ragcache+vllm"
        yield target


@contextmanager
def vllm_target(servers: ServerOptions) -> Iterator[VLLMTarget]:
    """The first vLLM server of --vllm-url (or --peer-url), already running."""
    url = servers.peer_url or (servers.vllm_urls or "").split(",")[0]
    yield VLLMTarget(url)


def peer_gguf(servers: ServerOptions) -> Path | None:
    """The GGUF the llama.cpp peer runs, or None when the peer is off (none, or auto without llama_cpp)."""
    if servers.peer in ("none", "vllm") or servers.peer_url:
        return None
    if importlib.util.find_spec("llama_cpp") is None:
        if servers.peer == "llamacpp":
            raise BenchServeError("--peer llamacpp needs llama-cpp-python: pip install 'ragcache[llamacpp]'")
        return None
    if servers.peer_model:
        return Path(servers.peer_model)
    if servers.model is None:
        from ragcache.engine.loader import default_model_file

        return default_model_file()
    if servers.model.endswith(".gguf"):
        return Path(servers.model)
    if servers.peer == "llamacpp":
        raise BenchServeError(f"--model {servers.model} is not a .gguf file: give the peer's with --peer-model")
    print(f"llama.cpp peer skipped: --model {servers.model} is not a .gguf file", file=sys.stderr)
    return None


def wants_peer(servers: ServerOptions) -> bool:
    return servers.peer != "vllm" and (bool(servers.peer_url) or peer_gguf(servers) is not None)


@contextmanager
def llamacpp_target(servers: ServerOptions) -> Iterator[LlamaCppTarget]:
    if servers.peer_url:
        yield LlamaCppTarget(servers.peer_url)
        return
    import torch

    gguf, port = peer_gguf(servers), free_port()
    threads = str(servers.peer_threads or torch.get_num_threads())  # default: as many as torch gives ragcache
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "8192",
        "--n_threads",
        threads,
        "--n_threads_batch",
        threads,
        "--interrupt_requests",
        "false",
    ]  # its default cuts a stream short whenever another request comes
    with launched(
        "llama_cpp.server", command, dict(os.environ), f"http://127.0.0.1:{port}", "/v1/models", servers.start_timeout_s
    ) as url:
        yield LlamaCppTarget(url)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def launched(
    name: str, command: list[str], env: dict[str, str], url: str, ready_path: str, timeout_s: float
) -> Iterator[str]:
    """Run a server subprocess until the block ends; its output goes to a log shown if it fails to start."""
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            _wait_ready(name, process, url + ready_path, timeout_s, log)
            yield url
        except BenchServeError as exc:
            if process.poll() is None:
                raise
            status = _status(process.returncode)
            raise BenchServeError(f"{exc}\n{name} exited ({status}); its last output:\n{_tail(log)}") from exc
        finally:
            _stop(process)


def _wait_ready(name: str, process: subprocess.Popen, ready_url: str, timeout_s: float, log) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchServeError(f"{name} stopped before it was ready")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise BenchServeError(f"{name} was not ready within {timeout_s:g} s:\n{_tail(log)}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _status(returncode: int) -> str:
    return f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"status {returncode}"


def _tail(log, num_lines: int = 20) -> str:
    log.seek(0)
    return "".join(log.readlines()[-num_lines:])


async def _call(client: httpx.AsyncClient, method: str, url: str, name: str, **kwargs) -> httpx.Response:
    """A set-up call; a failure stops the bench with what the server said."""
    try:
        response = await client.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        raise BenchServeError(f"{name} at {url}: {type(exc).__name__}: {exc}") from exc
    if not response.is_success:
        raise BenchServeError(f"{name} at {url}: HTTP {response.status_code}: {response.text[:300]}")
    return response
