"""The whole contract suite on the Daytona backend: the real SDK against the loopback Daytona fake.

The fake runs each sandbox's processes on this machine (under a per-sandbox root), so network
isolation and the pids limit are the runtime's here (a network namespace, a pids cgroup or
RLIMIT_NPROC), as they are inside a real Daytona sandbox, where Daytona also blocks the network.
No capability is switched off.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
from daytona_testkit import DaytonaFake, fake_server, options

import rlm_sandbox as rs
from rlm_sandbox.testing import OpenBox, SandboxContract


@pytest.fixture(scope="module")
def fake() -> Iterator[DaytonaFake]:
    with fake_server() as server:
        yield server


class TestDaytonaContract(SandboxContract):
    @pytest.fixture
    def open_box(self, fake: DaytonaFake) -> OpenBox:
        return functools.partial(rs.open_sandbox, "daytona", **options(fake))

    @pytest.fixture(autouse=True)
    def no_sandbox_left_behind(self, fake: DaytonaFake) -> Iterator[None]:
        yield
        assert fake.sandboxes == {}, "a closed sandbox must be deleted on Daytona"
