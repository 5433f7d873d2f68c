"""The whole contract suite against a real Daytona account. Never selected in CI (``-m 'not cloud'``).

Run it by hand, from the repository root::

    DAYTONA_API_KEY=dtn_... python -m pytest -m cloud backends/daytona/tests/test_daytona_cloud.py

Environment:

* ``DAYTONA_API_KEY`` (required; the module skips without it).
* ``DAYTONA_API_URL``, ``DAYTONA_TARGET``: optional, read by the SDK as usual.
* ``RLM_SANDBOX_DAYTONA_SNAPSHOT`` or ``RLM_SANDBOX_DAYTONA_IMAGE``: optional snapshot or image with
  ``python3`` (default: Daytona's default snapshot).

Each test creates and deletes its own sandboxes (about 40 in all, a few at a time); an autouse
check lists the account's sandboxes of this process afterwards and fails if one was left behind.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import pytest

import rlm_sandbox as rs
from rlm_sandbox._owner import LABEL, LABEL_PID
from rlm_sandbox.testing import OpenBox, SandboxContract

pytestmark = [
    pytest.mark.cloud,
    pytest.mark.skipif(not os.environ.get("DAYTONA_API_KEY"), reason="DAYTONA_API_KEY is not set"),
]


def _options() -> dict[str, str]:
    out = {}
    if os.environ.get("RLM_SANDBOX_DAYTONA_SNAPSHOT"):
        out["snapshot"] = os.environ["RLM_SANDBOX_DAYTONA_SNAPSHOT"]
    if os.environ.get("RLM_SANDBOX_DAYTONA_IMAGE"):
        out["image"] = os.environ["RLM_SANDBOX_DAYTONA_IMAGE"]
    return out


class TestDaytonaCloudContract(SandboxContract):
    @pytest.fixture
    def open_box(self) -> OpenBox:
        return functools.partial(rs.open_sandbox, "daytona", **_options())

    @pytest.fixture
    def kill_grace_slack_s(self) -> float:
        return 10.0  # a round trip to Daytona's proxy per step, not loopback

    @pytest.fixture(autouse=True)
    def no_sandbox_left_behind(self) -> Iterator[None]:
        yield
        from daytona import ListSandboxesQuery, SandboxState
        from rlm_sandbox_daytona import DaytonaBackendConfig

        client = DaytonaBackendConfig().client()
        mine = [
            s.id
            for s in client.list(ListSandboxesQuery(labels={LABEL: "1", LABEL_PID: str(os.getpid())}))
            if s.state not in (SandboxState.DESTROYED, SandboxState.DESTROYING)
        ]
        assert mine == [], f"sandboxes left on Daytona: {mine}"
