"""A loopback fake of the Daytona control-plane API and sandbox toolbox, for the real SDK.

Written from the API shape (the ``daytona_api_client`` / ``daytona_toolbox_api_client`` models and
what the ``daytona`` SDK sends and parses); no daemon code. It serves uvicorn + starlette (``ws=
"wsproto"``) on ``127.0.0.1`` in a background thread::

    with DaytonaFake() as fake:
        client = Daytona(DaytonaConfig(api_url=fake.api_url, api_key="test"))
        sandbox = client.create(CreateSandboxFromSnapshotParams(labels={"k": "v"}))
        fake.counts["create"]   # requests per route name (see ``DaytonaFake._routes``)

Every sandbox is a directory on the host (``fake.sandbox_root(id)``): an absolute sandbox path
``/x/y`` is ``<root>/x/y``, relative paths are under the work dir ``/home/daytona``. Commands are
real local subprocesses (their *cwd* is mapped; the command text is not). Deleting a sandbox kills
its processes and removes its root.

Routes (API under ``/api``, toolbox under ``/toolbox/{sandboxId}``; ``toolboxProxyUrl`` points
there, so the SDK's ``{toolboxProxyUrl}/{sandboxId}{path}`` lands on the toolbox routes):

* ``POST /api/sandbox`` (create), ``GET /api/sandbox`` (list, ``labels`` JSON filter, cursor),
  ``GET|DELETE /api/sandbox/{idOrName}``, ``GET /api/sandbox/{id}/toolbox-proxy-url``.
  ``/api/socket.io/`` answers 404, so the SDK's state-event socket fails quietly and it polls.
* ``POST /files/bulk-upload`` (multipart ``files[i].path`` / ``files[i].file``),
  ``POST /files/bulk-download`` (``{"paths"}`` -> multipart parts ``file`` or ``error``),
  ``POST /files/folder``, ``POST /process/execute``, ``GET /user-home-dir`` and ``GET /work-dir``
  (both ``/home/daytona``).
* Sessions: ``POST|GET /process/session``, ``GET|DELETE /process/session/{sid}``,
  ``POST /process/session/{sid}/exec`` (``runAsync``, ``suppressInputEcho``),
  ``GET /process/session/{sid}/command/{cid}``, ``.../logs`` (JSON, or a WebSocket with
  ``follow=true`` streaming the log with ``\\x01\\x01\\x01`` / ``\\x02\\x02\\x02`` markers), and
  ``POST .../input`` (``{"data"}``, a newline is appended, echoed unless suppressed).
* PTY: WebSocket ``/process/pty/create-connect?id&cols&rows&cwd`` and ``/process/pty/{id}/connect``
  (binary frames both ways, at most 64 KiB per client frame, control text messages ``connected``
  / ``exited``, close 1000 or 1011 with ``{"exitCode", "exitReason"}``), ``POST|GET /process/pty``,
  ``GET|DELETE /process/pty/{id}``, ``POST /process/pty/{id}/resize``. The shell is
  ``bash --noprofile --norc -i`` on a real pty.

Run it on its own (``python -m tests.fakes.daytona_fake [--port N] [--api-key KEY]``) to point
``rlm-sandbox`` at it from another process: it prints its API URL and serves until interrupted.

Fault knobs (all thread-safe, consumed one per matching request):

* :meth:`DaytonaFake.fail_next` -- HTTP error (503 by default) for the next N requests to a route;
  on WebSocket routes the upgrade is refused with that status.
* :meth:`DaytonaFake.rate_limit_next` -- 429 with ``Retry-After``.
* :meth:`DaytonaFake.slow_next` -- sleep before handling normally.
* :attr:`DaytonaFake.api_key` -- requests with another bearer key get 401.
* :attr:`DaytonaFake.create_delay_s` -- new sandboxes stay ``starting`` that long (slow create).
* :attr:`DaytonaFake.create_error_reason` -- new sandboxes go to state ``error``.
* :meth:`DaytonaFake.drop_stream_after` -- the next log or PTY WebSocket to send output (an open
  one included) closes with 1011 after N more bytes; the process keeps running.
* :meth:`DaytonaFake.vanish` -- a sandbox disappears: processes killed, root removed, 404s.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import functools
import json
import os
import posixpath
import secrets
import shutil
import signal
import socket
import struct
import tempfile
import termios
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from tests.fakes import kill_tree

__all__ = ["DaytonaFake", "Fault"]

STDOUT_PREFIX = b"\x01\x01\x01"
STDERR_PREFIX = b"\x02\x02\x02"
PTY_EXIT_CONTROL = "X-Daytona-Pty-Exit-Control"
PTY_ENVS_PREFIX = "X-Daytona-Pty-Envs~"
PTY_READ_LIMIT = 64 * 1024  # the daemon's per-message limit for client -> PTY frames
WORK_DIR = "/home/daytona"
#: Host environment variables a fake sandbox's processes get (PATH and the interpreter lookup).
IMAGE_ENV = ("PATH", "PYENV_ROOT", "PYENV_VERSION", "LANG", "LC_ALL", "LC_CTYPE", "TZ")

Handler = Callable[..., Awaitable[Any]]


@dataclass
class Fault:
    """One injected misbehaviour for one request."""

    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    message: str = "injected fault"
    #: Sleep this long first; with ``status == 0`` the request is then handled normally.
    delay_s: float = 0.0


class _ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass
class _Command:
    id: str
    command: str
    suppress_echo: bool
    proc: asyncio.subprocess.Process | None = None
    log: bytearray = field(default_factory=bytearray)
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    exit_code: int | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def append(self, prefix: bytes, data: bytes) -> None:
        async with self.changed:
            self.log += prefix + data
            (self.stdout if prefix == STDOUT_PREFIX else self.stderr).extend(data)
            self.changed.notify_all()

    def has_news(self, sent: int) -> bool:
        return len(self.log) > sent or self.exit_code is not None

    def dto(self) -> dict[str, Any]:
        return {"id": self.id, "command": self.command, "exitCode": self.exit_code}


@dataclass
class _Session:
    id: str
    commands: dict[str, _Command] = field(default_factory=dict)

    def dto(self) -> dict[str, Any]:
        return {"sessionId": self.id, "commands": [c.dto() for c in self.commands.values()]}


@dataclass
class _Pty:
    id: str
    cwd: str
    envs: dict[str, str]
    cols: int
    rows: int
    lazy_start: bool
    created_at: str
    proc: asyncio.subprocess.Process | None = None
    master: int | None = None
    clients: list[asyncio.Queue[bytes | None]] = field(default_factory=list)
    exit_code: int | None = None
    pump: asyncio.Task[None] | None = None

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "cwd": self.cwd,
            "envs": self.envs,
            "cols": self.cols,
            "rows": self.rows,
            "createdAt": self.created_at,
            "active": self.proc is not None and self.exit_code is None,
            "lazyStart": self.lazy_start,
        }


@dataclass
class FakeSandbox:
    """One live fake sandbox; ``spec`` is the create request body as received."""

    id: str
    name: str
    root: Path
    spec: dict[str, Any]
    labels: dict[str, str]
    env: dict[str, str]
    cpu: int
    memory: int
    disk: int
    created_at: str
    ready_at: float
    error_reason: str | None = None
    state: str = "starting"
    sessions: dict[str, _Session] = field(default_factory=dict)
    ptys: dict[str, _Pty] = field(default_factory=dict)

    def current_state(self) -> str:
        if self.state == "starting" and time.monotonic() >= self.ready_at:
            self.state = "error" if self.error_reason else "started"
        return self.state


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _kill_session_tree(pid: int) -> None:
    """SIGKILL every process whose session id is ``pid`` (they were started with setsid), and
    every descendant (the runtime's REPL starts its own session), as a destroyed VM would."""
    kill_tree(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == pid:  # field 6 of stat: session id
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry), signal.SIGKILL)


