"""Operator endpoints: statistics, flushing, health and readiness, Prometheus metrics."""

from __future__ import annotations

from litestar.params import FromQuery
from litestar import MediaType, Request, Response, get, post

from ragcache.service.auth import require_admin
from ragcache.service.errors import ERRORS
from ragcache.service.metrics import prometheus_text
from ragcache.service.deps import RuntimeDep, SettingsDep


@get("/admin/stats", operation_id="adminStats", summary="Per-tier and per-tenant cache statistics", responses=ERRORS)
async def admin_stats(request: Request, runtime: RuntimeDep, settings: SettingsDep) -> dict:
    require_admin(request, settings)
    return runtime.stats()


@get("/admin/programs", operation_id="adminPrograms", summary="Agent programs, pins, TTLs, tool durations",
     responses=ERRORS)
async def admin_programs(request: Request, runtime: RuntimeDep, settings: SettingsDep) -> dict:
    require_admin(request, settings)
    return runtime.program_stats()


@post("/admin/flush", operation_id="adminFlush", summary="Drop cached KV, by tier and/or tenant", status_code=200,
      responses=ERRORS)
async def admin_flush(request: Request, runtime: RuntimeDep, settings: SettingsDep,
                      tier: FromQuery[str | None] = None, tenant: FromQuery[str | None] = None) -> dict:
    require_admin(request, settings)
    return {"dropped": await runtime.flush(tier, tenant), "tier": tier, "tenant": tenant}


@get("/health", operation_id="health", summary="The process is up")
async def health() -> dict:
    return {"status": "ok"}


@get("/ready", operation_id="ready", summary="Model loaded; Redis reachable or degraded")
async def ready(runtime: RuntimeDep) -> Response[dict]:
    redis = [t for t in runtime.stats()["tiers"] if "available" in t]
    degraded = any(not t["available"] for t in redis)
    body = {"status": "degraded" if degraded else "ready", "model": runtime.model_name,
            "redis": None if not redis else ("unreachable" if degraded else "ok")}
    return Response(body, status_code=200)


@get("/metrics", operation_id="metrics", summary="Prometheus metrics", media_type=MediaType.TEXT, responses=ERRORS)
async def metrics(request: Request, runtime: RuntimeDep, settings: SettingsDep) -> str:
    require_admin(request, settings)
    return prometheus_text(runtime.stats())


ROUTES = [admin_stats, admin_programs, admin_flush, health, ready, metrics]
