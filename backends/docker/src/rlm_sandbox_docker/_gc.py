"""The reaper: find and remove containers a crashed host left behind."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from rlm_sandbox._owner import LABEL, should_collect

from ._backend import UPLOAD_PREFIX

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
    removed.extend(_collect_upload_dirs(older_than_s=older_than_s, dry_run=dry_run))
    return removed


def _collect_upload_dirs(*, older_than_s: float | None, dry_run: bool) -> list[str]:
    """Host-side upload directories of dead owners (a SIGKILLed host leaves them behind)."""
    removed: list[str] = []
    for owner in Path(tempfile.gettempdir()).glob(UPLOAD_PREFIX + "*.owner.json"):
        try:
            labels = json.loads(owner.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(labels, dict) or not should_collect(labels, older_than_s=older_than_s):
            continue
        directory = str(owner)[: -len(".owner.json")]
        removed.append(directory)
        if not dry_run:
            shutil.rmtree(directory, ignore_errors=True)
            with contextlib.suppress(OSError):
                owner.unlink()
    return removed
