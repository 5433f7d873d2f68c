"""What a backend implements: a started box that can launch the runtime and be destroyed."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ._channel import Channel
from ._limits import Limits

if TYPE_CHECKING:
    from ._sandbox import Blob, Sandbox

__all__ = ["BackendConfig", "Box"]


class Box(ABC):
    """One started box (a process tree, a container, a cloud sandbox).

    A backend does three things: start the box (in its config's ``create_box``), launch a fresh
    runtime process in it and hand over a :class:`Channel` to that process's stdin/stdout
    (:meth:`launch`), and destroy the box (:meth:`close`). Timeouts, output limits, restarts, host
    functions, contexts and results live once, in the core.
    """

    #: A stable identifier (container id, cloud sandbox id) for logs, trajectories and ``gc``.
    id: str = ""
    #: The working directory of user code inside the box (absolute, or relative to the directory
    #: the runtime is launched in).
    workdir: str = "."
    #: Where the runtime keeps its state (contexts) inside the box; survives runtime restarts.
    statedir: str = ".rlm"
    #: The Python interpreter to run inside the box.
    python: str = "python3"
    #: Whether the channel this box hands over is not binary-safe (the runtime then speaks base64
    #: lines); must match ``Channel.text_mode`` of what :meth:`launch` returns.
    text_mode: bool = False
    #: Path inside the box of a file identical to ``rlm_sandbox/runtime.py`` (e.g. baked into the
    #: image), or None: then the runtime's source is sent over the channel at start.
    baked_runtime: str | None = None
    #: Options for the runtime: the limits it enforces on itself because the box does not
    #: (``rlimits``, ``unshare_net``, ``cgroup_pids``, ``affinity``, ``oom_detect``), and
    #: ``tmpdir`` (the code's private TMPDIR, emptied by ``reset()``) and ``scratch_dirs`` (more
    #: directories ``reset()`` empties, e.g. a container's /dev/shm).
    runtime_options: dict[str, Any]
    #: Limits this box cannot enforce, by name, with the reason. Filled in by ``create_box``.
    unenforced: dict[str, str]

    def __init__(self) -> None:
        self.runtime_options = {}
        self.unenforced = {}

    @abstractmethod
    def launch(self, argv: Sequence[str]) -> Channel:
        """Start ``argv`` in the box with stdin/stdout as the returned channel.

        Environment: only what the config allows; never the host's environment.
        """

    @abstractmethod
    def close(self) -> None:
        """Destroy the box and everything in it. Idempotent; never raises for a box already gone."""

    def kill_runtime(self) -> None:  # noqa: B027 - optional hook with a documented default
        """Forcefully stop the process started by the last :meth:`launch` (it is unresponsive).

        The default does nothing beyond what closing the channel does; backends whose processes
        outlive their channel (``docker exec``) override it.
        """

    def upload(self, path: str, data: Blob) -> str | None:
        """Optional fast path for large uploads (contexts, files) through the backend's own API.

        Write ``data`` (``data.size`` bytes from ``data.chunks()``) to ``path`` (relative to
        :attr:`workdir`) and return the path the runtime
        should read, or return ``None`` to have the core stream it over the channel.
        """
        return None


class BackendConfig(BaseModel, ABC):
    """Base of every backend's config: one pydantic model per backend, ``extra="forbid"``.

    ``open_sandbox("name", **options)`` builds the registered config class from ``options``;
    passing a config object directly is the same.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The registered name, set by each backend's config class.
    backend: ClassVar[str] = ""
    #: The pip requirement that installs this backend (for hints).
    install_hint: ClassVar[str] = ""

    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables set inside the sandbox (nothing from the host passes otherwise)."""
    env_passthrough: tuple[str, ...] = ()
    """Names of host environment variables to copy in. Empty by default: no host secret leaks."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels/metadata put on the box (containers, cloud sandboxes)."""
    max_concurrent_calls: int = Field(default=16, ge=1)
    """How many host-function calls from one sandbox run at once on the host."""
    max_pending_calls: int = Field(default=1024, ge=1)
    """Calls queued beyond this are refused at once (a flood from the box cannot grow the host)."""
    max_pending_call_bytes: int = Field(default=256 << 20, ge=1 << 16)
    """Bytes of host-function arguments queued on the host at once; calls beyond are refused."""
    max_message_bytes: int = Field(default=64 << 20, ge=1 << 16)
    """Largest protocol message accepted from the box (host-function arguments included)."""
    startup_timeout_s: float = Field(default=120.0, gt=0)
    """How long creating the box and starting its runtime may take."""
    op_timeout_s: float = Field(default=300.0, gt=0)
    """How long a non-exec operation (variables, files, contexts) may take."""

    @abstractmethod
    def create_box(self, limits: Limits) -> Box:
        """Create and start the box. Raise ``SandboxStartError`` (or a subclass) on failure."""

    def open(
        self,
        *,
        limits: Limits | None = None,
        functions: Mapping[str, Callable[..., Any]] | None = None,
    ) -> Sandbox:
        """Open a sandbox with this config. Backends that do not use the runtime override this."""
        from ._sandbox import RuntimeSandbox

        return RuntimeSandbox(self, limits=limits, functions=functions)

    def check(self) -> str | None:
        """Return ``None`` if this backend is usable here, else the reason it is not."""
        return None

    def gc(self, *, older_than_s: float | None = None, dry_run: bool = False, all_hosts: bool = False) -> list[str]:
        """Remove boxes that crashed hosts left behind; return their ids.

        A box is collected when the host process that created it is gone, when its lifetime
        has passed, or when it is older than ``older_than_s``. ``dry_run`` only lists them.
        """
        return []

    def passthrough_env(self, host_env: dict[str, str]) -> dict[str, str]:
        """The environment for the box: the allow-listed host variables, then ``env``."""
        out = {k: host_env[k] for k in self.env_passthrough if k in host_env}
        out.update(self.env)
        return out
