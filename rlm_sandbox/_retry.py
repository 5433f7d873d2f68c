"""Retries, in one place: only ``TransientSandboxError``, bounded in attempts and in time.

Backends wrap idempotent service calls (create with an idempotency key, get, list, delete, file
reads and writes) in :func:`retry_transient`; they translate SDK errors into the project's tree
first, so that authentication and quota errors (not transient) fail at once.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import tenacity

from ._errors import TransientSandboxError

__all__ = ["RetryPolicy", "call_translated", "retry_transient", "testing_retries"]

T = TypeVar("T")


class RetryPolicy:
    """How transient failures are retried."""

    def __init__(
        self, attempts: int = 5, max_time_s: float = 60.0, initial_s: float = 0.5, max_wait_s: float = 10.0
    ) -> None:
        self.attempts = attempts
        self.max_time_s = max_time_s
        self.initial_s = initial_s
        self.max_wait_s = max_wait_s


DEFAULT_POLICY = RetryPolicy()
_state = threading.local()
_no_wait = False


def _wait(policy: RetryPolicy) -> Callable[[tenacity.RetryCallState], float]:
    backoff = tenacity.wait_exponential_jitter(initial=policy.initial_s, max=policy.max_wait_s)

    def wait(state: tenacity.RetryCallState) -> float:
        if _no_wait:
            return 0.0
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, TransientSandboxError) and exc.retry_after is not None:
            return min(max(exc.retry_after, 0.0), policy.max_wait_s)
        return float(backoff(state))

    return wait


def retry_transient(fn: Callable[[], T], *, policy: RetryPolicy | None = None, what: str = "") -> T:
    """Call ``fn``, retrying it while it raises ``TransientSandboxError`` (429 honours Retry-After)."""
    p = policy or DEFAULT_POLICY
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TransientSandboxError),
        stop=tenacity.stop_after_attempt(p.attempts) | tenacity.stop_after_delay(p.max_time_s),
        wait=_wait(p),
        reraise=True,
    )
    return retrying(fn)


def call_translated(
    translate: Callable[[], contextlib.AbstractContextManager[None]],
    fn: Callable[[], T],
    *,
    retry: bool,
    policy: RetryPolicy | None = None,
    what: str = "",
) -> T:
    """``fn()`` inside a backend's error translation (SDK errors become the project's tree), retried
    while transient when ``retry`` is set — which a backend does for idempotent steps only."""

    def attempt() -> T:
        with translate():
            return fn()

    return retry_transient(attempt, policy=policy, what=what) if retry else attempt()


@contextlib.contextmanager
def testing_retries() -> Iterator[None]:
    """Within this block, retries do not wait (for tests)."""
    global _no_wait
    saved, _no_wait = _no_wait, True
    try:
        yield
    finally:
        _no_wait = saved
