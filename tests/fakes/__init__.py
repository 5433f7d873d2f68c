"""Loopback fakes of sandbox providers, driven by the providers' real SDKs in tests."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process descended from it, as deleting a real sandbox (a VM)
    would: processes that started their own session (the runtime's REPL does) included."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    tree, todo = [pid], [pid]
    while todo:
        for child in kids.get(todo.pop(), ()):
            tree.append(child)
            todo.append(child)
    for p in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
