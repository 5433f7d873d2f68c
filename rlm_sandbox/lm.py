"""Language-model clients used by the RLM driver.

Everything here is synchronous and thread-safe: the driver calls :meth:`LM.complete` from many
threads at once (one per concurrent sub-call).

* :class:`LM` is the small interface the rest of the package depends on.
* :class:`OpenAICompatibleLM` speaks ``POST {base_url}/chat/completions`` over httpx. It works
  with OpenAI and with self-hosted OpenAI-compatible servers (vLLM, SGLang, llama.cpp): the only
  response field it requires is ``choices[0].message.content``; ``usage`` and ``model`` are
  optional. Concurrency is bounded by a semaphore shared by all threads, and only transient
  failures are retried (with tenacity), bounded both in attempts and in total time.
* :class:`ScriptedLM` replays canned replies (a list, or a function of the messages) and records
  every call, for tests and offline demos.

Errors all derive from :class:`LMError`, defined here in one place so that they can later be
re-parented under the project's error tree without touching callers.
"""

from __future__ import annotations

import copy
import email.utils
import logging
import math
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx
import tenacity

__all__ = [
    "DEFAULT_BASE_URL",
    "LM",
    "LMAuthError",
    "LMError",
    "LMResponse",
    "LMResponseError",
    "LMTransientError",
    "Messages",
    "OpenAICompatibleLM",
    "ScriptedCall",
    "ScriptedLM",
    "parse_retry_after",
]

_log = logging.getLogger(__name__)

#: Chat messages in the OpenAI format: ``[{"role": "user", "content": "..."}, ...]``.
Messages = list[dict[str, str]]

#: Base URL used when neither the ``base_url`` argument nor ``OPENAI_BASE_URL`` is set.
DEFAULT_BASE_URL = "https://api.openai.com/v1"

#: HTTP statuses that are retried (with backoff, or after ``Retry-After`` for 429).
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

