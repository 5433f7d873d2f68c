"""The Sandbox interface and the implementation every built-in backend shares."""

from __future__ import annotations

import atexit
import functools
import json
import os
import signal
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import runtime as rt
from ._errors import (
    LimitNotSupported,
    NotSerializable,
    ProtocolViolation,
    SandboxClosed,
    SandboxCrashed,
    SandboxError,
    SandboxStartError,
)
from ._limits import Limits
from ._results import ExecResult, Outcome
from ._session import ChannelLost, RuntimeUnresponsive, Session

if TYPE_CHECKING:
    from ._box import BackendConfig, Box

__all__ = ["ContextPayload", "RuntimeSandbox", "Sandbox", "close_all", "install_exit_hooks"]

ContextPayload = str | bytes | bytearray | dict[str, Any] | list[Any]

#: Extra time the host waits beyond timeout + grace before it calls a runtime unresponsive.
UNRESPONSIVE_SLACK_S = 30.0


class Sandbox(ABC):
    """A persistent Python REPL in an isolated box.

    Errors in user code come back as data in :class:`ExecResult`; infrastructure failures raise
    :class:`SandboxError` subclasses. Use it as a context manager, or call :meth:`close`.

    Example::

        with rlm_sandbox.open_sandbox("local") as sb:
            sb.load_context("a long text")
            r = sb.execute("print(len(context))")
            assert r.stdout == "11\\n"
    """

    #: The backend's registered name.
    backend: str = ""
    #: A stable identifier of the box (for logs, trajectories and ``gc``).
    id: str = ""

    @property
    @abstractmethod
    def limits(self) -> Limits:
        """The limits this sandbox was opened with."""

    @property
    def unenforced_limits(self) -> Mapping[str, str]:
        """Limits skipped under ``Limits(best_effort=True)``, by name, with the reason."""
        return {}

    @abstractmethod
    def execute(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        """Run ``code`` in the persistent namespace. Never raises for an error in the code."""

    @abstractmethod
    def load_context(self, payload: ContextPayload, *, name: str = "context") -> str:
        """Make ``payload`` a variable inside the sandbox; return the variable's name.

        With the default name, contexts become ``context_0``, ``context_1``, ... and ``context``
        names the first. Contexts survive runtime restarts. Never passed through argv or code.
        """

    @abstractmethod
    def get_variable(self, name: str) -> Any:
        """Return a variable's value (JSON types and bytes only; else ``NotSerializable``)."""

    @abstractmethod
    def set_variable(self, name: str, value: Any) -> None:
        """Set a variable inside the sandbox (JSON types and bytes)."""

    @abstractmethod
    def list_variables(self) -> dict[str, str]:
        """Names of the user's variables with their type names."""

    @abstractmethod
    def write_file(self, path: str, data: bytes | str) -> None:
        """Write a file (relative paths are in the work directory; parents are created)."""

    @abstractmethod
    def read_file(self, path: str) -> bytes:
        """Read a file from the sandbox."""

    @abstractmethod
    def interrupt(self) -> None:
        """Interrupt the running cell from another thread (as a timeout would)."""

    @abstractmethod
    def reset(self) -> None:
        """Start over: a fresh runtime with no variables, contexts or files from before."""

    @abstractmethod
    def close(self) -> None:
        """Destroy the box. Idempotent."""

    @property
    @abstractmethod
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_open_sandboxes: weakref.WeakSet[Sandbox] = weakref.WeakSet()
_atexit_installed = False
_sigterm_installed = False
_hooks_lock = threading.Lock()


def close_all() -> int:
    """Close every sandbox still open in this process; returns how many were closed.

    Runs automatically at normal interpreter exit and on SIGTERM (when the application has not
    installed its own SIGTERM handler; then call it from yours).
    """
    closed = 0
    for sb in list(_open_sandboxes):
        try:
            if not sb.closed:
                sb.close()
                closed += 1
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    return closed


def _on_sigterm(signum: int, frame: object) -> None:
    close_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _track(sb: Sandbox) -> None:
    """Remember an open sandbox, and install the exit hooks."""
    _open_sandboxes.add(sb)
    install_exit_hooks()


def install_exit_hooks() -> None:
    """Close every open sandbox at interpreter exit and on SIGTERM.

    Called at each open; the SIGTERM handler can only be installed from the main thread, so
    code that opens sandboxes only in worker threads (the driver, pools) calls this first from the
    main thread. A SIGTERM handler the application installed itself is left alone.
    """
    global _atexit_installed, _sigterm_installed
    if _atexit_installed and _sigterm_installed:
        return
    with _hooks_lock:
        if not _atexit_installed:
            _atexit_installed = True
            atexit.register(close_all)
        if not _sigterm_installed and threading.current_thread() is threading.main_thread():
            _sigterm_installed = True
            try:
                if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                    signal.signal(signal.SIGTERM, _on_sigterm)
            except (ValueError, OSError):
                pass


@functools.cache
def runtime_source() -> bytes:
    """The runtime file's bytes, as sent into every box."""
    return Path(rt.__file__).read_bytes()


@functools.cache
def runtime_sha256() -> str:
    """Identifies this exact runtime (images carry it in the label ``org.rlm-sandbox.runtime-sha256``)."""
    import hashlib

    return hashlib.sha256(runtime_source()).hexdigest()


class Blob:
    """Bytes to send into a box, produced in chunks (a 100 MB ASCII str is never copied whole)."""

    def __init__(self, size: int, chunks: Callable[[], Iterator[bytes]]) -> None:
        self.size = size
        self.chunks = chunks

    @classmethod
    def of(cls, data: bytes | str) -> Blob:
        if isinstance(data, str):
            text: str = data
            if text.isascii():  # O(1) in CPython: the size is known without encoding
                step = rt.CHUNK
                return cls(
                    len(text),
                    lambda: (text[i : i + step].encode("ascii") for i in range(0, len(text), step)),
                )
            data = data.encode("utf-8")
        view = memoryview(data)
        return cls(len(view), lambda: (bytes(view[i : i + rt.CHUNK]) for i in range(0, len(view), rt.CHUNK)))

    def getvalue(self) -> bytes:
        return b"".join(self.chunks())


def encode_context(payload: ContextPayload) -> tuple[str, Blob]:
    """(kind, blob) for a context payload."""
    if isinstance(payload, str):
        return "str", Blob.of(payload)
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return "bytes", Blob.of(bytes(payload))
    if isinstance(payload, (dict, list)):
        try:
            return "json", Blob.of(json.dumps(payload, ensure_ascii=False))
        except (TypeError, ValueError) as exc:
            raise NotSerializable(f"context is not JSON-serialisable: {exc}") from None
    raise NotSerializable(f"a context must be str, bytes, dict or list, not {type(payload).__name__}")


class RuntimeSandbox(Sandbox):
    """A sandbox driven by the rlm_sandbox runtime over a backend's byte channel.

    Every built-in backend is this class plus a :class:`Box`; a third-party backend usually is
    too. Restarts, timeouts, output bounds, host functions and contexts all live here.
    """

    def __init__(
        self,
        config: BackendConfig,
        *,
        limits: Limits | None = None,
        functions: Mapping[str, Callable[..., Any]] | None = None,
    ) -> None:
        self.config = config
        self.backend = config.backend
        self._limits = limits or Limits()
        self.functions = dict(functions or {})
        for fname in self.functions:
            if not fname.isidentifier():
                raise NotSerializable(f"host function name {fname!r} is not an identifier")
        self._lock = threading.RLock()
        self._state_lock = threading.Lock()
        self._closed = False
        self._context_count = 0
        self._unenforced: dict[str, str] = {}
        self._session: Session | None = None
        self._box: Box = config.create_box(self._limits)
        self.id = self._box.id
        try:
            self._check_limits(self._box.unenforced)
            self._start_runtime()
        except BaseException:
            self._teardown()
            raise
        _track(self)

    # ---- lifecycle ----------------------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def unenforced_limits(self) -> Mapping[str, str]:
        return dict(self._unenforced)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def box(self) -> Box:
        """The backend's box (for backend-specific inspection)."""
        return self._box

    def _check_limits(self, failed: Mapping[str, str]) -> None:
        if not failed:
            return
        if self._limits.best_effort:
            self._unenforced.update(failed)
            return
        detail = "; ".join(f"{k}: {v}" for k, v in sorted(failed.items()))
        raise LimitNotSupported(
            f"the {self.backend} backend cannot enforce these limits here ({detail}). "
            "Relax them, or pass Limits(best_effort=True) to run without them.",
            limits=dict(failed),
        )

    def _runtime_config(self) -> dict[str, Any]:
        box, limits = self._box, self._limits
        cfg: dict[str, Any] = dict(box.runtime_options)
        cfg.update(
            workdir=box.workdir,
            statedir=box.statedir,
            functions=sorted(self.functions),
            output_bytes=limits.output_bytes,
            grace_s=limits.grace_s,
            memory_mb=limits.memory_mb,
            max_message=self.config.max_message_bytes,
        )
        return cfg

    def _start_runtime(self) -> None:
        baked = self._box.baked_runtime
        if baked is not None:
            code = rt.LOAD_BAKED % (baked, "b64" if self._box.text_mode else "raw")
            channel = self._box.launch([self._box.python, "-u", "-c", code])
        else:
            channel = self._box.launch([self._box.python, "-u", "-c", rt.BOOTSTRAP])
        session = Session(
            channel,
            functions=self.functions,
            max_workers=self.config.max_concurrent_calls,
            max_pending=self.config.max_pending_calls,
            max_pending_bytes=self.config.max_pending_call_bytes,
            max_message=self.config.max_message_bytes,
            name=self.id,
        )
        try:
            source = None if baked is not None else runtime_source()
            hello = session.start(source, self._runtime_config(), self.config.startup_timeout_s)
        except SandboxError as exc:
            session.close()
            raise SandboxStartError(f"the runtime did not start in the {self.backend} box: {exc}") from exc
        if hello.get("op") != "hello":
            session.close()
            raise SandboxStartError(f"unexpected first message from the runtime: {hello.get('op')!r}")
        failed = hello.get("failed") or {}
        self._session = session
        self._check_limits({str(k): str(v) for k, v in failed.items()} if isinstance(failed, dict) else {})
        contexts = hello.get("contexts")
        if isinstance(contexts, list) and not self._context_count:
            self._context_count = sum(1 for c in contexts if str(c).startswith("context_"))

    def _recover(self) -> None:
        """Replace a dead or unresponsive runtime with a fresh one in the same box."""
        if self._session is not None:
            self._session.close()
            self._session = None
        self._box.kill_runtime()
        self._start_runtime()

    def _live_session(self) -> Session:
        if self._closed:
            raise SandboxClosed("the sandbox is closed")
        if self._session is None:
            self._start_runtime()
        assert self._session is not None
        return self._session

    def _teardown(self) -> None:
        session, self._session = self._session, None
        try:
            if session is not None:
                session.shutdown()
        finally:
            self._box.close()

    def close(self) -> None:
        """Destroy the box. Idempotent, and it never waits for a running cell: the box is torn down
        under it, and that ``execute`` raises ``SandboxClosed``."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        if self._lock.acquire(blocking=False):
            try:
                self._teardown()
            finally:
                self._lock.release()
        else:
            # An operation runs in another thread: kill the runtime and the box under it; that
            # thread sees its channel end and cleans up its session.
            self._box.kill_runtime()
            self._box.close()

    # ---- operations -----------------------------------------------------------------------------

    def execute(self, code: str, *, timeout_s: float | None = None, echo: bool = False) -> ExecResult:
        """Run ``code``; ``echo=True`` prints the repr of a trailing expression, as a REPL does."""
        if not isinstance(code, str):
            raise TypeError("code must be a str")
        timeout = self._limits.exec_timeout_s if timeout_s is None else timeout_s
        with self._lock:
            session = self._live_session()
            try:
                return session.execute(code, timeout, self._limits.grace_s, UNRESPONSIVE_SLACK_S, echo)
            except (RuntimeUnresponsive, ChannelLost, ProtocolViolation) as exc:
                self._raise_if_closed(exc)
                self._recover()
                if isinstance(exc, RuntimeUnresponsive):
                    return ExecResult(
                        outcome=Outcome.KILLED,
                        stdout="",
                        stderr="",
                        timed_out=True,
                        state_lost=True,
                        message="the runtime stopped answering; it was killed and restarted",
                    )
                return ExecResult(
                    outcome=Outcome.CRASHED,
                    stdout="",
                    stderr="",
                    state_lost=True,
                    message=f"the runtime was lost ({exc}); it was restarted",
                )

    def _raise_if_closed(self, exc: BaseException) -> None:
        """A channel that ended because close() tore the box down is not a crash to recover from."""
        if self._closed:
            if self._session is not None:
                self._session.close()
                self._session = None
            raise SandboxClosed("the sandbox was closed during the operation") from exc

    def _op(self, fn: Callable[[Session], Any]) -> Any:
        with self._lock:
            session = self._live_session()
            try:
                return fn(session)
            except (ChannelLost, ProtocolViolation, RuntimeUnresponsive) as exc:
                self._raise_if_closed(exc)
                self._recover()
                raise SandboxCrashed(f"the runtime was lost during the operation ({exc}); restarted") from exc

    def load_context(self, payload: ContextPayload, *, name: str = "context") -> str:
        if not name.isidentifier():
            raise NotSerializable(f"context name {name!r} is not an identifier")
        kind, data = encode_context(payload)
        with self._lock:
            if name == "context":
                var, aliases = f"context_{self._context_count}", ["context"] if self._context_count == 0 else []
            else:
                var, aliases = name, []
            upload_name = f".rlm-upload-{var}.{kind}"
            path = self._box.upload(upload_name, data)
            timeout = self.config.op_timeout_s
            self._op(lambda s: s.load_context(var, aliases, kind, None if path else data, path, timeout))
            if name == "context":
                self._context_count += 1
            return var

    def get_variable(self, name: str) -> Any:
        return self._op(lambda s: s.get_var(name, self.config.op_timeout_s))

    def set_variable(self, name: str, value: Any) -> None:
        if not name.isidentifier():
            raise NotSerializable(f"variable name {name!r} is not an identifier")
        self._op(lambda s: s.set_var(name, value, self.config.op_timeout_s))

    def list_variables(self) -> dict[str, str]:
        result: dict[str, str] = self._op(lambda s: s.list_vars(self.config.op_timeout_s))
        return result

    def write_file(self, path: str, data: bytes | str) -> None:
        raw = Blob.of(data if isinstance(data, str) else bytes(data))
        with self._lock:
            if self._box.upload(path, raw):
                return
            self._op(lambda s: s.put_file(path, raw, self.config.op_timeout_s))

    def read_file(self, path: str) -> bytes:
        data: bytes = self._op(lambda s: s.get_file(path, self.config.op_timeout_s))
        return data

    def interrupt(self) -> None:
        session = self._session
        if session is not None and not self._closed:
            try:
                session.interrupt()
            except ChannelLost:
                pass

    def reset(self) -> None:
        with self._lock:
            self._op(lambda s: s.reset(self.config.op_timeout_s))
            self._context_count = 0

    def ping(self) -> None:
        """Round-trip to the runtime's worker (raises if it does not answer)."""
        self._op(lambda s: s.ping(self.config.op_timeout_s))

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.backend}:{self.id} {state}>"
