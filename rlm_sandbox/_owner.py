"""Ownership labels on every box, and the rule the reapers (``rlm-sandbox gc``) apply.

Every container or cloud sandbox carries these labels, so that a reaper can find what a crashed
host left behind: the owner (``rlm-sandbox``), the host name, the host process (pid and its kernel
start time, so a recycled pid is not mistaken for the owner), the creation time and, when a
lifetime was set, the expiry time.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

__all__ = [
    "LABEL",
    "LABEL_CREATED",
    "LABEL_EXPIRES",
    "LABEL_HOST",
    "LABEL_PID",
    "LABEL_PID_START",
    "owner_alive",
    "owner_labels",
    "should_collect",
]

LABEL = "rlm-sandbox"
LABEL_HOST = "rlm-sandbox.host"
LABEL_PID = "rlm-sandbox.pid"
LABEL_PID_START = "rlm-sandbox.pid-start"
LABEL_CREATED = "rlm-sandbox.created"
LABEL_EXPIRES = "rlm-sandbox.expires"


def process_start_time(pid: int) -> str:
    """The kernel's start time of a process ('' where unknown)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2 :].split()[19].decode()
    except (OSError, ValueError, IndexError):
        return ""


def owner_labels(lifetime_s: float | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The labels for a new box owned by this process."""
    now = time.time()
    labels = {
        LABEL: "1",
        LABEL_HOST: socket.gethostname(),
        LABEL_PID: str(os.getpid()),
        LABEL_PID_START: process_start_time(os.getpid()),
        LABEL_CREATED: f"{now:.0f}",
    }
    if lifetime_s is not None:
        labels[LABEL_EXPIRES] = f"{now + lifetime_s:.0f}"
    labels.update(extra or {})
    return labels


def owner_alive(labels: Mapping[str, str]) -> bool:
    """Whether the host process that created a box (on this host) still runs."""
    try:
        pid = int(labels.get(LABEL_PID, ""))
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = labels.get(LABEL_PID_START, "")
    return not start or process_start_time(pid) == start


def should_collect(
    labels: Mapping[str, str], *, older_than_s: float | None = None, all_hosts: bool = False, now: float | None = None
) -> bool:
    """The reaper's rule: collect a box of ours whose owner is gone, expired, or too old.

    Boxes of other hosts are only considered with ``all_hosts``, and then only by age or expiry
    (their owner cannot be checked from here).
    """
    if labels.get(LABEL) != "1":
        return False
    now = time.time() if now is None else now
    mine = labels.get(LABEL_HOST) == socket.gethostname()
    if not mine and not all_hosts:
        return False
    try:
        created = float(labels.get(LABEL_CREATED, "0") or 0)
        expires = float(labels.get(LABEL_EXPIRES, "0") or 0)
    except ValueError:
        created = expires = 0.0
    if mine and not owner_alive(labels):
        return True
    if expires and now > expires:
        return True
    return older_than_s is not None and now - created > older_than_s