#: Transport failures that are retried: the request never reached the model, or the connection
#: died before a response arrived (stale keep-alive connections closed by the server show up as
#: ``RemoteProtocolError``/``ReadError``), or the response did not arrive within the read timeout.
_RETRY_TRANSPORT_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadTimeout,
    httpx.ReadError,
    httpx.RemoteProtocolError,
)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class LMError(Exception):
    """Base class of every error raised by an :class:`LM`.

    Attributes:
        status_code: the HTTP status of the failing response, if there was one.
    """

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class LMTransientError(LMError):
    """A failure that may succeed on retry: connection errors, timeouts, 429 and 5xx.

    :class:`OpenAICompatibleLM` retries these itself; one escapes only once the retry budget
    (attempts or total time) is spent.

    Attributes:
        retry_after: the delay the server asked for (``Retry-After``), in seconds, if any.
        attempts: how many attempts were made before giving up (set on the error that escapes).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.retry_after = retry_after
        self.attempts = attempts


class LMAuthError(LMError):
    """The server rejected the credentials (HTTP 401 or 403). Never retried."""


class LMResponseError(LMError):
    """The request was rejected (e.g. HTTP 400/404/422) or the response was unusable
    (not JSON, no ``choices[0].message.content``). Never retried."""


# --------------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMResponse:
    """One completed chat completion.

    Attributes:
        text: the assistant message content.
        model: the model that answered (as reported by the server, else as requested).
        prompt_tokens: input tokens, or ``None`` if the server reported no usage.
        completion_tokens: output tokens, or ``None`` if the server reported no usage.
        duration_s: wall time of the call in seconds, including retries and backoff but not
            the time spent waiting for a concurrency slot.
    """

    text: str
    model: str
    prompt_tokens: int | None
    completion_tokens: int | None
    duration_s: float


class LM(ABC):
    """A chat language model. Implementations must be safe to call from many threads."""

    @abstractmethod
    def complete(self, messages: Messages, *, model: str | None = None) -> LMResponse:
        """Return the assistant's reply to ``messages``.

        Args:
            messages: OpenAI-style chat messages (``role``/``content`` dicts).
            model: overrides the client's default model for this call.

        Raises:
            LMError: (a subclass of) when no reply could be obtained.
        """

    def close(self) -> None:
        """Release resources (connections). Idempotent. The default does nothing."""
        return

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP client
# --------------------------------------------------------------------------------------------


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def parse_retry_after(headers: httpx.Headers, *, now: float | None = None) -> float | None:
    """Return the delay in seconds requested by a response's headers, or ``None``.

    Understands ``retry-after-ms`` (sent by OpenAI), ``Retry-After`` as (possibly fractional)
    seconds, and ``Retry-After`` as an HTTP date. Negative delays become 0.
    """
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            ms = float(raw_ms)
        except ValueError:
            pass
        else:
            if math.isfinite(ms):
                return max(0.0, ms / 1000.0)
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _error_detail(response: httpx.Response) -> str:
    """A short human-readable reason extracted from an error response body."""
    try:
        data = response.json()
    except ValueError:
        text = response.text.strip()
        return text[:300] if text else response.reason_phrase
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail")
            if msg:
                return str(msg)[:300]
        elif isinstance(err, str) and err:
            return err[:300]
        detail = data.get("detail") or data.get("message")
        if detail:
            return str(detail)[:300]
    return str(data)[:300]


def _as_token_count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


class OpenAICompatibleLM(LM):
    """A client for ``POST {base_url}/chat/completions`` (OpenAI, vLLM, SGLang, llama.cpp, ...).

    Args:
        base_url: API root including the version prefix, e.g. ``http://127.0.0.1:8000/v1``.
            Defaults to ``$OPENAI_BASE_URL``, then ``https://api.openai.com/v1``.
        model: default model name. Defaults to ``$RLM_SANDBOX_MODEL``. Can be overridden per call.
        api_key: sent as ``Authorization: Bearer ...``. Defaults to ``$OPENAI_API_KEY``; when
            there is none, no ``Authorization`` header is sent (fine for local servers).
        max_concurrency: at most this many calls are in progress at once, across all threads.
            A call holds its slot for its whole duration, including retry backoff, so a failing
            server sees no more than this many callers.
        timeout_s: per-attempt timeout: connecting, and waiting for each chunk of the response
            (for a non-streaming completion this is essentially the generation time).
        max_retries: retries after the first attempt (so at most ``max_retries + 1`` attempts).
        max_retry_time_s: no new attempt is started (and no backoff is slept) once this many
            seconds have passed since the first attempt began; with the per-attempt timeout
            this bounds a call to about ``max_retry_time_s + timeout_s``.
        backoff_initial_s: first backoff delay; it doubles per retry, with random jitter.
        backoff_max_s: cap on one backoff delay. A server's ``Retry-After`` is honoured as given
            (not capped), but a delay that would cross ``max_retry_time_s`` ends the retries.
        extra_body: extra JSON fields merged into every request body (``temperature``,
            ``max_tokens``, ``seed``, vendor options, ...).
        headers: extra HTTP headers sent with every request.
        sleep: the function used to wait between attempts. Tests pass a no-op or a recorder to
            turn waits off.
        transport: an httpx transport to use instead of the network (for tests).
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        *,
        max_concurrency: int = 16,
        timeout_s: float = 600.0,
        max_retries: int = 5,
        max_retry_time_s: float = 300.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        extra_body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if max_retry_time_s < 0:
            raise ValueError("max_retry_time_s must be >= 0")
        self.base_url = (base_url or _env("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.model = model or _env("RLM_SANDBOX_MODEL")
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_retry_time_s = max_retry_time_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.extra_body: dict[str, Any] = dict(extra_body or {})
        self._sleep = sleep
        self._url = f"{self.base_url}/chat/completions"
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._backoff = tenacity.wait_exponential_jitter(
            initial=backoff_initial_s, max=backoff_max_s, jitter=backoff_initial_s
        )

        request_headers = {"Accept": "application/json", **dict(headers or {})}
        key = api_key if api_key is not None else _env("OPENAI_API_KEY")
        if key:
            request_headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(
            headers=request_headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
            transport=transport,
        )
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, "
            f"max_concurrency={self.max_concurrency})"
        )

    def close(self) -> None:
        """Close the underlying connection pool. Idempotent."""
        if not self._closed:
            self._closed = True
            self._client.close()

    def complete(self, messages: Messages, *, model: str | None = None) -> LMResponse:
        """Send one chat completion and return its reply, retrying transient failures.

        Raises:
            LMTransientError: the retry budget ran out on connection errors, timeouts, 429 or
                500/502/503/504 (``attempts`` says how many attempts were made).
            LMAuthError: HTTP 401/403 (immediately).
            LMResponseError: another 4xx/5xx, or a malformed body (immediately).
            LMError: no model configured, client closed, or another transport failure.
        """
        use_model = model or self.model
        if not use_model:
            raise LMError(
                "no model given: pass model=..., or set RLM_SANDBOX_MODEL, "
                "or construct OpenAICompatibleLM(model=...)"
            )
        if self._closed:
            raise LMError("the LM client is closed")
        body: dict[str, Any] = {**self.extra_body, "model": use_model, "messages": messages}

        with self._slots:
            start = time.monotonic()
            attempts = 0
            retrying = tenacity.Retrying(
                stop=(
                    tenacity.stop_after_attempt(self.max_retries + 1)
                    | tenacity.stop_before_delay(self.max_retry_time_s)
                ),
                wait=self._wait,
                retry=tenacity.retry_if_exception_type(LMTransientError),
                sleep=self._sleep,
                before_sleep=self._log_retry,
                reraise=True,
            )
            try:
                for attempt in retrying:
                    with attempt:
                        attempts += 1
                        text, served_model, usage = self._attempt(body)
            except LMTransientError as e:
                raise LMTransientError(
                    f"{e} (gave up after {attempts} attempt(s) in {time.monotonic() - start:.1f}s)",
                    status_code=e.status_code,
                    retry_after=e.retry_after,
                    attempts=attempts,
                ) from e
            duration = time.monotonic() - start

        return LMResponse(
            text=text,
            model=served_model or use_model,
            prompt_tokens=_as_token_count(usage.get("prompt_tokens")),
            completion_tokens=_as_token_count(usage.get("completion_tokens")),
            duration_s=duration,
        )

    # -- internals ---------------------------------------------------------------------------

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, LMTransientError) and exc.retry_after is not None:
            return exc.retry_after
        return float(self._backoff(state))

    @staticmethod
    def _log_retry(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        _log.warning("LM attempt %d failed (%s); retrying in %.2fs", state.attempt_number, exc, wait)

    def _attempt(self, body: dict[str, Any]) -> tuple[str, str | None, dict[str, Any]]:
        """One HTTP round trip. Returns (text, model reported by server, usage dict)."""
        try:
            response = self._client.post(self._url, json=body)
        except _RETRY_TRANSPORT_ERRORS as e:
            raise LMTransientError(f"{type(e).__name__} calling {self._url}: {e}") from e
        except httpx.HTTPError as e:
            raise LMError(f"{type(e).__name__} calling {self._url}: {e}") from e

        status = response.status_code
        if status in (401, 403):
            raise LMAuthError(
                f"HTTP {status} from {self._url}: {_error_detail(response)} "
                "(check the API key: api_key=... or $OPENAI_API_KEY)",
                status_code=status,
            )
        if status in _RETRY_STATUSES:
            raise LMTransientError(
                f"HTTP {status} from {self._url}: {_error_detail(response)}",
                status_code=status,
                retry_after=parse_retry_after(response.headers),
            )
        if status != 200:
            raise LMResponseError(
                f"HTTP {status} from {self._url}: {_error_detail(response)}", status_code=status
            )
        return self._parse(response)

    def _parse(self, response: httpx.Response) -> tuple[str, str | None, dict[str, Any]]:
        try:
            data = response.json()
        except ValueError as e:
            snippet = response.text[:200]
            raise LMResponseError(
                f"response from {self._url} is not JSON: {snippet!r}", status_code=200
            ) from e
        try:
            message = data["choices"][0]["message"]
            content = message["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise LMResponseError(
                f"response from {self._url} has no choices[0].message.content: {str(data)[:200]}",
                status_code=200,
            ) from e
        if not isinstance(content, str):
            choice = data["choices"][0]
            finish = choice.get("finish_reason") if isinstance(choice, dict) else None
            raise LMResponseError(
                f"response from {self._url} has no text content "
                f"(content={content!r}, finish_reason={finish!r})",
                status_code=200,
            )
        served = data.get("model")
        usage = data.get("usage")
        return (
            content,
            served if isinstance(served, str) and served else None,
            usage if isinstance(usage, dict) else {},
        )


# --------------------------------------------------------------------------------------------
# Scripted client for tests and offline demos
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScriptedCall:
    """One call recorded by :class:`ScriptedLM`.

    Attributes:
        index: 0-based order in which the call obtained its reply.
        messages: a deep copy of the messages passed.
        model: the ``model`` argument (or the scripted model name if none was given).
    """

    index: int
    messages: Messages
    model: str


#: What a :class:`ScriptedLM` replies with: a list of replies (an exception instance in the
#: list is raised instead of replied), or a function of the messages.
Script = Sequence[str | BaseException] | Callable[[Messages], str]


class ScriptedLM(LM):
    """An :class:`LM` that replays canned replies and records every call. Thread-safe.

    Args:
        script: either a sequence of replies, consumed in call order (an exception instance in
            the sequence is raised by the call that reaches it; running past the end raises
            :class:`LMError`), or a callable ``(messages) -> str`` invoked for every call
            (possibly concurrently; exceptions it raises propagate).
        model: the model name reported in responses when a call passes none.
    """

    def __init__(self, script: Script, *, model: str = "scripted") -> None:
        self._fn: Callable[[Messages], str] | None
        self._replies: list[str | BaseException]
        if callable(script):
            self._fn, self._replies = script, []
        else:
            self._fn, self._replies = None, list(script)
        self.model = model
        self._lock = threading.Lock()
        self._next = 0
        self._calls: list[ScriptedCall] = []

    @property
    def calls(self) -> list[ScriptedCall]:
        """A snapshot of the calls made so far, in the order they obtained their reply."""
        with self._lock:
            return list(self._calls)

    @property
    def remaining(self) -> int:
        """How many scripted replies are left (0 for a callable script)."""
        with self._lock:
            return len(self._replies) - self._next

    def complete(self, messages: Messages, *, model: str | None = None) -> LMResponse:
        """Return the next scripted reply (or the callable's result) and record the call."""
        start = time.monotonic()
        snapshot = copy.deepcopy(messages)
        use_model = model or self.model
        reply: str | BaseException
        with self._lock:
            index = len(self._calls)
            self._calls.append(ScriptedCall(index=index, messages=snapshot, model=use_model))
            if self._fn is None:
                if self._next >= len(self._replies):
                    raise LMError(
                        f"ScriptedLM ran out of replies (script had {len(self._replies)}, "
                        f"this is call #{index + 1})"
                    )
                reply = self._replies[self._next]
                self._next += 1
        if self._fn is not None:
            reply = self._fn(copy.deepcopy(messages))
        if isinstance(reply, BaseException):
            raise reply
        if not isinstance(reply, str):
            raise LMResponseError(f"ScriptedLM script produced {type(reply).__name__}, not str")
        return LMResponse(
            text=reply,
            model=use_model,
            prompt_tokens=None,
            completion_tokens=None,
            duration_s=time.monotonic() - start,
        )
