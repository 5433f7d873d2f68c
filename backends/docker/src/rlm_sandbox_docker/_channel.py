"""A :class:`~rlm_sandbox._channel.Channel` over a Docker exec socket (prototype).

The backend starts one long-lived process in a running container with ``exec_create`` +
``exec_start(socket=True)`` and hands the core this channel. The engine multiplexes the process's
stdout and stderr on one hijacked HTTP connection (``tty=False``): every frame is an 8-byte header
``>BxxxL`` (stream type, 3 zero bytes, big-endian payload length) followed by the payload. Frames do
not line up with the writes of the process, and a header can be split across reads.

``recv`` returns only stdout payload bytes; stderr payload goes to an optional callback and to a
bounded tail buffer (for error messages when the runtime dies). ``send`` writes to the raw socket;
stdin is not framed.

Pitfalls handled here:

* docker-py parses the upgrade response through a ``BufferedReader``, which may already hold the
  first bytes the process wrote. They are taken over (without blocking) before reading the raw
  socket. (The runtime speaks only after the host's first message, so normally there are none.)
* ``exec_start(socket=True)`` returns a ``socket.SocketIO`` for unix and plain TCP endpoints; it has
  no ``sendall`` and turns a timeout into a permanently broken reader, so all I/O goes to the
  underlying ``socket.socket`` (``SocketIO._sock``) and timeouts are done with ``poll``.
* Closing the socket does not stop the process in the box: use :meth:`DockerExecChannel.kill`.
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlm_sandbox._channel import Channel

__all__ = ["DockerExecChannel", "ExecStatus", "read_oom_kill_count"]

_HEADER = struct.Struct(">BxxxL")
_STDOUT = 1

#: Where the memory cgroup's OOM-kill counter lives inside a container (v1, then v2).
_OOM_COUNTER_SCRIPT = (
    "cat /sys/fs/cgroup/memory/memory.oom_control 2>/dev/null || cat /sys/fs/cgroup/memory.events 2>/dev/null"
)


@dataclass(frozen=True)
class ExecStatus:
    """What the engine knows about an exec'd process (``exec_inspect``)."""

    running: bool
    #: ``None`` while running; ``128 + n`` when killed by signal ``n`` (137: SIGKILL, e.g. OOM).
    exit_code: int | None
    #: The process id in the *host's* pid namespace (0 once it has exited); not usable inside.
    host_pid: int


