"""The vLLM servers ragcache sends requests to: their health, their load, and which one a request goes to.

Affinity, because a server only reuses KV it holds (or its connector can load):
    a program's or conversation's turn    the server that served its previous turn (its prefix, and
                                          the answer just generated, are in that server's cache)
    any other request                     rendezvous hashing of its affinity key (tenant, system
                                          prefix, documents): each key's order of servers is fixed,
                                          so a document set keeps landing where its KV is, and a
                                          server that leaves or joins moves only its own share
    the chosen server is down or full     the next one in the key's order that is up and not full;
                                          none: the least loaded server that is up

Why not vLLM's KV events (--kv-events-config): they say exactly which blocks each server holds,
but need a ZMQ subscriber per server and an index of every block hash, and they cannot see what
a server could load through ragcache's connector. With the connector sharing blocks through Redis,
a miss on the "wrong" server costs a load, not a recompute, so hashing the key is enough here.

Health: a connection error or a 5xx marks a server down at once; a prober thread asks its /health
every probe_s and marks it up again. Requests are never sent to a down server while another is up.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import httpx

from ragcache.engine.errors import EngineUnavailableError

MAX_PROGRAMS = 100_000  # program -> server entries kept (least recently used dropped)


@dataclass
class Upstream:
    url: str
    up: bool = True
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    last_error: str | None = None
    down_since: float | None = None
    models: list[str] = field(default_factory=list)

    def snapshot(self) -> dict:
        return {
            "url": self.url,
            "up": self.up,
            "in_flight": self.in_flight,
            "served": self.served,
            "failures": self.failures,
            "last_error": self.last_error,
        }


class NoUpstreamError(EngineUnavailableError):
    """Every vLLM server is down."""


class Upstreams:
    """Thread-safe. max_in_flight: requests one server is given before it counts as full."""

    def __init__(self, urls: list[str], *, max_in_flight: int = 64, probe_s: float = 2.0, timeout_s: float = 5.0):
        if not urls:
            raise ValueError("vllm_urls: at least one vLLM server URL")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"vllm_urls: {url!r} is not an http(s):// URL")
        self.servers = [Upstream(url.rstrip("/")) for url in urls]
        self.max_in_flight = max_in_flight
        self.probe_s = probe_s
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._programs: OrderedDict[tuple[str, str], Upstream] = OrderedDict()
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None

    def choose(self, key: str, program: tuple[str, str] | None = None) -> Upstream:
        """The server for a request (see the module's docstring); counts it in flight until release()."""
        with self._lock:
            chosen = None
            if program is not None:
                previous = self._programs.get(program)
                if previous is not None and previous.up and previous.in_flight < self.max_in_flight:
                    chosen = previous
            if chosen is None:
                up = [s for s in self.servers if s.up]
                if not up:
                    raise NoUpstreamError(f"no vLLM server is up ({', '.join(s.url for s in self.servers)})")
                ranked = sorted(up, key=lambda s: _rank(key, s.url))
                chosen = next((s for s in ranked if s.in_flight < self.max_in_flight), None)
                chosen = chosen or min(up, key=lambda s: s.in_flight)
            chosen.in_flight += 1
            if program is not None:
                self._programs[program] = chosen
                self._programs.move_to_end(program)
                while len(self._programs) > MAX_PROGRAMS:
                    self._programs.popitem(last=False)
            return chosen

    def release(self, server: Upstream, error: str | None = None) -> None:
        """A request on server ended; error: the server failed it (connection, 5xx) and is marked down."""
        with self._lock:
            server.in_flight -= 1
            if error is None:
                server.served += 1
                return
            server.failures += 1
            server.last_error = error
            if server.up:
                server.up, server.down_since = False, time.monotonic()

    def forget_program(self, tenant: str, program_id: str) -> None:
        with self._lock:
            self._programs.pop((tenant, program_id), None)

    def program_server(self, tenant: str, program_id: str) -> str | None:
        with self._lock:
            server = self._programs.get((tenant, program_id))
            return server.url if server is not None else None

    def probe(self) -> None:
        """Ask every server's /health (and /v1/models) once; update up / down."""
        for server in self.servers:
            try:
                with httpx.Client(timeout=self._timeout_s) as client:
                    client.get(f"{server.url}/health").raise_for_status()
                    models = client.get(f"{server.url}/v1/models").json()
                names = [m["id"] for m in models.get("data", [])]
                with self._lock:
                    server.up, server.down_since, server.models = True, None, names
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                with self._lock:
                    server.last_error = f"{type(exc).__name__}: {exc}"
                    if server.up:
                        server.up, server.down_since = False, time.monotonic()

    def start(self) -> None:
        """Probe now, then every probe_s on a daemon thread until close()."""
        self.probe()
        if self._prober is None:
            self._prober = threading.Thread(target=self._probe_loop, name="ragcache-vllm-probe", daemon=True)
            self._prober.start()

    def close(self) -> None:
        self._stop.set()

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [server.snapshot() for server in self.servers]

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.probe_s):
            self.probe()


def _rank(key: str, url: str) -> bytes:
    """Rendezvous hashing: each server's score for the key; lowest first."""
    return hashlib.blake2b(f"{key}\x00{url}".encode(), digest_size=8).digest()
