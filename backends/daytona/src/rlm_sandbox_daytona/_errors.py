"""SDK errors into the rlm_sandbox tree, at the boundary (one context manager), and the one retry.

What the ``daytona`` SDK (0.226) raises and what it becomes (see ``backends/daytona/NOTES.md``):

=====================================================  =========================================
SDK                                                    rlm_sandbox
=====================================================  =========================================
``DaytonaAuthenticationError`` (401, or no key)        ``AuthenticationError`` (never retried)
``DaytonaForbiddenError`` (403)                        ``QuotaExceeded`` (plan / organisation
                                                       limits; the message says which)
400 / 422 naming a quota or a maximum                  ``QuotaExceeded``
other 400 / 422                                        ``ConfigError``
``DaytonaRateLimitError`` (429)                        ``TransientSandboxError`` with the
                                                       ``Retry-After`` delay
500 / 502 / 503 / 504, ``DaytonaConnectionError``      ``TransientSandboxError``
a plain ``DaytonaError`` caused by a refused or reset  ``TransientSandboxError``
connection (urllib3 ``MaxRetryError`` ...)
``DaytonaNotFoundError`` / 410 about a sandbox          ``SandboxNotFound``
``DaytonaTimeoutError`` without a status (the SDK's    ``SandboxTimeout``
own deadline)
anything else                                          ``SandboxStartError`` while starting, else
                                                       ``SandboxError``
=====================================================  =========================================

The SDK has no backoff of its own for POSTs (urllib3 only retries GETs that carry a
``Retry-After``), so what is transient after translation goes through
:func:`rlm_sandbox._retry.retry_transient`, and only for idempotent steps.
"""

from __future__ import annotations

import contextlib
import email.utils
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from rlm_sandbox._errors import (
    AuthenticationError,
    ConfigError,
    QuotaExceeded,
    SandboxError,
    SandboxNotFound,
    SandboxStartError,
    SandboxTimeout,
    TransientSandboxError,
)
from rlm_sandbox._retry import RetryPolicy, call_translated

__all__ = ["call", "classify", "parse_retry_after", "translate_daytona_errors"]

T = TypeVar("T")

#: A 400/422 whose message names a plan or organisation limit is a quota, not a bad request.
_QUOTA = re.compile(r"quota|exceeds? (the )?maximum|maximum allowed|limit (reached|exceeded)|insufficient", re.I)
#: Causes (by class name, any module) that mean "the request never got an answer": retryable.
_TRANSPORT = {
    "MaxRetryError",
    "NewConnectionError",
    "ProtocolError",
    "RemoteDisconnected",
    "ConnectionResetError",
    "ConnectionRefusedError",
    "ConnectError",
    "ReadError",
    "WriteError",
    "RemoteProtocolError",
    "InvalidHeader",  # urllib3 refusing a fractional Retry-After on a retried GET
}


def parse_retry_after(headers: Mapping[str, Any] | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), if any."""
    if not headers:
        return None
    value = next((v for k, v in headers.items() if str(k).lower() == "retry-after"), None)
    if value is None:
        return None
    text = str(value).strip()
    try:
        return max(float(text), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _transport_cause(exc: BaseException) -> BaseException | None:
    """The first cause in the chain that is a transport failure, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ in _TRANSPORT or isinstance(current, ConnectionError):
            return current
        current = current.__cause__ or current.__context__
    return None


def classify(exc: Exception, what: str, *, sandbox_id: str | None = None, starting: bool = False) -> SandboxError:
    """The rlm_sandbox error for an exception the ``daytona`` SDK raised."""
    from daytona import (
        DaytonaAuthenticationError,
        DaytonaConnectionError,
        DaytonaError,
        DaytonaForbiddenError,
        DaytonaNotFoundError,
        DaytonaRateLimitError,
        DaytonaTimeoutError,
    )

    where = f" {sandbox_id}" if sandbox_id else ""
    if isinstance(exc, SandboxError):
        return exc
    if not isinstance(exc, DaytonaError):
        if _transport_cause(exc) is not None:
            return TransientSandboxError(f"{what}: cannot reach Daytona ({type(exc).__name__}: {exc})")
        return (SandboxStartError if starting else SandboxError)(f"{what}: {type(exc).__name__}: {exc}")
    status = exc.status_code
    message = exc.message or str(exc)
    if isinstance(exc, DaytonaAuthenticationError) or status == 401:
        return AuthenticationError(
            f"{what}: Daytona refused the credentials ({message}). Set DAYTONA_API_KEY or pass api_key=."
        )
    if isinstance(exc, DaytonaForbiddenError) or status == 403:
        return QuotaExceeded(f"{what}: Daytona refused the request: a plan or organisation limit ({message})")
    if isinstance(exc, DaytonaRateLimitError) or status == 429:
        return TransientSandboxError(
            f"{what}: Daytona is rate limiting ({message})", retry_after=parse_retry_after(exc.headers)
        )
    if (status is not None and (status >= 500 or status == 408)) or isinstance(exc, DaytonaConnectionError):
        return TransientSandboxError(f"{what}: Daytona answered {status or 'a connection error'} ({message})")
    if isinstance(exc, DaytonaNotFoundError) or status in (404, 410):
        if sandbox_id or not starting:
            return SandboxNotFound(
                f"{what}: the Daytona sandbox{where} no longer exists: it was deleted, stopped by "
                f"auto-stop, reached its lifetime, or was reaped ({message}). Open a new sandbox."
            )
        return SandboxStartError(f"{what}: Daytona could not find what the sandbox needs ({message})")
    if status in (400, 422):
        if _QUOTA.search(message):
            return QuotaExceeded(f"{what}: a Daytona plan or organisation limit was hit ({message})")
        return ConfigError(f"{what}: Daytona rejected the request ({message})")
    if isinstance(exc, DaytonaTimeoutError) and status is None:
        return SandboxTimeout(f"{what}: {message}")
    if status is None and _transport_cause(exc) is not None:
        return TransientSandboxError(f"{what}: cannot reach Daytona ({message})")
    return (SandboxStartError if starting else SandboxError)(f"{what}: {message}")


@contextlib.contextmanager
def translate_daytona_errors(what: str, *, sandbox_id: str | None = None, starting: bool = False) -> Iterator[None]:
    """Map exceptions raised inside the block (SDK, httpx, urllib3) into the rlm_sandbox tree.

    ``what`` starts the message; ``sandbox_id`` is the sandbox the call was about (a 404 then
    means it is gone); ``starting`` makes unclassified failures a ``SandboxStartError``.
    """
    try:
        yield
    except SandboxError:
        raise
    except Exception as exc:
        raise classify(exc, what, sandbox_id=sandbox_id, starting=starting) from exc


def call(
    what: str,
    fn: Callable[[], T],
    *,
    retry: bool,
    sandbox_id: str | None = None,
    starting: bool = False,
    policy: RetryPolicy | None = None,
) -> T:
    """``fn()`` with its errors translated; retried while transient when ``retry`` (idempotent steps only)."""
    return call_translated(
        lambda: translate_daytona_errors(what, sandbox_id=sandbox_id, starting=starting),
        fn,
        retry=retry,
        policy=policy,
        what=what,
    )
