"""DockerExecChannel against a real Docker engine, in a hardened container.

Needs a running engine and the image built by ``.ci/docker-setup.sh`` (``rlm-sandbox:latest``, or
the offline base ``rlm-sandbox-base:bookworm``; override with ``RLM_SANDBOX_DOCKER_IMAGE``). Without
an engine the engine tests are skipped, unless ``CI`` or ``RLM_SANDBOX_REQUIRE_DOCKER`` is set, in
which case they fail.
"""

from __future__ import annotations

import gc
import hashlib
import io
import os
import random
import shutil
import socket
import struct
import sys
import threading
import time
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "backends" / "docker" / "src"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from rlm_sandbox_docker._channel import (  # noqa: E402
    DockerExecChannel,
    _unwrap_socket,
    read_oom_kill_count,
)

IMAGES = ("rlm-sandbox:latest", "rlm-sandbox-base:bookworm")
BASE_IMAGE = "rlm-sandbox-base:bookworm"
BOX_USER = "10001:10001"  # runs the exec'd processes
MAIN_USER = "65534:65534"  # runs PID 1, so `kill -1` as BOX_USER leaves the container alive
LABEL = "rlm-sandbox.test"
REQUIRED = bool(os.environ.get("CI") or os.environ.get("RLM_SANDBOX_REQUIRE_DOCKER"))


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"Docker is required (CI / RLM_SANDBOX_REQUIRE_DOCKER set): {reason}")
    pytest.skip(reason)


# -- engine fixtures -------------------------------------------------------------------------------


def _connect() -> tuple[Any, str]:
    """A docker-py client whose engine answered a ping, or ``(None, reason)``."""
    try:
        import docker
    except ImportError:
        return None, "docker-py is not installed"

    def attempt() -> tuple[Any, str]:
        try:
            dc = docker.from_env(timeout=60)
        except docker.errors.DockerException as exc:
            return None, f"no Docker engine: {exc}"
        try:
            dc.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means "no engine" here
            dc.close()
            return None, f"Docker engine does not answer: {exc}"
        return dc, ""

    # docker-py leaks the socket of a failed connection attempt; under -W error its
    # ResourceWarning would turn the skip into an error. Collect it while ignoring that warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        result = attempt()
        if result[0] is None:
            gc.collect()
    return result


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    dc, reason = _connect()
    if dc is None:
        _unavailable(reason)
    yield dc
    dc.close()


@pytest.fixture(scope="module")
def image(client: Any) -> str:
    import docker

    override = os.environ.get("RLM_SANDBOX_DOCKER_IMAGE")
    candidates = (override,) if override else IMAGES
    for name in candidates:
        try:
            client.images.get(name)
        except docker.errors.ImageNotFound:
            continue
        return name
    _unavailable(f"none of the images {candidates} exists; run .ci/docker-setup.sh")
    raise AssertionError("unreachable")


def _run_hardened(client: Any, image: str, mem: str = "256m") -> Any:
    return client.containers.run(
        image,
        ["sleep", "infinity"],
        detach=True,
        init=True,
        auto_remove=True,
        read_only=True,
        user=MAIN_USER,
        tmpfs={
            "/work": f"rw,exec,nosuid,nodev,size={mem},uid=10001,gid=10001,mode=0700",
            "/tmp": "rw,nosuid,nodev,size=16m,mode=1777",
        },
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        network_disabled=True,
        mem_limit=mem,
        memswap_limit=mem,
        nano_cpus=1_000_000_000,
        pids_limit=64,
        labels={LABEL: "1"},
    )


def _remove(container: Any) -> None:
    import docker

    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:  # auto_remove already in progress
        if "in progress" not in str(exc):
            raise


@pytest.fixture(scope="module")
def container(client: Any, image: str) -> Iterator[Any]:
    box = _run_hardened(client, image)
    try:
        yield box
    finally:
        _remove(box)


@pytest.fixture
def open_channel(client: Any, container: Any) -> Iterator[Any]:
    """Factory for channels into the shared container; closes and kills them afterwards."""
    opened: list[DockerExecChannel] = []

    def factory(cmd: list[str], **kwargs: Any) -> DockerExecChannel:
        ch = DockerExecChannel.start(client, container, cmd, user=BOX_USER, **kwargs)
        opened.append(ch)
        return ch

    yield factory
    for ch in opened:
        ch.close()
    if opened:
        opened[0].kill()  # anything still running as the box user


