"""The trajectory of an RLM run: one JSON object per line, written as the run goes, read back typed.

Every :meth:`~rlm_sandbox.driver.RLMRunner.run` writes ``<trajectory_dir>/<run_id>.jsonl``::

    {"type": "run_start", ...}      the question, a description of the context, backend, budget
    {"type": "agent_start", ...}    an RLM (root or sub-agent): its sandbox id, parent, depth
    {"type": "lm_call", ...}        every LM call: kind, start/end, prompt and reply (truncated)
    {"type": "cell", ...}           every ```repl block run: code, outcome, output (truncated)
    {"type": "agent_end", ...}      how an agent ended: answer, reason, iterations
    {"type": "run_end", ...}        the answer, reason, iterations, LM calls, sub-agents, time

Each line is flushed when written, so a crashed run leaves a readable prefix. Read it back with
:func:`read_trajectory`::

    for ev in read_trajectory(path):
        if isinstance(ev, CellEvent):
            print(ev.agent_id, ev.outcome, ev.code[:60])

Times (``t``, ``start``, ``end``) are Unix epoch seconds from :func:`time.time`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

__all__ = [
    "AgentEndEvent",
    "AgentStartEvent",
    "CellEvent",
    "ContextInfo",
    "LMCallEvent",
    "LMCallKind",
    "RunEndEvent",
    "RunStartEvent",
    "StopReason",
    "TrajectoryEvent",
    "TrajectoryWriter",
    "UnknownEvent",
    "iter_trajectory",
    "read_trajectory",
]

#: Why an agent or a run stopped.
StopReason = Literal["answer", "max_iterations", "max_lm_calls", "wall_time", "cancelled", "error"]

#: What an LM call was for.
LMCallKind = Literal["root", "sub", "rlm_fallback", "final"]


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    run_id: str
    """The run this event belongs to."""
    t: float
    """When the event was written (Unix epoch seconds)."""


class ContextInfo(BaseModel):
    """What the model is told about a context: its type, total size and chunk lengths."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    type: str
    """The Python type name inside the sandbox (``str``, ``list``, ``dict``, ``bytes``)."""
    total_length: int
    """Total characters (bytes for ``bytes``) over all chunks."""
    chunk_lengths: list[int]
    """Length of each chunk (one chunk for a ``str``; the first 100 for long lists)."""
    n_chunks: int
    """How many chunks there are in total (``len(chunk_lengths)`` unless it was cut)."""


class RunStartEvent(_Event):
    """A run began."""

    type: Literal["run_start"] = "run_start"
    question: str
    context: ContextInfo
    backend: str
    """The root agent's backend."""
    sub_backend: str
    """The sub-agents' backend."""
    budget: dict[str, Any]
    """The :class:`~rlm_sandbox.driver.RLMBudget` of the run, as a dict."""


class AgentStartEvent(_Event):
    """An agent (the root, or a sub-agent started by ``rlm_query``) got its own sandbox."""

    type: Literal["agent_start"] = "agent_start"
    agent_id: str
    """``"0"`` for the root; a child of ``"0"`` is ``"0.1"``, ``"0.2"``, ...; its children ``"0.1.1"``."""
    parent_id: str | None
    depth: int
    sandbox_id: str
    """The id of the sandbox this agent's REPL runs in."""
    backend: str
    lease: int
    """The pool's lease number (a reused sandbox keeps its id; each lease is new)."""
    warm: bool
    """Whether the sandbox came pre-started from the pool."""
    acquire_s: float
    """How long getting the sandbox took."""
    context: ContextInfo
    prompt: str
    """For a sub-agent, the prompt its parent passed (it is the sub-agent's context); truncated."""


