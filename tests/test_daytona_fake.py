"""The real ``daytona`` SDK against :mod:`tests.fakes.daytona_fake`, plus ``DaytonaChannel``.

These pin down what the backend can rely on: the requests the SDK makes, what it raises for each
failure, what it retries by itself, and that the PTY channel is byte-exact.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("daytona")

from daytona import (
    CreateSandboxFromImageParams,
    CreateSandboxFromSnapshotParams,
    Daytona,
    DaytonaAuthenticationError,
    DaytonaConfig,
    DaytonaError,
    DaytonaNotFoundError,
    DaytonaRateLimitError,
    DaytonaServiceUnavailableError,
    DaytonaTimeoutError,
    ListSandboxesQuery,
    Resources,
    SandboxState,
    SessionExecuteRequest,
)
from daytona.common.errors import DaytonaFileNotFoundError
from rlm_sandbox_daytona._channel import DaytonaChannel

from tests.fakes.daytona_fake import DaytonaFake

MiB = 1 << 20


@pytest.fixture(scope="module")
def fake() -> Iterator[DaytonaFake]:
    with DaytonaFake() as server:
        yield server


@pytest.fixture(autouse=True)
def _reset(fake: DaytonaFake) -> None:
    fake.reset()


@pytest.fixture(scope="module")
def client(fake: DaytonaFake) -> Daytona:
    return Daytona(DaytonaConfig(api_url=fake.api_url, api_key="test"))


@pytest.fixture
def sandbox(client: Daytona) -> Iterator[Any]:
    sb = client.create(CreateSandboxFromSnapshotParams(labels={"test": "daytona-fake"}))
    yield sb
    try:
        sb.delete()
    except DaytonaNotFoundError:
        pass


def _read_exactly(channel: DaytonaChannel, n: int, timeout: float = 10.0) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = channel.recv(timeout)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _read_to_eof(channel: DaytonaChannel, timeout: float = 10.0) -> bytes:
    out = bytearray()
    while chunk := channel.recv(timeout):
        out += chunk
    return bytes(out)


# -- control plane ---------------------------------------------------------------------------


def test_create_from_image_sends_labels_env_resources_and_network(client: Daytona, fake: DaytonaFake) -> None:
    """Image-based create carries everything the backend sets; the DTO reflects it."""
    sb = client.create(
        CreateSandboxFromImageParams(
            image="python:3.12-slim",
            resources=Resources(cpu=2, memory=4, disk=5),
            labels={"rlm-sandbox": "1", "owner": "t"},
            env_vars={"A": "1"},
            network_block_all=False,
            network_allow_list="10.0.0.0/8",
            auto_stop_interval=0,
        )
    )
    try:
        spec = fake.sandboxes[sb.id].spec
        assert (spec["cpu"], spec["memory"], spec["disk"]) == (2, 4, 5)
        assert spec["networkAllowList"] == "10.0.0.0/8"
        assert spec["autoStopInterval"] == 0
        assert "FROM python:3.12-slim" in spec["buildInfo"]["dockerfileContent"]
        assert (sb.cpu, sb.memory, sb.disk) == (2, 4, 5)
        assert sb.labels == {"rlm-sandbox": "1", "owner": "t", "code-toolbox-language": "python"}
        assert sb.env == {"A": "1"}
        assert sb.process.exec("echo $A").result.strip() == "1"
    finally:
        sb.delete()


def test_create_from_snapshot_blocks_network(client: Daytona, fake: DaytonaFake) -> None:
    """A snapshot create sends no resources; the sandbox gets the defaults."""
    sb = client.create(CreateSandboxFromSnapshotParams(snapshot="rlm-snap", network_block_all=True))
    try:
        spec = fake.sandboxes[sb.id].spec
        assert spec["snapshot"] == "rlm-snap" and spec["networkBlockAll"] is True
        assert "cpu" not in spec
        assert (sb.cpu, sb.memory, sb.disk, sb.network_block_all) == (1, 1, 3, True)
        assert fake.counts["create"] == 1 and fake.counts["get"] == 0  # started at once
    finally:
        sb.delete()


def test_resources_over_the_limit_are_a_bad_request(client: Daytona) -> None:
    """The API's 400 surfaces as a DaytonaError subclass with status 400."""
    with pytest.raises(DaytonaError) as info:
        client.create(CreateSandboxFromImageParams(image="x", resources=Resources(cpu=64)))
    assert info.value.status_code == 400


