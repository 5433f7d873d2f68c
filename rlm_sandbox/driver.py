"""The RLM loop: a root model that answers a question about a context it never sees, by writing code.

::

    import rlm_sandbox as rs
    from rlm_sandbox.lm import OpenAICompatibleLM

    with rs.RLMRunner("local", lm=OpenAICompatibleLM(model="gpt-5"),
                      sub_lm=OpenAICompatibleLM(model="gpt-5-mini"),
                      limits=rs.Limits(exec_timeout_s=120)) as runner:
        result = runner.run("Which city is mentioned most often?", context=big_text)
        result.answer, result.iterations, result.lm_calls, result.trajectory_path

What happens (the loop of the RLM paper and of the ``rlms`` library, >= 0.1.2):

* The root model gets a system prompt, then the question and a *description* of the context
  (type, total size, chunk lengths) -- never the context. The context is a variable in a sandbox.
* It replies with ```` ```repl ```` blocks. Each block runs in its sandbox, in order; what the
  block printed (stdout, stderr, the traceback, how it ended) goes back to the model, truncated to
  ``RLMBudget.output_chars``, with the names of the REPL's variables.
* Inside the sandbox, as host functions: ``llm_query(prompt)`` and ``llm_query_batched(prompts)``
  (the sub-LM; batches run concurrently, bounded), ``rlm_query(prompt)`` and
  ``rlm_query_batched(prompts)`` (a child RLM per prompt, with its *own* sandbox from the pool,
  whose context is the prompt; at max depth a plain sub-LM call instead).
* The run ends when code sets ``answer["content"] = ...; answer["ready"] = True`` (or calls
  ``FINAL(value)`` / ``FINAL_VAR("name")``, or the reply has a ``FINAL(...)`` /
  ``FINAL_VAR(name)`` line outside code), or when the iterations run out: then the model is asked
  once more for its final answer, as rlms does.
* Depth, iterations per agent, wall time, total sandboxes and total LM calls are bounded
  (:class:`RLMBudget`). The wall time bounds running cells too: each cell gets the remaining time
  as its timeout, and cells still running at the deadline (or on cancel) are interrupted.
* Every run writes a JSON-lines trajectory (:mod:`rlm_sandbox.trajectory`).

Nothing here depends on the backend: ``RLMRunner(backend="docker", backend_options={...})`` runs
the same loop in containers.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from ._box import BackendConfig
from ._errors import SandboxError
from ._limits import Limits
from ._registry import make_config
from ._results import ExecResult, Outcome
from ._sandbox import ContextPayload
from .pool import PooledSandbox, PoolExhausted, SandboxPool
from .trajectory import (
    AgentEndEvent,
    AgentStartEvent,
    CellEvent,
    ContextInfo,
    LMCallEvent,
    LMCallKind,
    RunEndEvent,
    RunStartEvent,
    StopReason,
    TrajectoryEvent,
    TrajectoryWriter,
)

if TYPE_CHECKING:
    from .lm import LM, LMResponse, Messages

__all__ = [
    "HOST_FUNCTIONS",
    "SYSTEM_PROMPT",
    "RLMBudget",
    "RLMResult",
    "RLMRunner",
    "describe_context",
    "find_code_blocks",
    "find_final",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The host functions every agent's sandbox gets.
HOST_FUNCTIONS = ("llm_query", "llm_query_batched", "rlm_query", "rlm_query_batched")

#: Default directory for trajectories (``$RLM_SANDBOX_RUNS_DIR`` overrides it).
DEFAULT_RUNS_DIR = ".rlm-runs"


class RLMBudget(BaseModel):
    """Bounds of one run (over the root and all its sub-agents)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_depth: int = Field(default=2, ge=1)
    """Agents nest at most this deep: the root is depth 0, and an agent at depth ``d`` may start
    sub-agents only while ``d + 1 < max_depth``; beyond, ``rlm_query`` is a plain sub-LM call.
    ``1`` turns recursion off (rlms' ``max_depth`` has the same meaning)."""
    max_iterations: int = Field(default=30, ge=1)
    """LM turns per agent before it is asked for its final answer."""
    max_wall_s: float | None = Field(default=3600.0, gt=0)
    """Wall time of the whole run, running cells and LM calls included."""
    max_sandboxes: int = Field(default=64, ge=1)
    """Sandbox leases over the run, the root's included (one per agent)."""
    max_lm_calls: int = Field(default=1000, ge=1)
    """LM calls over the run: agent turns, sub-LM calls and final-answer calls."""
    max_concurrency: int = Field(default=16, ge=1)
    """Sub-LM calls in flight at once over the run (``llm_query_batched`` items and the rest)."""
    max_concurrent_subagents: int = Field(default=4, ge=1)
    """Sub-agents one ``rlm_query_batched`` call runs at once."""
    output_chars: int = Field(default=20_000, ge=100)
    """What the model sees of one block's output, in characters (head and tail are kept)."""
    trajectory_chars: int = Field(default=20_000, ge=100)
    """Longest text (prompt, reply, code, output) stored per trajectory field."""
    acquire_timeout_s: float = Field(default=120.0, gt=0)
    """How long an agent waits for a sandbox from the pool."""


