"""The exception tree. Errors in user code are never raised: they come back in ``ExecResult``.

::

    SandboxError
    ├── BackendNotFound          (LookupError)         unknown or uninstalled backend
    ├── ConfigError              (ValueError)          a config or argument is wrong
    ├── LimitNotSupported        (NotImplementedError) a limit this backend cannot enforce here
    ├── SandboxStartError        (RuntimeError)        the box or its runtime did not start
    ├── SandboxTimeout           (TimeoutError)        an infrastructure step did not finish in time
    ├── SandboxClosed            (RuntimeError)        the sandbox was used after close()
    ├── SandboxCrashed           (RuntimeError)        the runtime died during a non-exec operation
    ├── ProtocolViolation        (RuntimeError)        the box broke the wire protocol
    ├── SandboxNotFound          (LookupError)         the remote box disappeared
    ├── AuthenticationError      (PermissionError)     credentials refused by a service
    ├── QuotaExceeded            (RuntimeError)        a service quota or plan limit was hit
    ├── TransientSandboxError    (ConnectionError)     a retryable service or network failure
    ├── VariableNotFound         (KeyError)            get_variable() of an unknown name
    ├── NotSerializable          (TypeError)           a value cannot cross the boundary
    ├── SandboxFileNotFound      (FileNotFoundError)
    ├── SandboxIsADirectory      (IsADirectoryError)
    └── SandboxPermissionError   (PermissionError)
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BackendNotFound",
    "ConfigError",
    "LimitNotSupported",
    "NotSerializable",
    "ProtocolViolation",
    "QuotaExceeded",
    "SandboxClosed",
    "SandboxCrashed",
    "SandboxError",
    "SandboxFileNotFound",
    "SandboxIsADirectory",
    "SandboxNotFound",
    "SandboxPermissionError",
    "SandboxStartError",
    "SandboxTimeout",
    "TransientSandboxError",
    "VariableNotFound",
]


class SandboxError(Exception):
    """Root of every infrastructure error raised by rlm_sandbox."""


class BackendNotFound(SandboxError, LookupError):
    """The backend name is not registered (the message lists installed ones and a pip hint)."""


class ConfigError(SandboxError, ValueError):
    """A backend config, a limit or an argument is invalid."""


class LimitNotSupported(SandboxError, NotImplementedError):
    """A requested limit cannot be enforced by this backend on this machine.

    Pass ``Limits(best_effort=True)`` to skip such limits instead; they are then listed in
    ``Sandbox.unenforced_limits``.
    """

    def __init__(self, message: str, *, limits: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.limits = dict(limits or {})


class SandboxStartError(SandboxError, RuntimeError):
    """The box, or the runtime inside it, could not be started."""


class SandboxTimeout(SandboxError, TimeoutError):
    """An infrastructure operation (start, file transfer, an unresponsive runtime) timed out."""


class SandboxClosed(SandboxError, RuntimeError):
    """The sandbox is closed."""


class SandboxCrashed(SandboxError, RuntimeError):
    """The runtime died during an operation other than ``execute`` (it is restarted)."""


class ProtocolViolation(SandboxError, RuntimeError):
    """The box sent bytes that break the protocol (garbage, forged or oversized frames)."""


class SandboxNotFound(SandboxError, LookupError):
    """The remote sandbox no longer exists (deleted, expired or reaped by the service)."""


class AuthenticationError(SandboxError, PermissionError):
    """The service refused the credentials. Not retried."""


class QuotaExceeded(SandboxError, RuntimeError):
    """A quota or plan limit of the service was hit. Not retried."""


class TransientSandboxError(SandboxError, ConnectionError):
    """A failure worth retrying: a 5xx, a 429, a reset connection. Retried in one place."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class VariableNotFound(SandboxError, KeyError):
    """``get_variable`` named a variable that does not exist in the sandbox."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotSerializable(SandboxError, TypeError):
    """A value cannot cross the sandbox boundary (only JSON types and bytes can)."""


class SandboxFileNotFound(SandboxError, FileNotFoundError):
    """A file inside the sandbox does not exist."""


class SandboxIsADirectory(SandboxError, IsADirectoryError):
    """A path inside the sandbox is a directory (or not a regular file)."""


class SandboxPermissionError(SandboxError, PermissionError):
    """The sandbox user may not read or write that path."""
