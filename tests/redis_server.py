"""Real Redis for tests: the shared server, throwaway servers a test may kill and restart, and a
namespace per test so that tests never touch each other's keys. Never a mock.

conftest.py can take these fixtures with `from redis_server import *`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid

import pytest
import redis

__all__ = ["RedisServer", "redis_url", "redis_namespace", "throwaway_redis", "wait_until"]

LOCAL_URL = "redis://127.0.0.1:6379/0"


def wait_until(condition, timeout_s: float = 5.0, poll_s: float = 0.01):
    """condition()'s first truthy value, polled until timeout_s; fails the test after that."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s")
        time.sleep(poll_s)


def pings(url: str, timeout_s: float = 0.2) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """A redis-server process on one port, without persistence; kill() and start() keep the port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("these tests need a real Redis: set $REDIS_URL, run one on 127.0.0.1:6379, "
                        "or put redis-server on PATH (apt-get install redis-server)")
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: pings(self.url), timeout_s=10)

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="session")
def redis_url():
    """$REDIS_URL, else the server on 127.0.0.1:6379, else a redis-server started for the session."""
    url = os.environ.get("REDIS_URL")
    if url and not pings(url):
        pytest.fail(f"$REDIS_URL={url} does not answer PING")
    if url or pings(LOCAL_URL):
        yield url or LOCAL_URL
        return
    server = RedisServer()
    server.start()
    yield server.url
    server.kill()


@pytest.fixture
def redis_namespace(redis_url):
    """A namespace of the test's own; its keys are deleted afterwards, nobody else's."""
    namespace = f"test-{uuid.uuid4().hex}"
    yield namespace
    with redis.Redis.from_url(redis_url) as client:
        for name in client.scan_iter(match=f"ragcache:{namespace}:*", count=1000):
            client.unlink(name)


@pytest.fixture
def throwaway_redis():
    """A server of the test's own, to kill, restart, pause or squeeze."""
    server = RedisServer()
    server.start()
    yield server
    server.kill()
