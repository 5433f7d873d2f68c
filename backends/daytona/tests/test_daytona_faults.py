"""The Daytona backend when the service misbehaves: what the user sees, through the real SDK.

Every fault is injected by the loopback fake (``tests/fakes/daytona_fake.py``): HTTP errors, 429
with ``Retry-After``, a slow start, a dropped PTY stream, a sandbox that vanishes, refused
credentials. Nothing of the SDK is mocked.
"""

from __future__ import annotations

import functools
import gc
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from daytona_testkit import DaytonaFake, fake_server, options, requests_during

import rlm_sandbox as rs
from rlm_sandbox._retry import testing_retries as no_retry_waits
from rlm_sandbox.testing import OpenBox


@pytest.fixture(scope="module")
def fake() -> Iterator[DaytonaFake]:
    with fake_server() as server:
        yield server


@pytest.fixture(autouse=True)
def _clean(fake: DaytonaFake) -> Iterator[None]:
    fake.reset()
    yield
    fake.reset()
    assert fake.sandboxes == {}, "every sandbox a test opened (or a failed open created) must be deleted"


@pytest.fixture
def open_box(fake: DaytonaFake) -> OpenBox:
    return functools.partial(rs.open_sandbox, "daytona", **options(fake))


def _ok(sb: rs.Sandbox, code: str) -> str:
    r = sb.execute(code)
    assert r.outcome is rs.Outcome.OK, (r.outcome, r.error, r.message)
    return r.stdout


# -- creating ---------------------------------------------------------------------------------


def test_503_on_create_then_success(fake: DaytonaFake, open_box: OpenBox) -> None:
    """A refused create is retried; the sandbox it may have hidden is looked up first: one sandbox."""
    fake.fail_next("create", 503)
    with no_retry_waits(), requests_during(fake) as seen, open_box() as sb:
        assert _ok(sb, "print('up')") == "up\n"
        assert len(fake.sandboxes) == 1
    routes = [r[0] for r in seen]
    assert routes[:3] == ["create", "list", "create"], routes


def test_lost_answer_after_the_sandbox_exists_is_not_created_twice(fake: DaytonaFake, open_box: OpenBox) -> None:
    """The create went through but the wait for "started" failed (503): the retry adopts it."""
    fake.create_delay_s = 0.3
    fake.fail_next("get", 503)  # the SDK's first state poll
    with no_retry_waits(), open_box() as sb:
        assert _ok(sb, "print('one')") == "one\n"
        assert list(fake.sandboxes) == [sb.id]
        assert fake.counts["create"] == 1 and fake.counts["list"] == 1


def test_429_retry_after_is_honoured(fake: DaytonaFake, open_box: OpenBox) -> None:
    fake.rate_limit_next("create", retry_after=1)
    start = time.monotonic()
    with open_box() as sb:
        elapsed = time.monotonic() - start
        assert _ok(sb, "print(2)") == "2\n"
    assert elapsed >= 1.0, f"Retry-After: 1 not waited ({elapsed:.2f} s)"
    assert elapsed < 5.0
    assert fake.counts["create"] == 2


def test_slow_create_hits_the_startup_timeout_and_leaves_nothing(fake: DaytonaFake, open_box: OpenBox) -> None:
    fake.create_delay_s = 30
    start = time.monotonic()
    with pytest.raises(rs.SandboxTimeout, match=r"not started within 1\.5 s") as info:
        open_box(create_timeout_s=1.5)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - start < 5.0
    assert fake.counts["create"] == 1  # a deadline is not retried
    assert fake.counts["delete"] == 1  # the half-started sandbox was deleted


# The SDK's request is abandoned on purpose (its thread finishes later); the socket it leaves is
# closed by the garbage collector. Collect it here, where that is expected, not in a later test.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_create_request_that_times_out_leaves_a_labelled_sandbox_gc_collects(
    fake: DaytonaFake, open_box: OpenBox
) -> None:
    """The POST's answer never came in time: the sandbox may appear later; it is ours, gc finds it."""
    fake.slow_next("create", 2.5)
    with pytest.raises(rs.SandboxTimeout):
        open_box(create_timeout_s=1.0)
    deadline = time.monotonic() + 10
    while not fake.sandboxes and time.monotonic() < deadline:
        time.sleep(0.05)
    (late,) = fake.sandboxes.values()
    assert late.labels["rlm-sandbox"] == "1" and "rlm-sandbox.create" in late.labels
    config = rs.backend_config("daytona")(**options(fake))
    assert config.gc(older_than_s=0) == [late.id]
    assert fake.sandboxes == {}
    time.sleep(0.5)  # the abandoned SDK thread gets its (late) answer and ends
    gc.collect()


def test_sandbox_in_error_state_is_a_start_error_and_deleted(fake: DaytonaFake, open_box: OpenBox) -> None:
    fake.create_error_reason = "no runner available"
    fake.create_delay_s = 0.1
    with pytest.raises(rs.SandboxStartError, match="no runner available"):
        open_box()
    assert fake.counts["create"] == 1


def test_missing_interpreter_is_a_clear_start_error(fake: DaytonaFake, open_box: OpenBox) -> None:
    with pytest.raises(rs.SandboxStartError, match="not on the sandbox's PATH"):
        open_box(python="/nonexistent/python3")
    assert fake.counts["delete"] == 1


def test_401_fails_at_once(fake: DaytonaFake, open_box: OpenBox) -> None:
    fake.api_key = "someone-else"
    start = time.monotonic()
    with pytest.raises(rs.AuthenticationError, match="DAYTONA_API_KEY") as info:
        open_box()
    assert isinstance(info.value, PermissionError)
    assert time.monotonic() - start < 1.0
    assert fake.counts["create"] == 1 and fake.counts["list"] == 0


def test_no_api_key_at_all(monkeypatch: pytest.MonkeyPatch, fake: DaytonaFake) -> None:
    monkeypatch.delenv("DAYTONA_API_KEY", raising=False)
    monkeypatch.delenv("DAYTONA_JWT_TOKEN", raising=False)
    with pytest.raises(rs.AuthenticationError):
        rs.open_sandbox("daytona", api_url=fake.api_url + "/no-key")
    assert rs.backend_config("daytona")(api_url=fake.api_url).check() is not None


def test_quota_errors(fake: DaytonaFake, open_box: OpenBox) -> None:
    fake.fail_next("create", 403, message="Total CPU quota exceeded")
    with pytest.raises(rs.QuotaExceeded, match="quota"):
        open_box()
    # Per-sandbox resources beyond the organisation's maximum (the fake allows 4 vCPUs).
    with pytest.raises(rs.QuotaExceeded, match="exceeds maximum"):
        open_box(image="python:3.12-slim", limits=rs.Limits(cpus=8))
    assert fake.counts["create"] == 2


# -- running ----------------------------------------------------------------------------------


def test_no_http_request_per_execute(fake: DaytonaFake, open_box: OpenBox) -> None:
    """Cells, host calls, variables and small files all travel on the open PTY WebSocket."""
    with open_box(functions={"double": lambda x: 2 * x}) as sb:
        sb.load_context("small context")
        _ok(sb, "pass")
        with requests_during(fake) as seen:
            for i in range(200):
                sb.execute(f"x = {i}")
            assert _ok(sb, "print(sum(double(i) for i in range(100)))") == "9900\n"
            sb.set_variable("v", [1, 2])
            assert sb.get_variable("v") == [1, 2]
            sb.write_file("f.txt", b"data")
            assert sb.read_file("f.txt") == b"data"
        assert seen == [], seen


def test_big_context_goes_through_the_file_api_and_a_5xx_is_retried(fake: DaytonaFake, open_box: OpenBox) -> None:
    fake.fail_next("upload", 503)
    with no_retry_waits(), open_box() as sb, requests_during(fake) as seen:
        sb.load_context("b" * (3 << 20))
        assert _ok(sb, "print(len(context))") == f"{3 << 20}\n"
    assert [r[0] for r in seen].count("upload") == 2


def test_dropped_stream_mid_cell_is_a_crash_and_the_sandbox_stays_usable(fake: DaytonaFake, open_box: OpenBox) -> None:
    with open_box() as sb:
        sb.load_context("kept")
        _ok(sb, "lost = 1")
        fake.drop_stream_after("pty", 100)
        r = sb.execute("print('y' * 5000)")
        assert r.outcome is rs.Outcome.CRASHED
        assert r.state_lost and "lost" in r.message
        assert _ok(sb, "print(context, 'lost' in globals())") == "kept False\n"
        assert fake.counts["pty_connect"] == 2  # one fresh PTY for the restarted runtime


def test_sandbox_that_disappears(fake: DaytonaFake, open_box: OpenBox) -> None:
    sb = open_box()
    _ok(sb, "x = 1")
    fake.vanish(sb.id)
    with pytest.raises(rs.SandboxNotFound, match="no longer exists"):
        sb.execute("print(x)")
    with pytest.raises(rs.SandboxNotFound):
        sb.get_variable("x")
    sb.close()  # gone already: no error
    sb.close()


def test_open_from_worker_threads_and_the_main_thread_leaves_sigalrm_alone(
    fake: DaytonaFake, open_box: OpenBox
) -> None:
    """The SDK times creates with SIGALRM on the main thread; the backend keeps it off the caller."""
    fired: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        fired.append(signum)

    old_handler = signal.signal(signal.SIGALRM, handler)
    old_alarm = signal.alarm(1000)
    try:
        with open_box() as sb:
            assert _ok(sb, "print('main')") == "main\n"
        assert signal.getsignal(signal.SIGALRM) is handler
        assert 990 <= signal.alarm(0) <= 1000, "the application's pending alarm was cancelled"
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        signal.alarm(old_alarm)
    assert fired == []

    out: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with open_box(create_timeout_s=30) as sb:
                out[i] = _ok(sb, f"print({i} * 3)")
        except BaseException as exc:  # noqa: BLE001 - asserted in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert out == {i: f"{i * 3}\n" for i in range(8)}


# -- config, limits, gc -----------------------------------------------------------------------


def test_create_request_carries_labels_network_lifetime_and_image_resources(
    fake: DaytonaFake, open_box: OpenBox
) -> None:
    limits = rs.Limits(cpus=2, memory_mb=3000, disk_mb=4096, lifetime_s=90, network=True)
    with open_box(
        image="python:3.12-slim", labels={"team": "rlm"}, network_allow_list=("10.0.0.0/8",), limits=limits
    ) as sb:
        spec = fake.sandboxes[sb.id].spec
        assert (spec["cpu"], spec["memory"], spec["disk"]) == (2, 3, 4)
        assert spec["networkBlockAll"] is False and spec["networkAllowList"] == "10.0.0.0/8"
        assert spec["ttlMinutes"] == 2 and spec["autoStopInterval"] == 30 and spec["autoDeleteInterval"] == 0
        labels = spec["labels"]
        assert labels["team"] == "rlm" and labels["rlm-sandbox"] == "1" and "rlm-sandbox.expires" in labels
        assert sb.unenforced_limits == {}
        # The memory limit is also the runtime's, per process and exact.
        r = sb.execute("import resource\nprint(resource.getrlimit(resource.RLIMIT_AS)[0] >> 20)")
        assert r.stdout == "3000\n"
    with open_box() as sb:
        spec = fake.sandboxes[sb.id].spec
        assert spec["networkBlockAll"] is True and "cpu" not in spec and "ttlMinutes" not in spec


def test_limits_a_snapshot_cannot_take_are_refused_before_creating(fake: DaytonaFake, open_box: OpenBox) -> None:
    with pytest.raises(rs.LimitNotSupported, match="cpus") as info:
        open_box(limits=rs.Limits(cpus=1))
    assert set(info.value.limits) == {"cpus"}
    assert fake.counts["create"] == 0
    with pytest.raises(rs.LimitNotSupported, match="whole GiB"):
        open_box(image="python:3.12-slim", limits=rs.Limits(disk_mb=1500))
    with open_box(limits=rs.Limits(cpus=1, disk_mb=2048, best_effort=True)) as sb:
        assert set(sb.unenforced_limits) == {"cpus", "disk_mb"}


def test_config_errors(fake: DaytonaFake) -> None:
    with pytest.raises(rs.ConfigError, match="snapshot= or image="):
        rs.open_sandbox("daytona", snapshot="s", image="i", **options(fake))
    with pytest.raises(rs.ConfigError, match="absolute"):
        rs.open_sandbox("daytona", home_dir="relative", **options(fake))
    config = rs.backend_config("daytona")(api_key="secret-key")
    assert "secret-key" not in repr(config)


def test_gc_from_the_cli(fake: DaytonaFake, open_box: OpenBox, capsys: pytest.CaptureFixture[str]) -> None:
    from daytona import CreateSandboxFromSnapshotParams, Daytona, DaytonaConfig

    from rlm_sandbox._owner import LABEL_PID, LABEL_PID_START, owner_labels
    from rlm_sandbox.cli import main

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    labels = {**owner_labels(), LABEL_PID: str(dead.pid), LABEL_PID_START: "1"}
    client = Daytona(DaytonaConfig(api_url=fake.api_url, api_key=fake.api_key))
    orphan = client.create(CreateSandboxFromSnapshotParams(labels=labels))
    other = client.create(CreateSandboxFromSnapshotParams(labels={"not": "ours"}))
    argv = ["gc", "--backend", "daytona", "-o", f"api_url={fake.api_url}", "-o", f"api_key={fake.api_key}"]
    with open_box() as live:
        assert main([*argv, "--dry-run"]) == 0
        assert capsys.readouterr().out == f"would remove {orphan.id}\n"
        assert orphan.id in fake.sandboxes
        assert main(argv) == 0
        assert capsys.readouterr().out == f"removed {orphan.id}\n"
        assert set(fake.sandboxes) == {live.id, other.id}
    other.delete()


def test_importing_the_plugin_does_not_import_the_sdk() -> None:
    code = (
        "import sys, rlm_sandbox as rs\n"
        "cls = rs.backend_config('daytona')\n"
        "assert cls.__name__ == 'DaytonaBackendConfig'\n"
        "assert 'daytona' not in sys.modules, 'the SDK was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
