"""API keys -> tenants, and the admin key, checked by guards before a request's body is read.

No keys configured: one tenant, "default", and no auth (the service then only binds to
localhost, as local inference servers do). With keys: every request names its key as
`Authorization: Bearer KEY`; admin endpoints take the separate admin key.

Guards run before Litestar resolves a handler's arguments, so a request without a valid key
is a 401 (a tenant key on an admin endpoint a 403) whatever its body, and its body is never
read. Keys are compared in constant time, each against every configured key, so timing tells
neither which key matched nor how much of one did.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from litestar.connection import ASGIConnection, Request
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler

from ragcache.config import Settings
from ragcache.kv import DEFAULT_NAMESPACE


def bearer(connection: ASGIConnection) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def matching_key(key: str, candidates: Iterable[str]) -> str | None:
    """The candidate equal to key or None; sha256 digests make every comparison the same length, and
    every candidate is compared (no early exit)."""
    digest = hashlib.sha256(key.encode()).digest()
    found = None
    for candidate in candidates:
        if hmac.compare_digest(digest, hashlib.sha256(candidate.encode()).digest()):
            found = candidate
    return found


def tenant_of(connection: ASGIConnection, settings: Settings) -> str:
    if not settings.api_keys:
        return DEFAULT_NAMESPACE
    key = bearer(connection)
    if key is None:
        raise NotAuthorizedException("missing API key: send Authorization: Bearer <key>")
    matched = matching_key(key, settings.api_keys)
    if matched is None:
        raise NotAuthorizedException("invalid API key")
    return settings.api_keys[matched]


def require_admin(connection: ASGIConnection, settings: Settings) -> None:
    if settings.admin_key is None:
        if settings.api_keys:
            raise PermissionDeniedException("admin endpoints are disabled: no admin_key is configured")
        return  # no auth at all: localhost only
    key = bearer(connection)
    if key is None:
        raise NotAuthorizedException("missing admin key: send Authorization: Bearer <admin key>")
    if matching_key(key, [settings.admin_key]) is None:
        raise PermissionDeniedException("this key is not the admin key")


def tenant_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Tenant endpoints: the key's tenant, kept in the request's state for the `tenant` dependency."""
    connection.state.tenant = tenant_of(connection, connection.app.state.settings)


def admin_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    require_admin(connection, connection.app.state.settings)


TENANT = [tenant_guard]  # a handler's guards: tenant endpoints
ADMIN = [admin_guard]  # admin endpoints


def current_tenant(request: Request) -> str:
    """The `tenant` dependency: what tenant_guard found (a handler that takes it must have that guard)."""
    return request.state.tenant
