"""`ragcache serve` as an operator runs it: a subprocess, settings from env and flags, clean SIGTERM."""

import os
import signal
import subprocess
import sys

import httpx
import pytest

from ragcache.config import SettingsError, load_settings
from service_server import free_port

from conftest import DOCUMENTS, QUESTION
from redis_server import wait_until


def test_serve_answers_then_shuts_down_cleanly(tiny_model_dir, redis_url, redis_namespace):
    port = free_port()
    tenant = redis_namespace  # a tenant of this run's own: its chunk keys are new to the shared Redis
    env = {**os.environ, "RAGCACHE_API_KEYS": f"k1:{tenant}", "RAGCACHE_ADMIN_KEY": "ops", "RAGCACHE_CPU_CACHE_GB": "0.5"}
    command = [sys.executable, "-m", "ragcache.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port),
               "--redis-url", redis_url]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url), timeout_s=60)
        headers = {"authorization": "Bearer k1"}
        body = {"question": QUESTION, "documents": [{"text": d} for d in DOCUMENTS], "max_tokens": 2}
        answer = httpx.post(f"{url}/v1/rag", json=body, headers=headers, timeout=30)
        assert answer.status_code == 200 and answer.json()["ragcache"]["chunk_misses"] == 4
        ready = httpx.get(f"{url}/ready").json()
        assert ready == {"status": "ready", "model": tiny_model_dir.name, "redis": "ok", "registry": "redis ok"}
        stats = httpx.get(f"{url}/admin/stats", headers={"authorization": "Bearer ops"}).json()
        assert [t["name"] for t in stats["tiers"]] == ["device", "cpu", "redis"]
        assert stats["tiers"][1]["max_bytes"] == 2**29
        flushed = httpx.post(f"{url}/admin/flush", params={"tier": "redis"}, headers={"authorization": "Bearer ops"})
        assert flushed.json()["dropped"] >= 5  # the prefix and four documents, written through
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    # uvicorn finishes in-flight work, runs the app's shutdown, then re-raises SIGTERM for the exit status
    assert server.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output and "Traceback" not in output


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_bad_configuration_stops_start_up_with_a_message(tmp_path):
    config = tmp_path / "ragcache.toml"
    config.write_text('port = 8100\nblend_ratio = 3\n')
    result = subprocess.run([sys.executable, "-m", "ragcache.cli", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "blend_ratio must be in [0, 1]" in result.stderr


@pytest.mark.parametrize(
    "file_text, env, message",
    [
        ("", {"RAGCACHE_PORT": "eighty"}, "environment RAGCACHE_PORT: port"),
        ("colour = 'red'\n", {}, "unknown setting(s) ['colour']"),
        ("", {"RAGCACHE_API_KEYS": "justakey"}, "key:tenant"),
        ("host = '0.0.0.0'\n", {}, "no api_keys are configured"),
    ],
)
def test_settings_errors_name_the_setting_and_its_source(tmp_path, file_text, env, message):
    config = tmp_path / "settings.toml"
    config.write_text(file_text)
    with pytest.raises(SettingsError) as error:
        load_settings(config, env)
    assert message in str(error.value)


def test_layers_override_in_order(tmp_path):
    config = tmp_path / "settings.toml"
    config.write_text("port = 8100\nblend_ratio = 0.3\n[api_keys]\nk1 = 'team'\n")
    settings = load_settings(config, {"RAGCACHE_PORT": "8200", "RAGCACHE_BLEND_RATIO": "0.2"}, {"port": 8300, "host": None})
    assert (settings.port, settings.blend_ratio, settings.api_keys, settings.host) == (8300, 0.2, {"k1": "team"}, "127.0.0.1")
