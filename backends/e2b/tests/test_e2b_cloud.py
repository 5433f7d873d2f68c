"""The whole contract suite against a real E2B account. Never selected in CI (``-m 'not cloud'``).

Run it by hand, from the repository root::

    E2B_API_KEY=e2b_... python -m pytest -m cloud backends/e2b/tests/test_e2b_cloud.py

Environment:

* ``E2B_API_KEY`` (required; the module skips without it).
* ``E2B_DOMAIN``, ``E2B_API_URL``, ``E2B_SANDBOX_URL``: optional, read by the SDK as usual.
* ``RLM_SANDBOX_E2B_TEMPLATE``: optional template with ``python3`` (default: E2B's ``base``).

Each test creates and deletes its own sandboxes (about 40 in all, a few at a time); an autouse
check lists the account's sandboxes of this process afterwards and fails if one was left behind.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import pytest

import rlm_sandbox as rs
from rlm_sandbox._owner import LABEL_PID
from rlm_sandbox.testing import OpenBox, SandboxContract

pytestmark = [
    pytest.mark.cloud,
    pytest.mark.skipif(not os.environ.get("E2B_API_KEY"), reason="E2B_API_KEY is not set"),
]


def _options() -> dict[str, str]:
    template = os.environ.get("RLM_SANDBOX_E2B_TEMPLATE")
    return {"template": template} if template else {}


class TestE2BCloudContract(SandboxContract):
    @pytest.fixture
    def open_box(self) -> OpenBox:
        return functools.partial(rs.open_sandbox, "e2b", **_options())

    @pytest.fixture
    def kill_grace_slack_s(self) -> float:
        return 10.0  # a round trip to the sandbox's edge per step, not loopback

    @pytest.fixture(autouse=True)
    def no_sandbox_left_behind(self) -> Iterator[None]:
        yield
        from rlm_sandbox_e2b import E2BConfig
        from rlm_sandbox_e2b._gc import list_owned

        mine = [s.sandbox_id for s in list_owned(E2BConfig()) if s.metadata.get(LABEL_PID) == str(os.getpid())]
        assert mine == [], f"sandboxes left running on E2B: {mine}"
