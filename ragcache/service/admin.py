"""Operator endpoints: statistics, flushing, health and readiness, Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

from litestar import MediaType, Response, get, post
from litestar.params import FromQuery, QueryParameter

from ragcache.service.auth import ADMIN
from ragcache.service.deps import RuntimeDep
from ragcache.service.errors import responses
from ragcache.service.metrics import prometheus_text


@get(
    "/admin/stats",
    operation_id="adminStats",
    summary="Per-tier and per-tenant cache statistics",
    guards=ADMIN,
    responses=responses(401, 403),
)
async def admin_stats(runtime: RuntimeDep) -> dict:
    return runtime.stats()


@get(
    "/admin/programs",
    operation_id="adminPrograms",
    summary="Agent programs, pins, TTLs, tool durations",
    guards=ADMIN,
    responses=responses(401, 403),
)
async def admin_programs(runtime: RuntimeDep) -> dict:
    return runtime.program_stats()


@post(
    "/admin/flush",
    operation_id="adminFlush",
    summary="Drop cached KV, by tier and/or tenant",
    status_code=200,
    description="`tier` is one of this server's tiers (the enum below).",
    guards=ADMIN,
    responses=responses(400, 401, 403),
)
async def admin_flush(
    runtime: RuntimeDep,
    tier: FromQuery[str | None] = None,
    of_tenant: Annotated[str | None, QueryParameter(name="tenant")] = None,
) -> dict:
    return {"dropped": await runtime.flush(tier, of_tenant), "tier": tier, "tenant": of_tenant}


@get("/health", operation_id="health", summary="The process is up")
async def health() -> dict:
    return {"status": "ok"}


@get(
    "/ready",
    operation_id="ready",
    summary="Model loaded; Redis, the registry and the model servers reachable, or degraded",
    responses=responses(503),
)
async def ready(runtime: RuntimeDep) -> Response[dict]:
    """200 once the model is loaded: a replica with Redis down, or with some of its vLLM servers down,
    still answers (misses, recomputation, the other servers), so it stays in the load balancer;
    `status` says degraded. 503 when every vLLM server is down."""
    redis = [t for t in runtime.engine.store.stats()["tiers"] if hasattr(t, "available")]
    redis_down = any(not t.available for t in redis)
    registry = runtime.documents.registry.stats()  # not runtime.stats(): no per-tenant registry reads per probe
    upstreams = runtime.engine.upstream_health()
    up = [server for server in upstreams if server["up"]]
    degraded = redis_down or not registry.available or len(up) < len(upstreams)
    body: dict[str, object] = {
        "status": "unavailable" if upstreams and not up else "degraded" if degraded else "ready",
        "model": runtime.model_name,
        "redis": None if not redis else ("unreachable" if redis_down else "ok"),
        "registry": f"{registry.kind} " + ("ok" if registry.available else "unreachable"),
    }
    if upstreams:  # --engine vllm: each server; a down one is skipped (and probed) until it is back
        body["upstreams"] = [{"url": s["url"], "up": s["up"], "last_error": s["last_error"]} for s in upstreams]
    # no model server up: nothing can be answered but semantic hits, so leave the load balancer
    return Response(body, status_code=503 if upstreams and not up else 200)


@get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics",
    media_type=MediaType.TEXT,
    guards=ADMIN,
    responses=responses(401, 403),
)
async def metrics(runtime: RuntimeDep) -> str:
    return prometheus_text(runtime.stats())


ROUTES = [admin_stats, admin_programs, admin_flush, health, ready, metrics]
