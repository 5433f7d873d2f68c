"""A protocol-faithful fake of the E2B control plane and of envd, on ``127.0.0.1``.

The real ``e2b`` SDK talks HTTP to it; nothing in the SDK is mocked::

    with E2BFake() as fake:
        sbx = Sandbox.create(metadata={"k": "v"}, **fake.sdk_opts())
        sbx.files.write("/tmp/a", b"x")
        sbx.commands.run("cat /tmp/a")
        fake.requests["POST /v2/sandboxes"]   # requests per route
        fake.live_sandboxes()                 # FakeSandbox records

``api_url`` and ``sandbox_url`` both point at one uvicorn server (a background thread, free port).
Envd requests are told apart by the ``E2b-Sandbox-Id`` header the SDK sends on every one.

Control plane (``X-API-KEY`` must equal :attr:`E2BFake.api_key`):

* ``POST /v2/sandboxes`` -> 201; records template, metadata, envVars, timeout and
  ``allow_internet_access``; the sandbox expires after ``timeout`` seconds like a real one.
* ``GET /v2/sandboxes?metadata=&state=&limit=&nextToken=`` (what ``Sandbox.list(query=...)`` calls),
  ``GET /sandboxes/{id}``, ``DELETE /sandboxes/{id}`` (204/404), ``POST /sandboxes/{id}/timeout``,
  ``POST /v2/sandboxes/{id}/connect``.

Envd (``X-Access-Token`` must equal the sandbox's ``envdAccessToken``):

* ``GET /health``; ``GET /files?path=``; ``POST /files`` multipart or octet-stream (gzip too).
  The ``filesystem.Filesystem`` RPCs (list, stat, make_dir, watch...) answer 501.
* Connect RPC ``/process.Process/{Start,Connect,List,SendInput,StreamInput,SendSignal,CloseStdin}``
  served by the SDK's own :class:`ProcessASGIApplication`.

Each sandbox is a host directory: sandbox path ``/x/y`` is ``<root>/x/y`` (relative paths are
under ``/home/user``). Processes are real subprocesses (``/bin/bash -l -c cmd`` as the SDK asks,
own process group, cwd mapped, env = sandbox envVars + request envs + ``PATH`` + mapped ``HOME``)
whose stdout/stderr are forwarded as they arrive, with envd's keep-alive events when the
``Keepalive-Ping-Interval`` header asks for them. There is no chroot: absolute paths *inside* a
command are host paths, and PTYs are not supported. Killing or expiring a sandbox kills its
processes and deletes its root. A sandbox that is gone answers envd requests with the proxy's
502 "sandbox ... was not found" and control-plane requests with 404.

Fault knobs live on :attr:`E2BFake.faults` (:class:`Faults`) plus :meth:`E2BFake.vanish`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import posixpath
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote

import uvicorn
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from e2b.envd.process import process_pb
from e2b.envd.process.process_connect import ProcessASGIApplication
from protobuf import Oneof
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, Router
from starlette.types import Message, Receive, Scope, Send

from tests.fakes import kill_tree

__all__ = ["E2BFake", "FakeProcess", "FakeSandbox", "Faults"]

T = TypeVar("T")

HOME = "/home/user"
_SIGNAL_WORDS: dict[int, str] = {
    signal.SIGKILL: "killed",
    signal.SIGTERM: "terminated",
    signal.SIGINT: "interrupt",
}


def _event(which: str, payload: Any) -> process_pb.ProcessEvent:
    """A ``ProcessEvent`` whose ``event`` oneof is ``which`` (start, data, end or keepalive)."""
    return process_pb.ProcessEvent(event=Oneof(which, payload))  # type: ignore[arg-type]


@dataclass
class Faults:
    """Fault injection knobs; tests set them directly on ``fake.faults``."""

    #: The next create answers 503 once (the SDK retries it by itself).
    create_503_once: bool = False
    #: The next create answers 429 with ``Retry-After: N`` once (the SDK waits N s and retries).
    create_429_retry_after: int | None = None
    #: Errors the next creates answer with, consumed one per create: a status (``500``) or a
    #: ``(status, message)`` pair (``(429, "... maximum number of concurrent E2B sandboxes ...")``).
    create_errors: list[int | tuple[int, str]] = field(default_factory=list)
    #: Seconds every create waits before answering.
    create_delay_s: float = 0.0
    #: Every control-plane request answers 401.
    return_401: bool = False
    #: A process output stream (Start/Connect) has its TCP connection cut after exactly this many
    #: bytes of response body (mid-message if need be); the process keeps running, as with a
    #: real network drop.
    drop_stream_after_bytes: int | None = None
    #: With ``drop_stream_after_bytes``: cut only the next stream that reaches the limit, then
    #: clear the knob (streams started afterwards, e.g. a relaunched process, are left alone).
    drop_stream_once: bool = False


@dataclass
class FakeProcess:
    """One real subprocess behind envd's process API."""

    popen: subprocess.Popen[bytes]
    config: process_pb.ProcessConfig
    tag: str | None
    stdin: asyncio.WriteTransport | None = None
    stdin_flow: _StdinFlow | None = None
    exit_code: int | None = None
    subscribers: list[asyncio.Queue[process_pb.ProcessEvent | None]] = field(default_factory=list)
    outputs: list[asyncio.BaseTransport] = field(default_factory=list)
    pidfd: int = -1
    open_outputs: int = 2
    ended: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def publish(self, event: process_pb.ProcessEvent | None) -> None:
        for queue in self.subscribers:
            queue.put_nowait(event)

    def on_output(self, stream: str, data: bytes) -> None:
        output = process_pb.ProcessEvent.DataEvent(output=Oneof(stream, data))  # type: ignore[arg-type]
        self.publish(_event("data", output))

    def on_output_eof(self) -> None:
        self.open_outputs -= 1
        self._maybe_end()

    def on_exit(self, returncode: int) -> None:
        self.exit_code = returncode
        self._maybe_end()

    def _maybe_end(self) -> None:
        if self.ended or self.open_outputs > 0 or self.exit_code is None:
            return
        self.ended = True
        code = self.exit_code
        if code < 0:
            word = _SIGNAL_WORDS.get(-code) or signal.strsignal(-code) or f"signal {-code}"
            end = process_pb.ProcessEvent.EndEvent(
                exit_code=-1, exited=False, status=f"signal: {word}", error=f"signal: {word}"
            )
        elif code:
            status = f"exit status {code}"
            end = process_pb.ProcessEvent.EndEvent(exit_code=code, exited=True, status=status, error=status)
        else:
            end = process_pb.ProcessEvent.EndEvent(exit_code=0, exited=True, status="exit status 0")
        self.publish(_event("end", end))

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        if sig == signal.SIGKILL:
            kill_tree(self.popen.pid)  # the whole tree, as a destroyed VM would
            return
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def reap(self) -> None:
        """Wait for the process (the pidfd said it exited, or it was SIGKILLed) and record it."""
        if self.pidfd >= 0:
            asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
            self.on_exit(self.popen.wait())

    def discard(self) -> None:
        """SIGKILL the process group, reap it and close its pipes (its sandbox is gone)."""
        self.publish(None)  # open streams break, like a VM that went away
        self.kill_group()
        self.reap()
        for transport in [*self.outputs, *([self.stdin] if self.stdin else [])]:
            if not transport.is_closing():
                transport.close()


