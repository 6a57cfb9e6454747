"""Python client for ragcache's HTTP API: `Client` (blocking) and `AsyncClient` (asyncio).

Results are the wire structs of ragcache.schemas; failures raise the classes of
ragcache.sdk.errors. Importing it loads httpx and msgspec, never torch or the engine.
"""

from ragcache.sdk.client import AsyncClient, Client
from ragcache.sdk.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PermissionDeniedError,
    RagcacheConnectionError,
    RagcacheError,
    RagcacheTimeoutError,
    RateLimitError,
    ServerError,
)
from ragcache.sdk.programs import AsyncProgram, Program
from ragcache.sdk.stream import AsyncChatStream, ChatStream

__all__ = [
    "APIError",
    "AsyncChatStream",
    "AsyncClient",
    "AsyncProgram",
    "AuthenticationError",
    "BadRequestError",
    "ChatStream",
    "Client",
    "NotFoundError",
    "PermissionDeniedError",
    "Program",
    "RagcacheConnectionError",
    "RagcacheError",
    "RagcacheTimeoutError",
    "RateLimitError",
    "ServerError",
]
