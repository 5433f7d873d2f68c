"""Shared helpers of the E2B backend tests: the loopback fake, and options that point at it."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.fakes.e2b_fake import E2BFake  # noqa: E402

__all__ = ["E2BFake", "clean_e2b_env", "fake_server", "options"]

#: Variables the SDK reads that must not steer tests at a real account, a proxy or debug mode.
_SDK_ENV = ("E2B_DEBUG", "E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL", "E2B_DOMAIN")


@contextlib.contextmanager
def clean_e2b_env() -> Iterator[None]:
    """No E2B_* variables and no proxy for loopback while the block runs (restored after)."""
    saved = {k: os.environ.get(k) for k in (*_SDK_ENV, "NO_PROXY", "no_proxy")}
    for name in _SDK_ENV:
        os.environ.pop(name, None)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def fake_server() -> Iterator[E2BFake]:
    with clean_e2b_env(), E2BFake() as fake:
        yield fake


def options(fake: E2BFake, **extra: Any) -> dict[str, Any]:
    """``open_sandbox("e2b", **options(fake))`` opens a sandbox on the fake."""
    return {"api_url": fake.url, "sandbox_url": fake.url, "api_key": fake.api_key, **extra}