@dataclass
class FakeSandbox:
    """What the fake knows about one sandbox."""

    sandbox_id: str
    template_id: str
    root: Path
    metadata: dict[str, str]
    env_vars: dict[str, str]
    timeout: int
    allow_internet_access: bool | None
    access_token: str
    started_at: datetime
    end_at: datetime
    processes: dict[int, FakeProcess] = field(default_factory=dict)
    alive: bool = True
    expiry: asyncio.TimerHandle | None = None

    def path(self, sandbox_path: str) -> Path:
        """The host path behind an absolute (or home-relative) sandbox path."""
        full = posixpath.normpath(posixpath.join(HOME, sandbox_path))
        return self.root / full.lstrip("/")


class _StdinFlow(asyncio.BaseProtocol):
    """Write-side protocol of a process's stdin pipe, with ``drain`` for back-pressure."""

    def __init__(self) -> None:
        self._paused = False
        self._waiters: list[asyncio.Future[None]] = []
        self.lost = False

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def drain(self) -> None:
        if self._paused and not self.lost:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter


class _OutputReader(asyncio.Protocol):
    def __init__(self, proc: FakeProcess, stream: str) -> None:
        self._proc = proc
        self._stream = stream

    def data_received(self, data: bytes) -> None:
        self._proc.on_output(self._stream, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._proc.on_output_eof()


class _StreamDropped(Exception):
    """Raised through the ASGI ``send`` to make uvicorn cut the connection."""


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status, headers=headers)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _selected(selector: process_pb.ProcessSelector | None) -> tuple[str, int | str]:
    if selector is None or selector.selector is None:
        raise ConnectError(Code.INVALID_ARGUMENT, "process selector is required")
    return selector.selector.field, selector.selector.value


