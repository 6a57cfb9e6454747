"""What the SDK raises: one class per way a call can fail, so callers catch what they can handle.

`APIError` and its subclasses carry the server's own error object (`{"error": {"message",
"type", "param"}}`); `RagcacheConnectionError` means no answer came back at all. Every
class derives from `RagcacheError`, so `except RagcacheError` catches the lot.
"""

from __future__ import annotations

import msgspec


class RagcacheError(Exception):
    """Base of every error the SDK raises."""


class APIError(RagcacheError):
    """The server answered with an error.

    `status` is the HTTP status. An error event inside a stream arrives after a 200, so it
    has none of its own: it gets the status the server gives that error `type` elsewhere.
    `param` names the offending request field when the server could tell which one.
    """

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param

    def __str__(self) -> str:
        where = f" (param: {self.param})" if self.param else ""
        return f"{self.status} {self.type or 'error'}: {self.message}{where}"


class BadRequestError(APIError):
    """400: the request is invalid; retrying it unchanged fails again."""


class AuthenticationError(APIError):
    """401: the API key is missing or unknown."""


class PermissionDeniedError(APIError):
    """403: the key is valid but not allowed here (a tenant key on an admin endpoint)."""


class NotFoundError(APIError):
    """404: an unknown document id (or another tenant's, which is the same thing) or path."""


class RateLimitError(APIError):
    """429: the server's queue is full; raised once the SDK's retries are used up."""


class ServerError(APIError):
    """5xx: the server failed; a 503 is retried before this is raised."""


class RagcacheConnectionError(RagcacheError, ConnectionError):
    """No response: the server is unreachable (after retries) or the connection broke mid-answer."""


class RagcacheTimeoutError(RagcacheConnectionError, TimeoutError):
    """The server took longer than timeout_s to answer. Not retried: it may still be generating."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    429: RateLimitError,
}

# The status the server pairs with each error type (ragcache/service/errors.py), for stream events.
_STATUS_BY_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
}


class _ErrorBody(msgspec.Struct):
    message: str = ""
    type: str | None = None
    param: str | None = None


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorBody


def api_error(status: int, message: str, type: str | None = None, param: str | None = None) -> APIError:
    """The APIError subclass for status."""
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    return cls(status, message, type, param)


def error_from_response(status: int, content: bytes) -> APIError:
    """The error a non-2xx response stands for; a body that is not ragcache's JSON (a proxy's
    HTML page) becomes the message as it is, cut short."""
    try:
        body = msgspec.json.decode(content, type=_ErrorEnvelope).error
    except msgspec.DecodeError:
        text = content.decode(errors="replace").strip()
        return api_error(status, text[:500] or f"HTTP {status}")
    return api_error(status, body.message, body.type, body.param)


def error_from_event(error: object) -> APIError:
    """The error an `{"error": {...}}` event inside a stream stands for."""
    try:
        body = msgspec.convert(error, _ErrorBody)
    except msgspec.ValidationError:
        body = _ErrorBody(str(error))
    return api_error(_STATUS_BY_TYPE.get(body.type or "", 500), body.message, body.type, body.param)
