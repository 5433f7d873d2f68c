"""The real ``e2b`` SDK against the loopback E2B fake, and the E2B channel prototype on top."""

from __future__ import annotations

import base64
import io
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT, ROOT / "backends" / "e2b" / "src"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from e2b import Sandbox  # noqa: E402
from e2b.exceptions import (  # noqa: E402
    AuthenticationException,
    FileNotFoundException,
    RateLimitException,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxUnreachableException,
    ServiceBusyException,
)
from e2b.sandbox.commands.command_handle import CommandExitException  # noqa: E402
from e2b.sandbox.sandbox_api import SandboxQuery  # noqa: E402
from rlm_sandbox_e2b import E2BChannel  # noqa: E402

from tests.fakes.e2b_fake import E2BFake  # noqa: E402


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[E2BFake]:
    """A fresh fake; the SDK must reach it directly, never through a proxy or debug mode."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    for name in ("E2B_DEBUG", "E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL", "E2B_DOMAIN"):
        monkeypatch.delenv(name, raising=False)
    with E2BFake() as server:
        yield server


@pytest.fixture
def opts(fake: E2BFake) -> dict[str, Any]:
    return fake.sdk_opts()


@pytest.fixture
def sandbox(opts: dict[str, Any]) -> Sandbox:
    return Sandbox.create(timeout=300, **opts)


def _read_until_eof(channel: E2BChannel) -> bytes:
    out = bytearray()
    while chunk := channel.recv(10):
        out += chunk
    return bytes(out)


def _recv_exactly(channel: E2BChannel, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = channel.recv(10)
        assert chunk, f"EOF after {len(out)} of {size} bytes"
        out += chunk
    return bytes(out)


# -- control plane ---------------------------------------------------------------------------------


def test_create_records_what_was_asked(fake: E2BFake, opts: dict[str, Any]) -> None:
    sbx = Sandbox.create(
        template="rlm-runtime",
        timeout=120,
        metadata={"rlm_sandbox": "1", "owner": "a b&c=d"},
        envs={"GREETING": "hi"},
        allow_internet_access=False,
        **opts,
    )
    record = fake.sandbox(sbx.sandbox_id)
    assert record.template_id == "rlm-runtime"
    assert record.timeout == 120
    assert record.metadata == {"rlm_sandbox": "1", "owner": "a b&c=d"}
    assert record.allow_internet_access is False
    assert record.root.is_dir()
    assert fake.create_bodies[0]["envVars"] == {"GREETING": "hi"}
    assert [s.sandbox_id for s in fake.live_sandboxes()] == [sbx.sandbox_id]
    assert sbx.get_info().metadata == record.metadata
    assert sbx.commands.run("echo $GREETING").stdout == "hi\n"


def test_list_finds_sandboxes_by_metadata(fake: E2BFake, opts: dict[str, Any]) -> None:
    ours = [Sandbox.create(metadata={"rlm_sandbox": "run-1", "n": str(i)}, **opts) for i in range(3)]
    Sandbox.create(metadata={"rlm_sandbox": "run-2"}, **opts)

    pages = Sandbox.list(query=SandboxQuery(metadata={"rlm_sandbox": "run-1"}), limit=2, **opts)
    found = []
    while pages.has_next:
        found += pages.next_items()
    assert sorted(s.sandbox_id for s in found) == sorted(s.sandbox_id for s in ours)
    assert fake.requests["GET /v2/sandboxes"] == 2  # two pages of two

    ours[0].kill()
    left = Sandbox.list(query=SandboxQuery(metadata={"rlm_sandbox": "run-1", "n": "1"}), **opts)
    assert [s.sandbox_id for s in left.next_items()] == [ours[1].sandbox_id]


def test_kill_stops_processes_and_removes_the_root(fake: E2BFake, opts: dict[str, Any]) -> None:
    sbx = Sandbox.create(**opts)
    handle = sbx.commands.run("sleep 600", background=True)
    proc = fake.sandbox(sbx.sandbox_id).processes[handle.pid]
    root = fake.sandbox(sbx.sandbox_id).root

    assert sbx.kill() is True
    assert proc.popen.poll() is not None
    assert not root.exists()
    assert fake.live_sandboxes() == []
    assert sbx.kill() is False
    assert Sandbox.kill(sbx.sandbox_id, **opts) is False
    assert fake.requests["DELETE /sandboxes/{id}"] == 3


def test_set_timeout_rearms_and_expiry_kills(fake: E2BFake, sandbox: Sandbox, opts: dict[str, Any]) -> None:
    sandbox.set_timeout(900)
    assert fake.sandbox(sandbox.sandbox_id).timeout == 900

    short = Sandbox.create(timeout=1, **opts)
    channel = E2BChannel(short, "cat")
    with pytest.raises(ConnectionError) as caught:
        channel.recv(10)  # the stream breaks when the sandbox expires
    assert isinstance(caught.value.__cause__, SandboxNotRunningException)
    channel.close()
    assert [s.sandbox_id for s in fake.live_sandboxes()] == [sandbox.sandbox_id]


# -- files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_file", [False, True], ids=["multipart", "octet-stream"])
def test_files_round_trip_20_mb(fake: E2BFake, sandbox: Sandbox, as_file: bool) -> None:
    data = os.urandom(20 << 20)
    payload: bytes | io.BytesIO = io.BytesIO(data) if as_file else data
    info = sandbox.files.write("/data/blob.bin", payload)
    assert info.path == "/data/blob.bin"
    assert fake.upload_kinds == {("octet-stream" if as_file else "multipart"): 1}
    assert (fake.sandbox(sandbox.sandbox_id).root / "data" / "blob.bin").read_bytes() == data
    assert bytes(sandbox.files.read("/data/blob.bin", format="bytes")) == data


def test_files_and_processes_share_the_root(sandbox: Sandbox) -> None:
    sandbox.files.write("notes.txt", "relative paths are under /home/user\n")
    result = sandbox.commands.run("pwd; echo $HOME; cat notes.txt", envs={"X": "1"})
    root = str(Path(result.stdout.splitlines()[0]).parents[1])
    assert result.stdout.splitlines() == [
        f"{root}/home/user",
        f"{root}/home/user",
        "relative paths are under /home/user",
    ]
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout == f"{root}/tmp\n"
    sandbox.commands.run("printf made > out.txt", cwd="/tmp")
    assert sandbox.files.read("/tmp/out.txt") == "made"
    with pytest.raises(FileNotFoundException):
        sandbox.files.read("/nope")
    with pytest.raises(CommandExitException) as failed:
        sandbox.commands.run("echo bad >&2; exit 3")
    assert (failed.value.exit_code, failed.value.stderr) == (3, "bad\n")


def test_process_rpcs(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("cat", background=True, stdin=True, timeout=0)
    assert [p.pid for p in sandbox.commands.list()] == [handle.pid]
    sandbox.commands.stream_input(handle.pid, [b"one ", "two\n"])
    seen = ""
    for stdout, _, _ in handle:
        seen += stdout or ""
        if seen == "one two\n":
            break
    watcher = sandbox.commands.connect(handle.pid, timeout=0)
    sandbox.commands.send_stdin(handle.pid, b"three\n")
    assert next(iter(watcher)) == ("three\n", None, None)
    assert sandbox.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as killed:
        handle.wait()
    assert (killed.value.exit_code, killed.value.error) == (-1, "signal: killed")
    assert killed.value.stdout == "one two\nthree\n"
    assert sandbox.commands.list() == []
    assert sandbox.commands.kill(handle.pid) is False


# -- the channel ----------------------------------------------------------------------------------


def test_channel_echoes_text_lines_byte_exact(fake: E2BFake, sandbox: Sandbox) -> None:
    channel = E2BChannel(sandbox, "cat")
    assert channel.text_mode is True
    blob = base64.b64encode(os.urandom(3 << 20)) + b"\n"  # what the runtime sends in text mode
    for line in (b"hello\n", b"x" * 70_000 + b"\n", blob):
        channel.send(line)
        assert _recv_exactly(channel, len(line)) == line
    assert fake.requests["POST /process.Process/SendInput"] == 1 + 1 + 5  # 1 MiB per request
    assert fake.requests["POST /process.Process/Start"] == 1
    with pytest.raises(TimeoutError):
        channel.recv(0.05)
    channel.close()
    assert channel.recv(1) == b""
    assert channel.exit_code == 0
    channel.close()  # idempotent


def test_channel_is_not_binary_safe(sandbox: Sandbox) -> None:
    """The SDK decodes stdout as UTF-8 with replacement: why the channel is text_mode."""
    channel = E2BChannel(sandbox, "cat")
    channel.send(b"\xff\xfe\n")
    assert _recv_exactly(channel, 7) == "\ufffd\ufffd\n".encode()
    channel.close()


def test_channel_reports_exit_code_and_stderr(sandbox: Sandbox) -> None:
    channel = E2BChannel(sandbox, "echo oops >&2; head -n 1; exit 3")
    channel.send(b"only line\nnot read\n")
    assert _read_until_eof(channel) == b"only line\n"
    assert channel.exit_code == 3
    assert channel.stderr_tail == b"oops\n"
    with pytest.raises(BrokenPipeError):
        channel.send(b"too late\n")
    channel.close()


def test_channel_close_kills_a_process_that_ignores_eof(sandbox: Sandbox) -> None:
    channel = E2BChannel(sandbox, "trap '' TERM; sleep 600", close_timeout=0.5)
    channel.close()
    assert channel.recv(1) == b""
    assert sandbox.commands.list() == []


# -- faults ---------------------------------------------------------------------------------------


def test_401_is_an_authentication_error(fake: E2BFake, opts: dict[str, Any]) -> None:
    with pytest.raises(AuthenticationException):
        Sandbox.create(**{**opts, "api_key": "wrong"})
    fake.faults.return_401 = True
    with pytest.raises(AuthenticationException):
        Sandbox.create(**opts)
    with pytest.raises(AuthenticationException):
        Sandbox.list(**opts).next_items()
    with pytest.raises(AuthenticationException):
        Sandbox.kill("anything", **opts)
    assert fake.requests["POST /v2/sandboxes"] == 2  # never retried


def test_503_once_is_retried_by_the_sdk(fake: E2BFake, opts: dict[str, Any]) -> None:
    fake.faults.create_503_once = True
    Sandbox.create(**opts)
    assert fake.requests["POST /v2/sandboxes"] == 2
    assert len(fake.live_sandboxes()) == 1


def test_503_beyond_the_retries_is_service_busy(fake: E2BFake, opts: dict[str, Any]) -> None:
    fake.faults.create_errors = [503, 503]
    with pytest.raises(ServiceBusyException):
        Sandbox.create(retries=1, **opts)
    assert fake.requests["POST /v2/sandboxes"] == 2


def test_429_waits_for_retry_after(fake: E2BFake, opts: dict[str, Any]) -> None:
    fake.faults.create_429_retry_after = 1
    start = time.monotonic()
    Sandbox.create(**opts)
    assert time.monotonic() - start >= 1
    assert fake.requests["POST /v2/sandboxes"] == 2


def test_429_without_retries_is_a_rate_limit_error(fake: E2BFake, opts: dict[str, Any]) -> None:
    fake.faults.create_errors = [429]
    with pytest.raises(RateLimitException) as caught:
        Sandbox.create(retries=0, **opts)
    assert caught.value.status_code == 429


def test_502_and_504_are_retried_500_is_not(fake: E2BFake, opts: dict[str, Any]) -> None:
    fake.faults.create_errors = [502, 504]
    Sandbox.create(**opts)
    assert fake.requests["POST /v2/sandboxes"] == 3
    fake.faults.create_errors = [500]
    with pytest.raises(SandboxException) as caught:
        Sandbox.create(**opts)
    assert caught.value.status_code == 500
    assert fake.requests["POST /v2/sandboxes"] == 4


def test_slow_create_times_out_with_an_httpx_error(fake: E2BFake, opts: dict[str, Any]) -> None:
    """The SDK does not map a control-plane timeout: it surfaces as ``httpx.TimeoutException``."""
    fake.faults.create_delay_s = 1.0
    with pytest.raises(httpx.TimeoutException):
        Sandbox.create(request_timeout=0.2, **opts)


def test_dropped_stream_breaks_the_channel(fake: E2BFake, sandbox: Sandbox) -> None:
    channel = E2BChannel(sandbox, "cat")
    fake.faults.drop_stream_after_bytes = 200
    channel.send(b"y" * 1000 + b"\n")
    with pytest.raises(ConnectionError) as caught:
        _read_until_eof(channel)
    assert isinstance(caught.value.__cause__, SandboxUnreachableException)
    assert [p.pid for p in sandbox.commands.list()] == [channel.pid]  # the process lives on
    channel.close()


def test_vanished_sandbox(fake: E2BFake, sandbox: Sandbox) -> None:
    channel = E2BChannel(sandbox, "cat")
    channel.send(b"before\n")
    assert _recv_exactly(channel, 7) == b"before\n"
    fake.vanish(sandbox.sandbox_id)

    with pytest.raises(ConnectionError) as broke:
        channel.recv(10)
    assert isinstance(broke.value.__cause__, SandboxNotRunningException)
    with pytest.raises(ConnectionError) as refused:
        channel.send(b"after\n")
    assert isinstance(refused.value.__cause__, SandboxNotRunningException)
    channel.close()
    with pytest.raises(SandboxNotRunningException):
        sandbox.files.read("/tmp/x")
    with pytest.raises(SandboxNotRunningException):
        sandbox.commands.run("true")
    with pytest.raises(SandboxNotFoundException):
        sandbox.get_info()
    with pytest.raises(SandboxNotFoundException):
        sandbox.set_timeout(60)
    assert sandbox.is_running() is False
    assert sandbox.kill() is False