@dataclass(frozen=True)
class RLMResult:
    """What :meth:`RLMRunner.run` returns."""

    answer: str | None
    """The final answer; ``None`` when the run stopped without one (see ``reason``)."""
    reason: StopReason
    """``answer``; ``max_iterations`` (the answer is the model's reply to the last request);
    ``max_lm_calls``, ``wall_time`` or ``cancelled`` (no answer)."""
    iterations: int
    """The root agent's LM turns."""
    lm_calls: int
    """Every LM call of the run (root, sub-agents, sub-LM)."""
    sub_agents: int
    """Sub-agents started by ``rlm_query`` / ``rlm_query_batched``."""
    sandboxes: int
    """Sandbox leases (root included)."""
    elapsed_s: float
    run_id: str
    trajectory_path: Path


# ------------------------------------------------------------------------------------------------
# Prompts and parsing
# ------------------------------------------------------------------------------------------------

SYSTEM_PROMPT = """\
You are tasked with answering a query with associated context. You can access, transform and \
analyse this context interactively in a REPL environment that can query sub-LLMs, which you are \
strongly encouraged to use. You will be queried iteratively until you provide a final answer.

The REPL is a persistent Python session (variables persist across blocks and turns) with:
1. `context`: the information for the query. You never see it directly: inspect it with code.
2. `llm_query(prompt: str, model: str | None = None) -> str`: one sub-LLM call. It can read about \
500K characters, so give it large chunks of the context.
3. `llm_query_batched(prompts: list[str], model: str | None = None) -> list[str]`: many sub-LLM \
calls run concurrently; answers come back in the same order. Much faster than a loop of llm_query.
4. `rlm_query(prompt: str, model: str | None = None) -> str`: a recursive sub-agent with its own \
REPL whose `context` is `prompt`; use it for sub-tasks that need several steps. \
`rlm_query_batched(prompts: list[str], model=None) -> list[str]` runs several concurrently.{depth_note}
5. `SHOW_VARS()` lists your variables.
6. `print(...)` shows output; only printed output is shown, and output longer than {output_chars} \
characters is truncated, so print slices and summaries. A bare expression on the last line is not shown.

Write code in ```repl blocks; they run in order, e.g.:
```repl
chunk = context[:10000]
print(llm_query(f"What is the magic number in this text?\\n{{chunk}}"))
```

When you have the final answer, set it inside a ```repl block:
```repl
answer["content"] = "your final answer"
answer["ready"] = True
```
`FINAL(value)` or `FINAL_VAR("variable_name")` in a block, or a line `FINAL(your answer)` outside \
code, do the same. Do not set the answer before you have actually found it.
"""

_DEPTH_NOTE = " (Here recursion is off: they are plain llm_query / llm_query_batched calls.)"

_FIRST_TURN = (
    "You have not interacted with the REPL yet: look at the context first and decide how to "
    "split the work. Your next action:"
)
_NEXT_TURN = (
    "The above is the output of your code. Continue: use the REPL and sub-LLMs as needed, and set "
    'answer["content"] / answer["ready"] = True once you have the final answer. Your next action:'
)
_NO_CODE = (
    "Your reply had no ```repl block and no final answer. Write code in ```repl blocks, or set the "
    "final answer. Your next action:"
)
_FINAL_REQUEST = (
    "You have used all your iterations. Based on everything above, give your final answer now, "
    "as a line FINAL(your answer)."
)

_CODE_BLOCK = re.compile(r"```repl[ \t]*\n(.*?)\n?```", re.DOTALL)
_FINAL_VAR = re.compile(r"^\s*FINAL_VAR\((.*?)\)\s*$", re.MULTILINE)
_FINAL_LINE = re.compile(r"^\s*FINAL\((.*)\)\s*$", re.MULTILINE)
_FINAL = re.compile(r"^\s*FINAL\((.*)\)\s*$", re.MULTILINE | re.DOTALL)
_MARK = "\x1erlm-after\x1e"

#: Defined once per agent sandbox (and again if the runtime lost its state).
_PRELUDE = '''
import builtins as _rlm_b
answer = {"content": "", "ready": False}
def FINAL(value):
    """Submit value as the final answer (same as answer["content"] = value; answer["ready"] = True)."""
    B = _rlm_b
    g = B.globals()
    g["answer"]["content"] = value if B.isinstance(value, B.str) else B.str(value)
    g["answer"]["ready"] = True
    return g["answer"]["content"]
def FINAL_VAR(name):
    """Submit the variable named name (a str) as the final answer."""
    B = _rlm_b
    if not B.isinstance(name, B.str):
        return FINAL(name)
    key = name.strip().strip("'\\"")
    g = B.globals()
    if key not in g:
        raise B.NameError("FINAL_VAR: no variable named %r" % key)
    return FINAL(g[key])
_RLM_HIDDEN = {"answer", "FINAL", "FINAL_VAR", "SHOW_VARS", "llm_query", "llm_query_batched",
               "rlm_query", "rlm_query_batched", "HostFunctionError"}
def SHOW_VARS():
    """List the REPL's variables with their types."""
    import types
    B = _rlm_b
    names = {k: B.type(v).__name__ for k, v in B.globals().items()
             if not k.startswith("_") and k not in _RLM_HIDDEN and not B.isinstance(v, types.ModuleType)}
    if not names:
        return "No variables created yet. Use ```repl``` blocks to create variables."
    return "Available variables: %r" % (names,)
def _rlm_after():
    # Only builtins reached through the module: user code may rebind list, str, print, ...
    import builtins as B
    import json
    g = B.globals()
    a = g.get("answer")
    final = None
    if B.isinstance(a, B.dict) and a.get("ready"):
        c = a.get("content")
        final = c if B.isinstance(c, B.str) else B.str(c)
    if not B.isinstance(a, B.dict):
        g["answer"] = {"content": "", "ready": False}
    if "context_0" in g:
        g["context"] = g["context_0"]
    simple = (B.str, B.int, B.float, B.bool, B.list, B.dict, B.tuple)
    names = B.sorted(k for k, v in g.items() if not k.startswith("_") and k not in _RLM_HIDDEN
                     and B.isinstance(v, simple))
    B.print(MARK + json.dumps({"final": final, "vars": names}))
'''.replace("MARK", repr(_MARK))