class DockerExecChannel(Channel):
    """A channel to the stdin/stdout of one process exec'd into a running container.

    Create it with :meth:`start`. Safe for one reader thread plus one writer thread at a time.
    """

    def __init__(
        self,
        api: Any,
        container_id: str,
        exec_id: str,
        raw: Any,
        *,
        user: str = "",
        on_stderr: Callable[[bytes], None] | None = None,
        stderr_limit: int = 64 * 1024,
        chunk: int = 256 * 1024,
    ) -> None:
        """Wrap what ``api.exec_start(exec_id, socket=True)`` returned (``raw``)."""
        self._api = api
        self.container_id = container_id
        self.exec_id = exec_id
        self.user = user
        self._raw = raw
        self._sock, initial = _unwrap_socket(raw)
        self._sock.settimeout(None)  # blocking sends; reads wait in poll() first
        self._on_stderr = on_stderr
        self._stderr_limit = stderr_limit
        self._stderr_tail = bytearray()
        self._chunk = chunk
        self._out: list[bytes] = []
        self._header = bytearray()
        self._stream = 0
        self._remaining = 0  # payload bytes left in the current frame
        self._eof = False
        self._closed = False
        # close() from another thread must not free the fd while recv() waits on it (the number
        # could be reused by the next connection and read as ours): it only shuts the socket
        # down, and the reader releases the fd when it leaves recv().
        self._state = threading.Lock()
        self._reading = False
        self._released = False
        self._poller = select.poll()
        self._poller.register(self._sock.fileno(), select.POLLIN | select.POLLPRI)
        if initial:
            self._feed(initial)

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        client: Any,
        container: Any,
        cmd: Sequence[str],
        *,
        user: str = "",
        workdir: str | None = None,
        environment: Mapping[str, str] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        stderr_limit: int = 64 * 1024,
    ) -> DockerExecChannel:
        """Exec ``cmd`` in ``container`` and connect to its stdin/stdout.

        ``client`` is a ``docker.DockerClient`` or a ``docker.APIClient``; ``container`` a
        ``Container`` or an id. The process starts at once; it should wait for the host's first
        message before writing anything.
        """
        api = getattr(client, "api", client)
        container_id: str = getattr(container, "id", container)
        created = api.exec_create(
            container_id,
            list(cmd),
            stdin=True,
            stdout=True,
            stderr=True,
            tty=False,
            user=user,
            workdir=workdir,
            environment=dict(environment) if environment is not None else None,
        )
        exec_id: str = created["Id"]
        raw = api.exec_start(exec_id, socket=True, tty=False)
        try:
            return cls(
                api,
                container_id,
                exec_id,
                raw,
                user=user,
                on_stderr=on_stderr,
                stderr_limit=stderr_limit,
            )
        except BaseException:
            with contextlib.suppress(Exception):
                raw.close()
            raise

    # -- Channel ---------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self._closed:
            raise OSError("channel is closed")
        self._sock.sendall(data)

    def recv(self, timeout: float | None) -> bytes:
        with self._state:
            if self._closed:
                return b""
            self._reading = True
        try:
            return self._recv(timeout)
        finally:
            with self._state:
                self._reading = False
                release = self._closed
            if release:
                self._release()

    def _recv(self, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            if self._out:
                data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
                self._out.clear()
                return data
            if self._eof or self._closed:
                return b""
            if not self._wait_readable(deadline):
                raise TimeoutError("no data from the runtime")
            try:
                data = self._sock.recv(self._chunk)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            except OSError:
                if self._closed:  # closed by another thread while we waited
                    return b""
                raise
            if not data:
                self._eof = True
                continue
            self._feed(data)

    def close(self) -> None:
        with self._state:
            if self._closed:
                return
            self._closed = True
            reading = self._reading
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a reader waiting in poll()
        if not reading:
            self._release()

    def _release(self) -> None:
        with self._state:
            if self._released:
                return
            self._released = True
        # Outermost first: the HTTP response flushes its reader, which needs the SocketIO open.
        response = getattr(self._raw, "_response", None)
        for closable in (response, self._raw, self._sock):
            if closable is not None:
                with contextlib.suppress(OSError, ValueError):
                    closable.close()

    # -- extras for the backend ------------------------------------------------------------------

    def close_stdin(self) -> None:
        """Half-close: the process reads EOF on stdin; its stdout stays readable."""
        self._sock.shutdown(socket.SHUT_WR)

    @property
    def stderr_tail(self) -> bytes:
        """The last ``stderr_limit`` bytes the process wrote to stderr."""
        return bytes(self._stderr_tail)

    def status(self) -> ExecStatus:
        """Ask the engine whether the process still runs and how it ended."""
        info = self._api.exec_inspect(self.exec_id)
        return ExecStatus(
            running=bool(info.get("Running")),
            exit_code=info.get("ExitCode"),
            host_pid=int(info.get("Pid") or 0),
        )

    def wait(self, timeout: float = 5.0, poll_interval: float = 0.005) -> int | None:
        """After EOF: poll ``exec_inspect`` until the engine reports the exit code.

        The engine may still say ``Running`` for a few milliseconds after the socket's EOF.
        Returns ``None`` if the process is still running after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if not status.running:
                return status.exit_code
            if time.monotonic() >= deadline:
                return None
            time.sleep(poll_interval)
            poll_interval = min(poll_interval * 2, 0.1)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Signal every process of this exec's user in the container (``kill -SIG -1``).

        Closing the socket does not end the exec'd process, and the engine has no API to kill an
        exec. ``kill(-1)`` reaches the whole tree, including children that left the process group
        with ``setsid``, and never PID 1 or the caller. It is only safe when the container's main
        process runs as a *different* uid than the exec (e.g. container ``user="65534:65534"``,
        exec ``user="10001:10001"``); otherwise it also stops the container. Returns the helper
        exec's exit code.
        """
        result = self._api.exec_create(self.container_id, ["sh", "-c", f"kill -{int(sig)} -1"], user=self.user)
        self._api.exec_start(result["Id"])
        return int(self._api.exec_inspect(result["Id"]).get("ExitCode") or 0)

    # -- internals -------------------------------------------------------------------------------

    def _wait_readable(self, deadline: float | None) -> bool:
        if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            return True
        while True:
            ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
            if self._poller.poll(ms):
                return True  # readable, hung up, or error: recv() tells which
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def _feed(self, data: bytes) -> None:
        """Demultiplex ``data`` (any slice of the frame stream) into stdout chunks and stderr."""
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._remaining == 0:
                need = _HEADER.size - len(self._header)
                self._header += view[pos : pos + need]
                pos += min(need, end - pos)
                if len(self._header) < _HEADER.size:
                    return
                self._stream, self._remaining = _HEADER.unpack(self._header)
                self._header.clear()
                continue
            take = min(self._remaining, end - pos)
            payload = view[pos : pos + take]
            pos += take
            self._remaining -= take
            if self._stream == _STDOUT:
                self._out.append(data if take == end else payload.tobytes())
            else:
                self._stderr(payload.tobytes())

    def _stderr(self, payload: bytes) -> None:
        if self._on_stderr is not None:
            self._on_stderr(payload)
        if self._stderr_limit > 0:
            self._stderr_tail += payload
            excess = len(self._stderr_tail) - self._stderr_limit
            if excess > 0:
                del self._stderr_tail[:excess]


def _unwrap_socket(raw: Any) -> tuple[socket.socket, bytes]:
    """Return the real socket behind ``exec_start(socket=True)`` and any bytes already buffered."""
    if isinstance(raw, socket.socket):  # https endpoints: docker-py already unwrapped it
        sock = raw
    elif isinstance(getattr(raw, "_sock", None), socket.socket):  # socket.SocketIO: unix, http
        sock = raw._sock
    else:
        raise TypeError(f"unsupported Docker transport for a raw exec socket: {type(raw)!r}")
    return sock, _take_buffered(raw, sock)


def _take_buffered(raw: Any, sock: socket.socket) -> bytes:
    """Bytes that http.client's BufferedReader read past the upgrade headers, without blocking."""
    try:
        reader = raw._response.raw._fp.fp
    except AttributeError:
        return b""
    if reader is None:
        return b""
    previous = sock.gettimeout()
    sock.setblocking(False)  # if the buffer is empty, peek() must not wait for the socket
    try:
        data: bytes = reader.peek()
    except (BlockingIOError, ssl.SSLWantReadError, OSError, ValueError):
        data = b""
    finally:
        sock.settimeout(previous)
    return data


def read_oom_kill_count(client: Any, container: Any, user: str = "") -> int | None:
    """The container's memory cgroup ``oom_kill`` counter, read with a short exec (~60 ms).

    Compare it before and after a process died with exit code 137 to tell an OOM kill from other
    SIGKILLs: ``State.OOMKilled`` of ``docker inspect`` only covers the container's PID 1. Returns
    ``None`` if the counter is not visible (kernel without ``oom_kill`` in ``memory.oom_control``).
    """
    api = getattr(client, "api", client)
    container_id: str = getattr(container, "id", container)
    created = api.exec_create(container_id, ["sh", "-c", _OOM_COUNTER_SCRIPT], user=user)
    output = api.exec_start(created["Id"])
    for line in bytes(output).decode("ascii", "replace").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None
