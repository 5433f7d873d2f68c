"""A :class:`~rlm_sandbox._channel.Channel` over one long-lived E2B background command.

Mechanism (see ``backends/e2b/NOTES.md``):

* start: ``sandbox.commands.run(cmd, background=True, stdin=True, timeout=0,
  retain_output=False)`` -- one ``POST /process.Process/Start`` whose response is a Connect
  server stream that lives as long as the process (``timeout=0``: no deadline; envd sends
  keep-alive events every 50 s, asked for by the SDK's ``Keepalive-Ping-Interval`` header).
* host -> box: ``sandbox.commands.send_stdin(pid, data)`` -- one unary
  ``POST /process.Process/SendInput`` per call (bytes, base64 inside JSON).
* box -> host: iterating the handle yields stdout as ``str``: the SDK decodes it as UTF-8 with
  ``errors="replace"``, so the stream is **not binary-safe** and the channel is ``text_mode``:
  the runtime base64-encodes its frames on ASCII lines, which survive the decoding unchanged.
* EOF: ``sandbox.commands.close_stdin(pid)``; kill: ``sandbox.commands.kill(pid)`` (SIGKILL).

A daemon thread iterates the output stream and hands chunks to :meth:`recv` through a queue.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from e2b.exceptions import NotFoundException

from rlm_sandbox._channel import Channel

if TYPE_CHECKING:
    from e2b import Sandbox

__all__ = ["E2BChannel"]

_EOF = object()


class E2BChannel(Channel):
    """Start ``command`` in ``sandbox`` as a background process and talk to its stdin/stdout.

    ``recv`` raises :class:`ConnectionError` (an :class:`OSError`) when the output stream broke
    (network drop, sandbox killed or expired) instead of ending cleanly; it returns ``b""`` once
    the process has exited. ``send`` raises :class:`BrokenPipeError` when the process is gone and
    :class:`ConnectionError` for other failures. The SDK exception is chained as ``__cause__``.
    The constructor lets the SDK's exception through when the process cannot be started.

    Stderr never enters the channel: its last ``stderr_limit`` bytes are kept in
    :attr:`stderr_tail` and each chunk goes to ``on_stderr`` (called on the reader thread).
    ``send`` splits ``data`` into ``send_chunk``-byte ``SendInput`` requests, each bounded by
    ``request_timeout`` (default: the sandbox's connection config).
    """

    text_mode = True

    def __init__(
        self,
        sandbox: Sandbox,
        command: str,
        *,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
        user: str | None = None,
        send_chunk: int = 1 << 20,
        request_timeout: float | None = None,
        close_timeout: float = 5.0,
        stderr_limit: int = 64 << 10,
        on_stderr: Callable[[bytes], None] | None = None,
    ) -> None:
        self._commands = sandbox.commands
        self._send_chunk = send_chunk
        self._request_timeout = request_timeout
        self._close_timeout = close_timeout
        self._stderr_limit = stderr_limit
        self._stderr = bytearray()
        self._on_stderr = on_stderr
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._final: object = None  # _EOF or the exception that broke the stream, once seen
        self._closed = False
        #: Exit code of the process once its output stream ended normally.
        self.exit_code: int | None = None
        self._handle = self._commands.run(
            command,
            background=True,
            stdin=True,
            cwd=cwd,
            envs=envs,
            user=user,
            timeout=0,
            retain_output=False,
        )
        #: The process id inside the sandbox.
        self.pid: int = self._handle.pid
        self._reader = threading.Thread(target=self._pump, name=f"e2b-channel-{self.pid}", daemon=True)
        self._reader.start()

    @property
    def stderr_tail(self) -> bytes:
        """The last ``stderr_limit`` bytes the process wrote to stderr (for diagnostics)."""
        return bytes(self._stderr)

    def _pump(self) -> None:
        try:
            for stdout, stderr, _pty in self._handle:
                if stdout:
                    self._queue.put(stdout.encode("utf-8"))
                elif stderr:
                    data = stderr.encode("utf-8")
                    self._stderr += data
                    del self._stderr[: -self._stderr_limit]
                    if self._on_stderr is not None:
                        self._on_stderr(data)
        except Exception as exc:  # noqa: BLE001 - the SDK's mapped error: the stream broke; recv raises it
            self._queue.put(exc)
            return
        try:  # the stream is exhausted, so this only reads the recorded end event
            self.exit_code = self._handle.wait().exit_code
        except Exception as exc:  # noqa: BLE001 - CommandExitException for a non-zero exit
            self.exit_code = getattr(exc, "exit_code", None)
        self._queue.put(_EOF)

    def send(self, data: bytes) -> None:
        if self._closed:
            raise BrokenPipeError("the channel is closed")
        view = memoryview(data)
        for start in range(0, len(view), self._send_chunk):
            try:
                self._commands.send_stdin(
                    self.pid, bytes(view[start : start + self._send_chunk]), request_timeout=self._request_timeout
                )
            except Exception as exc:
                if isinstance(exc, NotFoundException):
                    raise BrokenPipeError(f"the E2B process {self.pid} is gone: {exc}") from exc
                raise ConnectionError(f"sending to the E2B process {self.pid} failed: {exc}") from exc

    def recv(self, timeout: float | None) -> bytes:
        if self._final is None:
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError("no data from the runtime") from None
            if isinstance(item, bytes):
                return self._drain(item)
            self._final = item
        if isinstance(self._final, BaseException):
            raise ConnectionError(f"the E2B output stream broke: {self._final}") from self._final
        return b""

    def _drain(self, first: bytes, limit: int = 4 << 20) -> bytes:
        """Join ``first`` with whatever else is already queued, up to about ``limit`` bytes."""
        parts = [first]
        size = len(first)
        while size < limit:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(item, bytes):
                self._final = item
                break
            parts.append(item)
            size += len(item)
        return b"".join(parts)

    def close(self) -> None:
        """Close stdin so the runtime exits; kill the process if it has not ended in time."""
        if self._closed:
            return
        self._closed = True
        if not self._reader.is_alive():
            return
        try:
            self._commands.close_stdin(self.pid, request_timeout=self._close_timeout)
        except Exception:  # noqa: BLE001 - already gone, or unreachable: the kill below is the fallback
            pass
        self._reader.join(self._close_timeout)
        if self._reader.is_alive():
            try:
                self._commands.kill(self.pid, request_timeout=self._close_timeout)
            except Exception:  # noqa: BLE001 - best effort: the sandbox's deletion ends it anyway
                pass
            self._reader.join(self._close_timeout)
