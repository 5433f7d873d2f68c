"""The ``daytona`` backend: one Daytona cloud sandbox per rlm-sandbox sandbox.

The runtime runs in the sandbox behind one PTY WebSocket (:class:`DaytonaChannel`): raw bytes
both ways, and no HTTP request per ``execute``. Contexts above ``upload_threshold_bytes`` go
through the SDK's streaming file upload instead of the channel. The sandbox is created with the
owner labels of :mod:`rlm_sandbox._owner` (``rlm-sandbox gc --backend daytona`` finds what a
crashed host left), the network blocked unless ``Limits(network=True)``, a wall-clock lifetime
(``ttl_minutes``) when ``Limits.lifetime_s`` is set, and auto-stop + auto-delete as a safety net.

The SDK is imported only when a sandbox is opened (or ``check``/``gc`` runs).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import posixpath
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, TypeVar

from pydantic import Field, SecretStr, model_validator

from rlm_sandbox._box import BackendConfig, Box
from rlm_sandbox._channel import Channel
from rlm_sandbox._errors import (
    AuthenticationError,
    ConfigError,
    LimitNotSupported,
    QuotaExceeded,
    SandboxError,
    SandboxNotFound,
    SandboxStartError,
    SandboxTimeout,
    TransientSandboxError,
)
from rlm_sandbox._limits import Limits
from rlm_sandbox._owner import owner_labels
from rlm_sandbox._retry import RetryPolicy, retry_transient
from rlm_sandbox._sandbox import Blob

from ._errors import call, classify, translate_daytona_errors

__all__ = ["DaytonaBackendConfig", "DaytonaBox", "delete_sandbox"]

log = logging.getLogger("rlm_sandbox.daytona")

T = TypeVar("T")

#: A label unique to one ``open``: a create whose answer was lost is found by it, not repeated.
LABEL_CREATE = "rlm-sandbox.create"
#: Only uploads of this prefix (contexts) take the file API; the core names them so.
UPLOAD_PREFIX = ".rlm-upload-"

_clients: dict[tuple[str | None, str | None, str | None], Any] = {}
_homes: dict[tuple[Any, ...], str] = {}
_cache_lock = threading.Lock()


class DaytonaBackendConfig(BackendConfig):
    """Config of the ``daytona`` backend (``pip install "rlm-sandbox[daytona]"``).

    Named so as not to clash with the SDK's own ``daytona.DaytonaConfig`` (the client settings).
    Connection fields left at ``None`` fall back to the SDK's environment variables
    ``DAYTONA_API_KEY``, ``DAYTONA_API_URL`` and ``DAYTONA_TARGET``.
    """

    backend: ClassVar[str] = "daytona"
    install_hint: ClassVar[str] = "rlm-sandbox[daytona]"

    api_key: SecretStr | None = None
    """Daytona API key (default: ``DAYTONA_API_KEY``)."""
    api_url: str | None = None
    """Daytona API URL (default: ``DAYTONA_API_URL``, else ``https://app.daytona.io/api``)."""
    target: str | None = None
    """Region (default: ``DAYTONA_TARGET``, else the organisation's default)."""
    snapshot: str | None = None
    """Snapshot to create sandboxes from (default: Daytona's default snapshot). Resources of a
    snapshot's sandboxes are the snapshot's: ``Limits.cpus`` / ``disk_mb`` cannot be applied."""
    image: str | None = None
    """Image to create sandboxes from instead (e.g. ``python:3.12-slim``; Daytona builds it once).
    Sandboxes from an image get ``Limits.cpus``, ``memory_mb`` and ``disk_mb`` as resources."""
    os_user: str | None = None
    """OS user in the sandbox (default: the snapshot's or image's)."""
    python: str = "python3"
    """The interpreter in the sandbox (3.8+, standard library only)."""
    home_dir: str | None = None
    """Absolute directory the runtime starts in (``work/`` and ``.rlm/`` are created there).
    Default: the sandbox user's home, asked once per process and snapshot/image."""
    auto_stop_minutes: int = Field(default=30, ge=0)
    """Daytona stops a sandbox after this many minutes without a sandbox event (0: never). With
    ``auto_delete_minutes=0`` a stopped sandbox is deleted at once: the safety net for sandboxes
    a crashed host left behind. Raise it if your sessions sit idle longer than this."""
    auto_delete_minutes: int | None = 0
    """Minutes a stopped sandbox is kept before Daytona deletes it (0: at once; None: the
    service's default, which keeps it)."""
    network_allow_list: tuple[str, ...] = ()
    """With ``Limits(network=True)``: the only CIDRs the sandbox may reach (empty: all)."""
    domain_allow_list: tuple[str, ...] = ()
    """With ``Limits(network=True)``: the only domains the sandbox may reach (empty: all)."""
    request_timeout_s: float = Field(default=60.0, gt=0)
    """Timeout of one request to the Daytona API (get, list, delete, PTY kill)."""
    create_timeout_s: float | None = Field(default=None, gt=0)
    """How long creating the sandbox may take until it is started (default: ``startup_timeout_s``)."""
    upload_threshold_bytes: int = Field(default=1 << 20, ge=0)
    """Contexts at least this big go through the SDK's file upload; smaller ones take the open
    channel (no extra request)."""

    @model_validator(mode="after")
    def _one_source(self) -> DaytonaBackendConfig:
        if self.snapshot and self.image:
            raise ValueError("give either snapshot= or image=, not both")
        if self.home_dir is not None and not self.home_dir.startswith("/"):
            raise ValueError("home_dir must be an absolute path")
        return self

    def create_box(self, limits: Limits) -> Box:
        return DaytonaBox(self, limits)

    def check(self) -> str | None:
        try:
            import daytona  # noqa: F401
        except ImportError as exc:
            return f'the daytona SDK cannot be imported ({exc}): pip install "rlm-sandbox[daytona]"'
        if self.api_key is None:
            names = ("DAYTONA_API_KEY", "DAYTONA_JWT_TOKEN")
            try:  # the SDK's own lookup: the environment, then .env.local / .env
                from daytona._utils.env import DaytonaEnvReader

                reader = DaytonaEnvReader()
                found = any(reader.get(name) for name in names)
            except ImportError:
                found = any(os.environ.get(name) for name in names)
            if not found:
                return "no Daytona credentials: set DAYTONA_API_KEY or pass api_key="
        return None

    def gc(self, *, older_than_s: float | None = None, dry_run: bool = False, all_hosts: bool = False) -> list[str]:
        """Delete sandboxes whose owning process is gone, that expired, or older than ``older_than_s``."""
        from ._gc import collect

        return collect(self, older_than_s=older_than_s, dry_run=dry_run, all_hosts=all_hosts)

    # ---- the SDK client ------------------------------------------------------------------------

    def _client_key(self) -> tuple[str | None, str | None, str | None]:
        key = self.api_key.get_secret_value() if self.api_key else os.environ.get("DAYTONA_API_KEY")
        return (key, self.api_url or os.environ.get("DAYTONA_API_URL"), self.target or os.environ.get("DAYTONA_TARGET"))

    def client(self) -> Any:
        """The SDK's ``daytona.Daytona`` for these settings, shared by every sandbox of the process.

        One client means one connection pool and one state-event socket, however many sandboxes
        (sub-agents) are open; the SDK's client is thread-safe.
        """
        key = self._client_key()
        with _cache_lock:
            client = _clients.get(key)
            if client is not None:
                return client
            from daytona import Daytona, DaytonaConfig

            with translate_daytona_errors("connecting to Daytona", starting=True):
                client = Daytona(
                    DaytonaConfig(
                        api_key=self.api_key.get_secret_value() if self.api_key else None,
                        api_url=self.api_url,
                        target=self.target,
                    )
                )
            _clients[key] = client
            return client


def _offload(
    fn: Callable[[], T], *, name: str, wait_s: float | None = None, abandon: Callable[[T], Any] | None = None
) -> T:
    """Run an SDK call in a short-lived thread of its own and wait for its outcome.

    The SDK enforces ``timeout=`` deadlines with ``SIGALRM`` on the main thread (replacing the
    application's handler and cancelling its pending alarm) and, on other threads, with an
    exception injected by ``PyThreadState_SetAsyncExc`` (which can land in the caller's own code
    when it fires as the call returns). In a dedicated thread neither reaches the caller, whatever
    thread opens the sandbox (the driver opens sub-agents' sandboxes from worker threads).

    ``wait_s`` bounds the wait for calls without a deadline of their own. If the caller stops
    waiting (timeout, ``KeyboardInterrupt``), ``abandon`` receives the result once it arrives.
    """
    lock = threading.Lock()
    done = threading.Event()
    outcome: list[tuple[bool, Any]] = []
    abandoned = False

    def run() -> None:
        try:
            value = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            with lock:
                outcome.append((False, exc))
            done.set()
            return
        with lock:
            outcome.append((True, value))
            late = abandoned
        done.set()
        if late and abandon is not None:
            with contextlib.suppress(Exception):
                abandon(value)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        if not done.wait(wait_s):
            raise SandboxTimeout(f"{name}: Daytona did not answer within {wait_s:g} s")
    except BaseException:
        with lock:
            abandoned = True
            finished = list(outcome)
        if finished and finished[0][0] and abandon is not None:
            with contextlib.suppress(Exception):
                abandon(finished[0][1])
        raise
    ok, value = outcome[0]
    if ok:
        result: T = value
        return result
    if isinstance(value, Exception):
        raise value
    # The SDK's timeout marker (a BaseException) escaped its own context manager.
    raise SandboxTimeout(f"{name}: the Daytona SDK's deadline passed") from value


def delete_sandbox(sandbox: Any, timeout: float) -> None:
    """Delete a sandbox; gone already is fine; other failures are logged (``gc`` reaps it later)."""
    try:
        call(
            "deleting the Daytona sandbox",
            lambda: _offload(lambda: sandbox.delete(timeout=timeout), name="daytona-delete"),
            retry=True,
            sandbox_id=str(sandbox.id),
        )
    except SandboxNotFound:
        pass
    except SandboxError as exc:
        log.warning("could not delete Daytona sandbox %s (rlm-sandbox gc will): %s", sandbox.id, exc)


class _BlobReader:
    """A read-only file object over a :class:`Blob`'s chunks: streamed, never joined or re-copied."""

    def __init__(self, blob: Blob) -> None:
        self._chunks: Iterator[bytes] = blob.chunks()
        self._cur = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            rest = self._cur[self._pos :] + b"".join(self._chunks)
            self._cur, self._pos = b"", 0
            return rest
        while self._pos >= len(self._cur):
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._cur, self._pos = chunk, 0
        out = self._cur[self._pos : self._pos + size]
        self._pos += len(out)
        return out


class DaytonaBox(Box):
    """One Daytona sandbox."""

    def __init__(self, config: DaytonaBackendConfig, limits: Limits) -> None:
        super().__init__()
        self.config = config
        self.python = config.python
        # Relative: the runtime resolves them against the directory it is launched in (home_dir),
        # which holds on Daytona and on the loopback fake alike.
        self.workdir = "work"
        self.statedir = ".rlm"
        self.home = config.home_dir or ""
        self._channel: Any = None
        self._lock = threading.Lock()
        self._closed = False
        self._sandbox: Any = None
        resources = self._plan(limits)
        if self.unenforced and not limits.best_effort:
            # Refuse before creating anything (the core would, but only after the sandbox exists).
            detail = "; ".join(f"{k}: {v}" for k, v in sorted(self.unenforced.items()))
            raise LimitNotSupported(
                f"the daytona backend cannot enforce these limits here ({detail}). "
                "Relax them, or pass Limits(best_effort=True) to run without them.",
                limits=dict(self.unenforced),
            )
        self._client = config.client()
        self._sandbox = self._create(limits, resources)
        self.id = str(self._sandbox.id)
        try:
            self.home = self._home_dir()
        except BaseException:
            self.close()
            raise

    # ---- limits ---------------------------------------------------------------------------------

    def _plan(self, limits: Limits) -> dict[str, int]:
        """Runtime options and the sandbox's resources for ``limits``; what cannot be, in ``unenforced``."""
        from_image = self.config.image is not None
        snapshot_reason = "a sandbox from a snapshot has the snapshot's resources (pass image= to size it)"
        # TMPDIR inside the work dir: the box's /tmp is shared with its system; reset() empties ours.
        opts: dict[str, Any] = {"rlimits": {}, "oom_detect": True, "tmpdir": ".tmp"}
        rl: dict[str, int] = opts["rlimits"]
        res: dict[str, int] = {}
        if limits.memory_mb is not None:
            # Per process, exact, in any sandbox; the sandbox's own memory when created from an image.
            rl["memory_bytes"] = limits.memory_mb << 20
            if from_image:
                res["memory"] = max(1, math.ceil(limits.memory_mb / 1024))
        if limits.cpus is not None:
            if not from_image:
                self.unenforced["cpus"] = snapshot_reason
            elif limits.cpus != int(limits.cpus):
                self.unenforced["cpus"] = "Daytona allocates whole vCPUs"
            else:
                res["cpu"] = int(limits.cpus)
        if limits.disk_mb is not None:
            if not from_image:
                self.unenforced["disk_mb"] = snapshot_reason
            elif limits.disk_mb % 1024:
                self.unenforced["disk_mb"] = "Daytona sizes disks in whole GiB: ask for a multiple of 1024 MB"
            else:
                res["disk"] = limits.disk_mb // 1024
        if limits.file_size_mb is not None:
            rl["file_size_bytes"] = limits.file_size_mb << 20
        if limits.cpu_time_s is not None:
            rl["cpu_time_s"] = limits.cpu_time_s
        if limits.pids is not None:
            # A pids cgroup when writable; else RLIMIT_NPROC (in a sandbox, the user's tasks are ours).
            opts["cgroup_pids"] = limits.pids
            opts["pids_nproc_fallback"] = True
        if not limits.network:
            # Daytona blocks the sandbox's network; a namespace where allowed also cuts loopback
            # services of the sandbox (and isolates the fake's local processes).
            opts["unshare_net"] = "try"
        self.runtime_options = opts
        return res

    # ---- creation -------------------------------------------------------------------------------

    def _params(self, limits: Limits, resources: dict[str, int], token: str) -> Any:
        from daytona import CreateSandboxFromImageParams, CreateSandboxFromSnapshotParams, Resources

        cfg = self.config
        labels = owner_labels(limits.lifetime_s, cfg.labels)
        labels[LABEL_CREATE] = token
        common: dict[str, Any] = {
            "language": "python",
            "labels": labels,
            "os_user": cfg.os_user,
            "network_block_all": not limits.network,
            "auto_stop_interval": cfg.auto_stop_minutes,
            "auto_delete_interval": cfg.auto_delete_minutes,
        }
        if limits.network:
            common["network_allow_list"] = ",".join(cfg.network_allow_list) or None
            common["domain_allow_list"] = ",".join(cfg.domain_allow_list) or None
        if limits.lifetime_s is not None:
            common["ttl_minutes"] = max(1, math.ceil(limits.lifetime_s / 60))
        if cfg.image is not None:
            sized = (
                Resources(cpu=resources.get("cpu"), memory=resources.get("memory"), disk=resources.get("disk"))
                if resources
                else None
            )
            return CreateSandboxFromImageParams(image=cfg.image, resources=sized, **common)
        return CreateSandboxFromSnapshotParams(snapshot=cfg.snapshot, **common)

    def _create(self, limits: Limits, resources: dict[str, int]) -> Any:
        """Create the sandbox and wait until it is started, within ``create_timeout_s``.

        A create is not idempotent: every attempt carries the same unique label, and before an
        attempt is repeated the sandbox is looked up by it (a lost answer may hide a created
        sandbox, which is then used, or deleted if it failed). Only transient failures repeat.
        """
        cfg = self.config
        budget = cfg.create_timeout_s or cfg.startup_timeout_s
        deadline = time.monotonic() + budget
        token = secrets.token_hex(12)
        params = self._params(limits, resources, token)
        attempts = 0

        def attempt() -> Any:
            nonlocal attempts
            if attempts:
                found = self._find(token)
                if found is not None:
                    adopted = self._adopt(found, deadline, budget)
                    if adopted is not None:
                        return adopted
            attempts += 1
            return self._create_once(params, deadline, budget, token)

        policy = RetryPolicy(max_time_s=budget)
        try:
            return retry_transient(attempt, policy=policy, what="creating a Daytona sandbox")
        except TransientSandboxError:
            self._discard(None, token)  # the last attempt's answer may have been lost too
            raise

    def _create_once(self, params: Any, deadline: float, budget: float, token: str) -> Any:
        from daytona import DaytonaTimeoutError

        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SandboxTimeout(f"creating a Daytona sandbox took longer than {budget:g} s")
        client = self._client
        try:
            return _offload(
                lambda: client.create(params, timeout=remaining),
                name="daytona-create",
                abandon=self._delete_quietly,
            )
        except Exception as exc:
            if isinstance(exc, DaytonaTimeoutError) and exc.status_code is None:
                self._discard(getattr(exc, "sandbox_id", None), token)
                raise SandboxTimeout(
                    f"the Daytona sandbox was not started within {budget:g} s (create_timeout_s, else "
                    f"startup_timeout_s); it was deleted. ({exc})"
                ) from exc
            err = classify(exc, "creating a Daytona sandbox", starting=True)
            if not isinstance(err, (TransientSandboxError, AuthenticationError, QuotaExceeded, ConfigError)):
                # Created, then failed (e.g. state "error"): do not leave it behind.
                self._discard(None, token)
            raise err from exc

    def _find(self, token: str) -> Any:
        """The sandbox an earlier attempt of this open created, if any."""
        from daytona import ListSandboxesQuery

        client, timeout = self._client, self.config.request_timeout_s
        found = call(
            "looking up a Daytona sandbox by its create label",
            lambda: list(client.list(ListSandboxesQuery(labels={LABEL_CREATE: token}), request_timeout=timeout)),
            retry=False,
            starting=True,
        )
        return found[0] if found else None

    def _adopt(self, sandbox: Any, deadline: float, budget: float) -> Any:
        """Use a sandbox an earlier attempt created: wait for it, or delete it if it failed."""
        from daytona import SandboxState

        state = sandbox.state
        if state == SandboxState.STARTED:
            return sandbox
        if state in (SandboxState.ERROR, SandboxState.BUILD_FAILED, SandboxState.DESTROYED, SandboxState.DESTROYING):
            self._delete_quietly(sandbox)
            return None
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise SandboxTimeout(f"the Daytona sandbox was not started within {budget:g} s")
            with translate_daytona_errors("waiting for the Daytona sandbox to start", starting=True):
                _offload(lambda: sandbox.wait_for_sandbox_start(timeout=remaining), name="daytona-wait-start")
        except TransientSandboxError:
            raise  # the next attempt finds it again
        except SandboxError:
            self._delete_quietly(sandbox)
            raise
        return sandbox

    def _discard(self, sandbox_id: str | None, token: str) -> None:
        """Best effort: delete the sandbox a failed create may have left (by id, else by label)."""
        try:
            if sandbox_id:
                client, timeout = self._client, self.config.request_timeout_s
                sandbox = call(
                    "getting a Daytona sandbox", lambda: client.get(sandbox_id, request_timeout=timeout), retry=True
                )
            else:
                sandbox = self._find(token)
        except SandboxError:
            return
        if sandbox is not None:
            self._delete_quietly(sandbox)

    def _home_dir(self) -> str:
        cfg = self.config
        if cfg.home_dir:
            return cfg.home_dir
        key = (cfg._client_key(), cfg.snapshot, cfg.image, cfg.os_user)
        with _cache_lock:
            home = _homes.get(key)
        if home:
            return home
        sandbox, timeout = self._sandbox, cfg.request_timeout_s
        home = call(
            "asking the Daytona sandbox for its home directory",
            lambda: _offload(sandbox.get_user_home_dir, name="daytona-home-dir", wait_s=timeout),
            retry=True,
            sandbox_id=self.id,
            starting=True,
        )
        if not isinstance(home, str) or not home.startswith("/"):
            raise SandboxStartError(f"the Daytona sandbox reported no usable home directory ({home!r}); set home_dir=")
        with _cache_lock:
            _homes[key] = home
        return home

    # ---- the Box interface --------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        env.update(self.config.passthrough_env(dict(os.environ)))
        return env

    def launch(self, argv: Sequence[str]) -> Channel:
        from ._channel import DaytonaChannel, PtyNotConfirmed

        what = "starting the runtime in the Daytona sandbox"
        cfg, sandbox, env = self.config, self._sandbox, self._env()

        def start() -> DaytonaChannel:
            try:
                return DaytonaChannel.start(
                    sandbox,
                    list(argv),
                    cwd=self.home,
                    environment=env,
                    stderr_path=".rlm-runtime.err",
                    startup_timeout=cfg.startup_timeout_s,
                    request_timeout=cfg.request_timeout_s,
                )
            except PtyNotConfirmed as exc:  # nothing left behind: start again
                raise TransientSandboxError(f"{what}: {exc}") from exc
            except TimeoutError as exc:  # the shell never ran the command
                raise SandboxTimeout(f"{what}: {exc}") from exc
            except (ConnectionError, ValueError) as exc:  # the shell ended first / the line is too long
                raise SandboxStartError(f"{what}: {exc}") from exc
            except Exception as exc:
                raise classify(exc, what, sandbox_id=self.id, starting=True) from exc

        channel = retry_transient(start, what=what)
        self._channel = channel
        return channel

    def kill_runtime(self) -> None:
        channel = self._channel
        if channel is None:
            return
        with contextlib.suppress(Exception):
            channel.kill()
        with contextlib.suppress(Exception):
            channel.close()

    def upload(self, path: str, data: Blob) -> str | None:
        # Contexts only (files belong to the runtime, which writes them with its own rules), and
        # only big ones: small payloads are cheaper on the open channel than as a request.
        if not path.startswith(UPLOAD_PREFIX) or data.size < self.config.upload_threshold_bytes:
            return None
        remote = posixpath.join(self.home, self.workdir, path)
        sandbox, timeout = self._sandbox, max(1, math.ceil(self.config.op_timeout_s))
        call(
            "uploading a context to the Daytona sandbox",
            lambda: sandbox.fs.upload_file_stream(_BlobReader(data), remote, timeout=timeout),
            retry=True,
            sandbox_id=self.id,
        )
        return path

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._channel is not None:
            with contextlib.suppress(Exception):
                self._channel.close()
        if self._sandbox is not None:
            self._delete(self._sandbox)

    def _delete(self, sandbox: Any) -> None:
        delete_sandbox(sandbox, self.config.request_timeout_s)

    def _delete_quietly(self, sandbox: Any) -> None:
        with contextlib.suppress(Exception):
            self._delete(sandbox)

    # ---- extras ---------------------------------------------------------------------------------

    @property
    def sandbox(self) -> Any:
        """The SDK's ``daytona.Sandbox``."""
        return self._sandbox

    def stderr_tail(self, limit: int = 8192) -> bytes:
        """The end of what the runtime wrote to its stderr (diagnostics; one download)."""
        sandbox, timeout = self._sandbox, max(1, math.ceil(self.config.request_timeout_s))
        path = posixpath.join(self.home, ".rlm-runtime.err")
        data: bytes = call(
            "reading the runtime's stderr",
            lambda: sandbox.fs.download_file(path, timeout),
            retry=True,
            sandbox_id=self.id,
        )
        return data[-limit:]