async def _save_upload(target: Path, upload: UploadFile) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        while chunk := await upload.read(1 << 20):
            out.write(chunk)


def _written(path: str) -> dict[str, str]:
    return {"name": posixpath.basename(path), "type": "file", "path": path}


class _ProcessService:
    """envd's ``process.Process`` service over :class:`FakeSandbox` processes."""

    def __init__(self, fake: E2BFake) -> None:
        self._fake = fake

    # -- helpers -------------------------------------------------------------------------------

    def _sandbox(self, ctx: RequestContext[Any, Any]) -> FakeSandbox:
        sandbox = self._fake._sandboxes.get(ctx.request_headers.get("e2b-sandbox-id", ""))
        if sandbox is None or not sandbox.alive:  # the ASGI layer checked; raced with a kill
            raise ConnectError(Code.UNAVAILABLE, "The sandbox was not found")
        return sandbox

    def _process(self, ctx: RequestContext[Any, Any], selector: process_pb.ProcessSelector | None) -> FakeProcess:
        sandbox = self._sandbox(ctx)
        kind, value = _selected(selector)
        for proc in sandbox.processes.values():
            if not proc.ended and ((kind == "pid" and proc.pid == value) or (kind == "tag" and proc.tag == value)):
                return proc
        raise ConnectError(Code.NOT_FOUND, f"process with {kind} {value} not found")

    async def _events(
        self,
        proc: FakeProcess,
        queue: asyncio.Queue[process_pb.ProcessEvent | None],
        ctx: RequestContext[Any, Any],
    ) -> AsyncIterator[process_pb.ProcessEvent]:
        """The start event, then what ``queue`` (already subscribed to ``proc``) receives."""
        interval = float(ctx.request_headers.get("keepalive-ping-interval", "0") or 0)
        getter: asyncio.Future[process_pb.ProcessEvent | None] | None = None
        try:
            yield _event("start", process_pb.ProcessEvent.StartEvent(pid=proc.pid))
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter}, timeout=interval or None)
                if not done:
                    yield _event("keepalive", process_pb.ProcessEvent.KeepAlive())
                    continue
                event, getter = getter.result(), None
                if event is None:
                    raise ConnectError(
                        Code.UNAVAILABLE,
                        f"the connection to sandbox {ctx.request_headers.get('e2b-sandbox-id')} "
                        "ended before the stream completed",
                    )
                yield event
                if event.event is not None and event.event.field == "end":
                    return
        finally:
            if getter is not None:
                getter.cancel()
            if queue in proc.subscribers:
                proc.subscribers.remove(queue)

    async def _write(self, proc: FakeProcess, data: bytes) -> None:
        if proc.stdin is None or proc.stdin_flow is None:
            raise ConnectError(Code.FAILED_PRECONDITION, "stdin is not enabled for this process")
        if proc.stdin.is_closing() or proc.stdin_flow.lost:
            raise ConnectError(Code.FAILED_PRECONDITION, "stdin of the process is closed")
        proc.stdin.write(data)
        await proc.stdin_flow.drain()

    # -- RPCs ----------------------------------------------------------------------------------

    async def start(
        self, request: process_pb.StartRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[process_pb.StartResponse]:
        if request.has_field("pty"):
            raise ConnectError(Code.UNIMPLEMENTED, "the fake has no PTY support")
        sandbox = self._sandbox(ctx)
        config = request.process or process_pb.ProcessConfig()
        want_stdin = request.stdin if request.has_field("stdin") else True
        # Subscribed before the pipes are attached, so that no early output is missed.
        queue: asyncio.Queue[process_pb.ProcessEvent | None] = asyncio.Queue()
        tag = request.tag if request.has_field("tag") else None
        proc = await self._fake._spawn(sandbox, config, tag, want_stdin, queue)
        async for event in self._events(proc, queue, ctx):
            yield process_pb.StartResponse(event=event)

    async def connect(
        self, request: process_pb.ConnectRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[process_pb.ConnectResponse]:
        proc = self._process(ctx, request.process)
        queue: asyncio.Queue[process_pb.ProcessEvent | None] = asyncio.Queue()
        proc.subscribers.append(queue)
        async for event in self._events(proc, queue, ctx):
            yield process_pb.ConnectResponse(event=event)

    async def list(self, request: process_pb.ListRequest, ctx: RequestContext[Any, Any]) -> process_pb.ListResponse:
        sandbox = self._sandbox(ctx)
        return process_pb.ListResponse(
            processes=[
                process_pb.ProcessInfo(config=p.config, pid=p.pid, tag=p.tag)
                for p in sandbox.processes.values()
                if not p.ended
            ]
        )

    async def send_input(
        self, request: process_pb.SendInputRequest, ctx: RequestContext[Any, Any]
    ) -> process_pb.SendInputResponse:
        proc = self._process(ctx, request.process)
        if request.input is not None and request.input.input is not None:
            if request.input.input.field != "stdin":
                raise ConnectError(Code.UNIMPLEMENTED, "the fake has no PTY support")
            await self._write(proc, request.input.input.value)
        return process_pb.SendInputResponse()

    async def stream_input(
        self, requests: AsyncIterator[process_pb.StreamInputRequest], ctx: RequestContext[Any, Any]
    ) -> process_pb.StreamInputResponse:
        proc: FakeProcess | None = None
        async for message in requests:
            if message.event is None:
                continue
            if message.event.field == "start":
                proc = self._process(ctx, message.event.value.process)
            elif message.event.field == "data":
                if proc is None:
                    raise ConnectError(Code.FAILED_PRECONDITION, "data before the start event")
                chunk = message.event.value.input
                if chunk is not None and chunk.input is not None:
                    await self._write(proc, chunk.input.value)
        return process_pb.StreamInputResponse()

    async def send_signal(
        self, request: process_pb.SendSignalRequest, ctx: RequestContext[Any, Any]
    ) -> process_pb.SendSignalResponse:
        proc = self._process(ctx, request.process)
        sig = signal.SIGKILL if request.signal == process_pb.Signal.SIGKILL else signal.SIGTERM
        proc.kill_group(sig)
        return process_pb.SendSignalResponse()

    async def close_stdin(
        self, request: process_pb.CloseStdinRequest, ctx: RequestContext[Any, Any]
    ) -> process_pb.CloseStdinResponse:
        proc = self._process(ctx, request.process)
        if proc.stdin is not None:
            proc.stdin.close()  # flushes what is buffered first
        return process_pb.CloseStdinResponse()

    async def update(
        self, request: process_pb.UpdateRequest, ctx: RequestContext[Any, Any]
    ) -> process_pb.UpdateResponse:
        raise ConnectError(Code.UNIMPLEMENTED, "the fake has no PTY support")


class E2BFake:
    """The fake server. Use as a context manager, or call :meth:`stop` yourself."""

    def __init__(self, *, api_key: str = "e2b_fake_key", envd_version: str = "0.5.7") -> None:
        self.api_key = api_key
        self.envd_version = envd_version
        self.faults = Faults()
        #: Requests received, keyed ``"METHOD /route"`` (e.g. ``"DELETE /sandboxes/{id}"``).
        self.requests: Counter[str] = Counter()
        #: Every create request body, in arrival order.
        self.create_bodies: list[dict[str, Any]] = []
        #: The ``Idempotency-Key`` header of every create request (``None`` when absent), in
        #: arrival order, answered or refused.
        self.create_keys: list[str | None] = []
        #: ``POST /files`` uploads by body kind: ``"multipart"`` or ``"octet-stream"``.
        self.upload_kinds: Counter[str] = Counter()
        self._sandboxes: dict[str, FakeSandbox] = {}
        self._ids = itertools.count(1)
        self._workdir = Path(tempfile.mkdtemp(prefix="e2b-fake-"))
        self._rpc = ProcessASGIApplication(_ProcessService(self))  # type: ignore[arg-type]
        self._router = Router(
            routes=[
                Route("/v2/sandboxes", self._create, methods=["POST"]),
                Route("/v2/sandboxes", self._list, methods=["GET"]),
                Route("/v2/sandboxes/{sandbox_id}/connect", self._connect, methods=["POST"]),
                Route("/sandboxes/{sandbox_id}", self._detail, methods=["GET"]),
                Route("/sandboxes/{sandbox_id}", self._kill, methods=["DELETE"]),
                Route("/sandboxes/{sandbox_id}/timeout", self._set_timeout, methods=["POST"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/files", self._read_file, methods=["GET"]),
                Route("/files", self._write_files, methods=["POST"]),
            ]
        )
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self._sock = sock
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(
            self._asgi,
            interface="asgi3",
            loop="asyncio",
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="e2b-fake", daemon=True)
        self._thread.start()
        self._loop_ready.wait()
        self._stopped = False

    # -- lifecycle -----------------------------------------------------------------------------

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._loop_ready.set()
            await self._server.serve(sockets=[self._sock])

        asyncio.run(main())

    def _in_loop(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the server's event loop thread and return its result."""

        async def call() -> T:
            return fn()

        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()

    def stop(self) -> None:
        """Kill every sandbox, stop the server and join its thread. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self._in_loop(self._kill_all)
            self._server.should_exit = True
            self._thread.join()
        self._sock.close()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> E2BFake:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def sdk_opts(self) -> dict[str, Any]:
        """Keyword arguments that point ``Sandbox.create`` / ``Sandbox.list`` at this fake."""
        return {"api_key": self.api_key, "api_url": self.url, "sandbox_url": self.url}

    # -- inspection and faults -----------------------------------------------------------------

    def live_sandboxes(self) -> list[FakeSandbox]:
        """The sandboxes that are still alive, in creation order."""
        return [s for s in list(self._sandboxes.values()) if s.alive]

    def sandbox(self, sandbox_id: str) -> FakeSandbox:
        return self._sandboxes[sandbox_id]

    def vanish(self, sandbox_id: str) -> None:
        """The sandbox disappears as if its VM died: streams break, later calls 404/502."""
        sandbox = self._sandboxes[sandbox_id]
        self._in_loop(lambda: self._destroy(sandbox))

    # -- ASGI entry ----------------------------------------------------------------------------

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        self.requests[f"{method} {self._route_key(path)}"] += 1
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path.startswith(("/process.Process/", "/filesystem.Filesystem/", "/files", "/health")):
            refusal = self._refuse_envd(headers)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
            if path.startswith("/process.Process/"):
                if path in ("/process.Process/Start", "/process.Process/Connect"):
                    send = self._dropping(send)
                try:
                    await self._rpc(scope, receive, send)
                except _StreamDropped:
                    pass
                return
            if path.startswith("/filesystem.Filesystem/"):
                await _json_error(501, "the fake has no filesystem RPCs")(scope, receive, send)
                return
        elif self.faults.return_401 or headers.get("x-api-key") != self.api_key:
            await _json_error(401, "Invalid API key")(scope, receive, send)
            return
        await self._router(scope, receive, send)

    @staticmethod
    def _route_key(path: str) -> str:
        parts = path.split("/")
        if len(parts) > 2 and parts[1] == "sandboxes":
            parts[2] = "{id}"
        elif len(parts) > 3 and parts[1:3] == ["v2", "sandboxes"]:
            parts[3] = "{id}"
        return "/".join(parts)

    def _refuse_envd(self, headers: dict[str, str]) -> Response | None:
        sandbox = self._sandboxes.get(headers.get("e2b-sandbox-id", ""))
        if sandbox is None or not sandbox.alive:
            name = headers.get("e2b-sandbox-id", "")
            return _json_error(502, f"The sandbox {name} was not found")
        if headers.get("x-access-token") != sandbox.access_token:
            return _json_error(401, "unauthorized: invalid access token")
        return None

    def _dropping(self, send: Send) -> Send:
        sent = 0

        async def wrapped(message: Message) -> None:
            nonlocal sent
            limit = self.faults.drop_stream_after_bytes
            if limit is not None and message["type"] == "http.response.body":
                body: bytes = message.get("body", b"")
                if sent + len(body) > limit:
                    if self.faults.drop_stream_once:
                        self.faults.drop_stream_after_bytes = None
                        self.faults.drop_stream_once = False
                    if limit > sent:
                        await send({**message, "body": body[: limit - sent], "more_body": True})
                    sent = limit
                    raise _StreamDropped
                sent += len(body)
            await send(message)

        return wrapped

    # -- sandboxes -----------------------------------------------------------------------------

    def _body(self, sandbox: FakeSandbox) -> dict[str, Any]:
        return {
            "templateID": sandbox.template_id,
            "sandboxID": sandbox.sandbox_id,
            "clientID": "fakeclient",
            "envdVersion": self.envd_version,
            "envdAccessToken": sandbox.access_token,
        }

    def _listed(self, sandbox: FakeSandbox) -> dict[str, Any]:
        return {
            **self._body(sandbox),
            "alias": sandbox.template_id,
            "startedAt": _iso(sandbox.started_at),
            "endAt": _iso(sandbox.end_at),
            "cpuCount": 2,
            "memoryMB": 512,
            "diskSizeMB": 1024,
            "state": "running",
            "metadata": sandbox.metadata,
        }

    def _arm_expiry(self, sandbox: FakeSandbox, timeout: int) -> None:
        if sandbox.expiry is not None:
            sandbox.expiry.cancel()
        sandbox.timeout = timeout
        sandbox.end_at = datetime.now(UTC) + timedelta(seconds=timeout)
        loop = asyncio.get_running_loop()
        sandbox.expiry = loop.call_later(timeout, self._destroy, sandbox)

    def _live(self, request: Request) -> FakeSandbox | None:
        sandbox = self._sandboxes.get(request.path_params["sandbox_id"])
        return sandbox if sandbox is not None and sandbox.alive else None

    async def _create(self, request: Request) -> Response:
        body: dict[str, Any] = await request.json()  # before any delay, while the client waits
        self.create_keys.append(request.headers.get("idempotency-key"))
        faults = self.faults
        if faults.create_delay_s:
            await asyncio.sleep(faults.create_delay_s)
        if faults.create_503_once:
            faults.create_503_once = False
            return _json_error(503, "no capacity to place the sandbox")
        if faults.create_429_retry_after is not None:
            after, faults.create_429_retry_after = faults.create_429_retry_after, None
            return _json_error(429, "rate limit exceeded", {"Retry-After": str(after)})
        if faults.create_errors:
            error = faults.create_errors.pop(0)
            status, message = error if isinstance(error, tuple) else (error, f"injected error {error}")
            return _json_error(status, message)
        self.create_bodies.append(body)
        sandbox_id = f"fake{next(self._ids):04d}{secrets.token_hex(4)}"
        root = self._workdir / sandbox_id
        for sub in (HOME, "/tmp"):
            (root / sub.lstrip("/")).mkdir(parents=True)
        now = datetime.now(UTC)
        sandbox = FakeSandbox(
            sandbox_id=sandbox_id,
            template_id=str(body.get("templateID", "base")),
            root=root,
            metadata=dict(body.get("metadata") or {}),
            env_vars=dict(body.get("envVars") or {}),
            timeout=int(body.get("timeout", 15)),
            allow_internet_access=body.get("allow_internet_access"),
            access_token=secrets.token_hex(16),
            started_at=now,
            end_at=now,
        )
        self._arm_expiry(sandbox, sandbox.timeout)
        self._sandboxes[sandbox_id] = sandbox
        return JSONResponse(self._body(sandbox), status_code=201)

    async def _list(self, request: Request) -> Response:
        query = request.query_params
        wanted = {unquote(k): unquote(v) for k, v in parse_qsl(query.get("metadata", ""), keep_blank_values=True)}
        states = set(filter(None, query.get("state", "").split(",")))
        found = [
            s
            for s in self.live_sandboxes()
            if all(s.metadata.get(k) == v for k, v in wanted.items()) and (not states or "running" in states)
        ]
        start = int(query.get("nextToken") or 0)
        limit = int(query.get("limit") or 100)
        page = found[start : start + limit]
        headers = {"x-next-token": str(start + limit)} if start + limit < len(found) else {}
        return JSONResponse([self._listed(s) for s in page], headers=headers)

    async def _detail(self, request: Request) -> Response:
        sandbox = self._live(request)
        if sandbox is None:
            return _json_error(404, "sandbox not found")
        return JSONResponse({**self._listed(sandbox), "allowInternetAccess": sandbox.allow_internet_access})

    async def _connect(self, request: Request) -> Response:
        sandbox = self._live(request)
        if sandbox is None:
            return _json_error(404, "sandbox not found")
        body: dict[str, Any] = await request.json()
        if "timeout" in body:
            self._arm_expiry(sandbox, max(int(body["timeout"]), sandbox.timeout))
        return JSONResponse(self._body(sandbox), status_code=200)

    async def _kill(self, request: Request) -> Response:
        sandbox = self._live(request)
        if sandbox is None:
            return _json_error(404, "sandbox not found")
        self._destroy(sandbox)
        return Response(status_code=204)

    async def _set_timeout(self, request: Request) -> Response:
        sandbox = self._live(request)
        if sandbox is None:
            return _json_error(404, "sandbox not found")
        body: dict[str, Any] = await request.json()
        self._arm_expiry(sandbox, int(body["timeout"]))
        return Response(status_code=204)

    def _destroy(self, sandbox: FakeSandbox) -> None:
        if not sandbox.alive:
            return
        sandbox.alive = False
        if sandbox.expiry is not None:
            sandbox.expiry.cancel()
        for proc in sandbox.processes.values():
            proc.discard()
        shutil.rmtree(sandbox.root, ignore_errors=True)

    def _kill_all(self) -> None:
        for sandbox in list(self._sandboxes.values()):
            self._destroy(sandbox)

    # -- envd HTTP API (the ASGI layer has checked the sandbox and its token) ------------------

    async def _health(self, request: Request) -> Response:
        return Response(status_code=204)

    async def _read_file(self, request: Request) -> Response:
        sandbox = self._sandboxes[request.headers["e2b-sandbox-id"]]
        path = request.query_params.get("path", "")
        target = sandbox.path(path)
        if not target.exists():
            return _json_error(404, f"path '{path}' does not exist")
        if target.is_dir():
            return _json_error(400, f"path '{path}' is a directory")
        return FileResponse(target, media_type="application/octet-stream")

    async def _write_files(self, request: Request) -> Response:
        sandbox = self._sandboxes[request.headers["e2b-sandbox-id"]]
        query_path = request.query_params.get("path")
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/octet-stream"):
            self.upload_kinds["octet-stream"] += 1
            if not query_path:
                return _json_error(400, "path is required for an octet-stream upload")
            target = sandbox.path(query_path)
            target.parent.mkdir(parents=True, exist_ok=True)
            gzipped = request.headers.get("content-encoding") == "gzip"
            gunzip = zlib.decompressobj(wbits=31)
            with target.open("wb") as out:
                async for chunk in request.stream():
                    out.write(gunzip.decompress(chunk) if gzipped else chunk)
                out.write(gunzip.flush() if gzipped else b"")
            return JSONResponse([_written(query_path)])
        if not content_type.startswith("multipart/form-data"):
            return _json_error(400, f"unsupported content type {content_type!r}")
        self.upload_kinds["multipart"] += 1
        written = []
        async with request.form(max_files=10_000) as form:
            uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if query_path and len(uploads) > 1:
                return _json_error(400, "path is only allowed with a single file")
            for upload in uploads:
                path = query_path or upload.filename or ""
                if not path:
                    return _json_error(400, "every file needs a path")
                await _save_upload(sandbox.path(path), upload)
                written.append(_written(path))
        return JSONResponse(written)

    # -- processes -----------------------------------------------------------------------------

    async def _spawn(
        self,
        sandbox: FakeSandbox,
        config: process_pb.ProcessConfig,
        tag: str | None,
        want_stdin: bool,
        subscriber: asyncio.Queue[process_pb.ProcessEvent | None],
    ) -> FakeProcess:
        cwd = sandbox.path(config.cwd if config.has_field("cwd") and config.cwd else HOME)
        if not cwd.is_dir():
            raise ConnectError(Code.INVALID_ARGUMENT, f"cwd '{config.cwd}' does not exist")
        env = {
            **sandbox.env_vars,
            **dict(config.envs),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(sandbox.path(HOME)),
        }
        try:
            popen = subprocess.Popen(
                [config.cmd, *config.args],
                cwd=cwd,
                env=env,
                stdin=subprocess.PIPE if want_stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, f"error starting process: {exc}") from exc
        proc = FakeProcess(popen=popen, config=config, tag=tag, subscribers=[subscriber])
        sandbox.processes[popen.pid] = proc
        loop = asyncio.get_running_loop()
        assert popen.stdout is not None and popen.stderr is not None
        for stream, pipe in (("stdout", popen.stdout), ("stderr", popen.stderr)):
            reader, _ = await loop.connect_read_pipe(functools.partial(_OutputReader, proc, stream), pipe)
            proc.outputs.append(reader)
        if popen.stdin is not None:
            proc.stdin, proc.stdin_flow = await loop.connect_write_pipe(_StdinFlow, popen.stdin)
        proc.pidfd = os.pidfd_open(popen.pid)
        loop.add_reader(proc.pidfd, proc.reap)
        return proc


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.fakes.e2b_fake``: serve the fake on 127.0.0.1 until Ctrl-C (or SIGTERM)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.fakes.e2b_fake", description=main.__doc__)
    parser.add_argument("--api-key", default="test", help="the API key the fake accepts (default: test)")
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    with E2BFake(api_key=args.api_key) as fake:
        print(fake.url, flush=True)
        print(
            f"  rlm-sandbox exec --backend e2b -o api_url={fake.url} -o sandbox_url={fake.url} "
            f"-o api_key={fake.api_key} -c 'print(1 + 1)'",
            flush=True,
        )
        print("  (export NO_PROXY=127.0.0.1,localhost if a proxy is set; Ctrl-C stops)", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
