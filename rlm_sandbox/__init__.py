"""rlm-sandbox: isolated, persistent Python REPLs for Recursive Language Models.

::

    import rlm_sandbox as rs

    with rs.open_sandbox("local", limits=rs.Limits(exec_timeout_s=5),
                         functions={"llm_query": my_llm}) as sb:
        sb.load_context(big_text)
        r = sb.execute("print(llm_query(context[:100]))")
"""

from __future__ import annotations

from ._box import BackendConfig, Box
from ._channel import Channel, PipeChannel
from ._errors import (
    AuthenticationError,
    BackendNotFound,
    ConfigError,
    LimitNotSupported,
    NotSerializable,
    ProtocolViolation,
    QuotaExceeded,
    SandboxClosed,
    SandboxCrashed,
    SandboxError,
    SandboxFileNotFound,
    SandboxIsADirectory,
    SandboxNotFound,
    SandboxPermissionError,
    SandboxStartError,
    SandboxTimeout,
    TransientSandboxError,
    VariableNotFound,
)
from ._limits import Limits
from ._registry import available_backends, backend_config, open_sandbox, register_backend, registry
from ._results import CodeError, ExecResult, Outcome
from ._sandbox import RuntimeSandbox, Sandbox, close_all
from .backends.local import LocalConfig

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "BackendConfig",
    "BackendNotFound",
    "Box",
    "Channel",
    "CodeError",
    "ConfigError",
    "ExecResult",
    "LimitNotSupported",
    "Limits",
    "LocalConfig",
    "NotSerializable",
    "Outcome",
    "PipeChannel",
    "ProtocolViolation",
    "QuotaExceeded",
    "RuntimeSandbox",
    "Sandbox",
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
    "__version__",
    "available_backends",
    "backend_config",
    "close_all",
    "open_sandbox",
    "register_backend",
    "registry",
]
