"""The Daytona backend for rlm-sandbox: ``open_sandbox("daytona", snapshot=..., ...)``.

Importing this package does not import the ``daytona`` SDK; opening a sandbox does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._backend import DaytonaBackendConfig, DaytonaBox
from ._gc import collect

if TYPE_CHECKING:
    from ._channel import DaytonaChannel

__all__ = ["DaytonaBackendConfig", "DaytonaBox", "DaytonaChannel", "collect"]


def __getattr__(name: str) -> Any:
    if name == "DaytonaChannel":  # imports the SDK
        from ._channel import DaytonaChannel

        return DaytonaChannel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
