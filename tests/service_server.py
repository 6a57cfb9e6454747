"""A real ragcache HTTP server (uvicorn on a free port, in a thread) over a tiny-model engine."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import uvicorn

from ragcache.agents.coordinator import AgentConfig, ProgramCoordinator
from ragcache.config import Settings
from ragcache.engine.runner import BlendEngine
from ragcache.registry.documents import DocumentRegistry
from ragcache.service.app import create_app
from ragcache.service.runtime import Runtime
from ragcache.service.server import answer_checks


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(app, port: int):
    """Run an ASGI app under uvicorn on 127.0.0.1:port in a thread until the block ends (then shut down gracefully)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def running_server(engine: BlendEngine, semantic=None, agents: AgentConfig = AgentConfig(),
                   documents: DocumentRegistry | None = None, **settings):
    """Yield (base_url, runtime) while a ragcache server runs over engine (no shadow checks unless asked:
    a test's answers must not depend on which of them were drawn for a check)."""
    settings = Settings(port=free_port(), **{"shadow_fraction": 0.0, "semantic_shadow_fraction": 0.0, **settings})
    coordinator = ProgramCoordinator.measured(engine.prefix, engine.stack, agents)
    engine.use_admission_order(coordinator.scheduler)
    runtime = Runtime(engine, settings.max_queue, semantic, coordinator, *answer_checks(settings, engine, semantic),
                      documents=documents)
    with serving(create_app(settings, runtime), settings.port) as url:
        yield url, runtime
