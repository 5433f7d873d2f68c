"""The whole contract suite on the Docker backend (needs an engine and the rlm-sandbox image)."""

from __future__ import annotations

import functools

import pytest

import rlm_sandbox as rs
from rlm_sandbox.testing import OpenBox, SandboxContract
from tests.conftest import need_docker

pytestmark = pytest.mark.docker


class TestDockerContract(SandboxContract):
    @pytest.fixture
    def open_box(self) -> OpenBox:
        need_docker()
        return functools.partial(rs.open_sandbox, "docker")
