"""A remote engine (``base_url="tcp://..."``): a second dockerd listening on 127.0.0.1.

Uploads cannot use the bind mount there (the host's files are not on the engine's machine), so
contexts and files stream over the exec socket.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import rlm_sandbox as rs
from tests.conftest import docker_required, need_docker

pytestmark = pytest.mark.docker

PORT = 23750
URL = f"tcp://127.0.0.1:{PORT}"
STATE = Path("/var/lib/rlm-sandbox-test-dockerd2")
RUN = Path("/run/rlm-sandbox-test-dockerd2")


def _answers() -> bool:
    r = subprocess.run(["docker", "-H", URL, "info"], capture_output=True, timeout=20)
    return r.returncode == 0


@pytest.fixture(scope="module")
def remote_engine() -> Iterator[str]:
    need_docker()
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        msg = "a second dockerd needs root and dockerd"
        if docker_required():
            pytest.fail(msg)
        pytest.skip(msg)
    proc = None
    if not _answers():
        STATE.mkdir(parents=True, exist_ok=True)
        RUN.mkdir(parents=True, exist_ok=True)
        log = open(STATE / "dockerd.log", "ab")  # noqa: SIM115 - owned by the daemon
        proc = subprocess.Popen(
            [
                "dockerd",
                "--host", URL,
                "--data-root", str(STATE / "data"),
                "--exec-root", str(RUN / "exec"),
                "--pidfile", str(RUN / "dockerd.pid"),
                "--iptables=false", "--ip-masq=false", "--bridge=none",
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 60
        while not _answers():
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the second dockerd did not start; see " + str(STATE / "dockerd.log"))
            time.sleep(0.5)
    have = subprocess.run(["docker", "-H", URL, "image", "inspect", "rlm-sandbox:latest"], capture_output=True)
    if have.returncode != 0:
        save = subprocess.Popen(["docker", "save", "rlm-sandbox:latest"], stdout=subprocess.PIPE)
        subprocess.run(["docker", "-H", URL, "load", "-q"], stdin=save.stdout, check=True, capture_output=True)
        assert save.stdout is not None
        save.stdout.close()
        assert save.wait() == 0
    try:
        yield URL
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_remote_engine_runs_the_whole_round_trip(remote_engine: str) -> None:
    def shout(text: str) -> str:
        return text.upper()

    context = "x" * (20 << 20) + "NEEDLE"
    mine = {"test-run": f"remote-{os.getpid()}-{time.monotonic_ns()}"}
    with rs.open_sandbox("docker", base_url=remote_engine, functions={"shout": shout}, labels=mine) as sb:
        assert sb.execute("import socket\nprint(socket.gethostname() != '')").ok
        sb.load_context(context)
        r = sb.execute("print(len(context), context[-6:], shout('hi'))")
        assert r.stdout == f"{len(context)} NEEDLE HI\n"
        sb.write_file("data/blob.bin", bytes(range(256)) * 1000)
        assert sb.read_file("data/blob.bin") == bytes(range(256)) * 1000
        listed = subprocess.run(
            ["docker", "-H", remote_engine, "ps", "-q", "--filter", "label=rlm-sandbox"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert any(sb.id.startswith(c) or c.startswith(sb.id) for c in listed)
    # Only this test's container: other sessions may share the engine.
    query = ["docker", "-H", remote_engine, "ps", "-aq", "--filter", f"label=test-run={mine['test-run']}"]
    deadline = time.monotonic() + 10
    while (left := subprocess.run(query, capture_output=True, text=True, check=True).stdout.split()) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert left == []


def test_docker_host_environment_variable_selects_the_engine(
    remote_engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", remote_engine)
    with rs.open_sandbox("docker") as sb:
        box = sb.box  # type: ignore[attr-defined]
        assert box.client.api.base_url.endswith(f"127.0.0.1:{PORT}")
        assert box._upload_dir is None  # a remote engine: no bind-mounted uploads
        sb.load_context("small")
        assert sb.execute("print(context)").stdout == "small\n"
