"""The whole contract suite on the E2B backend: the real SDK against the loopback E2B fake.

The fake runs each sandbox's processes on this machine (under a per-sandbox root), so network
isolation and the pids limit are the runtime's (a network namespace, a pids cgroup) here, as they
are inside a real E2B VM for everything but the internet cut-off, which E2B applies.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
from e2b_testkit import E2BFake, fake_server, options

import rlm_sandbox as rs
from rlm_sandbox.testing import OpenBox, SandboxContract


@pytest.fixture(scope="module")
def fake() -> Iterator[E2BFake]:
    with fake_server() as server:
        yield server


class TestE2BContract(SandboxContract):
    @pytest.fixture
    def open_box(self, fake: E2BFake) -> OpenBox:
        return functools.partial(rs.open_sandbox, "e2b", **options(fake))

    @pytest.fixture(autouse=True)
    def no_sandbox_left_behind(self, fake: E2BFake) -> Iterator[None]:
        yield
        assert fake.live_sandboxes() == [], "a closed sandbox must be deleted on E2B"
