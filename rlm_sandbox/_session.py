"""The host side of the protocol: one session per runtime process.

The thread that runs an operation reads the channel itself until its reply arrives; host-function
calls that arrive meanwhile are handed to a bounded thread pool, whose threads only write. So there
is no reader thread and no hand-off on the path of a trivial ``execute``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from . import runtime as rt
from ._channel import Channel
from ._errors import (
    NotSerializable,
    ProtocolViolation,
    SandboxError,
    SandboxFileNotFound,
    SandboxIsADirectory,
    SandboxPermissionError,
    SandboxTimeout,
    VariableNotFound,
)
from ._results import CodeError, ExecResult, Outcome

if TYPE_CHECKING:
    from ._sandbox import Blob

__all__ = ["ChannelLost", "RuntimeUnresponsive", "Session"]

log = logging.getLogger("rlm_sandbox")

_OUTCOMES = {o.value: o for o in Outcome}


class ChannelLost(SandboxError):
    """The runtime's stream ended (the runtime process or the box is gone)."""


class RuntimeUnresponsive(SandboxTimeout):
    """The runtime did not answer within the host's safety deadline."""


class _Stop(Exception):
    pass


class Session:
    """Speaks the framed protocol with one runtime over one channel."""

    def __init__(
        self,
        channel: Channel,
        *,
        functions: Mapping[str, Callable[..., Any]],
        max_workers: int = 16,
        max_pending: int = 1024,
        max_pending_bytes: int = 256 << 20,
        max_message: int = 64 << 20,
        name: str = "sandbox",
    ) -> None:
        self.channel = channel
        self.text_mode = channel.text_mode
        self.functions = dict(functions)
        self.max_workers = max_workers
        self.max_pending = max_pending
        self.name = name
        self.reader = rt.FrameReader(max_message=max_message, text_mode=self.text_mode)
        self._wlock = threading.Lock()
        self._oplock = threading.Lock()
        self._ids = 0
        self._pool: ThreadPoolExecutor | None = None
        self._inflight = 0
        self._inflight_bytes = 0
        self.max_pending_bytes = max_pending_bytes
        self._inflight_lock = threading.Lock()
        self._broken: BaseException | None = None
        self.notices: list[str] = []
        self._backlog: deque[tuple[int, bytes]] = deque()
        self.hello: dict[str, Any] = {}

    # ---- low level --------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        with self._wlock:
            try:
                self.channel.send(data)
            except OSError as exc:
                raise ChannelLost(f"the runtime's stream is closed: {exc}") from exc

    def _msg(self, msg: dict[str, Any]) -> None:
        self._send(rt.message(msg, self.text_mode))

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def _frames(self, deadline: float | None) -> list[tuple[int, bytes]]:
        """Read from the channel until at least one frame is complete."""
        while True:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                raise RuntimeUnresponsive("the runtime did not answer in time")
            try:
                data = self.channel.recv(timeout)
            except TimeoutError:
                raise RuntimeUnresponsive("the runtime did not answer in time") from None
            except OSError as exc:
                raise ChannelLost(f"the runtime's stream failed: {exc}") from exc
            if not data:
                raise ChannelLost("the runtime's stream ended")
            try:
                frames = self.reader.feed(data)
            except rt.ProtocolError as exc:
                raise ProtocolViolation(f"the box broke the protocol: {exc}") from exc
            if frames:
                return frames

    def _wait(
        self,
        rid: int,
        deadline: float | None,
        on_data: Callable[[bytes], None] | None = None,
    ) -> dict[str, Any]:
        """Pump frames until the reply to request ``rid`` arrives; serve calls meanwhile."""
        backlog = self._backlog
        try:
            while True:
                if not backlog:
                    backlog.extend(self._frames(deadline))
                while backlog:
                    kind, payload = backlog.popleft()
                    if kind == rt.T_DATA:
                        tid, chunk = rt.split_data(payload)
                        if tid != rid or on_data is None:
                            raise ProtocolViolation("unexpected data frame from the box")
                        on_data(chunk)
                        continue
                    msg = rt.parse_message(payload)
                    op = msg["op"]
                    if op == "call":
                        self._on_call(msg, len(payload))
                    elif op == "notice":
                        self.notices.append(str(msg.get("message", "")))
                    elif op == "fatal":
                        raise ProtocolViolation(str(msg.get("message", "runtime error")))
                    elif msg.get("id") == rid:
                        return msg
                    # Anything else is a late reply to an abandoned request: ignore it.
        except rt.ProtocolError as exc:
            raise ProtocolViolation(f"the box broke the protocol: {exc}") from exc

    def _request(
        self,
        msg: dict[str, Any],
        timeout: float | None,
        *,
        after_send: Callable[[int], None] | None = None,
        on_data: Callable[[bytes], None] | None = None,
        then: Callable[[int, dict[str, Any], float | None], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        if self._broken is not None:
            raise ChannelLost(f"the runtime is gone: {self._broken}")
        with self._oplock:
            rid = self._next_id()
            msg["id"] = rid
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                self._msg(msg)
                if after_send is not None:
                    after_send(rid)
                reply = self._wait(rid, deadline, on_data)
                return reply if then is None else then(rid, reply, deadline)
            except (ChannelLost, ProtocolViolation, RuntimeUnresponsive) as exc:
                self._broken = exc
                raise

    # ---- host functions ----------------------------------------------------------------------

    def _on_call(self, msg: dict[str, Any], size: int) -> None:
        cid = msg.get("id")
        name = msg.get("name")
        args = msg.get("args", [])
        kwargs = msg.get("kwargs", {})
        if not isinstance(cid, int) or not isinstance(name, str):
            raise ProtocolViolation("malformed call frame")
        if name not in self.functions or not isinstance(args, list) or not isinstance(kwargs, dict):
            self._reply_error(cid, "NameError", f"no host function named {name!r}")
            return
        with self._inflight_lock:
            # Bounded in count and in bytes: a flood of calls from the box cannot grow the host.
            busy = self._inflight >= self.max_pending or self._inflight_bytes + size > self.max_pending_bytes
            if not busy:
                self._inflight += 1
                self._inflight_bytes += size
        if busy:
            self._reply_error(cid, "RuntimeError", "too many host-function calls pending")
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.max_workers, thread_name_prefix=f"rlm-{self.name}-call"
            )
        self._pool.submit(self._run_call, cid, self.functions[name], args, kwargs, size)

    def _reply_error(self, cid: int, name: str, message: str) -> None:
        self._msg(
            {"op": "call_result", "id": cid, "ok": False, "error": {"name": name, "message": message}}
        )

    def _run_call(
        self, cid: int, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], size: int
    ) -> None:
        try:
            try:
                value = fn(*rt.decode_value(args), **rt.decode_value(kwargs))
                reply = {"op": "call_result", "id": cid, "ok": True, "value": rt.encode_value(value)}
            except BaseException as exc:  # noqa: BLE001 - every host error goes back as data
                reply = {
                    "op": "call_result",
                    "id": cid,
                    "ok": False,
                    "error": {"name": type(exc).__name__, "message": str(exc)},
                }
            self._msg(reply)
        except (ChannelLost, OSError):
            log.debug("could not deliver a host-function result: the runtime is gone")
        finally:
            with self._inflight_lock:
                self._inflight -= 1
                self._inflight_bytes -= size

    # ---- operations ---------------------------------------------------------------------------

    def start(self, source: bytes | None, config: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send the runtime's source (unless the box has it) and the init message; return hello."""
        if source is not None:
            mode = b"b64" if self.text_mode else b"raw"
            self._send(b"%d %s\n" % (len(source), mode) + source)
        self.hello = self._request({"op": "init", "config": config}, timeout)
        return self.hello

    def execute(self, code: str, timeout: float | None, grace: float, slack: float, echo: bool = False) -> ExecResult:
        host_timeout = None if timeout is None else timeout + grace + slack
        reply = self._request(
            {"op": "exec", "code": code, "timeout": timeout, "echo": echo}, host_timeout
        )
        return result_from_reply(reply)

    def interrupt(self) -> None:
        """Interrupt the running cell (KeyboardInterrupt; killed after the grace period)."""
        self._msg({"op": "interrupt"})

    def get_var(self, name: str, timeout: float) -> Any:
        reply = self._request({"op": "get_var", "name": name}, timeout)
        self._raise_for(reply, name)
        return rt.decode_value(reply.get("value"))

    def set_var(self, name: str, value: Any, timeout: float) -> None:
        try:
            encoded = rt.encode_value(value)
        except TypeError as exc:
            raise NotSerializable(str(exc)) from None
        self._raise_for(self._request({"op": "set_var", "name": name, "value": encoded}, timeout), name)

    def list_vars(self, timeout: float) -> dict[str, str]:
        reply = self._request({"op": "list_vars"}, timeout)
        self._raise_for(reply, "")
        value = reply.get("value")
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}

    def _stream_upload(self, rid: int, data: Blob) -> None:
        for chunk in data.chunks():
            self._send(rt.data_frame(rid, chunk, self.text_mode))

    def load_context(
        self,
        name: str,
        aliases: list[str],
        kind: str,
        data: Blob | None,
        path: str | None,
        timeout: float,
    ) -> None:
        msg: dict[str, Any] = {"op": "load_context", "name": name, "aliases": aliases, "kind": kind}
        if path is not None:
            msg["path"] = path
            reply = self._request(msg, timeout)
        else:
            assert data is not None
            msg["size"] = data.size
            reply = self._request(msg, timeout, after_send=lambda rid: self._stream_upload(rid, data))
        self._raise_for(reply, path or name)

    def put_file(self, path: str, data: Blob, timeout: float) -> None:
        reply = self._request(
            {"op": "put_file", "path": path, "size": data.size},
            timeout,
            after_send=lambda rid: self._stream_upload(rid, data),
        )
        self._raise_for(reply, path)

    def get_file(self, path: str, timeout: float) -> bytes:
        parts: list[bytes] = []
        size = 0
        header: dict[str, Any] = {}

        def on_data(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)
            expected = header.get("size")
            if isinstance(expected, int) and size > expected:
                raise ProtocolViolation("more file data than announced")
            parts.append(chunk)

        def then(rid: int, reply: dict[str, Any], deadline: float | None) -> dict[str, Any]:
            self._raise_for(reply, path)
            if reply["op"] != "file":
                raise ProtocolViolation("unexpected reply to get_file")
            header.update(reply)
            # The data frames and the closing "done" follow under the same id.
            return self._wait(rid, deadline, on_data)

        done = self._request({"op": "get_file", "path": path}, timeout, then=then)
        self._raise_for(done, path)
        return b"".join(parts)

    def reset(self, timeout: float) -> None:
        self._raise_for(self._request({"op": "reset"}, timeout), "")

    def ping(self, timeout: float) -> None:
        self._raise_for(self._request({"op": "ping"}, timeout), "")

    def shutdown(self, timeout: float = 2.0) -> None:
        """Ask the runtime to kill its process tree and exit; best effort."""
        if self._broken is None:
            try:
                self._request({"op": "shutdown"}, timeout)
            except SandboxError:
                pass
        self.close()

    def close(self) -> None:
        self.channel.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    @staticmethod
    def _raise_for(reply: dict[str, Any], what: str) -> None:
        if reply.get("op") != "error":
            return
        kind = reply.get("kind")
        text = str(reply.get("message", ""))
        if kind == "name":
            raise VariableNotFound(f"no variable named {what!r} in the sandbox")
        if kind == "type":
            raise NotSerializable(text)
        if kind == "not_found":
            raise SandboxFileNotFound(f"no such file in the sandbox: {what}")
        if kind == "is_dir":
            raise SandboxIsADirectory(f"not a regular file in the sandbox: {what}")
        if kind == "permission":
            raise SandboxPermissionError(f"permission denied in the sandbox: {what}")
        if kind == "restarted":
            from ._errors import SandboxCrashed

            raise SandboxCrashed("the runtime was restarted during the operation")
        raise SandboxError(f"{kind}: {text}")


def result_from_reply(reply: dict[str, Any]) -> ExecResult:
    """Build a validated ExecResult from the runtime's result message."""
    if reply.get("op") != "result":
        raise ProtocolViolation(f"unexpected reply to exec: {reply.get('op')!r}")
    outcome = _OUTCOMES.get(str(reply.get("outcome")))
    if outcome is None:
        raise ProtocolViolation("bad outcome in result")
    err = reply.get("error")
    error = None
    if isinstance(err, dict):
        error = CodeError(
            name=str(err.get("name", "")),
            message=str(err.get("message", "")),
            traceback=str(err.get("traceback", "")),
        )
    return ExecResult(
        outcome=outcome,
        stdout=str(reply.get("stdout", "")),
        stderr=str(reply.get("stderr", "")),
        error=error,
        duration_s=float(reply.get("duration", 0.0) or 0.0),
        truncated=bool(reply.get("truncated")),
        state_lost=bool(reply.get("state_lost")),
        timed_out=bool(reply.get("timed_out")),
        message=str(reply.get("message", "")),
    )
