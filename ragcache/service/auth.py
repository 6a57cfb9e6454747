"""API keys -> tenants, and the admin key.

No keys configured: one tenant, "default", and no auth (the service then only binds to
localhost, as local inference servers do). With keys: every request names its key as
`Authorization: Bearer KEY`; admin endpoints take the separate admin key.
"""

from __future__ import annotations

from litestar import Request
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException

from ragcache.config import Settings
from ragcache.kv import DEFAULT_NAMESPACE


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def tenant_of(request: Request, settings: Settings) -> str:
    if not settings.api_keys:
        return DEFAULT_NAMESPACE
    key = bearer(request)
    if key is None:
        raise NotAuthorizedException("missing API key: send Authorization: Bearer <key>")
    if key not in settings.api_keys:
        raise NotAuthorizedException("invalid API key")
    return settings.api_keys[key]


def require_admin(request: Request, settings: Settings) -> None:
    key = bearer(request)
    if settings.admin_key is None:
        if settings.api_keys:
            raise PermissionDeniedException("admin endpoints are disabled: no admin_key is configured")
        return  # no auth at all: localhost only
    if key is None:
        raise NotAuthorizedException("missing admin key: send Authorization: Bearer <admin key>")
    if key != settings.admin_key:
        raise PermissionDeniedException("this key is not the admin key")
