"""Real Redis for tests: the shared server, throwaway servers a test may kill and restart, and a
namespace per test so that tests never touch each other's keys. Never a mock.

conftest.py can take these fixtures with `from redis_server import *`.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
import uuid

import pytest
import redis

__all__ = ["RedisCluster", "RedisServer", "redis_cluster", "redis_url", "redis_namespace", "throwaway_redis",
           "wait_until"]

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


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for port in random.sample(range(20_000, 50_000), 200):
        try:
            with socket.socket() as probe, socket.socket() as bus:
                probe.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10_000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


class RedisServer:
    """A redis-server process on one port, without persistence; kill() and start() keep the port."""

    def __init__(self, *options: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._options = options
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("these tests need a real Redis: set $REDIS_URL, run one on 127.0.0.1:6379, "
                        "or put redis-server on PATH (apt-get install redis-server)")
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   *self._options]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: pings(self.url), timeout_s=10)

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


class RedisCluster:
    """Three masters on free ports, no replicas, made with redis-cli --cluster create.

    cluster-require-full-coverage no: when a master dies the others keep serving their own
    slots, so a test can see what a lost shard costs. url names the first master; nodes maps
    each master's "host:port" to its RedisServer.
    """

    def __init__(self, folder) -> None:
        ports = [free_cluster_port() for _ in range(3)]
        self.masters = [RedisServer("--cluster-enabled", "yes", "--cluster-require-full-coverage", "no",
                                    "--cluster-node-timeout", "2000", "--dir", str(folder),
                                    "--cluster-config-file", f"nodes-{port}.conf", port=port)
                        for port in ports]
        self.url = self.masters[0].url
        self.nodes = {f"127.0.0.1:{master.port}": master for master in self.masters}

    def start(self) -> None:
        for master in self.masters:
            master.start()
        addresses = [f"127.0.0.1:{master.port}" for master in self.masters]
        subprocess.run(["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        wait_until(lambda: all(b"cluster_state:ok" in cluster_info(m) for m in self.masters), timeout_s=30)

    def master_of(self, key: str) -> RedisServer:
        """The master that serves key's slot (asked of a live master)."""
        live = next(master for master in self.masters if pings(master.url))
        with live.client() as client:
            slot = client.cluster("keyslot", key)
            for start, end, (host, port, *_), *_ in client.cluster("slots"):
                if start <= slot <= end:
                    return self.nodes[f"{host.decode() if isinstance(host, bytes) else host}:{port}"]
        raise AssertionError(f"no master serves slot {slot}")

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster.from_url(self.url)

    def kill(self, master: RedisServer) -> None:
        """Kill one master for good (no replica takes over): its slots stay unserved."""
        master.kill()

    def stop(self) -> None:
        for master in self.masters:
            master.kill()


def cluster_info(server: RedisServer) -> bytes:
    try:
        with server.client() as client:
            return client.execute_command("CLUSTER", "INFO")
    except (redis.RedisError, OSError):
        return b""


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """A real 3-master Redis Cluster for the module; a test may kill() one master (the module's
    later tests then see it dead, so a killing test goes last or takes a fresh module)."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


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
