"""One settings object for `ragcache serve`: from a TOML file, then RAGCACHE_* environment, then flags.

Each layer overrides the one before. Values are checked at start-up; a bad value stops
the service with a message naming the setting and where it came from.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

ENV_PREFIX = "RAGCACHE_"


class SettingsError(ValueError):
    """Bad configuration: the message names the setting and its source."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    # model runner: "own" (ragcache's engine, in this process) or "vllm" (vLLM OpenAI servers at vllm_urls,
    # serving the model at `model`, whose tokenizer ragcache renders prompts with)
    engine: str = "own"
    vllm_urls: str | None = None  # comma-separated http(s):// URLs of vLLM servers of one model
    # model
    model: str | None = None  # directory or .gguf; None: the default SmolLM2-135M-Instruct
    device: str = "cpu"
    dtype: str = "float32"
    # blending
    blend_ratio: float = 0.15
    check_layer: int = 1
    deviation: str = "value"
    sink_tokens: int = 0  # EPIC: each reused chunk's first k tokens recomputed first, within the ratio's budget
    # answers stay right: shadow checks (on spare engine capacity) and the blend error budget
    blend_epsilon: float = 0.1  # the largest first-token disagreement rate with full prefill blending may have
    blend_ladder: str | None = None  # settings fastest to safest, comma-separated; None: from blend_ratio
    shadow_fraction: float = 0.1  # of blended answers checked against full prefill
    semantic_shadow_fraction: float = 0.1  # of semantic hits checked against a fresh engine answer
    shadow_max_pending: int = 8
    # store
    device_cache_gb: float = 1.0
    cpu_cache_gb: float = 8.0
    redis_url: str | None = None  # one node or any node of a Redis Cluster (found out at start-up)
    codec: str = "raw"
    # chunk entries in Redis expire after this long (None: never). With a TTL, Redis can run with
    # maxmemory-policy volatile-lru and evict only chunks and answers, never registrations.
    redis_ttl_s: float | None = None
    eviction: str = "cost_aware"
    write_backlog_mb: float = 256.0  # chunks whose write to Redis failed, kept to retry once it is back
    # registrations (documents, programs) and semantic answers: durable, shared by replicas
    registry: str = "auto"  # auto (redis with redis_url, else sqlite), redis, sqlite or memory (lost on exit)
    data_dir: str | None = (
        None  # the sqlite registry's folder; None: $XDG_DATA_HOME/ragcache or ~/.local/share/ragcache
    )
    # agent programs: how a tool call pins the program's KV (tool_ttl, fixed_ttl or none; see agents/pins.py)
    pin_policy: str = "tool_ttl"
    pin_fixed_ttl_s: float = 2.0  # the pin of every tool call under pin_policy fixed_ttl
    pin_budget_share: float = 0.5  # of the device tier that pins may hold (the rest is for live requests)
    pin_lower_budget_share: float = 0.8  # of each local tier below it (no live request writes there)
    pin_memory_weight: float = 0.25  # tool_ttl's cost of a second of pinned memory (agents/pins.py PinConfig)
    # chats that name no program (with tools or history) kept as programs found by their token prefix
    conversation_kv: bool = True
    # batching: working KV of running sequences, tokens per batched step, KV growth block, concurrency
    working_kv_gb: float = 4.0
    step_tokens: int = 512
    kv_block_tokens: int = 128
    max_running: int = 64
    # semantic cache: answers in Redis when redis_url is set, in process memory otherwise
    semantic_cache: bool = True
    # auth: API key -> tenant; no keys: one default tenant, no auth, localhost only
    api_keys: dict[str, str] = field(default_factory=dict)
    admin_key: str | None = None
    # limits
    max_queue: int = 32
    max_documents: int = 64
    max_document_tokens: int = 4096
    max_new_tokens: int = 1024
    max_body_bytes: int = 8 * 1024 * 1024  # a larger request body is a 413 before it is read or parsed
    max_json_depth: int = 64  # deeper nesting of arrays/objects in a body is a 400 before it is parsed

    def __post_init__(self) -> None:
        checks = [
            (0 < self.port < 65536, "port must be in 1..65535"),
            (self.engine in ("own", "vllm"), "engine must be own or vllm"),
            (
                self.engine != "vllm" or bool(self.vllm_url_list),
                "engine vllm needs vllm_urls (--vllm-url URL[,URL...])",
            ),
            (
                all(url.startswith(("http://", "https://")) for url in self.vllm_url_list),
                "vllm_urls must be http(s):// URLs, comma-separated",
            ),
            (0.0 <= self.blend_ratio <= 1.0, "blend_ratio must be in [0, 1]"),
            (0.0 < self.blend_epsilon < 1.0, "blend_epsilon must be in (0, 1)"),
            (self.sink_tokens >= 0, "sink_tokens must be >= 0"),
            (
                0.0 <= self.shadow_fraction <= 1.0 and 0.0 <= self.semantic_shadow_fraction <= 1.0,
                "shadow_fraction and semantic_shadow_fraction must be in [0, 1]",
            ),
            (self.shadow_max_pending > 0, "shadow_max_pending must be positive"),
            (self.device_cache_gb > 0 and self.cpu_cache_gb > 0, "device_cache_gb and cpu_cache_gb must be positive"),
            (self.max_queue > 0, "max_queue must be positive"),
            (self.working_kv_gb > 0, "working_kv_gb must be positive"),
            (self.step_tokens > 0 and self.kv_block_tokens > 0, "step_tokens and kv_block_tokens must be positive"),
            (self.max_running > 0, "max_running must be positive"),
            (self.max_documents > 0 and self.max_document_tokens > 0, "document limits must be positive"),
            (self.max_new_tokens > 0, "max_new_tokens must be positive"),
            (self.max_body_bytes >= 1024, "max_body_bytes must be at least 1024"),
            (self.max_json_depth >= 8, "max_json_depth must be at least 8"),
            (self.write_backlog_mb >= 0, "write_backlog_mb must be >= 0"),
            (self.redis_ttl_s is None or self.redis_ttl_s >= 1, "redis_ttl_s must be at least 1 (or unset)"),
            (self.registry in ("auto", "redis", "sqlite", "memory"), "registry must be auto, redis, sqlite or memory"),
            (self.registry != "redis" or bool(self.redis_url), "registry redis needs redis_url"),
            (self.pin_policy in ("tool_ttl", "fixed_ttl", "none"), "pin_policy must be tool_ttl, fixed_ttl or none"),
            (self.pin_fixed_ttl_s > 0, "pin_fixed_ttl_s must be positive"),
            (0 < self.pin_budget_share < 1, "pin_budget_share must be in (0, 1)"),
            (0 < self.pin_lower_budget_share < 1, "pin_lower_budget_share must be in (0, 1)"),
            (self.pin_memory_weight >= 0, "pin_memory_weight must be >= 0"),
            (all(k and t for k, t in self.api_keys.items()), "api_keys must map non-empty keys to non-empty tenants"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)
        if not self.api_keys and not _is_loopback(self.host):
            raise SettingsError(
                f"host {self.host!r} is not local and no api_keys are configured: "
                "set api_keys (RAGCACHE_API_KEYS=key:tenant,...) before serving beyond localhost"
            )
        from ragcache.checks.blend_budget import BlendBudgetConfig

        try:
            BlendBudgetConfig(self.blend_epsilon, ladder=self.ladder)
        except ValueError as exc:
            raise SettingsError(f"blend_ladder: {exc}") from None
        if self.admin_key is not None and self.admin_key in self.api_keys:
            raise SettingsError("admin_key must differ from every tenant API key")

    @property
    def vllm_url_list(self) -> list[str]:
        return [url.strip() for url in (self.vllm_urls or "").split(",") if url.strip()]

    @property
    def data_path(self) -> Path:
        """Where the embedded (sqlite) registry lives."""
        import os

        if self.data_dir:
            return Path(self.data_dir).expanduser()
        base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        return Path(base) / "ragcache"

    @property
    def registry_kind(self) -> str:
        """The registry in use: auto resolved against redis_url."""
        if self.registry != "auto":
            return self.registry
        return "redis" if self.redis_url else "sqlite"

    @property
    def ladder(self) -> tuple[str, ...]:
        """The blend budget's settings, fastest to safest: blend_ladder, or the default built on blend_ratio."""
        from ragcache.checks.blend_budget import default_ladder

        if self.blend_ladder:
            return tuple(name.strip() for name in self.blend_ladder.split(",") if name.strip())
        return default_ladder(self.blend_ratio)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(
    file: Path | None = None, env: Mapping[str, str] | None = None, flags: Mapping[str, Any] | None = None
) -> Settings:
    """Merge file < environment < flags into Settings; None-valued flags mean 'not given'."""
    values: dict[str, Any] = {}
    if file is not None:
        try:
            values.update(_coerce_all(tomllib.loads(Path(file).read_text()), f"config file {file}"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"cannot read config file {file}: {exc}") from exc
    names = {f.name for f in dataclasses.fields(Settings)}
    for key, raw in (env or {}).items():
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in names:
            name = key[len(ENV_PREFIX) :].lower()
            values[name] = _coerce(name, _parse_env(name, raw), f"environment {key}")
    values.update(_coerce_all({k: v for k, v in (flags or {}).items() if v is not None}, "flag"))
    try:
        return Settings(**values)
    except TypeError as exc:
        raise SettingsError(str(exc)) from exc


def _coerce_all(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise SettingsError(f"{source}: unknown setting(s) {unknown}")
    return {name: _coerce(name, value, source) for name, value in raw.items()}


def _parse_env(name: str, raw: str) -> Any:
    if name == "api_keys":
        pairs = [item.split(":", 1) for item in raw.split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise SettingsError(f"environment {ENV_PREFIX}API_KEYS: expected key:tenant,key:tenant")
        return {key.strip(): tenant.strip() for key, tenant in pairs}
    return raw


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = {f.name: f.type for f in dataclasses.fields(Settings)}[name]
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "float | None":
            return None if value in ("", None) else float(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return str(value).lower() in ("1", "true", "yes", "on")
            raise ValueError("expected true or false")
        if kind == "dict[str, str]":
            if not isinstance(value, dict):
                raise ValueError("expected a table of key = tenant")
            return {str(k): str(v) for k, v in value.items()}
        if value in ("", None):
            return None
        return str(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{source}: {name}: cannot use {value!r} ({exc})") from None
