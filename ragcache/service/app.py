"""create_app(settings, runtime): the Litestar app. Handlers get the Runtime and Settings by injection."""

from __future__ import annotations

from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

from ragcache import __version__
from ragcache.config import Settings
from ragcache.service import admin, routes, semantic
from ragcache.service.errors import HANDLERS
from ragcache.service.runtime import Runtime

MAX_BODY_BYTES = 32 * 1024 * 1024


def create_app(settings: Settings, runtime: Runtime) -> Litestar:
    @asynccontextmanager
    async def lifespan(_: Litestar):
        runtime.start()
        try:
            yield
        finally:
            runtime.close()  # in-flight requests finish first; then hot entries reach Redis

    return Litestar(
        route_handlers=[*routes.ROUTES, *admin.ROUTES, *semantic.ROUTES],
        dependencies={
            "runtime": Provide(lambda: runtime, use_cache=True, sync_to_thread=False),
            "settings": Provide(lambda: settings, use_cache=True, sync_to_thread=False),
        },
        exception_handlers=HANDLERS,
        lifespan=[lifespan],
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(title="ragcache", version=__version__, path="/schema"),
    )