async def _wait_fd(fd: int, *, write: bool = False) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


def _exit_reason(code: int) -> str | None:
    if code == 0:
        return None
    return {130: "Ctrl+C", 137: "SIGKILL", 143: "SIGTERM"}.get(
        code, f"signal {code - 128}" if code > 128 else "non-zero exit"
    )


class DaytonaFake:
    """The fake server. Use as a context manager or call :meth:`start` / :meth:`stop`."""

    def __init__(self, *, api_key: str = "test", base_dir: str | Path | None = None, port: int = 0) -> None:
        #: The only bearer key accepted; change it to make every request fail with 401.
        self.api_key = api_key
        self._initial_key = api_key
        #: Seconds a new sandbox stays in state ``starting`` (the SDK polls ``GET`` meanwhile).
        self.create_delay_s = 0.0
        #: When set, new sandboxes end in state ``error`` with this reason.
        self.create_error_reason: str | None = None
        #: Organisation limits checked on create (the SDK sends resources only for images).
        self.max_cpu, self.max_memory, self.max_disk = 4, 8, 10
        #: Requests per route name, faulted ones included.
        self.counts: Counter[str] = Counter()
        #: ``(route, method, path)`` of every request, in arrival order.
        self.requests: list[tuple[str, str, str]] = []
        self.port = port
        self._own_dir = base_dir is None
        self._base = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="daytona-fake-"))
        self._sandboxes: dict[str, FakeSandbox] = {}
        self._faults: dict[str, list[Fault]] = {}
        self._drops: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        """What to pass as ``DaytonaConfig(api_url=...)`` or ``DAYTONA_API_URL``."""
        return f"{self.url}/api"

    @property
    def toolbox_url(self) -> str:
        return f"{self.url}/toolbox"

    def start(self) -> DaytonaFake:
        """Bind a free port and serve in a background thread; returns once accepting."""
        if self._thread is not None:
            raise RuntimeError("already started")
        config = uvicorn.Config(
            Starlette(routes=self._routes(), lifespan=self._lifespan),
            log_level="critical",
            access_log=False,
            lifespan="on",
            loop="asyncio",
            http="h11",
            ws="wsproto",
            ws_max_size=1 << 24,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        # proto=IPPROTO_TCP makes asyncio set TCP_NODELAY on accepted sockets (it checks
        # sock.proto); with proto 0 every reused keep-alive request waits ~40 ms (Nagle).
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, name="daytona-fake")
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("fake Daytona server failed to start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Destroy every sandbox, stop serving and join the server thread."""
        server, thread = self._server, self._thread
        if server is not None and thread is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._call(self._destroy_all())
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(timeout=10)
            if thread.is_alive():
                server.force_exit = True
                thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None
        if self._own_dir:
            shutil.rmtree(self._base, ignore_errors=True)

    def __enter__(self) -> DaytonaFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._loop = asyncio.get_running_loop()
        yield
        await self._destroy_all()

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- knobs ---------------------------------------------------------------------------------

    def add_fault(self, route: str, fault: Fault, times: int = 1) -> None:
        with self._lock:
            self._faults.setdefault(route, []).extend([fault] * times)

    def fail_next(
        self,
        route: str,
        status: int = 503,
        times: int = 1,
        message: str = "injected fault",
        headers: dict[str, str] | None = None,
    ) -> None:
        """The next ``times`` requests to ``route`` get HTTP ``status``."""
        self.add_fault(route, Fault(status, dict(headers or {}), message), times)

    def rate_limit_next(self, route: str, retry_after: int = 1, times: int = 1) -> None:
        """The next ``times`` requests to ``route`` get 429 with ``Retry-After``."""
        self.fail_next(route, 429, times, "Too Many Requests", {"Retry-After": str(retry_after)})

    def slow_next(self, route: str, delay_s: float, times: int = 1) -> None:
        """The next ``times`` requests to ``route`` are answered normally after ``delay_s``."""
        self.add_fault(route, Fault(status=0, delay_s=delay_s), times)

    def drop_stream_after(self, kind: str, nbytes: int) -> None:
        """The next ``kind`` ("logs" or "pty") stream to send closes with 1011 after ``nbytes``."""
        if kind not in ("logs", "pty"):
            raise ValueError(kind)
        with self._lock:
            self._drops.setdefault(kind, []).append(nbytes)

    def vanish(self, sandbox_id: str) -> None:
        """Make a sandbox disappear: kill its processes, remove its root; then 404 everywhere."""
        self._call(self._destroy(sandbox_id))

    def reset(self) -> None:
        """Forget queued faults, restore the knobs and zero the counters (sandboxes stay)."""
        with self._lock:
            self._faults.clear()
            self._drops.clear()
        self.api_key = self._initial_key
        self.create_delay_s = 0.0
        self.create_error_reason = None
        self.counts.clear()
        self.requests.clear()

    # -- inspection ----------------------------------------------------------------------------

    @property
    def sandboxes(self) -> dict[str, FakeSandbox]:
        """Live sandboxes by id (a snapshot)."""
        return dict(self._sandboxes)

    def sandbox_root(self, sandbox_id: str) -> Path:
        """The host directory that is ``/`` inside the sandbox."""
        return self._sandboxes[sandbox_id].root

    def host_path(self, sandbox_id: str, path: str) -> Path:
        """The host path of a sandbox path (absolute, or relative to the work dir)."""
        return self._map(self._sandboxes[sandbox_id], path)

    # -- plumbing ------------------------------------------------------------------------------

    def _routes(self) -> list[Route | WebSocketRoute]:
        tb = "/toolbox/{sid}"
        cmd = tb + "/process/session/{session}/command/{cmd}"
        http: list[tuple[str, str, str, Handler]] = [
            ("create", "POST", "/api/sandbox", self._create),
            ("list", "GET", "/api/sandbox", self._list),
            ("toolbox_proxy_url", "GET", "/api/sandbox/{sid}/toolbox-proxy-url", self._proxy_url),
            ("get", "GET", "/api/sandbox/{sid}", self._get),
            ("delete", "DELETE", "/api/sandbox/{sid}", self._delete),
            ("upload", "POST", tb + "/files/bulk-upload", self._upload),
            ("download", "POST", tb + "/files/bulk-download", self._download),
            ("folder", "POST", tb + "/files/folder", self._folder),
            ("execute", "POST", tb + "/process/execute", self._execute),
            ("user_home_dir", "GET", tb + "/user-home-dir", self._home_dir),
            ("work_dir", "GET", tb + "/work-dir", self._home_dir),
            ("session_create", "POST", tb + "/process/session", self._session_create),
            ("session_list", "GET", tb + "/process/session", self._session_list),
            ("session_get", "GET", tb + "/process/session/{session}", self._session_get),
            ("session_delete", "DELETE", tb + "/process/session/{session}", self._session_delete),
            ("session_exec", "POST", tb + "/process/session/{session}/exec", self._session_exec),
            ("command_get", "GET", cmd, self._command_get),
            ("command_logs", "GET", cmd + "/logs", self._command_logs),
            ("command_input", "POST", cmd + "/input", self._command_input),
            ("pty_create", "POST", tb + "/process/pty", self._pty_create),
            ("pty_list", "GET", tb + "/process/pty", self._pty_list),
            ("pty_get", "GET", tb + "/process/pty/{pty}", self._pty_get),
            ("pty_delete", "DELETE", tb + "/process/pty/{pty}", self._pty_delete),
            ("pty_resize", "POST", tb + "/process/pty/{pty}/resize", self._pty_resize),
        ]
        ws: list[tuple[str, str, Handler]] = [
            ("socketio", "/api/socket.io/", self._ws_refuse),
            ("command_logs_ws", cmd + "/logs", self._ws_logs),
            ("pty_connect", tb + "/process/pty/create-connect", self._ws_pty),
            ("pty_connect", tb + "/process/pty/{pty}/connect", self._ws_pty),
        ]
        routes: list[Route | WebSocketRoute] = [
            Route(path, self._http(name, fn), methods=[method]) for name, method, path, fn in http
        ]
        routes += [WebSocketRoute(path, self._websocket(name, fn)) for name, path, fn in ws]
        routes.append(Route("/api/socket.io/", self._not_found, methods=["GET", "POST"]))
        return routes

    async def _gate(
        self,
        route: str,
        method: str,
        path: str,
        headers: Any,
        request: Request | None = None,
    ) -> Response | None:
        """Count the request, then apply auth and queued faults; an error response or None."""
        self.counts[route] += 1
        self.requests.append((route, method, path))
        with self._lock:
            queue = self._faults.get(route)
            fault = queue.pop(0) if queue else None
        if fault is not None and fault.delay_s:
            if request is not None:  # like a real server: the request is in, the reply is slow
                await request.body()
            await asyncio.sleep(fault.delay_s)
        if route != "socketio" and headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "Unauthorized", path)
        if fault is not None and fault.status:
            return _error(fault.status, fault.message, path, headers=fault.headers)
        return None

    def _http(self, route: str, fn: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            denied = await self._gate(route, request.method, request.url.path, request.headers, request)
            if denied is not None:
                return denied
            try:
                result = await fn(request, **request.path_params)
            except _ApiError as e:
                return _error(e.status, e.message, request.url.path, code=e.code)
            return result if isinstance(result, Response) else JSONResponse(result)

        return endpoint

    def _websocket(self, route: str, fn: Handler) -> Callable[[WebSocket], Awaitable[None]]:
        async def endpoint(ws: WebSocket) -> None:
            path = ws.url.path
            denied = await self._gate(route, "WS", path, ws.headers)
            if denied is None:
                try:
                    await fn(ws, **ws.path_params)
                    return
                except _ApiError as e:
                    denied = _error(e.status, e.message, path, code=e.code)
            await ws.send_denial_response(denied)

        return endpoint

    async def _not_found(self, request: Request) -> Response:
        return _error(404, "Not Found", request.url.path)

    async def _ws_refuse(self, ws: WebSocket) -> None:
        raise _ApiError(404, "socket.io is not served by the fake")

    def _sandbox(self, sid: str) -> FakeSandbox:
        sb = self._sandboxes.get(sid) or next((s for s in self._sandboxes.values() if s.name == sid), None)
        if sb is None:
            raise _ApiError(404, f"Sandbox with ID or name {sid} not found")
        return sb

    def _started(self, sid: str) -> FakeSandbox:
        sb = self._sandbox(sid)
        if sb.current_state() != "started":
            raise _ApiError(409, f"Sandbox {sid} is not started")
        return sb

    def _map(self, sb: FakeSandbox, path: str) -> Path:
        absolute = path if path.startswith("/") else posixpath.join(WORK_DIR, path)
        return sb.root / posixpath.normpath(absolute).lstrip("/")

    def _env(self, sb: FakeSandbox, extra: dict[str, str] | None = None) -> dict[str, str]:
        # A real sandbox never sees the client's environment: keep only what this host's
        # "image" needs to find its interpreter and tools (the fake runs in the test process,
        # so copying os.environ would leak whatever the test put there).
        env = {k: os.environ[k] for k in IMAGE_ENV if k in os.environ}
        env.update(sb.env)
        env.update(HOME=str(self._map(sb, WORK_DIR)), DAYTONA_FAKE_ROOT=str(sb.root))
        env.update(extra or {})
        return env

    # -- control plane -------------------------------------------------------------------------

    def _dto(self, sb: FakeSandbox) -> dict[str, Any]:
        spec = sb.spec
        return {
            "id": sb.id,
            "organizationId": "org-fake",
            "name": sb.name,
            "snapshot": spec.get("snapshot"),
            "user": spec.get("user") or "daytona",
            "env": sb.env,
            "labels": sb.labels,
            "public": bool(spec.get("public")),
            "networkBlockAll": bool(spec.get("networkBlockAll")),
            "networkAllowList": spec.get("networkAllowList"),
            "domainAllowList": spec.get("domainAllowList"),
            "kvm": False,
            "target": spec.get("target") or "us",
            "cpu": sb.cpu,
            "gpu": spec.get("gpu") or 0,
            "memory": sb.memory,
            "disk": sb.disk,
            "state": sb.current_state(),
            "desiredState": "started",
            "errorReason": sb.error_reason if sb.state == "error" else None,
            "autoStopInterval": spec.get("autoStopInterval", 15),
            "autoArchiveInterval": spec.get("autoArchiveInterval", 10080),
            "autoDeleteInterval": spec.get("autoDeleteInterval", -1),
            "volumes": spec.get("volumes") or [],
            "buildInfo": (
                {
                    **spec["buildInfo"],
                    "createdAt": sb.created_at,
                    "updatedAt": sb.created_at,
                    "snapshotRef": f"fake-{sb.id}",
                }
                if spec.get("buildInfo")
                else None
            ),
            "createdAt": sb.created_at,
            "updatedAt": _now(),
            "daemonVersion": "fake",
            "toolboxProxyUrl": self.toolbox_url,
        }

    async def _create(self, request: Request) -> Response:
        spec: dict[str, Any] = await request.json()
        from_image = spec.get("buildInfo") is not None
        cpu = int(spec.get("cpu") or 1) if from_image else 1
        memory = int(spec.get("memory") or 1) if from_image else 1
        disk = int(spec.get("disk") or 3) if from_image else 3
        for what, value, limit in (
            ("CPU", cpu, self.max_cpu),
            ("memory", memory, self.max_memory),
            ("disk", disk, self.max_disk),
        ):
            if value > limit:
                raise _ApiError(400, f"{what} request {value} exceeds maximum allowed {limit}")
        name = spec.get("name") or ""
        if name and any(s.name == name for s in self._sandboxes.values()):
            raise _ApiError(409, f"Sandbox with name {name} already exists")
        sid = secrets.token_hex(8)
        root = self._base / sid
        for sub in (WORK_DIR, "/tmp"):
            (root / sub.lstrip("/")).mkdir(parents=True, exist_ok=True)
        sb = FakeSandbox(
            id=sid,
            name=name or sid,
            root=root,
            spec=spec,
            labels=dict(spec.get("labels") or {}),
            env=dict(spec.get("env") or {}),
            cpu=cpu,
            memory=memory,
            disk=disk,
            created_at=_now(),
            ready_at=time.monotonic() + self.create_delay_s,
            error_reason=self.create_error_reason,
        )
        self._sandboxes[sid] = sb
        return JSONResponse(self._dto(sb))

    async def _list(self, request: Request) -> dict[str, Any]:
        q = request.query_params
        labels: dict[str, str] = json.loads(q["labels"]) if q.get("labels") else {}
        items = [
            self._dto(sb)
            for sb in self._sandboxes.values()
            if all(sb.labels.get(k) == v for k, v in labels.items())
            and (not q.get("states") or sb.current_state() in q.getlist("states"))
        ]
        start = int(q.get("cursor") or 0)
        limit = int(q.get("limit") or 100)
        page = items[start : start + limit]
        more = start + limit < len(items)
        return {"items": page, "nextCursor": str(start + limit) if more else None}

    async def _get(self, request: Request, sid: str) -> dict[str, Any]:
        return self._dto(self._sandbox(sid))

    async def _proxy_url(self, request: Request, sid: str) -> dict[str, Any]:
        self._sandbox(sid)
        return {"url": self.toolbox_url}

    async def _delete(self, request: Request, sid: str) -> dict[str, Any]:
        sb = self._sandbox(sid)
        dto = self._dto(sb)
        await self._destroy(sb.id)
        return {**dto, "state": "destroying", "desiredState": "destroyed"}

    async def _destroy(self, sid: str) -> None:
        sb = self._sandboxes.pop(sid, None)
        if sb is None:
            return
        for session in list(sb.sessions.values()):
            await self._kill_session(session)
        for pty in list(sb.ptys.values()):
            await self._kill_pty(pty)
        await asyncio.to_thread(shutil.rmtree, sb.root, True)

    async def _destroy_all(self) -> None:
        for sid in list(self._sandboxes):
            await self._destroy(sid)

    # -- files ---------------------------------------------------------------------------------

    async def _upload(self, request: Request, sid: str) -> Response:
        sb = self._started(sid)
        async with request.form(max_files=100_000, max_fields=100_000) as form:
            i = 0
            while f"files[{i}].path" in form:
                dest = self._map(sb, str(form[f"files[{i}].path"]))
                upload = form.get(f"files[{i}].file")
                if not isinstance(upload, UploadFile):
                    raise _ApiError(400, f"files[{i}].file is missing")
                await asyncio.to_thread(_copy_upload, upload, dest)
                i += 1
        return Response(status_code=200)

    async def _download(self, request: Request, sid: str) -> Response:
        sb = self._started(sid)
        paths: list[str] = (await request.json()).get("paths") or []
        boundary = secrets.token_hex(16)
        mapped = [(p, self._map(sb, p)) for p in paths]
        return StreamingResponse(
            _multipart_files(mapped, boundary),
            media_type=f"multipart/form-data; boundary={boundary}",
        )

    async def _folder(self, request: Request, sid: str) -> Response:
        sb = self._started(sid)
        path = request.query_params.get("path", "")
        self._map(sb, path).mkdir(parents=True, exist_ok=True)
        return Response(status_code=201)

    async def _home_dir(self, request: Request, sid: str) -> dict[str, Any]:
        self._started(sid)
        return {"dir": WORK_DIR}

    # -- processes -----------------------------------------------------------------------------

    async def _spawn(self, sb: FakeSandbox, argv: list[str], **kw: Any) -> asyncio.subprocess.Process:
        kw.setdefault("cwd", self._map(sb, WORK_DIR))
        kw.setdefault("env", self._env(sb))
        return await asyncio.create_subprocess_exec(*argv, start_new_session=True, **kw)

    async def _execute(self, request: Request, sid: str) -> dict[str, Any]:
        sb = self._started(sid)
        body: dict[str, Any] = await request.json()
        cwd = self._map(sb, body["cwd"]) if body.get("cwd") else None
        proc = await self._spawn(
            sb,
            ["/bin/sh", "-c", body["command"]],
            cwd=cwd or self._map(sb, WORK_DIR),
            env=self._env(sb, body.get("envs")),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), body.get("timeout") or None)
        except TimeoutError:
            _kill_session_tree(proc.pid)
            await proc.wait()
            raise _ApiError(408, "command execution timeout", "PROCESS_EXECUTION_TIMEOUT") from None
        return {"exitCode": proc.returncode, "result": out.decode("utf-8", "replace")}

    def _session(self, sid: str, session: str) -> tuple[FakeSandbox, _Session]:
        sb = self._started(sid)
        if session not in sb.sessions:
            raise _ApiError(404, "session not found")
        return sb, sb.sessions[session]

    def _command(self, sid: str, session: str, cmd: str) -> _Command:
        _, s = self._session(sid, session)
        if cmd not in s.commands:
            raise _ApiError(404, "command not found")
        return s.commands[cmd]

    async def _session_create(self, request: Request, sid: str) -> Response:
        sb = self._started(sid)
        session_id = (await request.json())["sessionId"]
        if session_id in sb.sessions:
            raise _ApiError(409, f"session {session_id} already exists")
        sb.sessions[session_id] = _Session(session_id)
        return Response(status_code=201)

    async def _session_list(self, request: Request, sid: str) -> list[dict[str, Any]]:
        return [s.dto() for s in self._started(sid).sessions.values()]

    async def _session_get(self, request: Request, sid: str, session: str) -> dict[str, Any]:
        return self._session(sid, session)[1].dto()

    async def _session_delete(self, request: Request, sid: str, session: str) -> Response:
        sb, s = self._session(sid, session)
        del sb.sessions[session]
        await self._kill_session(s)
        return Response(status_code=204)

    async def _kill_session(self, session: _Session) -> None:
        for c in session.commands.values():
            if c.proc is not None and c.exit_code is None:
                _kill_session_tree(c.proc.pid)
                await c.proc.wait()

    async def _session_exec(self, request: Request, sid: str, session: str) -> Response:
        sb, s = self._session(sid, session)
        body: dict[str, Any] = await request.json()
        c = _Command(secrets.token_hex(8), body["command"], bool(body.get("suppressInputEcho")))
        c.proc = await self._spawn(
            sb,
            ["/bin/sh", "-c", c.command],
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        s.commands[c.id] = c
        done = asyncio.ensure_future(_run_command(c))
        if body.get("runAsync") or body.get("async"):
            return JSONResponse({"cmdId": c.id}, status_code=202)
        await done
        out = bytes(c.log).replace(STDOUT_PREFIX, b"").replace(STDERR_PREFIX, b"")
        return JSONResponse(
            {
                "cmdId": c.id,
                "exitCode": c.exit_code,
                "output": out.decode("utf-8", "replace"),
                "stdout": c.stdout.decode("utf-8", "replace"),
                "stderr": c.stderr.decode("utf-8", "replace"),
            }
        )

    async def _command_get(self, request: Request, sid: str, session: str, cmd: str) -> Any:
        return self._command(sid, session, cmd).dto()

    async def _command_logs(self, request: Request, sid: str, session: str, cmd: str) -> Any:
        c = self._command(sid, session, cmd)
        out = bytes(c.log).replace(STDOUT_PREFIX, b"").replace(STDERR_PREFIX, b"")
        return {
            "output": out.decode("utf-8", "replace"),
            "stdout": c.stdout.decode("utf-8", "replace"),
            "stderr": c.stderr.decode("utf-8", "replace"),
        }

    async def _command_input(self, request: Request, sid: str, session: str, cmd: str) -> Response:
        c = self._command(sid, session, cmd)
        if c.exit_code is not None or c.proc is None or c.proc.stdin is None:
            raise _ApiError(
                410,
                f"command has already completed with exit code {c.exit_code}",
                "COMMAND_ALREADY_COMPLETED",
            )
        data: str = (await request.json())["data"]
        if not data.endswith("\n"):
            data += "\n"
        c.proc.stdin.write(data.encode())
        with contextlib.suppress(ConnectionError):
            await c.proc.stdin.drain()
        if not c.suppress_echo:
            await c.append(STDOUT_PREFIX, data.encode())
        return Response(status_code=204)

    async def _ws_logs(self, ws: WebSocket, sid: str, session: str, cmd: str) -> None:
        c = self._command(sid, session, cmd)
        if ws.query_params.get("follow") != "true":
            raise _ApiError(400, "only follow=true is served over a WebSocket")
        await ws.accept()
        budget: list[int | None] = [None]
        sent = 0
        while True:
            async with c.changed:
                await c.changed.wait_for(functools.partial(c.has_news, sent))
                chunk = bytes(c.log[sent:])
                finished = c.exit_code is not None
            if chunk and not await self._send_or_drop(ws, "logs", chunk, budget):
                return
            sent += len(chunk)
            if finished and sent == len(c.log):
                await ws.close(1000)
                return

    async def _send_or_drop(self, ws: WebSocket, kind: str, data: bytes, budget: list[int | None]) -> bool:
        """Send ``data``, unless a pending drop knob runs out: then close with 1011 (False).

        A drop knob is taken by the first stream of its kind that sends after it was set, and
        counts the bytes that stream sends from then on.
        """
        if budget[0] is None:
            with self._lock:
                pending = self._drops.get(kind)
                budget[0] = pending.pop(0) if pending else None
        left = budget[0]
        if left is not None and len(data) >= left:
            if left:
                await ws.send_bytes(data[:left])
            await ws.close(1011, "stream dropped")
            return False
        await ws.send_bytes(data)
        if left is not None:
            budget[0] = left - len(data)
        return True

    # -- PTY -----------------------------------------------------------------------------------

    def _new_pty(self, sb: FakeSandbox, spec: dict[str, Any]) -> _Pty:
        pid = spec.get("id") or ""
        if not pid:
            raise _ApiError(400, "session ID is required")
        if pid in sb.ptys:
            raise _ApiError(409, f"PTY session with ID '{pid}' already exists")
        cols, rows = int(spec.get("cols") or 80), int(spec.get("rows") or 24)
        if cols > 1000 or rows > 1000:
            raise _ApiError(400, "invalid value for cols/rows - must be less than 1000")
        envs = dict(spec.get("envs") or {})
        envs.setdefault("TERM", "xterm-256color")
        pty = _Pty(pid, spec.get("cwd") or WORK_DIR, envs, cols, rows, bool(spec.get("lazyStart")), _now())
        sb.ptys[pid] = pty
        return pty

    async def _start_pty(self, sb: FakeSandbox, pty: _Pty) -> None:
        if pty.proc is not None:
            return
        master, slave = os.openpty()
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", pty.rows, pty.cols, 0, 0))
        os.set_blocking(master, False)
        shell = ["/bin/bash", "--noprofile", "--norc", "-i"] if shutil.which("bash") else ["sh", "-i"]
        try:
            pty.proc = await self._spawn(
                sb,
                shell,
                cwd=self._map(sb, pty.cwd),
                env=self._env(sb, {"PS1": "$ ", **pty.envs}),
                stdin=slave,
                stdout=slave,
                stderr=slave,
                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        pty.master = master
        pty.pump = asyncio.ensure_future(self._pump_pty(sb, pty))

    async def _pump_pty(self, sb: FakeSandbox, pty: _Pty) -> None:
        """Copy PTY output to every attached client until the shell exits."""
        assert pty.proc is not None and pty.master is not None
        while True:
            try:
                data = os.read(pty.master, 32 * 1024)
            except BlockingIOError:
                await _wait_fd(pty.master)
                continue
            except OSError:  # EIO: no process holds the slave side any more
                break
            if not data:
                break
            for q in list(pty.clients):
                await q.put(data)
        code = await pty.proc.wait()
        pty.exit_code = 128 - code if code < 0 else code
        os.close(pty.master)
        pty.master = None
        sb.ptys.pop(pty.id, None)
        for q in pty.clients:
            await q.put(None)

    async def _kill_pty(self, pty: _Pty) -> None:
        if pty.proc is not None and pty.exit_code is None:
            _kill_session_tree(pty.proc.pid)
            if pty.pump is not None:
                await pty.pump

    async def _pty_create(self, request: Request, sid: str) -> Response:
        sb = self._started(sid)
        pty = self._new_pty(sb, await request.json())
        if not pty.lazy_start:
            await self._start_pty(sb, pty)
        return JSONResponse({"sessionId": pty.id}, status_code=201)

    async def _pty_list(self, request: Request, sid: str) -> dict[str, Any]:
        return {"sessions": [p.info() for p in self._started(sid).ptys.values()]}

    def _pty(self, sid: str, pty: str) -> tuple[FakeSandbox, _Pty]:
        sb = self._started(sid)
        if pty not in sb.ptys:
            raise _ApiError(404, "PTY session not found")
        return sb, sb.ptys[pty]

    async def _pty_get(self, request: Request, sid: str, pty: str) -> dict[str, Any]:
        return self._pty(sid, pty)[1].info()

    async def _pty_delete(self, request: Request, sid: str, pty: str) -> dict[str, Any]:
        sb, p = self._pty(sid, pty)
        sb.ptys.pop(pty, None)
        await self._kill_pty(p)
        return {"message": "PTY session deleted"}

    async def _pty_resize(self, request: Request, sid: str, pty: str) -> dict[str, Any]:
        _, p = self._pty(sid, pty)
        body = await request.json()
        p.cols, p.rows = int(body["cols"]), int(body["rows"])
        if p.master is not None:
            fcntl.ioctl(p.master, termios.TIOCSWINSZ, struct.pack("HHHH", p.rows, p.cols, 0, 0))
        return p.info()

    async def _ws_pty(self, ws: WebSocket, sid: str, pty: str | None = None) -> None:
        sb = self._started(sid)
        offered: list[str] = list(ws.scope.get("subprotocols") or [])
        if pty is None:  # create-connect
            q = ws.query_params
            envs: dict[str, str] = {}
            for token in offered:
                if token.startswith(PTY_ENVS_PREFIX):
                    raw = token[len(PTY_ENVS_PREFIX) :]
                    envs = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
            p = self._new_pty(
                sb, {"id": q.get("id"), "cwd": q.get("cwd"), "envs": envs, "cols": q.get("cols"), "rows": q.get("rows")}
            )
        else:
            p = self._pty(sid, pty)[1]
        exit_control = PTY_EXIT_CONTROL in offered
        await ws.accept(subprotocol=PTY_EXIT_CONTROL if exit_control else None)
        outbound: asyncio.Queue[bytes | None] = asyncio.Queue(256)
        p.clients.append(outbound)
        await self._start_pty(sb, p)
        await ws.send_text(json.dumps({"type": "control", "status": "connected"}))
        tasks = [
            asyncio.ensure_future(self._pty_to_client(ws, p, outbound, exit_control)),
            asyncio.ensure_future(self._client_to_pty(ws, p)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if outbound in p.clients:
                p.clients.remove(outbound)

    async def _pty_to_client(
        self, ws: WebSocket, p: _Pty, outbound: asyncio.Queue[bytes | None], exit_control: bool
    ) -> None:
        budget: list[int | None] = [None]
        while (data := await outbound.get()) is not None:
            if not await self._send_or_drop(ws, "pty", data, budget):
                return
        code = p.exit_code if p.exit_code is not None else 1
        reason = _exit_reason(code)
        if exit_control:
            await ws.send_text(
                json.dumps(
                    {
                        "type": "control",
                        "status": "exited",
                        "exitCode": code,
                        **({"exitReason": reason} if reason else {}),
                    }
                )
            )
        detail = {"exitCode": code, **({"exitReason": reason} if reason else {})}
        await ws.close(1000 if code == 0 else 1011, json.dumps(detail))

    async def _client_to_pty(self, ws: WebSocket, p: _Pty) -> None:
        """Write client frames to the PTY; returns when the client goes away."""
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data: bytes = message.get("bytes") or (message.get("text") or "").encode()
            if len(data) > PTY_READ_LIMIT:
                await ws.close(1009, "read limit exceeded")
                return
            view = memoryview(data)
            while view and p.master is not None:  # input after the shell exited is dropped
                try:
                    view = view[os.write(p.master, view) :]
                except BlockingIOError:
                    await _wait_fd(p.master, write=True)
                except OSError:
                    break


async def _run_command(c: _Command) -> None:
    assert c.proc is not None and c.proc.stdout is not None and c.proc.stderr is not None

    async def pump(stream: asyncio.StreamReader, prefix: bytes) -> None:
        while data := await stream.read(64 * 1024):
            await c.append(prefix, data)

    await asyncio.gather(pump(c.proc.stdout, STDOUT_PREFIX), pump(c.proc.stderr, STDERR_PREFIX))
    code = await c.proc.wait()
    async with c.changed:
        c.exit_code = 128 - code if code < 0 else code
        c.changed.notify_all()


def _copy_upload(upload: UploadFile, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    upload.file.seek(0)
    with open(dest, "wb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)


def _multipart_files(paths: list[tuple[str, Path]], boundary: str) -> Iterator[bytes]:
    for source, host in paths:
        quoted = source.replace("\\", "\\\\").replace('"', '\\"')
        if host.is_file():
            yield (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="{quoted}"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
            with open(host, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk
        else:
            error = {
                "message": f"file not found: {source}",
                "statusCode": 404,
                "code": "FILE_NOT_FOUND",
                "source": "DAYTONA_DAEMON",
            }
            yield (
                f'--{boundary}\r\nContent-Disposition: form-data; name="error"; '
                f'filename="{quoted}"\r\nContent-Type: application/json\r\n\r\n' + json.dumps(error)
            ).encode()
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _error(
    status: int,
    message: str,
    path: str,
    *,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"statusCode": status, "message": message, "path": path, "timestamp": _now()}
    if code:
        body.update(code=code, source="DAYTONA_DAEMON")
    return JSONResponse(body, status_code=status, headers=headers)


def main(argv: list[str] | None = None) -> None:
    """Serve the fake until SIGINT/SIGTERM; print the API URL first (for ``-o api_url=...``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.fakes.daytona_fake", description=main.__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--api-key", default="test", help="the bearer key it accepts (default: test)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with DaytonaFake(api_key=args.api_key, port=args.port) as fake:
        print(fake.api_url, flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
