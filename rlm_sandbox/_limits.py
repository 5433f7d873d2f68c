"""Resource limits, shared by every backend."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Limits"]


class Limits(BaseModel):
    """What a sandbox may use. ``None`` means "no limit requested".

    A limit that the backend cannot enforce on this machine raises ``LimitNotSupported`` when the
    sandbox opens, unless ``best_effort=True``; skipped limits are then listed in
    ``Sandbox.unenforced_limits``. Nothing is silently pretended.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    exec_timeout_s: float | None = Field(default=600.0, gt=0)
    """Wall-clock time one ``execute`` may take before the cell is interrupted (state kept)."""
    grace_s: float = Field(default=2.0, ge=0)
    """After the interrupt, how long the cell has to stop before its process tree is killed."""
    memory_mb: int | None = Field(default=2048, gt=0)
    """Memory of the code in the sandbox, in MiB (address space locally, the cgroup in Docker)."""
    cpus: float | None = Field(default=None, gt=0)
    """CPUs the code may use (a quota in Docker; whole cores by affinity locally)."""
    pids: int | None = Field(default=None, gt=0)
    """Processes and threads the code may have at once (a pids cgroup)."""
    network: bool = False
    """Whether the code may use the network. Off by default."""
    output_bytes: int = Field(default=1 << 20, ge=0)
    """Bytes of stdout and of stderr kept per cell; beyond that the head and tail are kept."""
    file_size_mb: int | None = Field(default=None, gt=0)
    """Largest file a process in the sandbox may write, in MiB (RLIMIT_FSIZE)."""
    disk_mb: int | None = Field(default=None, gt=0)
    """Size of the writable work area, in MiB, where the backend can bound it."""
    cpu_time_s: int | None = Field(default=None, gt=0)
    """CPU seconds any one process may use (RLIMIT_CPU); the process is killed beyond."""
    lifetime_s: float | None = Field(default=None, gt=0)
    """How long the whole sandbox may live (enforced by cloud services; reaped by ``gc``)."""
    best_effort: bool = False
    """Skip limits this backend cannot enforce instead of raising ``LimitNotSupported``."""
