"""The E2B backend: one E2B sandbox (a Firecracker microVM) per rlm-sandbox sandbox.

* create: ``Sandbox.create(template, timeout=lifetime, metadata=owner labels,
  allow_internet_access=Limits.network, idempotency_key=...)``. With the idempotency key the
  create is safe to retry; the SDK retries 429/502/503/504 itself, what is still transient after
  that goes through the core's one retry policy within ``startup_timeout_s``.
* runtime: ``exec python3 -u -c BOOTSTRAP`` as a background command with stdin
  (:class:`~rlm_sandbox_e2b.E2BChannel`, text mode: the SDK decodes stdout as UTF-8, so the runtime
  speaks base64 lines), launched in ``home`` with the relative ``workdir`` and ``statedir``.
* contexts: uploaded through envd's file API (streamed, octet-stream), then moved into the state
  directory by the runtime.
* close: ``DELETE /sandboxes/{id}``, always (a sandbox already gone is fine).

The ``e2b`` SDK is imported only when a sandbox is opened (or ``gc`` runs).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import posixpath
import shlex
import threading
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, SecretStr

from rlm_sandbox._box import BackendConfig, Box
from rlm_sandbox._channel import Channel
from rlm_sandbox._errors import SandboxError, SandboxNotFound, SandboxStartError
from rlm_sandbox._limits import Limits
from rlm_sandbox._owner import owner_labels
from rlm_sandbox._retry import RetryPolicy
from rlm_sandbox._sandbox import Blob

from ._errors import call

if TYPE_CHECKING:
    from e2b import Sandbox as E2BSandbox

    from ._channel import E2BChannel

__all__ = ["E2BBox", "E2BConfig"]

log = logging.getLogger("rlm_sandbox.e2b")

#: Uploads whose name starts with this (contexts) go through envd's file API.
UPLOAD_PREFIX = ".rlm-upload-"


class E2BConfig(BackendConfig):
    """Config of the ``e2b`` backend (``pip install "rlm-sandbox[e2b]"``).

    Connection fields left at ``None`` fall back to the SDK's environment variables:
    ``E2B_API_KEY``, ``E2B_API_URL``, ``E2B_SANDBOX_URL``, ``E2B_DOMAIN``. ``labels`` become the
    sandbox's E2B metadata, next to the ownership labels ``rlm-sandbox gc`` reads.
    """

    backend: ClassVar[str] = "e2b"
    install_hint: ClassVar[str] = "rlm-sandbox[e2b]"

    api_key: SecretStr | None = None
    """E2B API key (default: ``E2B_API_KEY``)."""
    api_url: str | None = None
    """Control-plane URL (default: ``E2B_API_URL``, else ``https://api.<domain>``)."""
    sandbox_url: str | None = None
    """URL of every sandbox's envd (default: ``E2B_SANDBOX_URL``, else derived from the domain)."""
    domain: str | None = None
    """E2B domain (default: ``E2B_DOMAIN``, else ``e2b.app``)."""
    template: str | None = None
    """Sandbox template name or id; any template with ``python3`` (3.8+). Default: E2B's ``base``.
    CPUs, memory and disk of the VM are properties of the template."""
    lifetime_s: float = Field(default=3600.0, gt=0, le=86_400)
    """E2B timeout of the sandbox when ``Limits.lifetime_s`` is not set: E2B kills it after this
    many seconds whatever runs. Hobby plans allow at most 3600 s, Pro 86400 s."""
    request_timeout_s: float = Field(default=60.0, gt=0)
    """Timeout of one control-plane or envd request (uploads use ``op_timeout_s``)."""
    retries: int = Field(default=3, ge=0)
    """How often the SDK itself retries a 429/502/503/504 answer (honouring ``Retry-After``)."""
    home: str = "/home/user"
    """Absolute directory the runtime is launched in (the template user's home)."""
    workdir: str = "work"
    """Work directory of user code, relative to ``home`` (or absolute)."""
    statedir: str = ".rlm"
    """Where the runtime keeps contexts, relative to ``home`` (or absolute); survives restarts."""
    python: str = "python3"
    """The interpreter inside the template."""
    user: str | None = None
    """Sandbox user that runs the runtime and owns uploads (default: envd's, ``user``)."""

    def create_box(self, limits: Limits) -> Box:
        return E2BBox(self, limits)

    def api_opts(self, *, request_timeout: float | None = None) -> dict[str, Any]:
        """Connection keyword arguments for the SDK; unset fields leave the SDK's env defaults."""
        opts: dict[str, Any] = {
            "request_timeout": self.request_timeout_s if request_timeout is None else request_timeout,
            "retries": self.retries,
        }
        if self.api_key is not None:
            opts["api_key"] = self.api_key.get_secret_value()
        for name in ("api_url", "sandbox_url", "domain"):
            value = getattr(self, name)
            if value is not None:
                opts[name] = value
        return opts

    def check(self) -> str | None:
        """Cheap: the SDK is installed and an API key is configured (no request is made)."""
        if importlib.util.find_spec("e2b") is None:
            return 'the e2b SDK is not installed: pip install "rlm-sandbox[e2b]"'
        if self.api_key is None and not os.environ.get("E2B_API_KEY"):
            return "no E2B API key: set E2B_API_KEY or pass api_key="
        return None

    def gc(self, *, older_than_s: float | None = None, dry_run: bool = False, all_hosts: bool = False) -> list[str]:
        """Kill sandboxes whose owning process is gone, expired, or older than ``older_than_s``."""
        from ._gc import collect

        return collect(self, older_than_s=older_than_s, dry_run=dry_run, all_hosts=all_hosts)


class E2BBox(Box):
    """One E2B sandbox and the runtime process in it."""

    #: The SDK decodes the process's stdout as text: the runtime speaks base64 lines.
    text_mode = True

    def __init__(self, config: E2BConfig, limits: Limits) -> None:
        super().__init__()
        self.config = config
        self.python = config.python
        self.workdir = config.workdir
        self.statedir = config.statedir
        #: The E2B timeout the sandbox was created with (seconds).
        self.lifetime_s = limits.lifetime_s if limits.lifetime_s is not None else config.lifetime_s
        self._plan_limits(limits)
        self._lock = threading.Lock()
        self._closed = False
        self._channel: E2BChannel | None = None
        self._stderr_tail = bytearray()
        self._sandbox: E2BSandbox | None = None
        if self.unenforced and not limits.best_effort:
            # The core refuses these limits right after this returns: no sandbox is created
            # (and billed) only to be deleted again.
            return
        self._sandbox = self._create(limits)
        self.id = self._sandbox.sandbox_id

    # ---- limits and creation ------------------------------------------------------------------

    def _plan_limits(self, limits: Limits) -> None:
        """E2B enforces the lifetime and the internet cut-off; the runtime enforces the rest."""
        rl: dict[str, int] = {}
        if limits.memory_mb is not None:
            rl["memory_bytes"] = limits.memory_mb << 20
        if limits.file_size_mb is not None:
            rl["file_size_bytes"] = limits.file_size_mb << 20
        if limits.cpu_time_s is not None:
            rl["cpu_time_s"] = limits.cpu_time_s
        # TMPDIR inside the work dir: the VM's /tmp is shared with its system; reset() empties ours.
        opts: dict[str, Any] = {"rlimits": rl, "tmpdir": ".tmp"}
        if limits.pids is not None:
            # A pids cgroup where the sandbox user may create one, else RLIMIT_NPROC (the user's
            # tasks in the VM are the runtime's).
            opts["cgroup_pids"] = limits.pids
            opts["pids_nproc_fallback"] = True
        if not limits.network:
            # E2B cuts the internet off (allow_internet_access=False); the namespace also keeps
            # user code off the VM's other local services where the kernel lets the user unshare.
            opts["unshare_net"] = "try"
        self.runtime_options = opts
        if limits.cpus is not None:
            self.unenforced["cpus"] = (
                "E2B sets vCPUs per template (Template.build(cpu_count=...)), not per sandbox"
            )
        if limits.disk_mb is not None:
            self.unenforced["disk_mb"] = "E2B sets the disk size per template and plan, not per sandbox"

    def _create(self, limits: Limits) -> E2BSandbox:
        from e2b import Sandbox

        cfg = self.config
        key = str(uuid.uuid4())  # the same key on every retry: E2B creates at most one sandbox
        timeout = max(1, math.ceil(self.lifetime_s))
        metadata = owner_labels(self.lifetime_s, cfg.labels)
        opts = cfg.api_opts(request_timeout=min(cfg.request_timeout_s, cfg.startup_timeout_s))

        def create() -> E2BSandbox:
            return Sandbox.create(
                template=cfg.template,
                timeout=timeout,
                metadata=metadata,
                allow_internet_access=limits.network,
                idempotency_key=key,
                **opts,
            )

        policy = RetryPolicy(max_time_s=cfg.startup_timeout_s)
        return call(f"creating an E2B sandbox from {cfg.template or 'base'}", create, retry=True,
                    starting=True, policy=policy)

    # ---- the Box interface ----------------------------------------------------------------------

    def _live(self) -> E2BSandbox:
        if self._sandbox is None or self._closed:
            raise SandboxStartError("the E2B sandbox was not created or is closed")
        return self._sandbox

    def remote_path(self, path: str) -> str:
        """The absolute path in the sandbox of ``path`` (relative to the work directory)."""
        return posixpath.normpath(posixpath.join(self.config.home, self.workdir, path))

    def _env(self) -> dict[str, str]:
        env = {"LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        env.update(self.config.passthrough_env(dict(os.environ)))
        return env

    def _on_stderr(self, data: bytes) -> None:
        self._stderr_tail += data
        del self._stderr_tail[:-8192]

    def launch(self, argv: Sequence[str]) -> Channel:
        from ._channel import E2BChannel

        sandbox = self._live()
        command = "exec " + shlex.join(argv)  # no shell left between envd and the runtime
        cfg = self.config

        def start() -> E2BChannel:
            return E2BChannel(
                sandbox,
                command,
                cwd=cfg.home,
                envs=self._env(),
                user=cfg.user,
                request_timeout=cfg.request_timeout_s,
                on_stderr=self._on_stderr,
            )

        # Not retried: a start that reached envd would leave a second runtime behind.
        channel = call("starting the runtime in the E2B sandbox", start, retry=False, sandbox_id=self.id,
                       starting=True)
        self._channel = channel
        return channel

    def kill_runtime(self) -> None:
        channel, sandbox = self._channel, self._sandbox
        if channel is None or sandbox is None:
            return
        try:
            call(
                "stopping the runtime",
                lambda: sandbox.commands.kill(channel.pid, request_timeout=self.config.request_timeout_s),
                retry=True,
                sandbox_id=self.id,
            )
        except SandboxError as exc:
            # Gone with its sandbox, or unreachable: the relaunch that follows reports it.
            log.debug("killing the runtime of %s: %s", self.id, exc)

    def upload(self, path: str, data: Blob) -> str | None:
        """Contexts go through envd's file API (streamed); other files through the runtime."""
        if self._sandbox is None or not path.startswith(UPLOAD_PREFIX):
            return None
        sandbox = self._sandbox
        target = self.remote_path(path)
        cfg = self.config
        call(
            "uploading a context to the E2B sandbox",
            # A fresh iterator per attempt: a retry rewrites the whole file.
            lambda: sandbox.files.write(target, data.chunks(), user=cfg.user, request_timeout=cfg.op_timeout_s),
            retry=True,
            sandbox_id=self.id,
        )
        return path

    def close(self) -> None:
        """Delete the sandbox. Idempotent; a sandbox already gone is fine.

        Other failures (after retries) are logged, not raised: close runs in ``finally`` blocks,
        at exit and after failed starts, where raising would hide the real error. The sandbox
        then ends at its E2B timeout, and ``rlm-sandbox gc --backend e2b`` finds it.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        sandbox = self._sandbox
        if sandbox is None:
            return
        try:
            call(
                "deleting the E2B sandbox",
                lambda: sandbox.kill(**self.config.api_opts()),
                retry=True,
                sandbox_id=self.id,
            )
        except SandboxNotFound:
            pass
        except SandboxError as exc:
            log.warning(
                "could not delete E2B sandbox %s (%s); it ends after its timeout of %.0f s, "
                "or run `rlm-sandbox gc --backend e2b`",
                self.id,
                exc,
                self.lifetime_s,
            )
        finally:
            channel = self._channel
            if channel is not None:
                with contextlib.suppress(Exception):
                    channel.close()

    @property
    def sandbox(self) -> E2BSandbox | None:
        """The SDK's ``Sandbox`` (for backend-specific use), ``None`` when none was created."""
        return self._sandbox

    def stderr_tail(self) -> bytes:
        """The last bytes the runtime wrote to its stderr (diagnostics)."""
        return bytes(self._stderr_tail)
