"""Shared test helpers."""

from __future__ import annotations

import os
import subprocess

import pytest

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


def docker_required() -> bool:
    """In CI (or when asked) a missing Docker engine is a failure, not a skip."""
    return bool(os.environ.get("CI") or os.environ.get("RLM_SANDBOX_REQUIRE_DOCKER"))


def docker_unavailable_reason() -> str | None:
    try:
        r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker CLI unusable: {exc}"
    if r.returncode != 0:
        return "no Docker engine answers: " + r.stderr.decode(errors="replace").strip()[:200]
    return None


def need_docker() -> None:
    """Skip (or fail under CI) when no Docker engine is reachable."""
    reason = docker_unavailable_reason()
    if reason is None:
        return
    if docker_required():
        pytest.fail(f"Docker is required here (CI / RLM_SANDBOX_REQUIRE_DOCKER) but {reason}")
    pytest.skip(reason)
