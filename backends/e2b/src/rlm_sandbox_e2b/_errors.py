"""SDK errors into the rlm_sandbox tree, at the boundary (one context manager), and the one retry.

What the ``e2b`` SDK raises (checked against e2b 2.63; see ``backends/e2b/NOTES.md``):

=================================================  ==========================================
SDK                                                rlm_sandbox
=================================================  ==========================================
``AuthenticationException`` (401, no API key)      ``AuthenticationError`` (never retried)
``RateLimitException`` (429) about a quota          ``QuotaExceeded`` (the concurrent-sandbox cap)
``RateLimitException`` (429), otherwise             ``TransientSandboxError``
``ServiceBusyException`` (503)                      ``TransientSandboxError``
``SandboxException`` with a 5xx status              ``TransientSandboxError``
``SandboxUnreachableException`` (envd unreachable)  ``TransientSandboxError``
``httpx.TransportError`` (refused, reset)           ``TransientSandboxError``
``SandboxNotRunningException`` (proxy: not found)   ``SandboxNotFound``
``SandboxNotFoundException`` (404 on a sandbox)     ``SandboxNotFound``
``FileNotFoundException``                           ``SandboxFileNotFound``
``NotEnoughSpaceException`` (507)                   ``QuotaExceeded``
``InvalidArgumentException``, 400, 422              ``ConfigError``
``httpx.TimeoutException``, ``TimeoutException``    ``SandboxTimeout``
anything else                                       ``SandboxStartError`` while starting, else
                                                    ``SandboxError``
=================================================  ==========================================

The SDK itself already retries 429/502/503/504 answers of the control plane (honouring
``Retry-After``, ``retries`` times) and failed connects; what is still transient after that goes
through :func:`rlm_sandbox._retry.retry_transient`, and only for idempotent steps.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import TypeVar

from rlm_sandbox._errors import (
    AuthenticationError,
    ConfigError,
    QuotaExceeded,
    SandboxError,
    SandboxFileNotFound,
    SandboxNotFound,
    SandboxStartError,
    SandboxTimeout,
    TransientSandboxError,
)
from rlm_sandbox._retry import RetryPolicy, call_translated

__all__ = ["call", "translate_e2b_errors"]

T = TypeVar("T")

#: A 429 or 403 whose message says a plan limit was hit is not worth retrying.
_QUOTA = re.compile(r"maximum number of|concurrent|quota|billing|credits|blocked", re.IGNORECASE)


@contextlib.contextmanager
def translate_e2b_errors(what: str, *, sandbox_id: str | None = None, starting: bool = False) -> Iterator[None]:
    """Map ``e2b`` / ``httpx`` exceptions raised inside the block into the rlm_sandbox tree.

    ``what`` says what was being done (it starts the message). ``sandbox_id`` is the sandbox the
    call was about (a 404 then means it is gone); ``starting`` makes unclassified failures a
    ``SandboxStartError``.
    """
    import httpx
    from e2b import exceptions as ex

    where = f" {sandbox_id}" if sandbox_id else ""
    try:
        yield
    except SandboxError:
        raise
    except ex.AuthenticationException as exc:
        raise AuthenticationError(
            f"{what}: E2B refused the credentials ({exc}). Set E2B_API_KEY or pass api_key=."
        ) from exc
    except ex.RateLimitException as exc:
        if _QUOTA.search(str(exc)):
            raise QuotaExceeded(f"{what}: an E2B plan limit was hit ({exc})") from exc
        raise TransientSandboxError(f"{what}: E2B is rate limiting ({exc})") from exc
    except ex.ServiceBusyException as exc:
        raise TransientSandboxError(f"{what}: E2B is busy ({exc})") from exc
    except ex.NotEnoughSpaceException as exc:
        raise QuotaExceeded(f"{what}: the E2B sandbox{where} is out of disk space ({exc})") from exc
    except (ex.SandboxNotRunningException, ex.SandboxNotFoundException) as exc:
        raise SandboxNotFound(
            f"{what}: the E2B sandbox{where} no longer exists: it was killed, reached the end of its "
            f"lifetime, or was reaped ({exc}). Open a new sandbox."
        ) from exc
    except ex.SandboxUnreachableException as exc:
        raise TransientSandboxError(f"{what}: the E2B sandbox{where} cannot be reached ({exc})") from exc
    except ex.FileNotFoundException as exc:
        raise SandboxFileNotFound(f"{what}: {exc}") from exc
    except ex.InvalidArgumentException as exc:
        raise ConfigError(f"{what}: {exc}") from exc
    except ex.TimeoutException as exc:
        raise SandboxTimeout(f"{what}: {exc}") from exc
    except ex.SandboxException as exc:
        status = exc.status_code or 0
        if status >= 500:
            raise TransientSandboxError(f"{what}: E2B answered {exc}") from exc
        if status == 403:
            if _QUOTA.search(str(exc)):
                raise QuotaExceeded(f"{what}: an E2B plan limit was hit ({exc})") from exc
            raise AuthenticationError(f"{what}: E2B refused the request ({exc})") from exc
        if status == 404 and sandbox_id:
            raise SandboxNotFound(f"{what}: the E2B sandbox{where} no longer exists ({exc})") from exc
        if status in (400, 422):
            raise ConfigError(f"{what}: E2B rejected the request ({exc})") from exc
        raise (SandboxStartError if starting else SandboxError)(f"{what}: {exc}") from exc
    except httpx.TimeoutException as exc:
        raise SandboxTimeout(f"{what}: E2B did not answer in time ({exc or type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        raise TransientSandboxError(f"{what}: cannot reach E2B ({exc})") from exc
    except Exception as exc:
        raise (SandboxStartError if starting else SandboxError)(f"{what}: {type(exc).__name__}: {exc}") from exc


def call(
    what: str,
    fn: Callable[[], T],
    *,
    retry: bool,
    sandbox_id: str | None = None,
    starting: bool = False,
    policy: RetryPolicy | None = None,
) -> T:
    """``fn()`` with its SDK errors translated; retried while transient when ``retry`` (idempotent)."""
    return call_translated(
        lambda: translate_e2b_errors(what, sandbox_id=sandbox_id, starting=starting),
        fn,
        retry=retry,
        policy=policy,
        what=what,
    )
