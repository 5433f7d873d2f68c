"""A :class:`~rlm_sandbox._channel.Channel` over a Daytona PTY WebSocket.

Why a PTY and not a session command: see ``backends/daytona/NOTES.md``. In short, the PTY is one
WebSocket carrying raw bytes both ways (binary frames, no per-write HTTP request, no log-file
tail), while session commands cost one HTTP POST per input, decode output as UTF-8 and poll a log
file.

``DaytonaChannel.start`` opens a PTY (``sandbox.process.create_pty_session``), which runs the
box's interactive login shell, and types one line into it::

     stty raw -echo -iexten && command -v <cmd0> >/dev/null \\
       && printf '%s-%s\\n' RLM-CHANNEL-READY <token> && exec <cmd> 2><stderr_path>; exit 127

``stty raw -echo`` makes the terminal binary-transparent (no echo, no CR/LF translation, no
signal or flow-control characters, no line buffering), so ``text_mode`` is False. Everything the
shell printed before the marker (prompt, echo of the typed line) is discarded; bytes after it are
the command's stdout. The command's stderr goes to ``stderr_path`` so it cannot corrupt frames.

Pitfalls handled here:

* Input sent before ``stty raw`` took effect would be mangled by the cooked line discipline, so
  ``start`` returns only after the marker arrived; the caller's first ``send`` is safe.
* The daemon rejects client frames over 64 KiB (gorilla ``SetReadLimit``), so ``send`` splits.
* The daemon drops a client whose 256-chunk output queue is full ("slow consumer", close 1008),
  so a reader thread drains the WebSocket into an unbounded buffer at once; ``recv`` reads that.
* A raw terminal cannot signal EOF on stdin, and closing the WebSocket leaves the process running
  (the PTY session outlives its clients), so ``close`` kills the PTY session.
"""

from __future__ import annotations

import queue
import secrets
import shlex
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from daytona import DaytonaError
from daytona.common.pty import PtySize

from rlm_sandbox._channel import Channel

__all__ = ["DaytonaChannel", "PtyNotConfirmed"]

_MARKER = "RLM-CHANNEL-READY"
#: Client -> PTY frames must stay under the daemon's 64 KiB read limit.
_FRAME = 32 * 1024
#: A canonical-mode tty keeps at most 4095 bytes of one line; the launch line must fit.
_MAX_LINE = 4000


class PtyNotConfirmed(ConnectionError):
    """The PTY WebSocket opened but its "connected" message came later than the SDK waits.

    ``PtyHandle.wait_for_connection`` (SDK 0.226) polls with 0.1 s receives and treats the
    ``queue.Empty`` httpx-ws raises as fatal, so a daemon (or the fake) that takes longer than
    0.1 s to start the shell fails the create. The half-made PTY is killed; starting again works.
    """


