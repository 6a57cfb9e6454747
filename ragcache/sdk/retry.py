"""When to try a call again, and after how long: the one retry policy both clients follow.

Retried: 429 (the server's queue is full) and 503 (it is starting or draining), and
failures to reach it or broken connections before an answer. Never retried: any other
4xx (the same request fails the same way) and read timeouts (the server may still be
generating; a second request would queue behind the first).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx

from ragcache.sdk.errors import RagcacheConnectionError, RagcacheTimeoutError, error_from_response

RETRY_STATUSES = frozenset({429, 503})
# A connection that failed or was dropped before the answer: safe to send again, since every
# ragcache call is idempotent (documents are keyed by id and content, answers have no side effect).
RETRY_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
# A Retry-After beyond this is treated as this, so a misconfigured proxy cannot park a client for hours.
MAX_DELAY_S = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3
    backoff_s: float = 0.5

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff_s < 0:
            raise ValueError(f"max_retries and backoff_s must be >= 0, got {self.max_retries}, {self.backoff_s}")

    def delay_s(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (0-based): the server's
        Retry-After when it sent one, else backoff_s doubled per attempt."""
        told = parse_retry_after(retry_after)
        return min(MAX_DELAY_S, told if told is not None else self.backoff_s * 2**attempt)

    def after_status(self, attempt: int, response: httpx.Response) -> float:
        """The delay before retrying a response with an error status (its body already read);
        raises the matching APIError when it is not retried or the retries are used up."""
        if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
            return self.delay_s(attempt, response.headers.get("retry-after"))
        raise error_from_response(response.status_code, response.content)

    def after_error(self, attempt: int, url: str, exc: httpx.TransportError) -> float:
        """The delay before retrying a call that got no response; raises RagcacheConnectionError
        (RagcacheTimeoutError for a timeout) when it is not retried or the retries are used up."""
        if isinstance(exc, RETRY_ERRORS) and attempt < self.max_retries:
            return self.delay_s(attempt)
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            raise RagcacheTimeoutError(f"no answer from {url} in time: {exc!r}") from exc
        tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
        raise RagcacheConnectionError(f"cannot reach {url} ({tries}): {exc!r}") from exc


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
