"""The reaper: find and kill E2B sandboxes that crashed hosts left behind."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from rlm_sandbox._errors import SandboxError, SandboxNotFound
from rlm_sandbox._owner import LABEL, should_collect

from ._errors import call

if TYPE_CHECKING:
    from e2b import SandboxInfo

    from ._backend import E2BConfig

__all__ = ["collect", "list_owned"]

log = logging.getLogger("rlm_sandbox.e2b")


def list_owned(config: E2BConfig, *, page_size: int = 100) -> list[SandboxInfo]:
    """Every sandbox (running or paused) carrying the ``rlm-sandbox`` label, all pages."""
    from e2b import Sandbox
    from e2b.sandbox.sandbox_api import SandboxQuery

    pages = Sandbox.list(query=SandboxQuery(metadata={LABEL: "1"}), limit=page_size, **config.api_opts())
    found: list[SandboxInfo] = []
    while pages.has_next:
        # A failed page leaves the paginator's token where it was: retrying it is idempotent.
        found += call("listing E2B sandboxes", pages.next_items, retry=True)
    return found


def collect(
    config: E2BConfig, *, older_than_s: float | None = None, dry_run: bool = False, all_hosts: bool = False
) -> list[str]:
    """Kill (or, with ``dry_run``, list) orphaned, expired or too old sandboxes; return their ids."""
    from e2b import Sandbox

    removed: list[str] = []
    for info in list_owned(config):
        if not should_collect(info.metadata or {}, older_than_s=older_than_s, all_hosts=all_hosts):
            continue
        if not dry_run:
            kill = functools.partial(Sandbox.kill, info.sandbox_id, **config.api_opts())
            try:
                call("deleting an E2B sandbox", kill, retry=True, sandbox_id=info.sandbox_id)
            except SandboxNotFound:
                continue  # gone meanwhile
            except SandboxError as exc:  # refused: report it, go on with the others
                log.warning("gc: could not delete E2B sandbox %s: %s", info.sandbox_id, exc)
                continue
        removed.append(info.sandbox_id)
    return removed
