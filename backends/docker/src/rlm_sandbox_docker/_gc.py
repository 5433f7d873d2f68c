"""The reaper: find and remove containers a crashed host left behind."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from rlm_sandbox._owner import LABEL, should_collect

if TYPE_CHECKING:
    from ._backend import DockerConfig

__all__ = ["collect"]


def collect(
    config: DockerConfig, *, older_than_s: float | None = None, dry_run: bool = False, all_hosts: bool = False
) -> list[str]:
    """Remove (or, with ``dry_run``, list) orphaned, expired or too old sandbox containers."""
    client = config.client()
    removed: list[str] = []
    try:
        for c in client.containers.list(all=True, filters={"label": LABEL}):
            if not should_collect(c.labels or {}, older_than_s=older_than_s, all_hosts=all_hosts):
                continue
            removed.append(c.id[:12])
            if not dry_run:
                with contextlib.suppress(Exception):
                    c.remove(force=True)
    finally:
        client.close()
    return removed
