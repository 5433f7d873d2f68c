"""Typed, frozen results."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["CodeError", "ExecResult", "Outcome"]


class Outcome(enum.StrEnum):
    """How a cell ended."""

    OK = "ok"
    """The cell ran to the end."""
    ERROR = "error"
    """The cell raised; ``ExecResult.error`` says what. Variables are kept."""
    INTERRUPTED = "interrupted"
    """The timeout fired and the cell stopped on KeyboardInterrupt. Every variable is kept."""
    KILLED = "killed"
    """The cell ignored the interrupt for the grace period: its whole process tree was killed and
    the runtime restarted. Files and loaded contexts are kept; other variables are lost."""
    CRASHED = "crashed"
    """The runtime died (``os._exit``, a segfault, out of memory) and was restarted. Files and
    loaded contexts are kept; other variables are lost."""


@dataclass(frozen=True, slots=True)
class CodeError:
    """An exception raised by user code, as data."""

    name: str
    """The exception's class name, e.g. ``"ZeroDivisionError"``."""
    message: str
    """``str(exception)``."""
    traceback: str
    """The formatted traceback, starting at the cell."""


@dataclass(frozen=True, slots=True)
class ExecResult:
    """The result of :meth:`Sandbox.execute`. Never raised, always returned."""

    outcome: Outcome
    stdout: str
    stderr: str
    error: CodeError | None = None
    duration_s: float = 0.0
    truncated: bool = False
    """True when stdout or stderr went over ``Limits.output_bytes`` (head and tail are kept)."""
    state_lost: bool = False
    """True when the runtime was restarted: variables other than loaded contexts are gone."""
    timed_out: bool = False
    """True when the cell hit its timeout (outcome INTERRUPTED or KILLED)."""
    message: str = ""
    """What happened, for KILLED and CRASHED (e.g. the signal, or the memory limit)."""

    @property
    def ok(self) -> bool:
        """True when the outcome is OK."""
        return self.outcome is Outcome.OK