class DaytonaChannel(Channel):
    """A channel to the stdin/stdout of one process running on a Daytona PTY.

    Create it with :meth:`start`. Safe for one reader thread plus one writer thread.
    """

    text_mode = False

    def __init__(self, handle: Any, *, wake_s: float = 0.5, kill: Callable[[], None] | None = None) -> None:
        """Wrap a connected ``daytona.handle.pty_handle.PtyHandle`` and start draining it.

        ``wake_s`` bounds how long the reader thread blocks between checks of :meth:`close`;
        data is delivered as soon as it arrives regardless. ``kill`` ends the PTY session
        (default: ``handle.kill()``, whose request has no timeout).
        """
        self._handle = handle
        self._kill = kill or handle.kill
        self._killed = False
        self._wake_s = wake_s
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._closing = threading.Event()
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name=f"daytona-pty-{handle.session_id}", daemon=True)
        self._reader.start()

    @classmethod
    def start(
        cls,
        sandbox: Any,
        cmd: Sequence[str],
        *,
        cwd: str | None = None,
        environment: Mapping[str, str] | None = None,
        stderr_path: str = "/dev/null",
        startup_timeout: float = 30.0,
        pty_id: str | None = None,
        request_timeout: float | None = 30.0,
    ) -> DaytonaChannel:
        """Run ``cmd`` on a new PTY in ``sandbox`` (a ``daytona.Sandbox``) and connect to it.

        Returns once the command is about to be exec'd with the terminal in raw mode. Raises
        ``TimeoutError`` if that takes longer than ``startup_timeout`` seconds, ``ConnectionError``
        if the PTY ends first, :class:`PtyNotConfirmed` (a ``ConnectionError``; start again) if the
        SDK gave up on the PTY's connection message, and ``DaytonaError`` if the PTY cannot be
        created.
        ``request_timeout`` bounds the HTTP request that kills the PTY on :meth:`close`.
        """
        token = secrets.token_hex(8)
        line = (
            f" stty raw -echo -iexten && command -v {shlex.quote(cmd[0])} >/dev/null"
            f" && printf '%s-%s\\n' {_MARKER} {token}"
            f" && exec {shlex.join(cmd)} 2>{shlex.quote(stderr_path)}; exit 127\n"
        )
        if len(line.encode()) > _MAX_LINE:
            raise ValueError("command too long for a PTY line; upload a script and run that")
        session_id = pty_id or f"rlm-{token}"
        process = sandbox.process

        def kill() -> None:
            process.kill_pty_session(session_id, request_timeout=request_timeout)

        try:
            handle = process.create_pty_session(
                session_id,
                cwd=cwd,
                envs=dict(environment) if environment else None,
                pty_size=PtySize(rows=24, cols=999),
            )
        except DaytonaError as exc:
            if not isinstance(exc.__cause__, queue.Empty):
                raise
            try:
                kill()
            except Exception:  # noqa: BLE001 - best effort; the sandbox's deletion ends it anyway
                pass
            raise PtyNotConfirmed("the PTY did not confirm its connection within the SDK's 0.1 s") from exc

        channel = cls(handle, kill=kill)
        try:
            handle.send_input(line)
            try:
                channel._skip_to(f"{_MARKER}-{token}\n".encode(), startup_timeout)
            except ConnectionError as exc:
                if channel.exit_code == 127:
                    raise ConnectionError(f"{cmd[0]!r} or stty is not on the sandbox's PATH") from exc
                raise
        except BaseException:
            channel.close()
            raise
        return channel

    # -- Channel -------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self._eof:
            raise BrokenPipeError("the PTY session has ended")
        view = memoryview(data)
        try:
            for i in range(0, len(view), _FRAME):
                self._handle.send_input(bytes(view[i : i + _FRAME]))
        except DaytonaError as e:
            raise BrokenPipeError(str(e)) from e

    def recv(self, timeout: float | None) -> bytes:
        with self._cond:
            if not self._cond.wait_for(lambda: self._buf or self._eof, timeout):
                raise TimeoutError("no data from the runtime")
            data = bytes(self._buf)
            self._buf.clear()
            return data

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self.kill()
        self._reader.join(timeout=self._wake_s + 5)
        self._handle.disconnect()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    # -- extras --------------------------------------------------------------------------------

    @property
    def pty_id(self) -> str:
        """The PTY session's id in the sandbox."""
        session_id: str = self._handle.session_id
        return session_id

    @property
    def exit_code(self) -> int | None:
        """The process's exit status once the PTY reported it (137 after a kill), else None.

        None after end of stream means the connection was lost without an exit status.
        """
        code: int | None = self._handle.exit_code
        return code

    @property
    def error(self) -> str | None:
        """The PTY's exit reason or connection error, if any."""
        error: str | None = self._handle.error
        return error

    def kill(self) -> None:
        """SIGKILL the process tree (``DELETE /process/pty/{id}``, once); errors are ignored."""
        if self._killed or self._handle.exit_code is not None:  # killed, or exited by itself
            return
        self._killed = True
        try:
            self._kill()
        except Exception:  # noqa: BLE001 - gone already, or unreachable: the sandbox's deletion ends it
            pass

    # -- internals -----------------------------------------------------------------------------

    def _read_loop(self) -> None:
        handle = self._handle
        try:
            while not self._closing.is_set():
                handle.wait(on_data=self._feed, timeout=self._wake_s)
                if handle.exit_code is not None or handle.error or not handle.is_connected():
                    break
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _feed(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            self._cond.notify_all()

    def _skip_to(self, marker: bytes, timeout: float) -> None:
        """Discard output up to and including ``marker``; keep what follows it."""
        deadline = time.monotonic() + timeout
        seen = bytearray()
        with self._cond:
            while (at := seen.find(marker)) < 0:
                remaining = deadline - time.monotonic()
                if not self._cond.wait_for(lambda: self._buf or self._eof, max(remaining, 0)):
                    raise TimeoutError(f"PTY did not start the command: {bytes(seen[-500:])!r}")
                if not self._buf:
                    raise ConnectionError(f"PTY ended before the command: {bytes(seen[-500:])!r}")
                seen += self._buf
                self._buf.clear()
            self._buf[:0] = seen[at + len(marker) :]