_AFTER = "_rlm_after()"


def find_code_blocks(text: str) -> list[str]:
    """The ```` ```repl ```` blocks of a reply, in order (as rlms finds them)."""
    return [m.group(1).strip("\n") for m in _CODE_BLOCK.finditer(text)]


def find_final(text: str) -> tuple[str, str] | None:
    """A ``FINAL_VAR(name)`` or ``FINAL(answer)`` line outside code blocks: ``("var", name)`` or
    ``("text", answer)``; ``None`` if there is none."""
    outside = _CODE_BLOCK.sub("", text)
    outside = re.sub(r"```.*?```", "", outside, flags=re.DOTALL)
    m = _FINAL_VAR.search(outside)
    if m:
        return "var", m.group(1).strip().strip("'\"")
    m = _FINAL_LINE.search(outside) or _FINAL.search(outside)
    if m:
        return "text", m.group(1).strip()
    return None


def describe_context(payload: ContextPayload) -> ContextInfo:
    """What the model is told about a context (rlms' metadata: type, total size, chunk lengths)."""
    lengths: list[int]
    if isinstance(payload, str):
        kind, lengths = "str", [len(payload)]
    elif isinstance(payload, (bytes, bytearray)):
        kind, lengths = "bytes", [len(payload)]
    elif isinstance(payload, list):
        kind = "list"
        lengths = [len(x) if isinstance(x, str) else len(json.dumps(x, default=str)) for x in payload]
    elif isinstance(payload, dict):
        kind = "dict"
        lengths = [len(v) if isinstance(v, str) else len(json.dumps(v, default=str)) for v in payload.values()]
    else:
        kind, lengths = type(payload).__name__, [len(str(payload))]
    return ContextInfo(type=kind, total_length=sum(lengths), chunk_lengths=lengths[:100], n_chunks=len(lengths))


def _context_message(info: ContextInfo) -> str:
    shown = info.chunk_lengths
    more = f" (first {len(shown)} of {info.n_chunks} chunks shown)" if info.n_chunks > len(shown) else ""
    unit = "bytes" if info.type == "bytes" else "characters"
    return (
        f"Your context is a {info.type} with {info.total_length:,} total {unit}, and is broken up into "
        f"chunks of char lengths: {shown}{more}."
    )