class LMCallEvent(_Event):
    """One language-model call."""

    type: Literal["lm_call"] = "lm_call"
    agent_id: str
    kind: LMCallKind
    """``root``: an agent's turn; ``sub``: ``llm_query``/``llm_query_batched``; ``rlm_fallback``:
    ``rlm_query`` at max depth; ``final``: the last call asking for an answer when the iterations
    ran out."""
    iteration: int | None
    """The agent's iteration (for ``root`` and ``final`` calls)."""
    batch: int | None = None
    """For ``llm_query_batched``/``rlm_query_batched`` items: the batch number within the agent."""
    model: str | None
    start: float
    end: float
    prompt: str
    """The last message sent (truncated)."""
    prompt_chars: int
    n_messages: int
    response: str | None
    """The reply (truncated), or ``None`` when the call failed."""
    response_chars: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None

    @property
    def duration_s(self) -> float:
        """``end - start``."""
        return self.end - self.start


class CellEvent(_Event):
    """One ```repl block run in an agent's sandbox."""

    type: Literal["cell"] = "cell"
    agent_id: str
    sandbox_id: str
    iteration: int
    block: int
    """The block's index within the LM reply (0-based)."""
    code: str
    outcome: str
    """An :class:`~rlm_sandbox.Outcome` value: ``ok``, ``error``, ``interrupted``, ``killed``, ``crashed``."""
    stdout: str
    stderr: str
    error: str | None
    """``"Name: message"`` of an exception raised by the code."""
    duration_s: float
    timed_out: bool
    state_lost: bool
    truncated: bool
    final: bool
    """Whether this block set the final answer."""


class AgentEndEvent(_Event):
    """An agent finished and gave its sandbox back."""

    type: Literal["agent_end"] = "agent_end"
    agent_id: str
    parent_id: str | None
    sandbox_id: str
    answer: str | None
    reason: StopReason
    iterations: int
    elapsed_s: float
    error: str | None = None


class RunEndEvent(_Event):
    """A run finished."""

    type: Literal["run_end"] = "run_end"
    answer: str | None
    reason: StopReason
    iterations: int
    """The root agent's iterations."""
    lm_calls: int
    sub_agents: int
    sandboxes: int
    """Sandbox leases over the run (root included)."""
    elapsed_s: float
    error: str | None = None


class UnknownEvent(BaseModel):
    """An event of a type this version does not know (written by a newer version)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    type: str


#: Any event of a trajectory, discriminated by its ``type`` field.
TrajectoryEvent = Annotated[
    RunStartEvent | AgentStartEvent | LMCallEvent | CellEvent | AgentEndEvent | RunEndEvent,
    Field(discriminator="type"),
]

_ADAPTER: TypeAdapter[Any] = TypeAdapter(TrajectoryEvent)
_KNOWN = frozenset({"run_start", "agent_start", "lm_call", "cell", "agent_end", "run_end"})


def iter_trajectory(path: str | Path) -> Iterator[TrajectoryEvent | UnknownEvent]:
    """Yield the events of a trajectory file in order.

    A last line without its newline (a run killed mid-write) is skipped; any other malformed line
    raises ``ValueError`` naming the line.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith("\n"):
                return
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON: {exc}") from None
            if not isinstance(data, dict) or not isinstance(data.get("type"), str):
                raise ValueError(f"{path}:{lineno}: not an event object")
            if data["type"] not in _KNOWN:
                yield UnknownEvent(**data)
                continue
            try:
                yield _ADAPTER.validate_python(data)
            except ValidationError as exc:
                raise ValueError(f"{path}:{lineno}: invalid {data['type']} event: {exc}") from None


def read_trajectory(path: str | Path) -> list[TrajectoryEvent | UnknownEvent]:
    """Read a trajectory file written by a run: a list of typed events, in order."""
    return list(iter_trajectory(path))


class TrajectoryWriter:
    """Appends events to a JSON-lines file; thread-safe; every line is flushed at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, event: BaseModel) -> None:
        """Append one event."""
        line = event.model_dump_json() + "\n"
        with self._lock:
            if self._file.closed:
                return
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        """Close the file. Idempotent."""
        with self._lock:
            self._file.close()
