"""`ragcache serve` replicas as subprocesses, for tests of what survives restarts and is shared."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx

from redis_server import wait_until
from service_server import free_port

TENANT_KEY, ADMIN_KEY = "k1", "ops"


class Replica:
    """One `ragcache serve` process; stop() and start() keep its port and settings."""

    def __init__(self, tenant: str, *args: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        self.env = {**os.environ, "RAGCACHE_API_KEYS": f"{TENANT_KEY}:{tenant}", "RAGCACHE_ADMIN_KEY": ADMIN_KEY,
                    "RAGCACHE_SHADOW_FRACTION": "0", "RAGCACHE_SEMANTIC_SHADOW_FRACTION": "0", **env}
        self._process: subprocess.Popen | None = None
        self.output = ""

    def launch(self) -> None:
        command = [sys.executable, "-m", "ragcache.cli", "serve", "--port", str(self.port), *self.args]
        self._process = subprocess.Popen(command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True)

    def wait_ready(self, timeout_s: float = 180) -> None:
        def ready() -> bool:
            if self._process.poll() is not None:
                raise AssertionError(f"ragcache serve exited:\n{self._process.communicate()[0]}")
            try:
                return httpx.get(f"{self.url}/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout_s=timeout_s, poll_s=0.2)

    def start(self) -> "Replica":
        self.launch()
        self.wait_ready()
        return self

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        self.output, _ = self._process.communicate(timeout=60)
        assert "Traceback" not in self.output, self.output

    def post(self, path: str, body: dict, timeout_s: float = 120) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, headers={"authorization": f"Bearer {TENANT_KEY}"},
                          timeout=timeout_s)

    def delete(self, path: str) -> httpx.Response:
        return httpx.delete(f"{self.url}{path}", headers={"authorization": f"Bearer {TENANT_KEY}"}, timeout=30)

    def admin(self, method: str, path: str, **params: str) -> httpx.Response:
        return httpx.request(method, f"{self.url}{path}", params=params,
                             headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)


def start_all(*replicas: Replica) -> None:
    """Start replicas side by side (their model loads overlap)."""
    for replica in replicas:
        replica.launch()
    for replica in replicas:
        replica.wait_ready()