def _read_exactly(ch: DockerExecChannel, n: int, timeout: float = 30.0) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        data = ch.recv(timeout)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _read_to_eof(ch: DockerExecChannel, timeout: float = 30.0) -> bytes:
    parts: list[bytes] = []
    while data := ch.recv(timeout):
        parts.append(data)
    return b"".join(parts)


# -- engine tests ----------------------------------------------------------------------------------


@pytest.mark.docker
def test_echo_is_byte_exact(open_channel: Any) -> None:
    """Every byte value and invalid UTF-8 come back unchanged, across several writes."""
    ch = open_channel(["cat"])
    pieces = [bytes(range(256)), b"\xff\xfe\x80\xc3\x28\xed\xa0\x80", b"\x00" * 9, b"\r\n\n\x1b[0m"]
    for piece in pieces:
        ch.send(piece)
    expected = b"".join(pieces)
    assert _read_exactly(ch, len(expected)) == expected


@pytest.mark.docker
def test_echo_10_mb_blob(open_channel: Any) -> None:
    """10 MB of random bytes through ``cat`` while reading concurrently, with exact length."""
    blob = random.Random(1234).randbytes(10 * 1024 * 1024)
    ch = open_channel(["cat"])
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(_read_to_eof(ch)))
    reader.start()
    ch.send(blob)
    ch.close_stdin()
    reader.join(60)
    assert not reader.is_alive()
    assert len(received[0]) == len(blob)
    assert hashlib.sha256(received[0]).digest() == hashlib.sha256(blob).digest()
    assert ch.wait() == 0


@pytest.mark.docker
def test_stderr_does_not_leak_into_stdout(open_channel: Any) -> None:
    """Interleaved stderr (also more than the tail limit) goes to the callback, never to recv."""
    script = (
        "import os, sys\n"
        "sys.stdin.buffer.readline()\n"
        "for i in range(200):\n"
        "    os.write(2, b'E' * 1000)\n"
        "    os.write(1, b'out%03d;' % i)\n"
    )
    seen: list[bytes] = []
    ch = open_channel(["python3", "-c", script], on_stderr=seen.append, stderr_limit=4096)
    ch.send(b"go\n")
    out = _read_to_eof(ch)
    assert out == b"".join(b"out%03d;" % i for i in range(200))
    assert b"".join(seen) == b"E" * 200_000
    assert ch.stderr_tail == b"E" * 4096
    assert ch.wait() == 0


@pytest.mark.docker
def test_recv_timeout(open_channel: Any) -> None:
    """recv raises TimeoutError on time and the channel stays usable afterwards."""
    ch = open_channel(["cat"])
    with pytest.raises(TimeoutError):
        ch.recv(0)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        ch.recv(0.3)
    elapsed = time.monotonic() - start
    assert 0.29 <= elapsed < 2.0
    ch.send(b"still here")
    assert _read_exactly(ch, 10, timeout=10) == b"still here"


@pytest.mark.docker
def test_eof_and_exit_code(open_channel: Any) -> None:
    """After the process exits recv returns b'' (repeatedly) and the exit code is known."""
    ch = open_channel(["sh", "-c", 'read line; printf "%s" "$line"; exit 3'])
    ch.send(b"bye\n")
    assert _read_to_eof(ch) == b"bye"
    assert ch.recv(0) == b""
    assert ch.wait() == 3
    status = ch.status()
    assert not status.running and status.exit_code == 3


@pytest.mark.docker
def test_close_is_idempotent_and_send_after_close_fails(open_channel: Any) -> None:
    ch = open_channel(["cat"])
    ch.close()
    ch.close()
    assert ch.recv(0) == b""
    with pytest.raises(OSError):
        ch.send(b"x")


@pytest.mark.docker
def test_kill_reaches_the_whole_tree(client: Any, container: Any, open_channel: Any) -> None:
    """kill() ends the exec'd process and a child that left its session; PID 1 survives."""
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
        "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
        "time.sleep(600)\n"
    )
    ch = open_channel(["python3", "-c", script])
    assert _read_exactly(ch, 6, timeout=10) == b"ready\n"
    assert ch.status().running
    ch.kill()
    assert _read_to_eof(ch, timeout=10) == b""
    assert ch.wait() == 137
    deadline = time.monotonic() + 5
    while True:  # a killed child may linger for a moment until PID 1 reaps it
        probe = container.exec_run(["sh", "-c", "stat -c %u /proc/[0-9]*"], user=MAIN_USER)
        if b"10001" not in probe.output.split() or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert b"10001" not in probe.output.split()
    container.reload()
    assert container.status == "running"


