"""Run the REPL of the ``rlms`` library (imported as ``rlm``) in any rlm_sandbox backend.

One line turns it on::

    from rlm import RLM
    import rlm_sandbox as rs
    from rlm_sandbox.contrib.rlm import sandboxed

    rlm = RLM(backend="openai", backend_kwargs={"model_name": "gpt-5-mini"},
              max_depth=2, **sandboxed("docker", limits=rs.Limits(exec_timeout_s=60)))
    print(rlm.completion(big_text, root_prompt="What is the magic number?").response)

``sandboxed(backend, *, limits=None, lm_timeout_s=600, pool=None, environment_kwargs=None, **options)``
calls :func:`enable` and returns ``{"environment": ENVIRONMENT, "environment_kwargs":
{"rlm_sandbox": SandboxSpec(...)}}`` (``ENVIRONMENT`` is ``"docker"``, see below). ``options``
are the backend config's fields, exactly as for :func:`rlm_sandbox.open_sandbox`. The long form
is the same thing by hand::

    rlm_sandbox.contrib.rlm.enable()
    RLM(..., environment="docker",
        environment_kwargs={"rlm_sandbox": {"backend": "local", "limits": {...}, **options}})

How it plugs in (all of it is here, in :func:`enable` / :func:`disable`):

* ``rlms`` has no registry of environments: ``RLM`` builds them with the module-level name
  ``rlm.core.rlm.get_environment``. :func:`enable` replaces that one name with a dispatcher
  that builds a :class:`SandboxREPL` when ``environment_kwargs`` holds the key
  ``"rlm_sandbox"``, and calls the original function for everything else. It is idempotent,
  and :func:`disable` puts the original back. Child RLMs built by ``RLM._subcall`` (for
  ``rlm_query``) get the same environment name and kwargs, so each child gets its own sandbox
  through the same dispatcher.
* The environment name is :data:`ENVIRONMENT`, ``"docker"``: ``rlms`` passes ``subcall_fn``
  (recursion), ``compaction`` and ``persistent=True`` only to environments it knows by name, and
  since 0.1.3 ``"docker"`` is one of them. It also fails closed: if the patch were somehow
  missing, ``rlms`` would start its own Docker container rather than run the model's code
  unsandboxed in-process. On rlms 0.1.2 only ``"local"`` passes those gates, so the name is
  ``"local"`` there (use :func:`sandboxed`, which enables the patch itself).

How the REPL works:

* ``llm_query``, ``llm_query_batched``, ``rlm_query`` and ``rlm_query_batched`` are *host
  functions* of the sandbox: the code in the box calls them like plain functions, and they run
  in this process, next to rlm's ``LMHandler``, which they reach through rlm's own request
  helpers on 127.0.0.1. No port is opened toward the box and no credential enters it.
  ``rlm_query`` calls rlm's ``subcall_fn`` (a child ``RLM`` in its own sandbox), or falls back
  to ``llm_query`` when recursion is off. Failures come back as ``"Error: ..."`` strings, as in
  rlm's own environments. The completions of the calls a cell *started* are returned in that
  cell's ``REPLResult.rlm_calls``.
* ``answer`` is a dict ``{"content": "", "ready": False}``. A cell that sets ``ready`` truthy (by
  ``answer["ready"] = True``, ``answer.update(ready=True)``, or rebinding ``answer`` to a ready
  dict) ends the run: ``REPLResult.final_answer`` is ``str(answer["content"])`` as it is at the
  end of that cell. ``FINAL(value)`` and ``FINAL_VAR(name)`` do the same, for models prompted
  the pre-0.1.2 way. ``SHOW_VARS()`` lists the variables.
* After every cell the reserved names (``llm_query``, ..., ``SHOW_VARS``, ``answer``,
  ``context``, ``history``) are restored, so ``context = "x"`` does not stick.
* ``execute_code`` never raises: errors, timeouts (``Limits.exec_timeout_s`` per cell), crashes
  and infrastructure failures are reported in ``REPLResult.stderr``. A timed-out cell keeps its
  variables when the interrupt stops it; a killed or crashed one restarts the REPL with contexts
  and histories reloaded and other variables lost (stderr says so).
* Contexts (``context_0``, ...) and histories (``history_0``, ...) are uploaded once as files
  and survive REPL restarts; the persistence protocol (``add_context``, ``get_context_count``,
  ``add_history``, ``get_history_count``, ``update_handler_address``) works as in rlm's
  ``LocalREPL``.
* ``custom_tools``: callables become host functions (they run **on the host**, with JSON
  arguments and results); other values must be JSON-serialisable and become variables.

Tested with ``rlms`` 0.1.2 and 0.1.3 (:data:`TESTED_RLMS`); :func:`enable` warns outside that range.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import re
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import rlm.core.rlm as _rlm_core
from rlm.core.comms_utils import LMRequest, send_lm_request, send_lm_request_batched
from rlm.core.types import REPLResult
from rlm.environments.base_env import NonIsolatedEnv, extract_tool_value, validate_custom_tools

from .. import runtime as _rt
from .._box import BackendConfig
from .._errors import NotSerializable, SandboxClosed, SandboxError
from .._limits import Limits
from .._registry import make_config
from .._results import ExecResult, Outcome
from .._sandbox import Sandbox

__all__ = [
    "ENVIRONMENT",
    "ENV_KEY",
    "TESTED_RLMS",
    "SandboxREPL",
    "SandboxSource",
    "SandboxSpec",
    "disable",
    "enable",
    "is_enabled",
    "live_environments",
    "sandboxed",
]

log = logging.getLogger(__name__)

#: The key in ``environment_kwargs`` that selects a sandboxed environment.
ENV_KEY = "rlm_sandbox"
#: The ``rlms`` versions this module was tested with: ``(lowest, first unsupported)``.
TESTED_RLMS = ((0, 1, 2), (0, 2, 0))


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _installed_rlms() -> tuple[int, ...] | None:
    try:
        return _version_tuple(importlib.metadata.version("rlms"))
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


_RLMS_VERSION = _installed_rlms()
#: The environment name to give ``RLM``: one that rlm's recursion/persistence/compaction gates
#: accept. ``"docker"`` (rlms >= 0.1.3) also fails closed if the patch is missing; rlms 0.1.2 only
#: lets ``"local"`` through those gates.
ENVIRONMENT = "local" if _RLMS_VERSION is not None and _RLMS_VERSION < (0, 1, 3) else "docker"

#: Names that rlm reserves in the REPL and that are restored after every cell.
RESERVED_FUNCTIONS = ("llm_query", "llm_query_batched", "rlm_query", "rlm_query_batched")
#: How long the scaffold's own small cells (restore, reset) may take.
SCAFFOLD_TIMEOUT_S = 30.0

_REPORT_FN = "_rlm_report"
_COMPACTION_VAR = "_rlm_compaction_history"


# --------------------------------------------------------------------------------------------
# What runs inside the box: the answer dict, SHOW_VARS, FINAL/FINAL_VAR and the per-cell restore.
# Python 3.8+ and stdlib only, like the runtime. Everything it needs is captured in closures at
# install time, so a model that rebinds ``str`` or ``dict`` cannot break it.

_SCAFFOLD = r'''
import builtins as _rlm_builtins


def _rlm_install(compaction, hidden_names, report):
    import reprlib
    import types

    b = _rlm_builtins
    dict_, str_, bool_, isinstance_, type_, list_ = b.dict, b.str, b.bool, b.isinstance, b.type, b.list
    Exception_ = b.Exception
    g = (lambda: None).__globals__
    hidden = b.frozenset(hidden_names)
    simple = (b.str, b.int, b.float, b.bool, b.list, b.dict, b.tuple)
    short = reprlib.Repr()
    short.maxlevel = 3
    short.maxstring = short.maxother = 120
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = short.maxfrozenset = 8
    state = {"prev_ready": False}

    def truthy(value):
        try:
            return bool_(value)
        except Exception_:
            return False

    class Answer(dict_):
        """The final answer: set answer["content"], then answer["ready"] = True."""

        __slots__ = ("_rlm_set",)

        def __init__(self, *args, **kwargs):
            dict_.__init__(self, *args, **kwargs)
            self._rlm_set = False

        def __setitem__(self, key, value):
            dict_.__setitem__(self, key, value)
            if key == "ready" and truthy(value):
                self._rlm_set = True

    def new_answer():
        return Answer(content="", ready=False)

    def show_vars():
        found = {}
        for k, v in list_(g.items()):
            if k[:1] == "_" or k in hidden or k == "answer" or isinstance_(v, types.ModuleType):
                continue
            found[k] = type_(v).__name__
        if not found:
            return "No variables created yet. Use ```repl``` blocks to create variables."
        return "Available variables: %s" % (found,)

    def final(value):
        """Submit value as the final answer (answer["content"] = value; answer["ready"] = True)."""
        a = g.get("answer")
        if not isinstance_(a, dict_):
            a = g["answer"] = new_answer()
        a["content"] = value
        a["ready"] = True
        return value

    def final_var(name):
        """Submit the variable called name (or name itself when it is not a str) as the final answer."""
        if isinstance_(name, str_):
            key = name.strip().strip("'\"")
            if key not in g:
                raise NameError("FINAL_VAR: no variable named %r" % (key,))
            return final(g[key])
        return final(name)

    def variables():
        out = {}
        for k, v in list_(g.items()):
            if k[:1] == "_" or k in hidden or not isinstance_(v, simple):
                continue
            try:
                out[k] = short.repr(v)
            except Exception_:
                out[k] = "<%s>" % (type_(v).__name__,)
            if b.len(out) >= 100:
                break
        return out

    def after(report_now):
        a = g.get("answer")
        fired = ready = False
        if isinstance_(a, Answer):
            ready = truthy(dict_.get(a, "ready"))
            fired = a._rlm_set or (ready and not state["prev_ready"])
            a._rlm_set = False
        elif isinstance_(a, dict_):
            ready = fired = truthy(dict_.get(a, "ready"))
            wrapped = new_answer()
            dict_.update(wrapped, a)
            g["answer"] = wrapped
        else:
            g["answer"] = new_answer()
        result = None
        if fired:
            content = dict_.get(a, "content", "")
            try:
                result = str_(content)
            except Exception_ as exc:
                result = "<unprintable %s: %s>" % (type_(content).__name__, exc)
        state["prev_ready"] = ready
        g["SHOW_VARS"] = show_vars
        if "context_0" in g:
            g["context"] = g["context_0"]
        if compaction:
            g["history"] = g.setdefault("_rlm_compaction_history", [])
        elif "history_0" in g:
            g["history"] = g["history_0"]
        if report_now:
            report({"final": result, "locals": variables()})

    def reset_answer():
        g["answer"] = new_answer()
        state["prev_ready"] = False

    for fn, name in ((show_vars, "SHOW_VARS"), (final, "FINAL"), (final_var, "FINAL_VAR")):
        fn.__name__ = fn.__qualname__ = name
    g["SHOW_VARS"] = show_vars
    g["FINAL"] = final
    g["FINAL_VAR"] = final_var
    g["_rlm_after"] = after
    g["_rlm_reset_answer"] = reset_answer
    after(False)
'''


# --------------------------------------------------------------------------------------------
# Configuration


class SandboxSource(Protocol):
    """Where sandboxes come from instead of opening new ones, e.g. a ``rlm_sandbox`` pool.

    ``acquire`` returns an open sandbox with these host functions; closing it gives it back.
    """

    def acquire(
        self,
        backend: BackendConfig,
        *,
        limits: Limits | None = None,
        functions: Mapping[str, Callable[..., Any]] | None = None,
    ) -> Sandbox: ...


@dataclass(frozen=True, repr=False)
class SandboxSpec:
    """Which sandbox each environment opens: a backend config, limits, and the LM-call timeout.

    Shared by a root RLM and all its children (``environment_kwargs`` is passed down as is).
    Its ``repr`` names only the backend and the limits, because rlm's logger records
    ``environment_kwargs``: backend options (which may hold credentials) stay out of logs.
    """

    config: BackendConfig
    limits: Limits | None = None
    lm_timeout_s: float = 600.0
    """Socket timeout of one ``llm_query``/``llm_query_batched`` request to rlm's LMHandler."""
    pool: SandboxSource | None = None
    """Lease sandboxes from here (warm, reset between users) instead of opening new ones."""

    @classmethod
    def build(
        cls,
        backend: str | BackendConfig = "local",
        *,
        limits: Limits | Mapping[str, Any] | None = None,
        lm_timeout_s: float = 600.0,
        pool: SandboxSource | None = None,
        **options: Any,
    ) -> SandboxSpec:
        """Validate a backend name (or config) and its options, as ``open_sandbox`` does."""
        config = make_config(backend, options)
        if isinstance(limits, Mapping):
            limits = Limits(**limits)
        if not (isinstance(lm_timeout_s, int | float) and math.isfinite(lm_timeout_s) and lm_timeout_s > 0):
            raise ValueError("lm_timeout_s must be a positive number of seconds")
        if pool is not None and not callable(getattr(pool, "acquire", None)):
            raise TypeError("pool must have an acquire(config, *, limits, functions) method")
        return cls(config=config, limits=limits, lm_timeout_s=float(lm_timeout_s), pool=pool)

    @classmethod
    def coerce(cls, value: object) -> SandboxSpec:
        """A spec from what ``environment_kwargs["rlm_sandbox"]`` may hold.

        A :class:`SandboxSpec`; a mapping ``{"backend": "local", "limits": ..., "lm_timeout_s":
        ..., **backend_options}``; a backend name; a :class:`~rlm_sandbox.BackendConfig`; or
        ``None`` for the local backend with default options. A mapping may also hold ``pool``.
        """
        if isinstance(value, SandboxSpec):
            return value
        if value is None:
            return cls.build()
        if isinstance(value, str | BackendConfig):
            return cls.build(value)
        if isinstance(value, Mapping):
            options = {str(k): v for k, v in value.items()}
            return cls.build(options.pop("backend", "local"), **options)
        raise TypeError(
            f"environment_kwargs[{ENV_KEY!r}] must be a SandboxSpec, a mapping of options, a backend "
            f"name or a BackendConfig, not {type(value).__name__}"
        )

    def open(self, functions: Mapping[str, Callable[..., Any]]) -> Sandbox:
        """Open (or lease from :attr:`pool`) one sandbox with these host functions."""
        if self.pool is not None:
            return self.pool.acquire(self.config, limits=self.limits, functions=functions)
        return self.config.open(limits=self.limits, functions=functions)

    def __repr__(self) -> str:
        pooled = ", pooled" if self.pool is not None else ""
        return f"SandboxSpec(backend={self.config.backend!r}, limits={self.limits!r}{pooled})"