def test_list_by_labels_then_delete(client: Daytona, fake: DaytonaFake) -> None:
    """What a garbage collector does: find our sandboxes by label and delete them."""
    ours = [client.create(CreateSandboxFromSnapshotParams(labels={"gc": "run-1"})) for _ in range(3)]
    other = client.create(CreateSandboxFromSnapshotParams(labels={"gc": "run-2"}))
    try:
        found = list(client.list(ListSandboxesQuery(labels={"gc": "run-1"}, limit=2)))
        assert sorted(s.id for s in found) == sorted(s.id for s in ours)
        assert fake.counts["list"] == 2  # two pages, followed by the SDK
        roots = [fake.sandbox_root(s.id) for s in found]
        for s in found:
            client.delete(s)
        assert list(client.list(ListSandboxesQuery(labels={"gc": "run-1"}))) == []
        assert not any(r.exists() for r in roots)
        with pytest.raises(DaytonaNotFoundError):
            client.get(ours[0].id)
    finally:
        other.delete()


# -- files -----------------------------------------------------------------------------------


def test_files_round_trip_20_mib(sandbox: Any, fake: DaytonaFake) -> None:
    """bulk-upload and bulk-download move 20 MiB of binary byte-exact."""
    blob = os.urandom(20 * MiB)
    sandbox.fs.upload_file(blob, "/data/in/blob.bin")
    assert fake.host_path(sandbox.id, "/data/in/blob.bin").read_bytes() == blob
    assert sandbox.fs.download_file("/data/in/blob.bin") == blob
    sandbox.fs.upload_file(b"rel", "notes.txt")  # relative to the work dir
    assert fake.host_path(sandbox.id, "/home/daytona/notes.txt").read_bytes() == b"rel"
    with pytest.raises(DaytonaFileNotFoundError):
        sandbox.fs.download_file("/data/missing.bin")


# -- the PTY channel ---------------------------------------------------------------------------


def test_channel_echoes_every_byte_through_cat(sandbox: Any, fake: DaytonaFake) -> None:
    """Raw mode makes the PTY binary-transparent both ways, including control bytes."""
    channel = DaytonaChannel.start(sandbox, ["cat"])
    try:
        payload = bytes(range(256)) * 64 + os.urandom(3 * MiB)  # > 64 KiB: split into frames
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(_read_exactly(channel, len(payload))))
        reader.start()
        channel.send(payload)
        reader.join(30)
        assert got == [payload]
        channel.send(b"ping\n")
        assert _read_exactly(channel, 5) == b"ping\n"
        with pytest.raises(TimeoutError):
            channel.recv(0.05)
    finally:
        channel.close()
    assert channel.exit_code == 137  # close() kills the PTY session
    assert channel.recv(1) == b""
    assert fake.counts["pty_connect"] == 1 and fake.counts["pty_delete"] == 1


def test_channel_keeps_stderr_out_and_reports_exit(sandbox: Any, fake: DaytonaFake) -> None:
    """stderr goes to a file, env and cwd apply, and the exit status arrives with EOF."""
    fake.host_path(sandbox.id, "/work").mkdir()
    script = 'echo oops >&2; printf "%s|" "$FOO" "${PWD##*/}"; head -c 5; exit 3'
    channel = DaytonaChannel.start(
        sandbox,
        ["sh", "-c", script],
        cwd="/work",
        environment={"FOO": "bar"},
        stderr_path="runtime.err",  # relative to cwd
    )
    try:
        assert _read_exactly(channel, 9) == b"bar|work|"
        channel.send(b"hello")
        assert _read_to_eof(channel) == b"hello"
        assert channel.exit_code == 3
        with pytest.raises(BrokenPipeError):
            channel.send(b"late")
    finally:
        channel.close()
    assert fake.host_path(sandbox.id, "/work/runtime.err").read_bytes() == b"oops\n"


def test_channel_reports_a_command_that_cannot_start(sandbox: Any) -> None:
    """A missing program is found before the marker: start fails, the PTY ended with 127."""
    with pytest.raises(ConnectionError, match="not on the sandbox's PATH"):
        DaytonaChannel.start(sandbox, ["/no/such/program"])
    assert sandbox.process.list_pty_sessions() == []


# -- sessions (the alternative to the PTY) -------------------------------------------------------