@pytest.mark.docker
def test_hardening_is_in_force(client: Any, container: Any) -> None:
    """Read-only root, writable tmpfs /work, no capabilities, no network, cgroup counter visible."""
    script = (
        "touch /probe 2>/dev/null && echo root-writable; "
        "echo data > /work/probe && cat /work/probe; "
        "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; "
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; id -u"
    )
    result = container.exec_run(["sh", "-c", script], user=BOX_USER)
    lines = result.output.decode().split()
    assert "root-writable" not in lines
    assert lines[:1] == ["data"]
    assert lines[1:5] == ["CapEff:", "0000000000000000", "NoNewPrivs:", "1"]
    assert lines[5:] == ["lo", "10001"]
    assert read_oom_kill_count(client, container, BOX_USER) == 0


@pytest.mark.docker
def test_dockerfile_builds_with_placeholder_runtime(client: Any, tmp_path: Path) -> None:
    """images/Dockerfile builds offline on the debootstrapped base with a dummy runtime file."""
    import docker

    try:
        client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        _unavailable(f"{BASE_IMAGE} does not exist; run .ci/docker-setup.sh")
    shutil.copy(ROOT / "images" / "Dockerfile", tmp_path / "Dockerfile")
    (tmp_path / "rlm_sandbox").mkdir()
    (tmp_path / "rlm_sandbox" / "runtime.py").write_bytes(b"# placeholder for the test build\n")
    tag = "rlm-sandbox-test-dockerfile:latest"
    built, _ = client.images.build(path=str(tmp_path), tag=tag, buildargs={"BASE": BASE_IMAGE}, rm=True)
    try:
        out = client.containers.run(
            built.id,
            ["sh", "-c", "id -u; id -g; stat -c '%u %a' /work; cat /opt/rlm-sandbox/runtime.py"],
            remove=True,
            network_disabled=True,
        )
        expected = ["10001", "10001", "10001 700", "# placeholder for the test build"]
        assert out.decode().splitlines() == expected
    finally:
        client.images.remove(tag)


# -- engine-free tests of the framing --------------------------------------------------------------


def _bare_channel() -> DockerExecChannel:
    """A channel object with only the demultiplexer state, for feeding frames by hand."""
    ch = DockerExecChannel.__new__(DockerExecChannel)
    ch._out = []
    ch._header = bytearray()
    ch._stream = 0
    ch._remaining = 0
    ch._on_stderr = None
    ch._stderr_limit = 1 << 20
    ch._stderr_tail = bytearray()
    return ch


def _frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


def test_demux_survives_every_split() -> None:
    """Headers and payloads split at any byte boundary demultiplex the same."""
    stream = _frame(1, b"hello ") + _frame(2, b"oops") + _frame(1, b"") + _frame(1, b"\xffworld")
    stream += _frame(3, b"sys") + _frame(1, b"!")
    for cut in range(len(stream) + 1):
        ch = _bare_channel()
        ch._feed(stream[:cut])
        ch._feed(stream[cut:])
        assert b"".join(ch._out) == b"hello \xffworld!"
        assert bytes(ch._stderr_tail) == b"oopssys"
    ch = _bare_channel()
    for i in range(len(stream)):
        ch._feed(stream[i : i + 1])
    assert b"".join(ch._out) == b"hello \xffworld!"


def test_bytes_buffered_during_the_upgrade_are_not_lost() -> None:
    """Bytes http.client read past the 101 headers are recovered, without blocking when none."""
    ours, theirs = socket.socketpair()
    raw = socket.SocketIO(ours, "rb")
    reader = io.BufferedReader(raw)
    try:
        theirs.sendall(b"HTTP/1.1 101 UPGRADED\r\n\r\n" + _frame(1, b"early"))
        time.sleep(0.05)
        assert reader.readline() == b"HTTP/1.1 101 UPGRADED\r\n"
        assert reader.readline() == b"\r\n"
        response = types.SimpleNamespace(raw=types.SimpleNamespace(_fp=types.SimpleNamespace(fp=reader)))
        raw._response = response  # type: ignore[attr-defined]  # as docker-py does
        sock, initial = _unwrap_socket(raw)
        assert sock is ours
        assert initial == _frame(1, b"early")
        reader.read(len(initial))
        start = time.monotonic()
        assert _unwrap_socket(raw)[1] == b""
        assert time.monotonic() - start < 0.5
    finally:
        reader.close()
        ours.close()
        theirs.close()
