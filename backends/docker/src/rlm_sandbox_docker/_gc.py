"""The reaper: find and remove containers a crashed host left behind."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import TYPE_CHECKING

from ._backend import LABEL, LABEL_CREATED, LABEL_EXPIRES, LABEL_HOST, LABEL_PID, LABEL_PID_START, _process_start_time

if TYPE_CHECKING:
    from ._backend import DockerConfig

__all__ = ["collect", "owner_alive"]


def owner_alive(pid_label: str, start_label: str) -> bool:
    """Whether the host process that created a container still runs (pid reuse is detected)."""
    try:
        pid = int(pid_label)
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not start_label or _process_start_time(pid) == start_label


def collect(
    config: DockerConfig, *, older_than_s: float | None = None, dry_run: bool = False, all_hosts: bool = False
) -> list[str]:
    """Remove (or, with ``dry_run``, list) orphaned, expired or too old sandbox containers.

    A container is collected when its owner process on this host is gone, when its lifetime
    label has passed, or when it is older than ``older_than_s``. Containers of other hosts are
    only collected by age or expiry, and only with ``all_hosts``.
    """
    client = config.client()
    host = socket.gethostname()
    now = time.time()
    removed: list[str] = []
    try:
        for c in client.containers.list(all=True, filters={"label": LABEL}):
            labels = c.labels or {}
            mine = labels.get(LABEL_HOST) == host
            if not mine and not all_hosts:
                continue
            created = float(labels.get(LABEL_CREATED, "0") or 0)
            expires = float(labels.get(LABEL_EXPIRES, "0") or 0)
            dead_owner = mine and not owner_alive(labels.get(LABEL_PID, ""), labels.get(LABEL_PID_START, ""))
            too_old = older_than_s is not None and now - created > older_than_s
            expired = bool(expires) and now > expires
            if not (dead_owner or too_old or expired):
                continue
            removed.append(c.id[:12])
            if not dry_run:
                with contextlib.suppress(Exception):
                    c.remove(force=True)
    finally:
        client.close()
    return removed
