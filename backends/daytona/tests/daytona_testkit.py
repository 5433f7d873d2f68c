"""Shared by the Daytona backend tests: the loopback fake, and options that point the backend at it."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from tests.fakes.daytona_fake import DaytonaFake

__all__ = ["DaytonaFake", "fake_server", "options", "requests_during"]

# The SDK's HTTP clients honour HTTP(S)_PROXY even for loopback unless told otherwise.
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


@contextlib.contextmanager
def fake_server() -> Iterator[DaytonaFake]:
    with DaytonaFake() as fake:
        yield fake


def options(fake: DaytonaFake, **extra: Any) -> dict[str, Any]:
    """``open_sandbox("daytona", **options(fake))`` opens a sandbox on the fake.

    The fake's "image" is this machine, so the interpreter is this one (a ``python3`` on PATH
    may be a slow shim); ``home_dir`` is left to the backend to ask for, as on Daytona.
    """
    return {"api_url": fake.api_url, "api_key": fake.api_key, "python": sys.executable, **extra}


@contextlib.contextmanager
def requests_during(fake: DaytonaFake) -> Iterator[list[tuple[str, str, str]]]:
    """Collect the requests the fake receives inside the block (socket.io probes left out)."""
    start = len(fake.requests)
    seen: list[tuple[str, str, str]] = []
    try:
        yield seen
    finally:
        seen.extend(r for r in fake.requests[start:] if r[0] != "socketio")