def _clip(text: str, limit: int) -> str:
    """Head and tail of ``text`` within about ``limit`` characters."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n... [{cut:,} characters truncated] ...\n{text[-tail:]}"


def _format_block(code: str, r: ExecResult, limit: int) -> str:
    parts: list[str] = []
    if r.stdout:
        parts.append(r.stdout)
    if r.stderr:
        parts.append(r.stderr)
    if r.error is not None:
        parts.append(r.error.traceback or f"{r.error.name}: {r.error.message}")
    if r.outcome is Outcome.INTERRUPTED:
        parts.append("[the cell was interrupted" + (" by its time limit" if r.timed_out else "") + "; variables kept]")
    elif r.outcome in (Outcome.KILLED, Outcome.CRASHED):
        lost = "; variables other than the context were lost" if r.state_lost else ""
        parts.append(f"[{r.outcome.value}: {r.message or 'the runtime was restarted'}{lost}]")
    output = "\n".join(p.rstrip("\n") for p in parts) or "(no output)"
    return f"Code executed:\n```python\n{code}\n```\n\nREPL output:\n{_clip(output, limit)}"


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


class _Stop(Exception):
    """A budget ran out, the wall time passed, or the run was cancelled."""

    def __init__(self, reason: StopReason, message: str) -> None:
        super().__init__(message)
        self.reason: StopReason = reason


@dataclass(frozen=True)
class _SandboxSpec:
    config: BackendConfig
    limits: Limits


class _Run:
    """The shared state of one run: budget, counters, deadline, trajectory, live agents."""

    def __init__(
        self,
        runner: RLMRunner,
        run_id: str,
        path: Path,
        on_event: Sequence[Callable[[TrajectoryEvent], None]],
        cancel: threading.Event | None,
    ) -> None:
        self.runner = runner
        self.budget = runner.budget
        self.run_id = run_id
        self.path = path
        self.on_event = on_event
        self.cancel = cancel
        self.started = time.monotonic()
        self.deadline = None if self.budget.max_wall_s is None else self.started + self.budget.max_wall_s
        self.cond = threading.Condition()
        self.lm_calls = 0
        self.sandboxes = 0
        self.sub_agents = 0
        self.active: dict[str, _Agent] = {}
        self.stopping: _Stop | None = None
        self.finished = False
        self.lm_slots = threading.BoundedSemaphore(self.budget.max_concurrency)
        self.writer = TrajectoryWriter(path)

    # ---- budget ----------------------------------------------------------------------------------

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise :class:`_Stop` if the run must stop (deadline, cancel)."""
        stop = self.stopping
        if stop is not None:
            raise stop
        with self.cond:
            stop = self._due_stop()
        if stop is not None:
            raise stop

    def reserve_lm_call(self) -> None:
        self.check()
        with self.cond:
            if self.lm_calls >= self.budget.max_lm_calls:
                raise _Stop("max_lm_calls", f"the run's LM call budget ({self.budget.max_lm_calls}) is spent")
            self.lm_calls += 1

    def reserve_sandbox(self, sub_agent: bool) -> None:
        self.check()
        with self.cond:
            if self.sandboxes >= self.budget.max_sandboxes:
                raise RuntimeError(f"the run's sandbox budget ({self.budget.max_sandboxes}) is spent")
            self.sandboxes += 1
            if sub_agent:
                self.sub_agents += 1

    def cell_timeout(self, limits: Limits) -> float | None:
        """The timeout of the next cell: the sandbox's own, capped by the remaining wall time."""
        self.check()
        remaining = self.remaining()
        limit = limits.exec_timeout_s
        if remaining is None:
            return limit
        return remaining if limit is None else min(limit, remaining)

    def wait_for(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (an LM call) but stop waiting at the deadline or on cancel.

        The call goes on in its thread until it returns; its result is then dropped.
        """
        self.check()
        if self.deadline is None and self.cancel is None:
            return fn()
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the waiting thread
                box["error"] = exc
            with self.cond:
                box["done"] = True
                self.cond.notify_all()

        threading.Thread(target=target, name="rlm-lm-call", daemon=True).start()
        with self.cond:
            while "done" not in box:
                if self.stopping is not None:
                    raise self.stopping
                remaining = self.remaining()
                if remaining is not None and remaining <= 0:
                    break
                self.cond.wait(remaining)
        if "done" not in box:
            self.check()
        if "error" in box:
            raise box["error"]
        value: T = box["value"]
        return value

    # ---- events -------------------------------------------------------------------------------

    def emit(self, event: TrajectoryEvent) -> None:
        self.writer.write(event)
        for callback in self.on_event:
            try:
                callback(event)
            except Exception:
                log.warning("an on_event callback failed", exc_info=True)

    def text(self, s: str) -> str:
        return _clip(s, self.budget.trajectory_chars)

    # ---- LM calls -----------------------------------------------------------------------------

    def complete(
        self,
        lm: LM,
        messages: Messages,
        *,
        agent_id: str,
        kind: LMCallKind,
        iteration: int | None = None,
        batch: int | None = None,
        model: str | None = None,
    ) -> str:
        """One LM call, counted, bounded by the deadline, recorded."""
        self.reserve_lm_call()
        start = time.time()
        last = messages[-1]["content"] if messages else ""
        response: LMResponse | None = None
        error: BaseException | None = None
        try:
            response = self.wait_for(lambda: lm.complete(messages, model=model))
            return response.text
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.emit(
                LMCallEvent(
                    run_id=self.run_id,
                    t=time.time(),
                    agent_id=agent_id,
                    kind=kind,
                    iteration=iteration,
                    batch=batch,
                    model=response.model if response is not None else model,
                    start=start,
                    end=time.time(),
                    prompt=self.text(last),
                    prompt_chars=len(last),
                    n_messages=len(messages),
                    response=self.text(response.text) if response is not None else None,
                    response_chars=len(response.text) if response is not None else 0,
                    prompt_tokens=response.prompt_tokens if response is not None else None,
                    completion_tokens=response.completion_tokens if response is not None else None,
                    error=_describe(error),
                )
            )

    # ---- agents -------------------------------------------------------------------------------

    def agent_started(self, agent: _Agent) -> None:
        with self.cond:
            self.active[agent.id] = agent

    def agent_ended(self, agent: _Agent) -> None:
        with self.cond:
            self.active.pop(agent.id, None)
            self.cond.notify_all()

    def _due_stop(self) -> _Stop | None:
        """The stop that applies now (deadline passed, cancel set), recorded; call under the lock."""
        if self.stopping is None:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self.stopping = _Stop("wall_time", f"the run's wall time ({self.budget.max_wall_s:g}s) is over")
            elif self.cancel is not None and self.cancel.is_set():
                self.stopping = _Stop("cancelled", "the run was cancelled")
            if self.stopping is not None:
                self.cond.notify_all()
        return self.stopping

    def _interrupt_running(self, done: set[tuple[str, int]]) -> None:
        """Interrupt every running cell once (called without the lock: interrupt() writes to a channel)."""
        with self.cond:
            targets = [(a, a.running_cell) for a in self.active.values() if a.running_cell is not None]
        for agent, cell in targets:
            if cell is not None and (agent.id, cell) not in done:
                done.add((agent.id, cell))
                agent.interrupt()

    def watch(self) -> None:
        """Watcher thread: at the deadline or on cancel, interrupt the cells still running."""
        done: set[tuple[str, int]] = set()
        while True:
            with self.cond:
                if self.finished:
                    return
                stop = self._due_stop()
                if stop is None:
                    remaining = self.remaining()
                    wait = 0.05 if self.cancel is not None else remaining
                    if wait is not None and remaining is not None:
                        wait = min(wait, max(remaining, 0.0))
                    self.cond.wait(wait)
                    continue
            self._interrupt_running(done)
            with self.cond:
                if not self.finished:
                    self.cond.wait(0.05)

    def drain(self, timeout: float) -> None:
        """After the root agent: stop and wait for sub-agents still running (abandoned by their
        parent's interrupted cell)."""
        deadline = time.monotonic() + timeout
        done: set[tuple[str, int]] = set()
        with self.cond:
            if not self.active:
                return
            if self.stopping is None:
                self.stopping = _Stop("cancelled", "the run is over")
            self.cond.notify_all()
        while True:
            self._interrupt_running(done)
            with self.cond:
                if not self.active:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("sub-agents still running at the end of run %s: %s", self.run_id, sorted(self.active))
                    return
                self.cond.wait(min(remaining, 0.1))


class _Agent:
    """One RLM: an LM loop over its own sandbox."""

    def __init__(
        self,
        run: _Run,
        agent_id: str,
        parent_id: str | None,
        depth: int,
        context: ContextPayload,
        question: str | None,
        model: str | None,
    ) -> None:
        self.run = run
        self.id = agent_id
        self.parent_id = parent_id
        self.depth = depth
        self.context = context
        self.question = question
        self.model = model
        self.sandbox: PooledSandbox | None = None
        self.running_cell: int | None = None
        self._cells = itertools.count(1)
        self._children = itertools.count(1)
        self._batches = itertools.count(1)
        self._lock = threading.Lock()
        self.iterations = 0

    # ---- host functions (called from the sandbox, on the host's call threads) ----------------------

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return {
            "llm_query": self.llm_query,
            "llm_query_batched": self.llm_query_batched,
            "rlm_query": self.rlm_query,
            "rlm_query_batched": self.rlm_query_batched,
        }

    @staticmethod
    def _prompt(prompt: Any) -> str:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
        return prompt

    @staticmethod
    def _prompts(prompts: Any) -> list[str]:
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of str")
        return list(prompts)

    @staticmethod
    def _model(model: Any) -> str | None:
        if model is not None and not isinstance(model, str):
            raise TypeError("model must be a str or None")
        return model

    def _sub_lm(self, prompt: str, model: str | None, kind: LMCallKind, batch: int | None = None) -> str:
        run = self.run
        remaining = run.remaining()
        if not run.lm_slots.acquire(timeout=None if remaining is None else max(remaining, 0.0)):
            run.check()
            raise _Stop("wall_time", f"the run's wall time ({run.budget.max_wall_s:g}s) is over")
        try:
            return run.complete(
                run.runner.sub_lm,
                [{"role": "user", "content": prompt}],
                agent_id=self.id,
                kind=kind,
                batch=batch,
                model=model or run.runner.sub_model,
            )
        finally:
            run.lm_slots.release()

    @staticmethod
    def _one(name: str, call: Callable[[], str]) -> str:
        """A single (non-batched) host call: budget stops become builtin exceptions, argument errors
        pass through, and any other failure is a RuntimeError inside the sandbox."""
        try:
            return call()
        except _Stop as stop:
            raise _as_builtin(stop) from None
        except (TypeError, ValueError):
            raise
        except Exception as exc:  # noqa: BLE001 - any LM or sub-agent failure is a RuntimeError inside
            raise RuntimeError(f"{name} failed: {type(exc).__name__}: {exc}") from None

    def llm_query(self, prompt: Any, model: Any = None) -> str:
        """Host function: one sub-LM call. Raises inside the sandbox when it fails."""
        return self._one("llm_query", lambda: self._sub_lm(self._prompt(prompt), self._model(model), "sub"))

    def llm_query_batched(self, prompts: Any, model: Any = None) -> list[str]:
        """Host function: sub-LM calls run concurrently; a failed item is ``"Error: ..."``."""
        items = self._prompts(prompts)
        use_model = self._model(model)
        batch = next(self._batches)
        return self._map(
            items,
            lambda p: self._sub_lm(p, use_model, "sub", batch),
            self.run.budget.max_concurrency,
        )

    def rlm_query(self, prompt: Any, model: Any = None) -> str:
        """Host function: a sub-agent (its own sandbox) whose context is ``prompt``."""
        return self._one("rlm_query", lambda: self._child(self._prompt(prompt), self._model(model)))

    def rlm_query_batched(self, prompts: Any, model: Any = None) -> list[str]:
        """Host function: sub-agents run concurrently (bounded); a failed item is ``"Error: ..."``."""
        items = self._prompts(prompts)
        use_model = self._model(model)
        batch = next(self._batches)
        return self._map(
            items,
            lambda p: self._child(p, use_model, batch),
            self.run.budget.max_concurrent_subagents,
        )

    def _map(self, items: list[str], fn: Callable[[str], str], bound: int) -> list[str]:
        if not items:
            return []
        self.run.check()
        out: list[str] = []
        with ThreadPoolExecutor(max_workers=min(bound, len(items)), thread_name_prefix=f"rlm-{self.id}") as ex:
            futures = [ex.submit(fn, item) for item in items]
            for fut in futures:
                try:
                    out.append(fut.result())
                except _Stop as stop:
                    if stop.reason in ("wall_time", "cancelled"):
                        for f in futures:
                            f.cancel()
                        raise _as_builtin(stop) from None
                    out.append(f"Error: {stop}")
                except Exception as exc:  # noqa: BLE001 - a failed item is an error string, as in rlms
                    out.append(f"Error: {type(exc).__name__}: {exc}")
        return out

    def _child(self, prompt: str, model: str | None, batch: int | None = None) -> str:
        run = self.run
        if self.depth + 1 >= run.budget.max_depth:
            return self._sub_lm(prompt, model, "rlm_fallback", batch)
        with self._lock:
            child_id = f"{self.id}.{next(self._children)}"
        child = _Agent(run, child_id, self.id, self.depth + 1, prompt, None, model or self.model)
        answer, reason = child.run_loop()
        if answer is None:
            raise RuntimeError(f"sub-agent {child_id} stopped without an answer ({reason})")
        return answer

    # ---- the loop ---------------------------------------------------------------------------------

    def interrupt(self) -> None:
        sb = self.sandbox
        if sb is not None:
            try:
                sb.interrupt()
            except Exception:
                log.debug("interrupting agent %s failed", self.id, exc_info=True)

    def _spec(self) -> _SandboxSpec:
        runner = self.run.runner
        return runner._root_spec if self.depth == 0 else runner._sub_spec

    def run_loop(self) -> tuple[str | None, StopReason]:
        """Run this agent to its end; returns (answer, reason). Raises for infrastructure errors."""
        run = self.run
        run.reserve_sandbox(sub_agent=self.parent_id is not None)
        started = time.monotonic()
        sb = self._acquire()
        self.sandbox = sb
        run.agent_started(self)
        info = describe_context(self.context)
        answer: str | None = None
        reason: StopReason = "error"
        error: BaseException | None = None
        broken = False
        try:
            run.emit(
                AgentStartEvent(
                    run_id=run.run_id,
                    t=time.time(),
                    agent_id=self.id,
                    parent_id=self.parent_id,
                    depth=self.depth,
                    sandbox_id=sb.id,
                    backend=sb.backend,
                    lease=sb.lease,
                    warm=sb.warm,
                    acquire_s=sb.acquire_s,
                    context=info,
                    prompt=run.text(self.context) if isinstance(self.context, str) and self.parent_id else "",
                )
            )
            try:
                answer, reason = self._loop(sb, info)
            except _Stop as stop:
                reason = stop.reason
                if self.parent_id is not None:
                    raise
            except SandboxError as exc:
                broken = True
                error = exc
                raise
            except BaseException as exc:
                error = exc
                raise
        finally:
            self.running_cell = None
            sb.release(broken=broken)
            self.sandbox = None
            run.agent_ended(self)
            run.emit(
                AgentEndEvent(
                    run_id=run.run_id,
                    t=time.time(),
                    agent_id=self.id,
                    parent_id=self.parent_id,
                    sandbox_id=sb.id,
                    answer=answer,
                    reason=reason,
                    iterations=self.iterations,
                    elapsed_s=time.monotonic() - started,
                    error=_describe(error),
                )
            )
        return answer, reason

    def _hidden(self, sb: PooledSandbox, code: str) -> ExecResult:
        return sb.execute(code, timeout_s=30.0)

    def _after(self, sb: PooledSandbox) -> tuple[str | None, list[str]]:
        """Read the answer and the variable names after a cell; restore the scaffold if lost."""
        r = self._hidden(sb, _AFTER)
        if not r.ok and r.error is not None and r.error.name == "NameError":
            self._hidden(sb, _PRELUDE)
            r = self._hidden(sb, _AFTER)
        for line in r.stdout.split("\n"):
            if line.startswith(_MARK):
                data = json.loads(line[len(_MARK) :])
                final = data.get("final")
                return (final if isinstance(final, str) else None), [str(v) for v in data.get("vars", [])]
        log.warning("agent %s: could not read the answer state: %s", self.id, r.error or r.message)
        return None, []

    def _cell(self, sb: PooledSandbox, code: str, iteration: int, block: int) -> tuple[ExecResult, str | None]:
        run = self.run
        timeout = run.cell_timeout(sb.limits)
        self.running_cell = next(self._cells)
        try:
            r = sb.execute(code, timeout_s=timeout)
        finally:
            self.running_cell = None
        final, _ = self._after(sb)
        run.emit(
            CellEvent(
                run_id=run.run_id,
                t=time.time(),
                agent_id=self.id,
                sandbox_id=sb.id,
                iteration=iteration,
                block=block,
                code=run.text(code),
                outcome=r.outcome.value,
                stdout=run.text(r.stdout),
                stderr=run.text(r.stderr),
                error=None if r.error is None else f"{r.error.name}: {r.error.message}",
                duration_s=r.duration_s,
                timed_out=r.timed_out,
                state_lost=r.state_lost,
                truncated=r.truncated,
                final=final is not None,
            )
        )
        return r, final

    def _first_message(self, info: ContextInfo) -> str:
        parts = [_context_message(info)]
        if self.question is not None:
            parts.append(f"Question: {self.question}")
        else:
            parts.append(
                f"You are a sub-agent (depth {self.depth}). Your task is the prompt your parent wrote, which is "
                "your `context`: read it with code first, then do what it asks and set the answer."
            )
        parts.append(_FIRST_TURN)
        return "\n\n".join(parts)

    def _acquire(self) -> PooledSandbox:
        """A sandbox from the pool with the context loaded and the REPL's scaffold defined.

        A pre-started sandbox that fails here (e.g. a cloud sandbox that expired while idle) is
        replaced once by a fresh one.
        """
        run = self.run
        spec = self._spec()
        while True:
            remaining = run.remaining()
            budget_s = run.budget.acquire_timeout_s
            timeout = budget_s if remaining is None else min(budget_s, remaining)
            try:
                sb = run.runner.pool.acquire(
                    spec.config, limits=spec.limits, functions=self.handlers(), timeout_s=max(timeout, 0.0)
                )
            except PoolExhausted:
                run.check()  # at the deadline: a wall-time stop, not a pool error
                raise
            try:
                sb.load_context(self.context)
                r = self._hidden(sb, _PRELUDE)
                if not r.ok:
                    raise SandboxError(f"could not set up the REPL: {r.error or r.message}")
                return sb
            except SandboxError:
                sb.release(broken=True)
                if not sb.warm:
                    raise
                log.warning("agent %s: pre-started sandbox %s failed its set-up; using a fresh one", self.id, sb.id)
            except BaseException:
                sb.release()
                raise

    def _loop(self, sb: PooledSandbox, info: ContextInfo) -> tuple[str | None, StopReason]:
        run = self.run
        budget = run.budget
        can_recurse = self.depth + 1 < budget.max_depth
        system = (
            run.runner.system_prompt
            if run.runner.system_prompt is not None
            else SYSTEM_PROMPT.format(depth_note="" if can_recurse else _DEPTH_NOTE, output_chars=budget.output_chars)
        )
        messages: Messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": self._first_message(info)},
        ]
        for iteration in range(1, budget.max_iterations + 1):
            reply = run.complete(
                run.runner.lm, messages, agent_id=self.id, kind="root", iteration=iteration, model=self.model
            )
            self.iterations = iteration  # counted once the model has answered (a stop may come first)
            blocks = find_code_blocks(reply)
            feedback: list[str] = []
            for index, code in enumerate(blocks):
                result, final = self._cell(sb, code, iteration, index)
                feedback.append(_format_block(code, result, budget.output_chars))
                if final is not None:
                    return final, "answer"
            found = find_final(reply)
            if found is not None:
                kind, value = found
                if kind == "text":
                    return value, "answer"
                result, final = self._cell(sb, f"FINAL_VAR({value!r})", iteration, len(blocks))
                if final is not None:
                    return final, "answer"
                feedback.append(_format_block(f"FINAL_VAR({value!r})", result, budget.output_chars))
            if not blocks and found is None:
                follow = _NO_CODE
            else:
                _, names = self._after(sb)
                follow = "\n\n".join([*feedback, f"REPL variables: {names}", _NEXT_TURN])
            messages.append({"role": "assistant", "content": reply})
            messages.append({"role": "user", "content": follow})
        # Out of iterations: ask once more, as rlms does.
        messages.append({"role": "user", "content": _FINAL_REQUEST})
        reply = run.complete(
            run.runner.lm, messages, agent_id=self.id, kind="final", iteration=budget.max_iterations, model=self.model
        )
        found = find_final(reply)
        if found is not None and found[0] == "text":
            return found[1], "max_iterations"
        return reply.strip(), "max_iterations"


def _describe(error: BaseException | None) -> str | None:
    if error is None:
        return None
    if isinstance(error, _Stop):
        return f"stopped ({error.reason}): {error}"
    return f"{type(error).__name__}: {error}"


def _as_builtin(stop: _Stop) -> Exception:
    """How a stop looks inside the sandbox (builtin types cross the boundary as themselves)."""
    if stop.reason == "wall_time":
        return TimeoutError(str(stop))
    return RuntimeError(str(stop))


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------


def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class RLMRunner:
    """Runs RLMs on one backend; reusable and thread-safe (one :meth:`run` per call).

    Args:
        backend: a backend name (``"local"``, ``"docker"``, ...) or a config object.
        backend_options: the backend config's fields (e.g. ``{"image": ...}`` for Docker).
        limits: the sandboxes' limits; ``exec_timeout_s`` bounds each cell (the run's remaining
            wall time bounds it too).
        lm: the model that drives each agent (root and sub-agents).
        sub_lm: the model behind ``llm_query``/``llm_query_batched`` (default: ``lm``).
        model / sub_model: model names passed to each call (default: the LMs' own).
        budget: the run's bounds (:class:`RLMBudget`).
        sub_backend / sub_backend_options / sub_limits: where sub-agents run (default: the same
            backend, options and limits).
        pool: the :class:`SandboxPool` agents take sandboxes from. Default: the runner's own
            (``min_idle=1``), closed by :meth:`close`.
        trajectory_dir: where trajectories go (default ``$RLM_SANDBOX_RUNS_DIR`` or ``.rlm-runs``).
        on_event: called with every trajectory event as it happens (from any thread; keep it fast).
        system_prompt: replaces :data:`SYSTEM_PROMPT`.
    """

    def __init__(
        self,
        backend: str | BackendConfig = "local",
        backend_options: Mapping[str, Any] | None = None,
        *,
        lm: LM,
        sub_lm: LM | None = None,
        limits: Limits | None = None,
        budget: RLMBudget | None = None,
        model: str | None = None,
        sub_model: str | None = None,
        sub_backend: str | BackendConfig | None = None,
        sub_backend_options: Mapping[str, Any] | None = None,
        sub_limits: Limits | None = None,
        pool: SandboxPool | None = None,
        trajectory_dir: str | os.PathLike[str] | None = None,
        on_event: Callable[[TrajectoryEvent], None] | None = None,
        system_prompt: str | None = None,
    ) -> None:
        self.lm = lm
        self.sub_lm = sub_lm or lm
        self.model = model
        self.sub_model = sub_model
        self.limits = limits or Limits()
        self.budget = budget or RLMBudget()
        self._root_spec = _SandboxSpec(make_config(backend, backend_options or {}), self.limits)
        if sub_backend is None and sub_backend_options is None:
            sub_config = self._root_spec.config
        else:
            sub_config = make_config(sub_backend if sub_backend is not None else backend, sub_backend_options or {})
        self._sub_spec = _SandboxSpec(sub_config, sub_limits or self.limits)
        self._own_pool = pool is None
        self.pool = pool if pool is not None else SandboxPool(max_size=16, min_idle=1)
        runs_dir = trajectory_dir if trajectory_dir is not None else os.environ.get("RLM_SANDBOX_RUNS_DIR")
        self.trajectory_dir = Path(runs_dir if runs_dir else DEFAULT_RUNS_DIR)
        self.on_event = on_event
        self.system_prompt = system_prompt

    @property
    def backend(self) -> str:
        """The root agents' backend name."""
        return self._root_spec.config.backend

    def run(
        self,
        question: str,
        context: ContextPayload,
        *,
        on_event: Callable[[TrajectoryEvent], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> RLMResult:
        """Answer ``question`` about ``context`` (str, bytes, list or dict; it stays in the sandbox).

        Returns when an answer is set or a budget runs out (see :class:`RLMResult`). Raises the LM's
        error when the root model cannot be reached, and :class:`~rlm_sandbox.SandboxError` for a
        sandbox that cannot be started; the trajectory records the run either way. Setting
        ``cancel`` stops the run: running cells are interrupted.
        """
        run_id = _new_run_id()
        path = self.trajectory_dir / f"{run_id}.jsonl"
        callbacks = [cb for cb in (self.on_event, on_event) if cb is not None]
        run = _Run(self, run_id, path, callbacks, cancel)
        info = describe_context(context)
        run.emit(
            RunStartEvent(
                run_id=run_id,
                t=time.time(),
                question=question,
                context=info,
                backend=self.backend,
                sub_backend=self._sub_spec.config.backend,
                budget=self.budget.model_dump(),
            )
        )
        watcher = threading.Thread(target=run.watch, name=f"rlm-watch-{run_id}", daemon=True)
        watcher.start()
        root = _Agent(run, "0", None, 0, context, question, self.model)
        answer: str | None = None
        reason: StopReason = "error"
        error: BaseException | None = None
        try:
            try:
                answer, reason = root.run_loop()
            except _Stop as stop:  # e.g. cancelled before the root got its sandbox
                reason = stop.reason
            return self._result(run, root, answer, reason)
        except BaseException as exc:
            error = exc
            raise
        finally:
            run.drain(timeout=self.limits.grace_s + 10.0)
            with run.cond:
                run.finished = True
                run.cond.notify_all()
            watcher.join(timeout=5)
            run.emit(
                RunEndEvent(
                    run_id=run_id,
                    t=time.time(),
                    answer=answer,
                    reason=reason,
                    iterations=root.iterations,
                    lm_calls=run.lm_calls,
                    sub_agents=run.sub_agents,
                    sandboxes=run.sandboxes,
                    elapsed_s=time.monotonic() - run.started,
                    error=_describe(error),
                )
            )
            run.writer.close()

    @staticmethod
    def _result(run: _Run, root: _Agent, answer: str | None, reason: StopReason) -> RLMResult:
        return RLMResult(
            answer=answer,
            reason=reason,
            iterations=root.iterations,
            lm_calls=run.lm_calls,
            sub_agents=run.sub_agents,
            sandboxes=run.sandboxes,
            elapsed_s=time.monotonic() - run.started,
            run_id=run.run_id,
            trajectory_path=run.path,
        )

    def close(self) -> None:
        """Close the runner's own pool (a pool passed in is left to its owner). Idempotent."""
        if self._own_pool:
            self.pool.close()

    def __enter__(self) -> RLMRunner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
