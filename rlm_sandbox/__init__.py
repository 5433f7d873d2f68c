"""rlm-sandbox: isolated, persistent Python REPLs for Recursive Language Models.

::

    import rlm_sandbox as rs

    with rs.open_sandbox("local", limits=rs.Limits(exec_timeout_s=5),
                         functions={"llm_query": my_llm}) as sb:
        sb.load_context(big_text)
        r = sb.execute("print(llm_query(context[:100]))")
"""

from __future__ import annotations

import importlib
import typing

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

if typing.TYPE_CHECKING:
    from .driver import RLMBudget, RLMResult, RLMRunner
    from .pool import PooledSandbox, PoolExhausted, SandboxPool
    from .trajectory import read_trajectory

#: Imported on first use, so that ``import rlm_sandbox`` stays light for sandbox-only users.
_LAZY = {
    "RLMBudget": "driver",
    "RLMResult": "driver",
    "RLMRunner": "driver",
    "PoolExhausted": "pool",
    "PooledSandbox": "pool",
    "SandboxPool": "pool",
    "read_trajectory": "trajectory",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

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
    "PoolExhausted",
    "PooledSandbox",
    "ProtocolViolation",
    "QuotaExceeded",
    "RLMBudget",
    "RLMResult",
    "RLMRunner",
    "RuntimeSandbox",
    "Sandbox",
    "SandboxClosed",
    "SandboxCrashed",
    "SandboxError",
    "SandboxFileNotFound",
    "SandboxIsADirectory",
    "SandboxNotFound",
    "SandboxPermissionError",
    "SandboxPool",
    "SandboxStartError",
    "SandboxTimeout",
    "TransientSandboxError",
    "VariableNotFound",
    "__version__",
    "available_backends",
    "backend_config",
    "close_all",
    "open_sandbox",
    "read_trajectory",
    "register_backend",
    "registry",
]