def sandboxed(
    backend: str | BackendConfig = "local",
    *,
    limits: Limits | Mapping[str, Any] | None = None,
    lm_timeout_s: float = 600.0,
    pool: SandboxSource | None = None,
    environment_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Keyword arguments for ``RLM(...)`` that run its REPL in sandboxes of ``backend``.

    ``RLM(backend="openai", backend_kwargs=..., **sandboxed("docker", limits=Limits(...)))``.
    Calls :func:`enable`. ``options`` are the backend's config fields (validated here);
    ``environment_kwargs`` are further keyword arguments for the environment (``setup_code``).
    With ``pool`` (e.g. a ``SandboxPool``), every environment, children included, leases a warm
    sandbox instead of starting one, which makes ``rlm_query`` cheap.
    """
    spec = SandboxSpec.build(backend, limits=limits, lm_timeout_s=lm_timeout_s, pool=pool, **options)
    enable()
    kwargs = dict(environment_kwargs or {})
    kwargs[ENV_KEY] = spec
    return {"environment": ENVIRONMENT, "environment_kwargs": kwargs}


# --------------------------------------------------------------------------------------------
# The patch: one name in rlm.core.rlm


class _PatchState:
    lock = threading.Lock()
    original: Callable[[str, dict[str, Any]], Any] | None = None
    enabled = False


def _get_environment(environment: str, environment_kwargs: dict[str, Any]) -> Any:
    """Stands in for ``rlm.core.rlm.get_environment`` while the plug-in is enabled."""
    original = _PatchState.original
    if ENV_KEY not in environment_kwargs:
        if original is None:  # pragma: no cover - only reachable if rlm imported us oddly
            raise RuntimeError("rlm_sandbox.contrib.rlm: the original get_environment is unknown")
        return original(environment, environment_kwargs)
    if not _PatchState.enabled:
        raise RuntimeError(
            f"environment_kwargs has the key {ENV_KEY!r} but rlm_sandbox.contrib.rlm is disabled; "
            "call rlm_sandbox.contrib.rlm.enable()"
        )
    kwargs = dict(environment_kwargs)
    spec = SandboxSpec.coerce(kwargs.pop(ENV_KEY))
    return SandboxREPL(sandbox=spec, **kwargs)


def enable() -> None:
    """Let ``RLM(environment_kwargs={"rlm_sandbox": ...})`` run its REPL in our sandboxes.

    Replaces ``rlm.core.rlm.get_environment`` (the name ``RLM`` and its children use) with a
    dispatcher; environments without our key still go to the original. Idempotent.
    """
    with _PatchState.lock:
        if _PatchState.enabled:
            return
        current = getattr(_rlm_core, "get_environment", None)
        if current is None:
            raise ImportError("this rlms version has no rlm.core.rlm.get_environment; it is not supported")
        low, high = TESTED_RLMS
        if _RLMS_VERSION is not None and not (low <= _RLMS_VERSION < high):
            warnings.warn(
                f"rlm_sandbox.contrib.rlm was tested with rlms >= {'.'.join(map(str, low))}, "
                f"< {'.'.join(map(str, high))}; rlms {'.'.join(map(str, _RLMS_VERSION))} is installed",
                RuntimeWarning,
                stacklevel=2,
            )
        if current is not _get_environment:
            _PatchState.original = current
            _rlm_core.get_environment = _get_environment
        _PatchState.enabled = True


def disable() -> None:
    """Undo :func:`enable`: ``rlm.core.rlm.get_environment`` is the original again. Idempotent.

    Sandboxes already open stay open until their RLM cleans them up.
    """
    with _PatchState.lock:
        if not _PatchState.enabled:
            return
        _PatchState.enabled = False
        if _rlm_core.get_environment is _get_environment and _PatchState.original is not None:
            _rlm_core.get_environment = _PatchState.original


def is_enabled() -> bool:
    """Whether :func:`enable` is in effect."""
    return _PatchState.enabled


_live: weakref.WeakSet[SandboxREPL] = weakref.WeakSet()


def live_environments() -> list[SandboxREPL]:
    """Environments whose sandbox is still open (for debugging leaks)."""
    return [env for env in list(_live) if not env.closed]


# --------------------------------------------------------------------------------------------
# The environment


@dataclass(frozen=True)
class _Report:
    final: str | None
    variables: dict[str, str]


_EMPTY_REPORT = _Report(None, {})


def _json_copy(value: Any) -> Any:
    """A deep copy through JSON (tuples become lists, non-JSON leaves become strings)."""
    return json.loads(json.dumps(value, default=str))


def _check_prompt(prompt: object, fn: str) -> None:
    if not isinstance(prompt, str | list | dict):
        raise TypeError(f"{fn}() prompt must be a str (or a list of chat messages), not {type(prompt).__name__}")


def _check_model(model: object, fn: str) -> None:
    if model is not None and not isinstance(model, str):
        raise TypeError(f"{fn}() model must be a str or None, not {type(model).__name__}")


class SandboxREPL(NonIsolatedEnv):  # type: ignore[misc]  # rlm ships no type information
    """An rlm environment whose REPL is an rlm_sandbox sandbox.

    Built by the patched ``get_environment`` (see :func:`enable`) with the keyword arguments
    ``RLM`` passes to every environment, plus ``sandbox`` (a :class:`SandboxSpec` or anything
    :meth:`SandboxSpec.coerce` accepts). Unknown keyword arguments are accepted and ignored,
    as rlm's own environments do. The sandbox opens in the constructor; :meth:`cleanup` closes it.
    """

    def __init__(
        self,
        lm_handler_address: tuple[str, int] | None = None,
        context_payload: dict[str, Any] | list[Any] | str | None = None,
        setup_code: str | None = None,
        persistent: bool = False,
        depth: int = 1,
        subcall_fn: Callable[[str, str | None], Any] | None = None,
        custom_tools: dict[str, Any] | None = None,
        custom_sub_tools: dict[str, Any] | None = None,
        compaction: bool = False,
        max_concurrent_subcalls: int = 4,
        *,
        sandbox: object = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(persistent=persistent, depth=depth, max_concurrent_subcalls=max_concurrent_subcalls, **kwargs)
        self.spec = SandboxSpec.coerce(sandbox)
        self.lm_handler_address = lm_handler_address
        self.subcall_fn = subcall_fn
        self.compaction = compaction
        self.custom_tools: dict[str, Any] = dict(custom_tools or {})
        self.custom_sub_tools: dict[str, Any] = (
            dict(custom_sub_tools) if custom_sub_tools is not None else self.custom_tools
        )
        validate_custom_tools(self.custom_tools)
        if any(name.startswith("_rlm_") for name in self.custom_tools):
            raise ValueError("custom tool names starting with '_rlm_' are reserved by rlm_sandbox")

        self._sandbox: Sandbox | None = None
        #: The sandbox's id (kept after cleanup, for logs).
        self.sandbox_id = ""
        self._closed = False
        self._lock = threading.RLock()  # one cell or protocol operation at a time
        self._calls_lock = threading.Lock()
        self._calls: dict[int, list[Any]] = {}
        self._cell = 0
        self._report: _Report | None = None
        self._context_count = 0
        self._history_count = 0
        self._compaction_history: list[Any] = []

        self._functions: dict[str, Callable[..., Any]] = {
            "llm_query": self._llm_query,
            "llm_query_batched": self._llm_query_batched,
            "rlm_query": self._rlm_query,
            "rlm_query_batched": self._rlm_query_batched,
            _REPORT_FN: self._on_report,
        }
        self._data_tools: dict[str, Any] = {}
        for name, entry in self.custom_tools.items():
            value = extract_tool_value(entry)
            if callable(value):
                self._functions[name] = value
            else:
                try:
                    _rt.encode_value(value)
                except TypeError as exc:
                    raise NotSerializable(
                        f"custom tool {name!r}: data passed into a sandbox must be JSON-serialisable ({exc})"
                    ) from None
                self._data_tools[name] = value

        _live.add(self)
        try:
            self.setup()
            if context_payload is not None:
                self.load_context(context_payload)
            if setup_code:
                self.execute_code(setup_code)
        except BaseException:
            self.cleanup()
            raise

    # ---- BaseEnv --------------------------------------------------------------------------------

    @property
    def sandbox(self) -> Sandbox:
        """The open sandbox (raises ``SandboxClosed`` after :meth:`cleanup`)."""
        if self._sandbox is None:
            raise SandboxClosed("this environment has been cleaned up")
        return self._sandbox

    @property
    def closed(self) -> bool:
        """Whether :meth:`cleanup` ran."""
        return self._closed

    def setup(self) -> None:
        """Open the sandbox and install the REPL's built-in names; on an open one, start over."""
        with self._lock:
            if self._closed:
                raise SandboxClosed("this environment has been cleaned up")
            if self._sandbox is None:
                self._sandbox = self.spec.open(self._functions)
                self.sandbox_id = self._sandbox.id
            else:
                self._sandbox.reset()
                self._context_count = self._history_count = 0
            if self.compaction:
                self._compaction_history = []
                self._sandbox.load_context([], name=_COMPACTION_VAR)
            self._install()

    def load_context(self, context_payload: dict[str, Any] | list[Any] | str) -> None:
        """Load the first context (``context_0``, aliased as ``context``)."""
        self.add_context(context_payload, 0)

    def execute_code(self, code: str) -> REPLResult:
        """Run one cell. Never raises: every failure is reported in ``stderr``."""
        start = time.perf_counter()
        with self._lock:
            cell = self._begin_cell()
            stdout, stderr, report = "", "", _EMPTY_REPORT
            try:
                sb = self.sandbox
                result = sb.execute(code)
                stdout, stderr = result.stdout, _describe(result, sb.limits.exec_timeout_s)
                if result.state_lost:
                    self._install()
                out, err, report = self._scaffold("_rlm_after(True)")
                stdout, stderr = stdout + out, _join(stderr, err)
            except Exception as exc:  # noqa: BLE001 - execute_code reports every failure, never raises
                stderr = _join(stderr, f"{type(exc).__name__}: {exc}\n")
            return REPLResult(
                stdout=stdout,
                stderr=stderr,
                locals=dict(report.variables),
                execution_time=time.perf_counter() - start,
                rlm_calls=self._end_cell(cell),
                final_answer=report.final,
            )

    # ---- SupportsPersistence ---------------------------------------------------------------------

    def update_handler_address(self, address: tuple[str, int]) -> None:
        """Point the query functions at a new LMHandler (a new ``completion()``); reset ``answer``."""
        self.lm_handler_address = address
        with self._lock:
            try:
                self._scaffold("_rlm_reset_answer()")
            except SandboxError as exc:  # the next execute_code reports the broken sandbox
                log.warning("rlm_sandbox: could not reset `answer` in %r: %s", self, exc)

    def add_context(self, context_payload: dict[str, Any] | list[Any] | str, context_index: int | None = None) -> int:
        """Upload a context as ``context_<i>`` (``i`` = next index by default); return ``i``."""
        with self._lock:
            index = self._context_count if context_index is None else _index(context_index)
            self.sandbox.load_context(context_payload, name=f"context_{index}")
            self._context_count = max(self._context_count, index + 1)
            if index == 0:
                self._scaffold("_rlm_after(False)")
            return index

    def get_context_count(self) -> int:
        return self._context_count

    def add_history(self, message_history: list[dict[str, Any]], history_index: int | None = None) -> int:
        """Store a copy of a conversation as ``history_<i>`` (``history`` aliases ``history_0``)."""
        with self._lock:
            index = self._history_count if history_index is None else _index(history_index)
            self.sandbox.load_context(_json_copy(list(message_history)), name=f"history_{index}")
            self._history_count = max(self._history_count, index + 1)
            if index == 0 and not self.compaction:
                self._scaffold("_rlm_after(False)")
            return index

    def get_history_count(self) -> int:
        return self._history_count

    def append_compaction_entry(self, entry: list[dict[str, Any]] | dict[str, Any]) -> None:
        """Compaction mode: append a copy of ``entry`` to ``history`` (kept on the host, re-sent)."""
        if not self.compaction:
            return
        with self._lock:
            self._compaction_history.append(_json_copy(entry))
            self.sandbox.load_context(self._compaction_history, name=_COMPACTION_VAR)
            self._scaffold("_rlm_after(False)")

    def cleanup(self) -> None:
        """Close the sandbox. Idempotent (rlm calls it more than once)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sb, self._sandbox = self._sandbox, None
            self.subcall_fn = None
        _live.discard(self)
        if sb is not None:
            try:
                sb.close()
            except Exception as exc:  # noqa: BLE001 - cleanup is best effort and must not raise
                log.warning("rlm_sandbox: closing sandbox %s failed: %s", sb.id, exc)

    def __enter__(self) -> SandboxREPL:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        sb = self._sandbox
        where = f"{sb.backend}:{sb.id}" if sb is not None else "closed"
        return f"<SandboxREPL depth={self.depth} {where}>"

    # ---- the scaffold inside the box ----------------------------------------------------------

    def _install_code(self) -> str:
        hidden = sorted({*self._functions, "SHOW_VARS", "FINAL", "FINAL_VAR", "HostFunctionError"})
        return f"{_SCAFFOLD}\n_rlm_install({bool(self.compaction)!r}, {hidden!r}, {_REPORT_FN})\n"

    def _install(self) -> None:
        """(Re)install the scaffold and the custom data tools (at start and after a restart)."""
        sb = self.sandbox
        result = sb.execute(self._install_code(), timeout_s=SCAFFOLD_TIMEOUT_S)
        if not result.ok:
            raise SandboxError(f"could not set up the REPL in the sandbox: {_describe(result, SCAFFOLD_TIMEOUT_S)}")
        for name, value in self._data_tools.items():
            sb.set_variable(name, value)

    def _scaffold(self, call: str) -> tuple[str, str, _Report]:
        """Run a scaffold call; reinstall the scaffold once if the model broke it.

        Returns (stdout, stderr, report): output that background threads printed meanwhile, and
        a note when the scaffold could not be restored.
        """
        sb = self.sandbox
        stdout = ""
        result: ExecResult | None = None
        for code in (call, self._install_code() + call):
            self._report = None
            result = sb.execute(code, timeout_s=SCAFFOLD_TIMEOUT_S)
            stdout += result.stdout
            if result.ok:
                return stdout, result.stderr, self._report or _EMPTY_REPORT
            if result.state_lost:
                self._install()
        assert result is not None
        problem = "rlm-sandbox: could not restore the REPL's built-in names (answer, SHOW_VARS, context, ...):\n"
        return stdout, problem + _describe(result, SCAFFOLD_TIMEOUT_S), _EMPTY_REPORT

    def _on_report(self, state: Any) -> None:
        """Host function the scaffold calls after each cell (the box is untrusted: validate)."""
        if not isinstance(state, dict):
            return
        final = state.get("final")
        variables = state.get("locals")
        self._report = _Report(
            final=final if isinstance(final, str) else None,
            variables=(
                {str(k): v for k, v in variables.items() if isinstance(v, str)} if isinstance(variables, dict) else {}
            ),
        )

    # ---- per-cell bookkeeping of sub-calls ----------------------------------------------------

    def _begin_cell(self) -> int:
        with self._calls_lock:
            self._cell += 1
            self._calls.clear()  # completions of cells already returned can no longer be reported
            return self._cell

    def _end_cell(self, cell: int) -> list[Any]:
        with self._calls_lock:
            return self._calls.pop(cell, [])

    def _record(self, cell: int, completions: Sequence[Any]) -> None:
        with self._calls_lock:
            self._calls.setdefault(cell, []).extend(completions)

    # ---- host functions: they run in this process, called from inside the box ----------------

    def _llm_query(self, prompt: Any, model: Any = None) -> str:
        _check_prompt(prompt, "llm_query")
        _check_model(model, "llm_query")
        cell = self._cell
        address = self.lm_handler_address
        if not address:
            return "Error: No LM handler configured"
        request = LMRequest(prompt=prompt, model=model, depth=self.depth)
        response = send_lm_request(tuple(address), request, timeout=self.spec.lm_timeout_s)
        if not response.success:
            return f"Error: {response.error}"
        self._record(cell, [response.chat_completion])
        return str(response.chat_completion.response)

    def _llm_query_batched(self, prompts: Any, model: Any = None) -> list[str]:
        if not isinstance(prompts, list):
            raise TypeError(f"llm_query_batched() prompts must be a list, not {type(prompts).__name__}")
        for prompt in prompts:
            _check_prompt(prompt, "llm_query_batched")
        _check_model(model, "llm_query_batched")
        cell = self._cell
        address = self.lm_handler_address
        if not address:
            return ["Error: No LM handler configured"] * len(prompts)
        if not prompts:
            return []
        responses = send_lm_request_batched(
            tuple(address), prompts, model=model, timeout=self.spec.lm_timeout_s, depth=self.depth
        )
        out: list[str] = []
        done: list[Any] = []
        for response in responses:
            if response.success:
                done.append(response.chat_completion)
                out.append(str(response.chat_completion.response))
            else:
                out.append(f"Error: {response.error}")
        self._record(cell, done)
        return out

    def _subcall(self, prompt: Any, model: str | None) -> tuple[str, Any]:
        fn = self.subcall_fn
        if fn is None:
            return "Error: RLM query failed - the environment is closed", None
        try:
            completion = fn(prompt, model)
        except Exception as exc:  # noqa: BLE001 - as rlm: the box gets an "Error: ..." string
            return f"Error: RLM query failed - {exc}", None
        return str(completion.response), completion

    def _rlm_query(self, prompt: Any, model: Any = None) -> str:
        _check_prompt(prompt, "rlm_query")
        _check_model(model, "rlm_query")
        if self.subcall_fn is None:  # recursion is off (max_depth <= 1): a plain sub-LM call
            return self._llm_query(prompt, model)
        cell = self._cell
        text, completion = self._subcall(prompt, model)
        if completion is not None:
            self._record(cell, [completion])
        return text

    def _rlm_query_batched(self, prompts: Any, model: Any = None) -> list[str]:
        if not isinstance(prompts, list):
            raise TypeError(f"rlm_query_batched() prompts must be a list, not {type(prompts).__name__}")
        for prompt in prompts:
            _check_prompt(prompt, "rlm_query_batched")
        _check_model(model, "rlm_query_batched")
        if self.subcall_fn is None:
            return self._llm_query_batched(prompts, model)
        cell = self._cell
        if len(prompts) <= 1:
            results = [self._subcall(p, model) for p in prompts]
        else:
            workers = max(1, min(int(self.max_concurrent_subcalls), len(prompts)))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rlm-sandbox-subcall") as pool:
                results = list(pool.map(lambda p: self._subcall(p, model), prompts))
        self._record(cell, [c for _, c in results if c is not None])
        return [text for text, _ in results]


# --------------------------------------------------------------------------------------------
# Helpers


def _index(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"an index must be a non-negative int, not {value!r}")
    return value


def _join(a: str, b: str) -> str:
    if not a or not b:
        return a + b
    return a + ("" if a.endswith("\n") else "\n") + b


def _describe(result: ExecResult, timeout_s: float | None) -> str:
    """The stderr rlm should see for a cell: what the code printed, then what went wrong."""
    limit = f"{timeout_s:g} s" if timeout_s is not None else "its time limit"
    lost = "the REPL was restarted: variables are lost (contexts, histories and files are kept)"
    stderr = result.stderr
    if result.outcome is Outcome.OK:
        return stderr
    if result.outcome is Outcome.ERROR:
        err = result.error
        return _join(stderr, err.traceback if err is not None and err.traceback else f"{err}\n")
    if result.outcome is Outcome.INTERRUPTED:
        if result.timed_out:
            note = f"TimeoutError: the cell ran longer than {limit} and was interrupted (variables are kept)\n"
        else:
            note = "KeyboardInterrupt: the cell was interrupted (variables are kept)\n"
        return _join(stderr, note)
    if result.outcome is Outcome.KILLED:
        if result.timed_out:
            note = f"TimeoutError: the cell ran longer than {limit}, ignored the interrupt and was killed; {lost}\n"
        else:
            note = f"RuntimeError: the cell was killed ({result.message}); {lost}\n"
        return _join(stderr, note)
    detail = f" ({result.message})" if result.message else ""
    return _join(stderr, f"RuntimeError: the REPL process crashed{detail}; {lost}\n")
