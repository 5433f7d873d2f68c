"""The local backend: the runtime as a child process of the host (the embedded default).

What it isolates: a fresh temporary working directory (removed on close), a scrubbed environment
(nothing from the host's environment unless allow-listed), its own process group and session,
limits from what the OS offers (address space, CPU time, file size, a pids cgroup where one is
writable, CPU affinity), and no network through a new network namespace where the OS allows it.

What it does not: the code runs as your user, on your filesystem and kernel. It is **not a
security boundary against hostile code**; use the Docker backend for that.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from itertools import count
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from .. import runtime as rt
from .._box import BackendConfig, Box
from .._channel import Channel, PipeChannel
from .._errors import SandboxStartError
from .._limits import Limits
from .._owner import owner_labels, should_collect
from .._sandbox import Blob

__all__ = ["LocalBox", "LocalConfig"]

_affinity_cursor = count()


class LocalConfig(BackendConfig):
    """Config of the ``local`` backend."""

    backend: ClassVar[str] = "local"
    install_hint: ClassVar[str] = "rlm-sandbox"

    python: str = Field(default_factory=lambda: sys.executable)
    """The interpreter that runs the runtime (default: the host's, so its packages import)."""
    root: str | None = None
    """Where the sandbox's temporary directory is created (default: the system temp dir)."""
    keep_files: bool = False
    """Keep the temporary directory after close (for debugging)."""
    path: str = "/usr/local/bin:/usr/bin:/bin"
    """PATH inside the sandbox."""

    def create_box(self, limits: Limits) -> Box:
        return LocalBox(self, limits)

    def gc(self, *, older_than_s: float | None = None, dry_run: bool = False, all_hosts: bool = False) -> list[str]:
        """Remove sandbox directories whose owning process died without closing them."""
        base = Path(self.root or tempfile.gettempdir())
        removed: list[str] = []
        for d in base.glob("rlm-sandbox-*"):
            try:
                labels = json.loads((d / "owner.json").read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(labels, dict) or not should_collect(labels, older_than_s=older_than_s):
                continue
            removed.append("local-" + d.name.removeprefix("rlm-sandbox-"))
            if not dry_run:
                shutil.rmtree(d, onerror=_force_remove)
        return removed

    def check(self) -> str | None:
        if os.name != "posix":
            return "the local backend needs a POSIX system"
        if not Path(self.python).exists() and shutil.which(self.python) is None:
            return f"python interpreter not found: {self.python}"
        return None


def _descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in kids.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


class LocalBox(Box):
    """A temporary directory and a child process tree on this machine."""

    def __init__(self, config: LocalConfig, limits: Limits) -> None:
        super().__init__()
        self.config = config
        self.python = config.python
        self.root = Path(tempfile.mkdtemp(prefix="rlm-sandbox-", dir=config.root))
        self.id = "local-" + self.root.name.removeprefix("rlm-sandbox-")
        (self.root / "owner.json").write_text(json.dumps(owner_labels(limits.lifetime_s, config.labels)))
        work = self.root / "work"
        work.mkdir()
        self.workdir = str(work)
        self.statedir = str(self.root / "state")
        # The runtime is this package's own file (and its .pyc): nothing to send or compile.
        self.baked_runtime = str(Path(rt.__file__).resolve())
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._limited_memory = limits.memory_mb is not None
        self._plan_limits(limits)

    def _plan_limits(self, limits: Limits) -> None:
        opts = self.runtime_options
        rl: dict[str, int] = {}
        if limits.memory_mb is not None:
            if sys.platform.startswith("linux"):
                rl["memory_bytes"] = limits.memory_mb << 20
            else:
                self.unenforced["memory_mb"] = "RLIMIT_AS is not enforced on this OS"
        if limits.file_size_mb is not None:
            rl["file_size_bytes"] = limits.file_size_mb << 20
        if limits.cpu_time_s is not None:
            rl["cpu_time_s"] = limits.cpu_time_s
        opts["rlimits"] = rl
        opts["tmpdir"] = ".tmp"
        if limits.pids is not None:
            opts["cgroup_pids"] = limits.pids
        if not limits.network:
            opts["unshare_net"] = True
        if limits.cpus is not None:
            try:
                allowed = sorted(os.sched_getaffinity(0))
            except AttributeError:
                allowed = []
            n = int(limits.cpus)
            if not allowed:
                self.unenforced["cpus"] = "CPU affinity is not available on this OS"
            elif n != limits.cpus or n < 1:
                self.unenforced["cpus"] = "only whole CPUs can be enforced locally (by affinity)"
            else:
                n = min(n, len(allowed))
                start = next(_affinity_cursor) * n
                opts["affinity"] = [allowed[(start + i) % len(allowed)] for i in range(n)]
        if limits.disk_mb is not None:
            self.unenforced["disk_mb"] = "the local backend has no disk quota"
        if limits.lifetime_s is not None:
            self.unenforced["lifetime_s"] = "local sandboxes live until close()"

    def _env(self) -> dict[str, str]:
        env = {
            "PATH": self.config.path,
            "HOME": self.workdir,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONNOUSERSITE": "1",
        }
        if self._limited_memory:
            # Under RLIMIT_AS, glibc's per-thread arenas (64 MB of address space each) would make
            # a few threads exhaust the limit long before the memory is used.
            env["MALLOC_ARENA_MAX"] = "2"
        env.update(self.config.passthrough_env(dict(os.environ)))
        return env

    def launch(self, argv: Sequence[str]) -> Channel:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        log = open(self.root / "runtime.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                list(argv),
                stdin=in_r,
                stdout=out_w,
                stderr=log,
                cwd=self.root,
                env=self._env(),
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            for fd in (in_r, in_w, out_r, out_w):
                os.close(fd)
            raise SandboxStartError(f"cannot start {argv[0]}: {exc}") from exc
        finally:
            log.close()
        os.close(in_r)
        os.close(out_w)
        return PipeChannel(in_w, out_r)

    def upload(self, path: str, data: Blob) -> str | None:
        """Write straight into the sandbox's directory: the box is this machine."""
        target = Path(self.workdir) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".rlm-part")
        with open(tmp, "wb") as f:
            for chunk in data.chunks():
                f.write(chunk)
        os.replace(tmp, target)
        return path

    def kill_runtime(self) -> None:
        proc = self._proc
        if proc is None:
            return
        # Kill the whole tree, even processes that left the process group.
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        proc = self._proc
        if proc is not None:
            # The runtime kills its own tree on shutdown or EOF; give it a moment, then force.
            deadline = time.monotonic() + 1.0
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            if proc.poll() is None or _descendants(proc.pid):
                self.kill_runtime()
        if not self.config.keep_files:
            shutil.rmtree(self.root, onerror=_force_remove)


def _force_remove(func: object, path: str, exc_info: object) -> None:
    try:
        parent = os.path.dirname(path)
        os.chmod(parent, 0o700)
        os.chmod(path, 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass
