"""Faults of the service and the network, injected by the E2B fake: what the user sees.

Each test uses a fresh fake (its fault knobs are global to it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from e2b_testkit import E2BFake, fake_server, options

import rlm_sandbox as rs
from rlm_sandbox._retry import testing_retries as no_retry_waits

QUOTA_MESSAGE = (
    "you have reached the maximum number of concurrent E2B sandboxes (20). If you need more, "
    "please visit 'https://e2b.dev/docs/billing'"
)


@pytest.fixture
def fake() -> Iterator[E2BFake]:
    with fake_server() as server:
        yield server


def _creates(fake: E2BFake) -> int:
    return fake.requests["POST /v2/sandboxes"]


# -- create ---------------------------------------------------------------------------------------


def test_a_503_then_success(fake: E2BFake) -> None:
    fake.faults.create_503_once = True
    with rs.open_sandbox("e2b", **options(fake)) as sb:
        assert sb.execute("print('up')").stdout == "up\n"
    assert _creates(fake) == 2  # retried by the SDK ...
    key = fake.create_keys[0]
    assert key and fake.create_keys == [key, key]  # ... with the same idempotency key
    assert len(fake.create_bodies) == 1


def test_503_beyond_the_sdk_retries_goes_through_the_one_policy(fake: E2BFake) -> None:
    fake.faults.create_errors = [503, 503, 503, 503]  # the SDK's 1 + 3 attempts all refused
    with no_retry_waits(), rs.open_sandbox("e2b", **options(fake)) as sb:
        assert sb.execute("print('up')").stdout == "up\n"
    assert _creates(fake) == 5
    assert len(set(fake.create_keys)) == 1  # every attempt is the same create
    assert len(fake.create_bodies) == 1


def test_a_500_is_retried_only_because_the_create_is_idempotent(fake: E2BFake) -> None:
    fake.faults.create_errors = [500]  # the SDK does not retry a 500
    with no_retry_waits(), rs.open_sandbox("e2b", **options(fake)):
        pass
    assert _creates(fake) == 2
    assert fake.create_keys[0] == fake.create_keys[1] is not None


def test_persistent_503_ends_in_a_transient_error(fake: E2BFake) -> None:
    fake.faults.create_errors = [503] * 100
    with no_retry_waits(), pytest.raises(rs.TransientSandboxError) as caught:
        rs.open_sandbox("e2b", retries=0, **options(fake))
    assert "busy" in str(caught.value)
    assert _creates(fake) == 5  # the policy's attempts, each one request (SDK retries off)
    assert fake.live_sandboxes() == []


def test_a_429_with_retry_after_is_honoured(fake: E2BFake) -> None:
    fake.faults.create_429_retry_after = 1
    start = time.monotonic()
    with rs.open_sandbox("e2b", **options(fake)) as sb:
        elapsed = time.monotonic() - start
        assert sb.execute("print('up')").stdout == "up\n"
    assert elapsed >= 1.0
    assert _creates(fake) == 2


def test_a_quota_429_is_not_retried(fake: E2BFake) -> None:
    fake.faults.create_errors = [(429, QUOTA_MESSAGE)]
    start = time.monotonic()
    with pytest.raises(rs.QuotaExceeded) as caught:
        rs.open_sandbox("e2b", retries=0, **options(fake))
    assert "maximum number of concurrent E2B sandboxes" in str(caught.value)
    assert _creates(fake) == 1
    assert time.monotonic() - start < 1.0


def test_a_401_fails_at_once(fake: E2BFake) -> None:
    start = time.monotonic()
    with pytest.raises(rs.AuthenticationError) as caught:
        rs.open_sandbox("e2b", **options(fake, api_key="wrong"))
    assert isinstance(caught.value, PermissionError)
    assert "E2B_API_KEY" in str(caught.value)
    assert _creates(fake) == 1  # never retried
    assert time.monotonic() - start < 1.0
    fake.faults.return_401 = True
    with pytest.raises(rs.AuthenticationError):
        rs.backend_config("e2b")(**options(fake)).gc()


def test_no_api_key_at_all(fake: E2BFake) -> None:
    opts = options(fake)
    del opts["api_key"]
    with pytest.raises(rs.AuthenticationError):
        rs.open_sandbox("e2b", **opts)
    assert _creates(fake) == 0


def test_a_slow_create_hits_the_startup_timeout(fake: E2BFake) -> None:
    fake.faults.create_delay_s = 3.0
    start = time.monotonic()
    with pytest.raises(rs.SandboxTimeout) as caught:
        rs.open_sandbox("e2b", startup_timeout_s=0.5, **options(fake))
    assert time.monotonic() - start < 2.0
    assert "in time" in str(caught.value)
    assert _creates(fake) == 1  # a timed-out create may have succeeded: not sent again


def test_unreachable_sandbox_edge(fake: E2BFake) -> None:
    """The control plane answers but envd cannot be reached: a transient error, nothing left behind."""
    start = time.monotonic()
    with pytest.raises(rs.TransientSandboxError) as caught:
        rs.open_sandbox("e2b", **options(fake, sandbox_url="http://127.0.0.1:9"))
    assert "cannot be reached" in str(caught.value)
    assert time.monotonic() - start < 15
    assert _creates(fake) == 1  # starting the runtime is not retried: it is not idempotent
    assert fake.requests["DELETE /sandboxes/{id}"] == 1
    assert fake.live_sandboxes() == []


# -- while running ----------------------------------------------------------------------------------


def test_a_dropped_output_stream_mid_cell_is_a_crash_and_the_sandbox_recovers(fake: E2BFake) -> None:
    calls = []

    def note(x: int) -> int:
        calls.append(x)
        return x

    with rs.open_sandbox("e2b", functions={"note": note}, **options(fake)) as sb:
        sb.load_context("context survives")
        sb.write_file("kept.txt", b"file survives")
        sb.execute("lost = 1")
        record = fake.sandbox(sb.id)
        old = next(p for p in record.processes.values() if not p.ended)
        # The next bytes on the output stream (the cell's call to the host) never arrive.
        fake.faults.drop_stream_after_bytes = 0
        fake.faults.drop_stream_once = True
        r = sb.execute("note(1)\nimport time\ntime.sleep(0.2)\nprint('done')")
        assert r.outcome is rs.Outcome.CRASHED
        assert r.state_lost
        assert "stream" in r.message and "restarted" in r.message
        assert calls == []
        assert old.popen.poll() is not None  # the old runtime was killed, not left running
        r = sb.execute("print(context, 'lost' in globals(), open('kept.txt').read(), note(2))")
        assert r.stdout == "context survives False file survives 2\n"
        assert fake.requests["POST /process.Process/Start"] == 2


def test_the_sandbox_vanishes_mid_cell(fake: E2BFake) -> None:
    sb = rs.open_sandbox("e2b", **options(fake))
    timer = threading.Timer(0.3, fake.vanish, args=(sb.id,))
    timer.start()
    start = time.monotonic()
    try:
        with pytest.raises(rs.SandboxNotFound) as caught:
            sb.execute("import time\ntime.sleep(30)")
    finally:
        timer.cancel()
    assert time.monotonic() - start < 5
    assert sb.id in str(caught.value) and "no longer exists" in str(caught.value)
    with pytest.raises(rs.SandboxNotFound):  # and so on, until the user opens a new one
        sb.get_variable("x")
    sb.close()  # never raises for a sandbox already gone
    sb.close()
    assert sb.closed


def test_the_sandbox_vanishes_while_idle(fake: E2BFake) -> None:
    with rs.open_sandbox("e2b", **options(fake)) as sb:
        sb.execute("x = 1")
        fake.vanish(sb.id)
        with pytest.raises(rs.SandboxNotFound):
            sb.execute("print(x)")


def test_the_lifetime_ends_mid_cell(fake: E2BFake) -> None:
    with rs.open_sandbox("e2b", limits=rs.Limits(lifetime_s=1), **options(fake)) as sb:
        assert fake.create_bodies[0]["timeout"] == 1
        with pytest.raises(rs.SandboxNotFound) as caught:
            sb.execute("import time\ntime.sleep(10)")
        assert "lifetime" in str(caught.value)
