"""A pool of pre-started sandboxes, per backend config, reset between users.

::

    with rlm_sandbox.SandboxPool(max_size=8, min_idle=2) as pool:
        with pool.acquire("local", limits=limits, functions={"llm_query": my_llm}) as sb:
            sb.load_context(text)
            sb.execute("print(llm_query(context[:100]))")
        # leaving the block gives the sandbox back: it is reset in the background

Sandboxes are grouped by a key: the backend config (name + options), the limits and the *set of
host-function names*. Host functions are bound when a sandbox opens, so a pooled sandbox is opened
with stable proxy functions, one per name, that dispatch to the callables of whoever holds the
current lease (and refuse calls between leases). Two users with the same function names share
sandboxes; each sees only their own callables.

* :meth:`SandboxPool.acquire` hands out an idle sandbox at once (a lock and a pop: well under a
  millisecond), opens one when the key has fewer than ``max_size``, and otherwise blocks until one
  comes back, up to a timeout (then :class:`PoolExhausted`).
* Releasing gives the sandbox back; a background thread resets it (``Sandbox.reset()``: a fresh
  runtime, no variables, contexts or files of the previous user) before anyone else gets it. A
  sandbox released as broken, or whose reset fails, is closed and replaced.
* A background thread keeps ``min_idle`` sandboxes of each key in use ready.
* :meth:`SandboxPool.close` (or leaving the ``with`` block) closes every sandbox, leased or not.
  There is no ``__del__``: close the pool.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from ._box import BackendConfig
from ._errors import ConfigError, SandboxClosed, SandboxError, SandboxStartError, SandboxTimeout
from ._limits import Limits
from ._registry import make_config
from ._results import ExecResult
from ._sandbox import ContextPayload, Sandbox, install_exit_hooks

__all__ = ["PoolExhausted", "PoolStats", "PooledSandbox", "SandboxPool"]

log = logging.getLogger(__name__)

def _answers(sb: Sandbox) -> bool:
    """Whether a sandbox's runtime still answers (one round trip)."""
    ping = getattr(sb, "ping", None)
    if ping is None:
        return True
    try:
        ping()
    except SandboxError:
        return False
    return True


class PoolExhausted(SandboxTimeout):
    """:meth:`SandboxPool.acquire` timed out: the key is at ``max_size`` and none came back."""


@dataclass(frozen=True)
class PoolStats:
    """Counters of a pool (over all keys)."""

    keys: int
    """Distinct configs (backend + options + limits + function names) seen."""
    idle: int
    """Ready to hand out."""
    leased: int
    """Held by users."""
    starting: int
    """Being opened."""
    resetting: int
    """Given back, being reset."""
    created: int
    """Sandboxes opened so far."""
    destroyed: int
    """Sandboxes closed so far."""
    acquired: int
    """Leases handed out."""
    warm: int
    """Leases served from an idle sandbox (no start-up wait)."""
    replaced: int
    """Sandboxes closed because they were released as broken or their reset failed."""
    failures: int
    """Sandbox openings that failed."""

    @property
    def open(self) -> int:
        """Sandboxes opened and not yet closed."""
        return self.created - self.destroyed


class _Slot:
    """One pooled sandbox and the handlers of its current lease."""

    __slots__ = ("destroyed", "handlers", "idle_since", "lease", "sandbox")

    def __init__(self) -> None:
        self.idle_since = 0.0
        self.sandbox: Sandbox | None = None
        self.handlers: Mapping[str, Callable[..., Any]] | None = None
        self.lease = 0
        self.destroyed = False

    def proxy(self, name: str) -> Callable[..., Any]:
        def host_function(*args: Any, **kwargs: Any) -> Any:
            handlers = self.handlers
            if handlers is None:
                raise RuntimeError(f"{name}: this sandbox is not leased to anyone (its lease ended)")
            return handlers[name](*args, **kwargs)

        host_function.__name__ = host_function.__qualname__ = name
        return host_function

    @property
    def box(self) -> Sandbox:
        assert self.sandbox is not None
        return self.sandbox


class _Key:
    """The sandboxes of one config."""

    def __init__(self, config: BackendConfig, limits: Limits, names: tuple[str, ...]) -> None:
        self.config = config
        self.limits = limits
        self.names = names
        self.idle: deque[_Slot] = deque()
        self.leased: set[_Slot] = set()
        self.starting = 0  # opening for a caller of acquire()
        self.starting_bg = 0  # opening to become idle
        self.resetting = 0
        self.last_error: BaseException | None = None

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.leased) + self.starting + self.starting_bg + self.resetting

    @property
    def coming(self) -> int:
        """Sandboxes that are or will soon be idle."""
        return len(self.idle) + self.starting_bg + self.resetting


