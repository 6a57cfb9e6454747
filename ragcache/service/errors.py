"""Every failure a client can cause becomes a 4xx with an OpenAI-shaped JSON error naming the field."""

from __future__ import annotations

import logging

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import ResponseSpec
from litestar.types import ExceptionHandlersMap

from ragcache.engine.errors import EngineUnavailableError, InvalidRequestError
from ragcache.registry import RegistryUnavailableError
from ragcache.schemas import DOCUMENT_ID, NON_BLANK, ErrorBody, ErrorResponse
from ragcache.service.runtime import QueueFullError, UnknownDocumentError

log = logging.getLogger("ragcache.service")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> Response:
    body = ErrorResponse(ErrorBody(message, _TYPES.get(status, "server_error"), param))
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers)


_PLAIN = {  # msgspec's words for our patterns
    f"Expected `str` matching regex {NON_BLANK!r}": "must not be blank",
    f"Expected `str` matching regex {DOCUMENT_ID!r}": "must not be blank or contain '/'",
}


def _plain(message: object) -> object:
    return _PLAIN.get(message, message) if isinstance(message, str) else message


def on_validation(_: Request, exc: ValidationException) -> Response:
    details = exc.extra if isinstance(exc.extra, list) else []
    fields = [str(d.get("key")) for d in details if isinstance(d, dict) and d.get("key")]
    reasons = "; ".join(f"{d.get('key') or 'body'}: {_plain(d.get('message'))}" for d in details if isinstance(d, dict))
    return error_response(400, reasons or exc.detail, fields[0] if fields else None)


def on_http(_: Request, exc: HTTPException) -> Response:
    return error_response(exc.status_code, exc.detail, headers=exc.headers)


def on_invalid(_: Request, exc: InvalidRequestError) -> Response:
    return error_response(400, str(exc))


def on_unknown_document(_: Request, exc: UnknownDocumentError) -> Response:
    return error_response(404, str(exc.args[0]))


def on_queue_full(_: Request, exc: QueueFullError) -> Response:
    return error_response(429, str(exc), headers={"retry-after": "1"})


def on_registry_unavailable(_: Request, exc: RegistryUnavailableError) -> Response:
    return error_response(503, str(exc), headers={"retry-after": "1"})


def on_engine_unavailable(_: Request, exc: EngineUnavailableError) -> Response:
    return error_response(503, str(exc), headers={"retry-after": "1"})


def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal error; the server log has the details")


_DESCRIPTIONS = {
    400: "Bad input; the message names the field",
    401: "Missing or invalid API key",
    403: "The key may not do this (e.g. a tenant key on an admin endpoint)",
    404: "Unknown document id or semantic-cache entry (or another tenant's), or a cache this server runs without",
    413: "The request body is over max_body_bytes (refused before it is read)",
    429: "The request queue is full; retry after Retry-After seconds",
    503: "The registry (Redis) or every model server cannot be reached; retry after Retry-After seconds",
}


def responses(*statuses: int) -> dict[int, ResponseSpec]:
    """The error responses an endpoint can give, for its OpenAPI entry (each an ErrorResponse)."""
    return {status: ResponseSpec(ErrorResponse, description=_DESCRIPTIONS[status]) for status in statuses}


HANDLERS: ExceptionHandlersMap = {
    ValidationException: on_validation,
    HTTPException: on_http,
    InvalidRequestError: on_invalid,
    UnknownDocumentError: on_unknown_document,
    QueueFullError: on_queue_full,
    RegistryUnavailableError: on_registry_unavailable,
    EngineUnavailableError: on_engine_unavailable,
    Exception: on_unexpected,
}
