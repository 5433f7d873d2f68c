"""E2B backend for rlm-sandbox: ``open_sandbox("e2b", ...)`` runs the runtime in an E2B sandbox.

Importing this package does not import the ``e2b`` SDK; opening a sandbox (or ``gc``) does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._backend import E2BBox, E2BConfig

if TYPE_CHECKING:
    from ._channel import E2BChannel

__all__ = ["E2BBox", "E2BChannel", "E2BConfig"]


def __getattr__(name: str) -> Any:
    if name == "E2BChannel":  # imports the SDK
        from ._channel import E2BChannel

        return E2BChannel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
