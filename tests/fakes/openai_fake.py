"""A fake OpenAI-compatible chat-completions server for tests.

It runs uvicorn + starlette on ``127.0.0.1`` on a free port, in a background thread::

    with FakeOpenAIServer(lambda messages: "hi " + messages[-1]["content"]) as srv:
        lm = OpenAICompatibleLM(base_url=srv.base_url, model="m")
        ...
        srv.requests      # every request received, in arrival order
        srv.max_in_flight # peak number of requests being handled at once

``POST /v1/chat/completions`` (and ``/chat/completions``) answer with the text computed by the
reply function from the request's ``messages``. Fault knobs:

* :meth:`FakeOpenAIServer.fail_next` -- the next N requests get an HTTP error (503 by default).
* :meth:`FakeOpenAIServer.rate_limit_next` -- 429 with a ``Retry-After`` header.
* ``require_api_key`` / :attr:`FakeOpenAIServer.required_api_key` -- 401 on a wrong bearer key.
* :attr:`FakeOpenAIServer.delay_s` or ``Fault(delay_s=...)`` -- slow responses.
* :meth:`FakeOpenAIServer.malformed_next` -- a 200 whose body is not a valid completion.
* :attr:`FakeOpenAIServer.include_usage` -- omit ``usage`` like some llama.cpp builds.

Faults queue up and are consumed one per request, before the normal reply.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["FakeOpenAIServer", "Fault", "RecordedRequest", "echo_last_user"]

ReplyFn = Callable[[list[dict[str, Any]]], str]


def echo_last_user(messages: list[dict[str, Any]]) -> str:
    """Default reply function: ``"echo: <content of the last message>"``."""
    return f"echo: {messages[-1]['content']}" if messages else "echo: "


@dataclass
class Fault:
    """One scripted misbehaviour, consumed by one request.

    Attributes:
        status: HTTP status to return.
        body: raw response body; ``None`` means an OpenAI-style JSON error object.
        headers: extra response headers (e.g. ``{"Retry-After": "1"}``).
        delay_s: seconds to wait before answering.
        content_type: the ``Content-Type`` of the response.
    """

    status: int = 503
    body: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    content_type: str = "application/json"


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received by the fake server.

    Attributes:
        index: arrival order (0-based).
        path: URL path.
        headers: request headers (lower-cased names).
        body: the parsed JSON body (``None`` if it was not JSON).
        started: ``time.monotonic()`` when handling began.
    """

    index: int
    path: str
    headers: dict[str, str]
    body: Any
    started: float

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The ``messages`` of the request body (empty if absent)."""
        if isinstance(self.body, dict):
            msgs = self.body.get("messages")
            if isinstance(msgs, list):
                return msgs
        return []

    @property
    def model(self) -> str | None:
        """The ``model`` of the request body, if any."""
        if isinstance(self.body, dict):
            model = self.body.get("model")
            return model if isinstance(model, str) else None
        return None


@dataclass(frozen=True)
class _Knobs:
    reply: ReplyFn
    model: str | None
    required_api_key: str | None
    delay_s: float
    include_usage: bool


class FakeOpenAIServer:
    """A fake OpenAI-compatible server on 127.0.0.1 (see the module docstring).

    Args:
        reply: computes the assistant text from the request's messages. May be called from the
            server's event loop thread; it should be quick.
        model: the ``model`` reported in responses (``None``: echo the requested model).
        require_api_key: if set, requests without ``Authorization: Bearer <key>`` get a 401.
        delay_s: delay applied to every successful reply.
        include_usage: whether successful replies carry a ``usage`` object.
    """

    def __init__(
        self,
        reply: ReplyFn = echo_last_user,
        *,
        model: str | None = None,
        require_api_key: str | None = None,
        delay_s: float = 0.0,
        include_usage: bool = True,
    ) -> None:
        self.reply = reply
        self.model = model
        self.required_api_key = require_api_key
        self.delay_s = delay_s
        self.include_usage = include_usage
        self._initial = _Knobs(reply, model, require_api_key, delay_s, include_usage)
        self._lock = threading.Lock()
        self._faults: deque[Fault] = deque()
        self._requests: list[RecordedRequest] = []
        self._statuses: dict[int, int] = {}
        self._in_flight = 0
        self._max_in_flight = 0
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The API root to give a client, e.g. ``http://127.0.0.1:43125/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAIServer:
        """Bind a free port and serve in a background thread; returns once accepting."""
        if self._thread is not None:
            raise RuntimeError("already started")
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._handle, methods=["POST"]),
                Route("/chat/completions", self._handle, methods=["POST"]),
            ]
        )
        config = uvicorn.Config(
            app,
            log_level="critical",
            access_log=False,
            lifespan="off",
            loop="asyncio",
            http="h11",
            ws="none",
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP proto: asyncio sets NODELAY
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", 0))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fake-openai", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise RuntimeError("fake OpenAI server failed to start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Stop serving (in-flight slow requests are cut short) and join the thread."""
        self._stopping.set()
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout=5)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- fault knobs -------------------------------------------------------------------------

    def add_fault(self, fault: Fault, times: int = 1) -> None:
        """Queue ``fault`` for the next ``times`` requests (after already-queued faults)."""
        with self._lock:
            self._faults.extend(Fault(**vars(fault)) for _ in range(times))

    def fail_next(self, status: int = 503, times: int = 1, **kwargs: Any) -> None:
        """The next ``times`` requests get HTTP ``status`` with an OpenAI-style error body."""
        self.add_fault(Fault(status=status, **kwargs), times)

    def rate_limit_next(self, retry_after: str | float = "1", times: int = 1) -> None:
        """The next ``times`` requests get 429 with ``Retry-After: <retry_after>``."""
        self.add_fault(Fault(status=429, headers={"Retry-After": str(retry_after)}), times)

    def malformed_next(self, body: str = "this is not json {", times: int = 1, status: int = 200) -> None:
        """The next ``times`` requests get a 200 (by default) with ``body`` as the raw body."""
        self.add_fault(Fault(status=status, body=body), times)

    def slow_next(self, delay_s: float, times: int = 1) -> None:
        """The next ``times`` requests are answered normally, but only after ``delay_s``."""
        self.add_fault(Fault(status=200, delay_s=delay_s), times)

    # -- observations ------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of all requests received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def statuses(self) -> list[int]:
        """Status codes returned so far, in request arrival order (skipping unanswered ones)."""
        with self._lock:
            return [self._statuses[i] for i in sorted(self._statuses)]

    @property
    def max_in_flight(self) -> int:
        """Peak number of requests handled concurrently."""
        with self._lock:
            return self._max_in_flight

    @property
    def in_flight(self) -> int:
        """Number of requests being handled right now."""
        with self._lock:
            return self._in_flight

    def reset(self, *, knobs: bool = True, timeout_s: float = 5.0) -> None:
        """Forget recorded requests, statuses, peak concurrency and queued faults.

        Waits (up to ``timeout_s``) for requests still being handled to finish first, so that
        nothing from before the reset is recorded after it. With ``knobs=True`` the reply
        function, model, API-key requirement, delay and usage flag go back to the values given
        to the constructor, so one server can be shared by many tests.
        """
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.005)
        with self._lock:
            self._requests.clear()
            self._statuses.clear()
            self._faults.clear()
            self._max_in_flight = self._in_flight
            self._ids = itertools.count()
        if knobs:
            self.reply = self._initial.reply
            self.model = self._initial.model
            self.required_api_key = self._initial.required_api_key
            self.delay_s = self._initial.delay_s
            self.include_usage = self._initial.include_usage

    # -- handler -----------------------------------------------------------------------------

    async def _pause(self, seconds: float, request: Request) -> bool:
        """Sleep up to ``seconds``; return False early if the client left or we are stopping."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self._stopping.is_set() or await request.is_disconnected():
                return False
            await asyncio.sleep(min(0.02, left))
        return True

    async def _handle(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        with self._lock:
            index = next(self._ids)
            self._requests.append(
                RecordedRequest(
                    index=index,
                    path=request.url.path,
                    headers={k.lower(): v for k, v in request.headers.items()},
                    body=body,
                    started=time.monotonic(),
                )
            )
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            fault = self._faults.popleft() if self._faults else None
        try:
            response = await self._respond(request, body, fault, index)
            with self._lock:
                self._statuses[index] = response.status_code
            return response
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _respond(self, request: Request, body: Any, fault: Fault | None, index: int) -> Response:
        if self.required_api_key is not None:
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {self.required_api_key}":
                return _error(401, "Incorrect API key provided.", "invalid_api_key")
        if fault is not None and (fault.status != 200 or fault.body is not None):
            if fault.delay_s and not await self._pause(fault.delay_s, request):
                return _error(499, "client went away", "cancelled")
            if fault.body is not None:
                return Response(
                    fault.body,
                    status_code=fault.status,
                    headers=fault.headers,
                    media_type=fault.content_type,
                )
            return JSONResponse(
                _error_body(f"injected HTTP {fault.status}", "injected_fault"),
                status_code=fault.status,
                headers=fault.headers,
            )
        delay = self.delay_s + (fault.delay_s if fault is not None else 0.0)
        if delay and not await self._pause(delay, request):
            return _error(499, "client went away", "cancelled")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "body must be a JSON object with a 'messages' list", "bad_request")
        messages: list[dict[str, Any]] = body["messages"]
        text = self.reply(messages)
        requested_model = body.get("model")
        payload: dict[str, Any] = {
            "id": f"chatcmpl-fake-{index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model or requested_model or "fake-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
        }
        if self.include_usage:
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
            completion_tokens = len(text.split())
            payload["usage"] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
        return JSONResponse(payload)


def _error_body(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": code, "param": None, "code": code}}


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(_error_body(message, code), status_code=status)
