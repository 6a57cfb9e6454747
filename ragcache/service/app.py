"""create_app(settings, runtime): the Litestar app. Handlers get the Runtime, Settings and tenant by injection.

Order of a request: guards (auth, service/auth.py) -> the body, read up to max_body_bytes and
checked for nesting (service/limits.py) -> msgspec validation -> the handler.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

from ragcache import __version__
from ragcache.config import Settings
from ragcache.service import admin, routes, semantic
from ragcache.service.auth import current_tenant
from ragcache.service.errors import HANDLERS
from ragcache.service.limits import LimitedRequest, state_limits
from ragcache.service.runtime import Runtime


def create_app(settings: Settings, runtime: Runtime) -> Litestar:
    @asynccontextmanager
    async def lifespan(_: Litestar):
        runtime.start()
        try:
            yield
        finally:
            runtime.close()  # in-flight requests finish first; then hot entries reach Redis

    app = Litestar(
        route_handlers=[*routes.ROUTES, *admin.ROUTES, *semantic.ROUTES],
        dependencies={
            "runtime": Provide(lambda: runtime, use_cache=True, sync_to_thread=False),
            "settings": Provide(lambda: settings, use_cache=True, sync_to_thread=False),
            "tenant": Provide(current_tenant, sync_to_thread=False),
        },
        state=State({"settings": settings}),  # for the guards and the request class, which take no dependencies
        request_class=LimitedRequest,
        exception_handlers=HANDLERS,
        lifespan=[lifespan],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="ragcache", version=__version__, path="/schema"),
    )
    categories = sorted(runtime.semantic.policies()) if runtime.semantic is not None else None
    state_limits(app.openapi_schema, settings, runtime.engine.store.tier_names, categories)
    return app