def _stream_logs(sandbox: Any, session: str, cmd: str) -> tuple[threading.Thread, queue.Queue[Any]]:
    """Run the SDK's async log follower in a thread; items are ("out"|"err"|"exc"|"end", x)."""
    items: queue.Queue[Any] = queue.Queue()

    def run() -> None:
        try:
            asyncio.run(
                sandbox.process.get_session_command_logs_async(
                    session, cmd, lambda s: items.put(("out", s)), lambda s: items.put(("err", s))
                )
            )
            items.put(("end", None))
        except Exception as e:  # noqa: BLE001 - handed to the test's thread
            items.put(("exc", e))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, items


def _collect(items: queue.Queue[Any], want: dict[str, str]) -> dict[str, str]:
    """Read ("out"|"err", text) items until each stream's text equals ``want``'s."""
    got = {kind: "" for kind in want}
    while any(len(got[k]) < len(v) for k, v in want.items()):
        kind, value = items.get(timeout=10)
        got[kind] += value
    return got


def test_session_command_input_and_streamed_logs(sandbox: Any, fake: DaytonaFake) -> None:
    """run_async + send_session_command_input + the log WebSocket, stdout/stderr apart."""
    sandbox.process.create_session("s1")
    req = SessionExecuteRequest(
        command='while read l; do echo "out:$l"; echo "err:$l" >&2; done',
        run_async=True,
        suppress_input_echo=True,
    )
    cmd = sandbox.process.execute_session_command("s1", req).cmd_id
    thread, items = _stream_logs(sandbox, "s1", cmd)
    sandbox.process.send_session_command_input("s1", cmd, "a")  # the daemon appends "\n"
    want = {"out": "out:a\n", "err": "err:a\n"}
    assert _collect(items, want) == want
    assert fake.counts["command_input"] == 1
    sandbox.process.delete_session("s1")
    thread.join(10)
    assert items.get_nowait() == ("end", None)


def test_session_input_is_echoed_unless_suppressed(sandbox: Any) -> None:
    """Without suppress_input_echo the input shows up in stdout (bad for a protocol)."""
    sandbox.process.create_session("s2")
    req = SessionExecuteRequest(command="head -n 1 >/dev/null; echo done", run_async=True)
    cmd = sandbox.process.execute_session_command("s2", req).cmd_id
    sandbox.process.send_session_command_input("s2", cmd, "secret")
    thread, items = _stream_logs(sandbox, "s2", cmd)
    thread.join(10)
    out = "".join(v for k, v in items.queue if k == "out")
    assert out == "secret\ndone\n"
    with pytest.raises(DaytonaError) as info:  # 410 COMMAND_ALREADY_COMPLETED
        sandbox.process.send_session_command_input("s2", cmd, "late")
    assert info.value.status_code == 410


# -- faults: what a user sees ------------------------------------------------------------------


def test_503_on_create_is_raised_not_retried(client: Daytona, fake: DaytonaFake) -> None:
    """POSTs are never retried by the SDK; 503 maps to DaytonaServiceUnavailableError."""
    fake.fail_next("create", 503)
    with pytest.raises(DaytonaServiceUnavailableError) as info:
        client.create()
    assert info.value.status_code == 503 and fake.counts["create"] == 1
    client.create().delete()


def test_429_on_create_carries_retry_after(client: Daytona, fake: DaytonaFake) -> None:
    """The backend must do its own backoff for create; Retry-After is in the headers."""
    fake.rate_limit_next("create", retry_after=7)
    with pytest.raises(DaytonaRateLimitError) as info:
        client.create()
    assert info.value.headers.get("retry-after") == "7" and fake.counts["create"] == 1


def test_429_on_get_is_retried_by_urllib3(client: Daytona, sandbox: Any, fake: DaytonaFake) -> None:
    """GETs with Retry-After (429/503) are retried by urllib3, sleeping as told (<= 3 times)."""
    fake.rate_limit_next("get", retry_after=1)
    started = time.monotonic()
    assert client.get(sandbox.id).id == sandbox.id
    assert fake.counts["get"] == 2 and time.monotonic() - started >= 1


def test_wrong_api_key_is_an_authentication_error(client: Daytona, fake: DaytonaFake) -> None:
    """401 -> DaytonaAuthenticationError, on the API and on the toolbox alike."""
    fake.api_key = "rotated"
    with pytest.raises(DaytonaAuthenticationError):
        list(client.list())
    with pytest.raises(DaytonaAuthenticationError):
        client.create()


def test_slow_create_times_out_and_names_the_sandbox(client: Daytona, fake: DaytonaFake) -> None:
    """create(timeout=) raises DaytonaTimeoutError with the id of the sandbox left behind."""
    fake.create_delay_s = 5
    with pytest.raises(DaytonaTimeoutError) as info:
        client.create(timeout=1)
    leftover = info.value.sandbox_id
    assert leftover in fake.sandboxes
    client.delete(client.get(leftover))


def test_create_that_times_out_client_side_may_still_create(client: Daytona, fake: DaytonaFake) -> None:
    """A slow POST: DaytonaTimeoutError without an id, yet the sandbox appears (GC by label)."""
    fake.slow_next("create", 1.5)
    with pytest.raises(DaytonaTimeoutError) as info:
        client.create(CreateSandboxFromSnapshotParams(labels={"gc": "leak"}), timeout=1)
    assert info.value.sandbox_id is None
    deadline = time.monotonic() + 10
    while not (leaked := list(client.list(ListSandboxesQuery(labels={"gc": "leak"})))):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for sb in leaked:
        sb.delete()


def test_read_timeout_on_get_is_retried_by_urllib3(client: Daytona, sandbox: Any, fake: DaytonaFake) -> None:
    """request_timeout bounds one attempt; urllib3 retries idempotent reads up to 3 times."""
    fake.slow_next("get", 2)
    assert client.get(sandbox.id, request_timeout=1).id == sandbox.id
    assert fake.counts["get"] == 2


def test_connection_refused_is_a_plain_daytona_error() -> None:
    """urllib3 gives up with MaxRetryError, which the SDK does not map to DaytonaConnectionError."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = Daytona(DaytonaConfig(api_url=f"http://127.0.0.1:{port}/api", api_key="test"))
    with pytest.raises(DaytonaError) as info:
        dead.get("anything")
    assert type(info.value) is DaytonaError and info.value.status_code is None
    assert "NewConnectionError" in str(info.value)


def test_sandbox_in_error_state_fails_create(client: Daytona, fake: DaytonaFake) -> None:
    """A sandbox that ends in state error makes create raise a plain DaytonaError."""
    fake.create_delay_s = 0.2
    fake.create_error_reason = "no capacity"
    with pytest.raises(DaytonaError, match="no capacity"):
        client.create()
    for sb in client.list(ListSandboxesQuery(states=[SandboxState.ERROR])):
        sb.delete()


def test_pty_connect_refused(sandbox: Any, fake: DaytonaFake) -> None:
    """A refused WebSocket upgrade maps to the typed error of its HTTP status."""
    fake.fail_next("pty_connect", 503)
    with pytest.raises(DaytonaServiceUnavailableError):
        DaytonaChannel.start(sandbox, ["cat"])


def test_dropped_log_stream_raises(sandbox: Any, fake: DaytonaFake) -> None:
    """A log WebSocket closed with 1011 mid-command raises DaytonaError from the follower."""
    sandbox.process.create_session("s3")
    req = SessionExecuteRequest(command="cat", run_async=True, suppress_input_echo=True)
    cmd = sandbox.process.execute_session_command("s3", req).cmd_id
    fake.drop_stream_after("logs", 3)
    thread, items = _stream_logs(sandbox, "s3", cmd)
    sandbox.process.send_session_command_input("s3", cmd, "hello")
    thread.join(10)
    kinds = [k for k, _ in items.queue]
    assert kinds[-1] == "exc"
    assert "close code 1011" in str(items.queue[-1][1])
    sandbox.process.delete_session("s3")


def test_dropped_pty_stream_is_end_of_stream(sandbox: Any, fake: DaytonaFake) -> None:
    """A PTY WebSocket closed mid-stream: EOF without an exit status; the process lives on."""
    channel = DaytonaChannel.start(sandbox, ["cat"])
    try:
        fake.drop_stream_after("pty", 4)
        channel.send(b"0123456789")
        assert _read_to_eof(channel) == b"0123"
        assert channel.exit_code is None
        assert [p.id for p in sandbox.process.list_pty_sessions()] == [channel.pty_id]
        with pytest.raises(BrokenPipeError):
            channel.send(b"more")
    finally:
        channel.close()
    assert sandbox.process.list_pty_sessions() == []


def test_vanished_sandbox(client: Daytona, sandbox: Any, fake: DaytonaFake) -> None:
    """The box disappears: the channel ends, then every call is DaytonaNotFoundError."""
    channel = DaytonaChannel.start(sandbox, ["cat"])
    try:
        fake.vanish(sandbox.id)
        assert _read_to_eof(channel) == b""
        assert channel.exit_code == 137
    finally:
        channel.close()
    with pytest.raises(DaytonaNotFoundError):
        client.get(sandbox.id)
    with pytest.raises(DaytonaNotFoundError):
        sandbox.process.exec("true")
