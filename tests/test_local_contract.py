"""The whole contract suite on the local backend."""

from __future__ import annotations

import functools

import pytest

import rlm_sandbox as rs
from rlm_sandbox.testing import OpenBox, SandboxContract


class TestLocalContract(SandboxContract):
    @pytest.fixture
    def open_box(self) -> OpenBox:
        return functools.partial(rs.open_sandbox, "local")