def _key_of(config: BackendConfig, limits: Limits, names: Iterable[str]) -> tuple[str, str, str, tuple[str, ...]]:
    cls = type(config)
    return (
        f"{cls.__module__}.{cls.__qualname__}",
        config.model_dump_json(),
        limits.model_dump_json(),
        tuple(sorted(names)),
    )


class SandboxPool:
    """Pre-started sandboxes per backend config; see the module docstring.

    Args:
        max_size: most sandboxes per key at once (idle, leased, starting and resetting).
        min_idle: sandboxes per key kept ready in the background once the key has been used
            (or :meth:`prewarm`-ed). 0 turns background refilling off.
        acquire_timeout_s: how long :meth:`acquire` waits for a sandbox by default.
        max_starting: how many sandboxes the background opens or resets at once.
    """

    def __init__(
        self,
        *,
        max_size: int = 8,
        min_idle: int = 1,
        acquire_timeout_s: float = 60.0,
        max_starting: int = 4,
        health_check_after_s: float = 30.0,
    ) -> None:
        install_exit_hooks()  # its sandboxes open in background threads
        if max_size < 1:
            raise ConfigError("max_size must be >= 1")
        if not 0 <= min_idle <= max_size:
            raise ConfigError("min_idle must be between 0 and max_size")
        if acquire_timeout_s < 0:
            raise ConfigError("acquire_timeout_s must be >= 0")
        if max_starting < 1:
            raise ConfigError("max_starting must be >= 1")
        self.max_size = max_size
        self.min_idle = min_idle
        self.acquire_timeout_s = acquire_timeout_s
        #: An idle sandbox older than this is pinged before it is handed out (one that died while
        #: idle is replaced); younger ones were just reset, which is a round trip already.
        self.health_check_after_s = health_check_after_s
        self._cond = threading.Condition()
        self._keys: dict[tuple[str, str, str, tuple[str, ...]], _Key] = {}
        self._closed = False
        self._leases = itertools.count(1)
        self._executor = ThreadPoolExecutor(max_workers=max_starting, thread_name_prefix="rlm-pool")
        self._created = self._destroyed = self._acquired = self._warm = self._replaced = self._failures = 0

    # ---- public API ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def acquire(
        self,
        backend: str | BackendConfig = "local",
        *,
        options: Mapping[str, Any] | None = None,
        limits: Limits | None = None,
        functions: Mapping[str, Callable[..., Any]] | None = None,
        timeout_s: float | None = None,
    ) -> PooledSandbox:
        """Lease a sandbox of this config whose host functions call ``functions``.

        Returns at once when one is idle; opens one when the key is below ``max_size``; else
        waits up to ``timeout_s`` (default ``acquire_timeout_s``) and raises
        :class:`PoolExhausted`. Give it back with ``release()``/``close()`` or a ``with`` block.
        """
        started = time.perf_counter()
        handlers = dict(functions or {})
        for name, fn in handlers.items():
            if not callable(fn):
                raise ConfigError(f"host function {name!r} is not callable")
        key = self._key(backend, options, limits, handlers)
        wait = self.acquire_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait
        slot: _Slot | None = None
        check = False
        with self._cond:
            while True:
                if self._closed:
                    raise SandboxClosed("the sandbox pool is closed")
                if key.idle:
                    slot = key.idle.pop()
                    check = time.monotonic() - slot.idle_since > self.health_check_after_s
                    lease = self._lease(key, slot, handlers, warm=True)
                    break
                if key.total < self.max_size:
                    key.starting += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PoolExhausted(
                        f"no sandbox free within {wait:g}s: {len(key.leased)} leased, max_size={self.max_size}"
                    )
                self._cond.wait(remaining)
        if slot is None:
            try:
                slot = self._open(key)
            finally:
                with self._cond:
                    key.starting -= 1
                    self._cond.notify_all()
            with self._cond:
                closed = self._closed
                if not closed:
                    lease = self._lease(key, slot, handlers, warm=False)
            if closed:
                self._destroy(slot)
                raise SandboxClosed("the sandbox pool is closed")
        self._refill(key)
        pooled = PooledSandbox(self, key, slot, lease, started=started)
        if check and not _answers(slot.box):
            log.warning("pooled sandbox %s died while idle; replacing it", slot.box.id)
            pooled.release(broken=True)
            left = max(deadline - time.monotonic(), 0.0)
            return self.acquire(backend, options=options, limits=limits, functions=functions, timeout_s=left)
        return pooled

    def prewarm(
        self,
        backend: str | BackendConfig = "local",
        *,
        options: Mapping[str, Any] | None = None,
        limits: Limits | None = None,
        function_names: Iterable[str] = (),
        count: int | None = None,
        wait: bool = True,
        timeout_s: float | None = None,
    ) -> None:
        """Open sandboxes of this config in the background until ``count`` (default ``min_idle``)
        are idle. With ``wait=True``, block until they are (raises what opening raised, or
        :class:`~rlm_sandbox.SandboxTimeout`)."""
        names = {n: _never for n in function_names}
        key = self._key(backend, options, limits, names)
        want = min(self.min_idle if count is None else count, self.max_size)
        self._refill(key, want)
        if not wait:
            return
        limit = self.acquire_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        with self._cond:
            while len(key.idle) < want:
                if self._closed:
                    raise SandboxClosed("the sandbox pool is closed")
                if not key.starting_bg and not key.resetting:
                    if key.last_error is not None:
                        raise SandboxStartError(f"could not prewarm the pool: {key.last_error}") from key.last_error
                    if key.total >= self.max_size:
                        return  # the rest are leased
                    self._cond.release()
                    try:
                        self._refill(key, want)
                    finally:
                        self._cond.acquire()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SandboxTimeout(f"the pool was not warm within {limit:g}s")
                self._cond.wait(remaining)

    def stats(self) -> PoolStats:
        """A snapshot of the pool's counters."""
        with self._cond:
            keys = list(self._keys.values())
            return PoolStats(
                keys=len(keys),
                idle=sum(len(k.idle) for k in keys),
                leased=sum(len(k.leased) for k in keys),
                starting=sum(k.starting + k.starting_bg for k in keys),
                resetting=sum(k.resetting for k in keys),
                created=self._created,
                destroyed=self._destroyed,
                acquired=self._acquired,
                warm=self._warm,
                replaced=self._replaced,
                failures=self._failures,
            )

    def wait_idle(self, count: int = 1, *, timeout_s: float = 30.0) -> bool:
        """Wait until at least ``count`` sandboxes (over all keys) are idle; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while sum(len(k.idle) for k in self._keys.values()) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self) -> None:
        """Close every sandbox of the pool, idle or leased; later acquires raise. Idempotent.

        Waits for sandboxes being opened or reset in the background, then closes them too.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            slots: list[_Slot] = []
            for key in self._keys.values():
                slots.extend(key.idle)
                key.idle.clear()
                for slot in key.leased:
                    slot.handlers = None
                    slots.append(slot)
            self._cond.notify_all()
        self._executor.shutdown(wait=True)
        if len(slots) > 1:
            with ThreadPoolExecutor(max_workers=min(8, len(slots)), thread_name_prefix="rlm-pool-close") as ex:
                list(ex.map(self._destroy, slots))
        else:
            for slot in slots:
                self._destroy(slot)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.stats()
        state = "closed" if self._closed else "open"
        return f"<SandboxPool {state} idle={s.idle} leased={s.leased} max_size={self.max_size}>"

    # ---- internals ----------------------------------------------------------------------------

    def _key(
        self,
        backend: str | BackendConfig,
        options: Mapping[str, Any] | None,
        limits: Limits | None,
        functions: Mapping[str, Any],
    ) -> _Key:
        config = make_config(backend, options or {})
        lim = limits or Limits()
        for name in functions:
            if not name.isidentifier():
                raise ConfigError(f"host function name {name!r} is not an identifier")
        k = _key_of(config, lim, functions)
        with self._cond:
            key = self._keys.get(k)
            if key is None:
                key = self._keys[k] = _Key(config, lim, k[3])
            return key

    def _lease(self, key: _Key, slot: _Slot, handlers: Mapping[str, Callable[..., Any]], *, warm: bool) -> _Lease:
        slot.lease = next(self._leases)
        slot.handlers = handlers
        key.leased.add(slot)
        self._acquired += 1
        if warm:
            self._warm += 1
        return _Lease(slot.lease, warm)

    def _open(self, key: _Key) -> _Slot:
        slot = _Slot()
        try:
            slot.sandbox = key.config.open(limits=key.limits, functions={n: slot.proxy(n) for n in key.names})
        except BaseException as exc:
            with self._cond:
                self._failures += 1
                key.last_error = exc
            raise
        with self._cond:
            self._created += 1
            key.last_error = None
        return slot

    def _destroy(self, slot: _Slot) -> None:
        with self._cond:
            slot.handlers = None
            sb = slot.sandbox
            if sb is None or slot.destroyed:
                return
            slot.destroyed = True
        try:
            sb.close()
        except Exception:  # closing must not fail the caller; the backend logs what went wrong
            log.warning("closing pooled sandbox %s failed", sb.id, exc_info=True)
        with self._cond:
            self._destroyed += 1
            self._cond.notify_all()

    def _submit(self, fn: Callable[..., None], *args: Any) -> bool:
        try:
            self._executor.submit(fn, *args)
        except RuntimeError:  # shut down: the pool is closing
            return False
        return True

    def _refill(self, key: _Key, want: int | None = None) -> None:
        target = self.min_idle if want is None else want
        with self._cond:
            if self._closed:
                return
            n = min(target - key.coming, self.max_size - key.total)
            for _ in range(max(0, n)):
                key.starting_bg += 1
                if not self._submit(self._open_idle, key):
                    key.starting_bg -= 1

    def _open_idle(self, key: _Key) -> None:
        try:
            slot = self._open(key)
        except BaseException:
            log.warning("pre-starting a sandbox failed", exc_info=True)
            with self._cond:
                key.starting_bg -= 1
                self._cond.notify_all()
            return
        with self._cond:
            key.starting_bg -= 1
            closed = self._closed
            if not closed:
                slot.idle_since = time.monotonic()
                key.idle.append(slot)
            self._cond.notify_all()
        if closed:
            self._destroy(slot)

    def _release(self, key: _Key, slot: _Slot, *, broken: bool) -> None:
        with self._cond:
            slot.handlers = None
            key.leased.discard(slot)
            destroy = self._closed or broken or slot.box.closed
            if destroy:
                if not self._closed:
                    self._replaced += 1
            else:
                key.resetting += 1
            self._cond.notify_all()
        if destroy:
            if not self._submit(self._destroy, slot):
                self._destroy(slot)
            self._refill(key)
            return
        if not self._submit(self._reset, key, slot):
            with self._cond:
                key.resetting -= 1
            self._destroy(slot)

    def _reset(self, key: _Key, slot: _Slot) -> None:
        ok = False
        try:
            slot.box.reset()
            ok = True
        except Exception:
            log.warning("resetting pooled sandbox %s failed; replacing it", slot.box.id, exc_info=True)
        with self._cond:
            key.resetting -= 1
            keep = ok and not self._closed
            if keep:
                slot.idle_since = time.monotonic()
                key.idle.append(slot)
            elif not self._closed:
                self._replaced += 1
            self._cond.notify_all()
        if not keep:
            self._destroy(slot)
            self._refill(key)


