"""The semantic cache's HTTP surface: how a hit is reported, feedback, admin.

The lookup before generation and the store after it belong to Runtime.answer. A hit is
answered without the model and marked as such (`semantic_hit`, similarity, entry id); a
client that finds it wrong reports the entry id to /v1/feedback.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import msgspec
from litestar import HttpMethod, Response, delete, get, post, put, route
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.status_codes import HTTP_204_NO_CONTENT

from ragcache.engine.errors import InvalidRequestError
from ragcache.schemas import BlendEpsilonIn, CacheReport, CategoryPolicyIn, Feedback, Timings
from ragcache.service.auth import ADMIN, TENANT
from ragcache.service.deps import RuntimeDep, TenantDep
from ragcache.service.errors import responses
from ragcache.service.runtime import CachedAnswer


def hit_report(hit: CachedAnswer) -> CacheReport:
    elapsed_ms = hit.elapsed_s * 1e3
    return CacheReport(
        mode="semantic",
        blend_ratio=0.0,
        chunk_hits=0,
        chunk_misses=0,
        cached_tokens=0,
        recomputed_tokens=0,
        recomputed_fraction=0.0,
        timings=Timings(elapsed_ms, 0.0, 0.0, elapsed_ms, 0.0),
        semantic_hit=True,
        semantic_similarity=hit.similarity,
        semantic_entry_id=hit.entry_id,
    )


def _require_semantic(runtime):
    """The semantic cache; a server without one has no such resource (404, as an unknown entry)."""
    if runtime.semantic is None:
        raise NotFoundException("the semantic cache is off (settings: semantic_cache = false)")
    return runtime.semantic


@post(
    "/v1/feedback",
    operation_id="reportFalseHit",
    summary="Report a wrong semantic-cache answer; it is removed",
    status_code=HTTP_204_NO_CONTENT,
    guards=TENANT,
    responses=responses(400, 401, 404, 413),
)
async def feedback(data: JSONBody[Feedback], runtime: RuntimeDep, tenant: TenantDep) -> None:
    if not await asyncio.to_thread(_require_semantic(runtime).report_false_hit, tenant, data.entry_id):
        raise NotFoundException(f"no semantic-cache entry {data.entry_id!r} for this tenant")


@get(
    "/admin/semantic",
    operation_id="adminSemantic",
    summary="Semantic cache: entries, hit rates, thresholds",
    guards=ADMIN,
    responses=responses(401, 403, 404),
)
async def semantic_stats(runtime: RuntimeDep) -> dict:
    return msgspec.to_builtins(_require_semantic(runtime).stats())


@delete(
    "/admin/semantic",
    operation_id="invalidateSemantic",
    summary="Drop entries by tenant, category or entry",
    status_code=200,
    guards=ADMIN,
    responses=responses(400, 401, 403, 404),
)
async def invalidate(
    runtime: RuntimeDep,
    of_tenant: Annotated[str, QueryParameter(name="tenant")],
    category: FromQuery[str | None] = None,
    entry_id: FromQuery[str | None] = None,
) -> dict:
    semantic = _require_semantic(runtime)
    if category is not None and category not in semantic.policies():
        raise InvalidRequestError(f"unknown category {category!r}; known: {', '.join(sorted(semantic.policies()))}")
    dropped = await asyncio.to_thread(semantic.invalidate, of_tenant, category, entry_id)
    return {"dropped": dropped}


@route("/admin/semantic", http_method=HttpMethod.OPTIONS, include_in_schema=False)
async def semantic_options() -> Response:
    """Litestar's own OPTIONS answer lists only the methods of the first handler registered on a path; this
    one, registered before the path's GET and DELETE, stands in for it."""
    return Response(None, status_code=HTTP_204_NO_CONTENT, headers={"allow": "DELETE, GET, OPTIONS"})


@put(
    "/admin/semantic/categories/{name:str}",
    operation_id="setCategoryPolicy",
    summary="Change a category's threshold, TTL, quota or switch at run time",
    guards=ADMIN,
    responses=responses(400, 401, 403, 404, 413),
)
async def set_category(name: FromPath[str], data: JSONBody[CategoryPolicyIn], runtime: RuntimeDep) -> dict:
    from ragcache.semantic import CategoryPolicy

    semantic = _require_semantic(runtime)
    if name not in semantic.policies():  # the classifier's categories; a policy is changed, not a category made
        raise NotFoundException(f"unknown category {name!r}; known: {', '.join(sorted(semantic.policies()))}")
    try:
        policy = CategoryPolicy(**{f: getattr(data, f) for f in data.__struct_fields__})
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    semantic.set_policy(name, policy)
    return {"category": name, "policy": {f: getattr(policy, f) for f in data.__struct_fields__}}


@put(
    "/admin/blend/categories/{name:str}",
    operation_id="setBlendEpsilon",
    summary="Change a category's blend error budget (first-token disagreement) at run time",
    guards=ADMIN,
    responses=responses(400, 401, 403, 404, 413),
)
async def set_blend_epsilon(name: FromPath[str], data: JSONBody[BlendEpsilonIn], runtime: RuntimeDep) -> dict:
    if runtime.budget is None:
        raise NotFoundException("this service runs without a blend error budget")
    try:
        runtime.budget.set_epsilon(name, data.epsilon)
    except ValueError as exc:
        raise InvalidRequestError(f"epsilon: {exc}") from None
    return {"category": name, "epsilon": data.epsilon}


ROUTES = [feedback, semantic_options, semantic_stats, invalidate, set_category, set_blend_epsilon]  # OPTIONS first
