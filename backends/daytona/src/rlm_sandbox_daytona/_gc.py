"""The reaper: find and delete Daytona sandboxes a crashed host left behind."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlm_sandbox._owner import LABEL, should_collect

from ._errors import call

if TYPE_CHECKING:
    from ._backend import DaytonaBackendConfig

__all__ = ["collect"]


def collect(
    config: DaytonaBackendConfig, *, older_than_s: float | None = None, dry_run: bool = False, all_hosts: bool = False
) -> list[str]:
    """Delete (or, with ``dry_run``, list) orphaned, expired or too old sandboxes of rlm-sandbox.

    Only sandboxes carrying the ``rlm-sandbox`` owner label are considered, and the rule is the
    core's :func:`~rlm_sandbox._owner.should_collect`.
    """
    from daytona import ListSandboxesQuery

    from ._backend import delete_sandbox

    client = config.client()
    timeout = config.request_timeout_s
    sandboxes: list[Any] = call(
        "listing Daytona sandboxes",
        lambda: list(client.list(ListSandboxesQuery(labels={LABEL: "1"}), request_timeout=timeout)),
        retry=True,
    )
    removed: list[str] = []
    for sb in sandboxes:
        if not should_collect(sb.labels or {}, older_than_s=older_than_s, all_hosts=all_hosts):
            continue
        removed.append(str(sb.id))
        if dry_run:
            continue
        delete_sandbox(sb, timeout)
    return removed