def _never(*args: Any, **kwargs: Any) -> Any:  # pragma: no cover - placeholder for key names
    raise RuntimeError("not leased")


@dataclass(frozen=True)
class _Lease:
    number: int
    warm: bool


class PooledSandbox(Sandbox):
    """A sandbox leased from a :class:`SandboxPool`.

    It behaves as the underlying sandbox (same ``id`` and ``backend``) until released;
    :meth:`close` gives it back instead of destroying it. After release every operation raises
    :class:`~rlm_sandbox.SandboxClosed`.
    """

    def __init__(self, pool: SandboxPool, key: _Key, slot: _Slot, lease: _Lease, *, started: float) -> None:
        self._pool = pool
        self._key = key
        self._slot = slot
        self._released = False
        self._rlock = threading.Lock()
        self.lease = lease.number
        """This lease's number (unique within the pool)."""
        self.warm = lease.warm
        """Whether the sandbox was idle and ready when acquired."""
        self.acquire_s = time.perf_counter() - started
        """How long :meth:`SandboxPool.acquire` took."""
        self.backend = slot.box.backend
        self.id = slot.box.id

    def _box(self) -> Sandbox:
        if self._released or self._slot.lease != self.lease:
            raise SandboxClosed("this pooled sandbox was released")
        return self._slot.box

    @property
    def limits(self) -> Limits:
        return self._slot.box.limits

    @property
    def unenforced_limits(self) -> Mapping[str, str]:
        return self._slot.box.unenforced_limits

    def execute(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        return self._box().execute(code, timeout_s=timeout_s)

    def load_context(self, payload: ContextPayload, *, name: str = "context") -> str:
        return self._box().load_context(payload, name=name)

    def get_variable(self, name: str) -> Any:
        return self._box().get_variable(name)

    def set_variable(self, name: str, value: Any) -> None:
        self._box().set_variable(name, value)

    def list_variables(self) -> dict[str, str]:
        return self._box().list_variables()

    def write_file(self, path: str, data: bytes | str) -> None:
        self._box().write_file(path, data)

    def read_file(self, path: str) -> bytes:
        return self._box().read_file(path)

    def interrupt(self) -> None:
        if not self._released:
            self._slot.box.interrupt()

    def reset(self) -> None:
        self._box().reset()

    def release(self, *, broken: bool = False) -> None:
        """Give the sandbox back to the pool (reset in the background), or, with ``broken=True``,
        have it closed and replaced. Idempotent."""
        with self._rlock:
            if self._released:
                return
            self._released = True
        self._pool._release(self._key, self._slot, broken=broken)

    def close(self) -> None:
        """Same as :meth:`release`."""
        self.release()

    @property
    def closed(self) -> bool:
        return self._released or self._slot.box.closed

    def __enter__(self) -> PooledSandbox:
        return self

    def __repr__(self) -> str:
        state = "released" if self._released else "leased"
        return f"<PooledSandbox {self.backend}:{self.id} lease={self.lease} {state}>"
