"""Docker-specific behaviour: hardening, OOM reporting, leak-proofing, scale, remote engines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

import rlm_sandbox as rs
from rlm_sandbox._owner import LABEL
from tests.conftest import docker_required, need_docker

pytestmark = pytest.mark.docker


@pytest.fixture(autouse=True)
def _engine() -> None:
    need_docker()


def _containers(**labels: str) -> list[str]:
    import docker

    client = docker.from_env()
    try:
        filters = [LABEL] + [f"{k}={v}" for k, v in labels.items()]
        return [c.id for c in client.containers.list(all=True, filters={"label": filters})]
    finally:
        client.close()


def _need_base_image() -> None:
    """The offline base (.ci/docker-setup.sh builds it): a bare image with python3 and nothing else."""
    import docker

    client = docker.from_env()
    try:
        client.images.get("rlm-sandbox-base:bookworm")
    except docker.errors.ImageNotFound:
        if docker_required():
            pytest.fail("rlm-sandbox-base:bookworm is missing: .ci/docker-setup.sh builds it")
        pytest.skip("the offline base image is not built here (.ci/docker-setup.sh builds it)")
    finally:
        client.close()


def test_hardening_is_in_force() -> None:
    with rs.open_sandbox("docker", limits=rs.Limits(memory_mb=512, pids=100, cpus=1)) as sb:
        code = textwrap.dedent(
            """
            import os, socket
            st = open('/proc/self/status').read()
            caps = [l.split()[1] for l in st.splitlines() if l.startswith('CapEff')][0]
            nnp = [l.split()[1] for l in st.splitlines() if l.startswith('NoNewPrivs')][0]
            try:
                open('/etc/x', 'w'); rootfs = 'writable'
            except OSError:
                rootfs = 'read-only'
            def cg(*names):
                for n in names:
                    try:
                        return open(n).read().strip()
                    except OSError:
                        pass
            mem = cg('/sys/fs/cgroup/memory/memory.limit_in_bytes', '/sys/fs/cgroup/memory.max')
            pids = cg('/sys/fs/cgroup/pids/pids.max', '/sys/fs/cgroup/pids.max')
            ifaces = sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:])
            print(os.getuid(), caps, nnp, rootfs, mem, pids, ifaces, os.getcwd())
            """
        )
        r = sb.execute(code)
        assert r.ok, r
        uid, caps, nnp, rootfs, mem, pids, rest = r.stdout.split(" ", 6)
        assert uid == "10001"
        assert int(caps, 16) == 0
        assert nnp == "1"
        assert rootfs == "read-only"
        assert int(mem) == 512 << 20
        assert pids == "100"
        assert rest.strip() == "['lo'] /work"
        assert sb.execute("open('/work/ok.txt', 'w').write('x')").ok


def test_host_environment_never_passes_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-host")
    with rs.open_sandbox("docker", env={"VISIBLE": "1"}) as sb:
        r = sb.execute("import os\nprint(os.environ.get('OPENAI_API_KEY'), os.environ.get('VISIBLE'))")
        assert r.stdout == "None 1\n"


def test_oom_kill_is_a_crash_that_names_the_memory_limit() -> None:
    with rs.open_sandbox("docker", limits=rs.Limits(memory_mb=200)) as sb:
        sb.execute("kept_var = 1")
        r = sb.execute("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))")
        assert r.outcome is rs.Outcome.CRASHED, r
        assert "out of memory" in r.message and "200 MB" in r.message
        assert r.state_lost
        assert sb.execute("print('usable')").stdout == "usable\n"


def test_fork_bomb_is_contained() -> None:
    with rs.open_sandbox("docker", limits=rs.Limits(pids=64, grace_s=0.5)) as sb:
        code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
        r = sb.execute(code, timeout_s=2)
        assert r.outcome in (rs.Outcome.INTERRUPTED, rs.Outcome.KILLED, rs.Outcome.CRASHED)
        r = sb.execute("import os\nprint(len([p for p in os.listdir('/proc') if p.isdigit()]))")
        assert r.ok and int(r.stdout) < 10


def _holder_script(n: int, mode: str) -> str:
    return textwrap.dedent(
        f"""
        import os, sys, time, signal
        import rlm_sandbox as rs
        boxes = [rs.open_sandbox("docker", labels={{"test-holder": "{mode}"}}) for _ in range({n})]
        for b in boxes:
            assert b.execute("x = 1").ok
        print("ready", flush=True)
        if "{mode}" == "exit":
            sys.exit(0)
        time.sleep(120)
        """
    )


@pytest.fixture
def holder_cleanup() -> Iterator[None]:
    """Remove this test's holder containers only: other sessions may share the engine."""
    yield
    import docker

    client = docker.from_env()
    try:
        for c in client.containers.list(all=True, filters={"label": "test-holder"}):
            c.remove(force=True)
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["sigkill", "exit", "sigterm"])
def test_no_container_outlives_its_host(mode: str, holder_cleanup: None) -> None:
    n = 5 if mode == "sigkill" else 2
    proc = subprocess.Popen(
        [sys.executable, "-c", _holder_script(n, mode)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert len(_containers(**{"test-holder": mode})) == n
        if mode == "sigkill":
            proc.send_signal(signal.SIGKILL)
        elif mode == "sigterm":
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    if mode == "sigkill":
        # The host died without cleaning up: the reaper finds its containers by their labels.
        assert len(_containers(**{"test-holder": mode})) == n
        out = subprocess.run(
            [sys.executable, "-m", "rlm_sandbox.cli", "gc", "--backend", "docker", "--dry-run"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.count("would remove") >= n
        subprocess.run([sys.executable, "-m", "rlm_sandbox.cli", "gc", "--backend", "docker"], check=True)
    deadline = time.monotonic() + 20
    while _containers(**{"test-holder": mode}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _containers(**{"test-holder": mode}) == []
    # Nor host-side upload directories of that process.
    import glob
    import json
    from pathlib import Path

    owners = [json.loads(Path(p).read_text()) for p in glob.glob("/tmp/rlm-sandbox-docker-*.owner.json")]
    assert not [o for o in owners if o.get("rlm-sandbox.pid") == str(proc.pid)]


def test_gc_leaves_live_owners_alone() -> None:
    from rlm_sandbox_docker import DockerConfig

    with rs.open_sandbox("docker") as sb:
        assert sb.id not in DockerConfig().gc(dry_run=True)
        assert sb.execute("print(1)").ok


def test_lifetime_stops_the_container() -> None:
    with rs.open_sandbox("docker", limits=rs.Limits(lifetime_s=2)) as sb:
        assert sb.execute("print(1)").ok
        time.sleep(3.5)
        with pytest.raises(rs.SandboxError):
            r = sb.execute("print(2)")
            if r.outcome is rs.Outcome.CRASHED:
                raise rs.SandboxError(r.message)


def test_32_sandboxes_at_once() -> None:
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    boxes: list[rs.Sandbox] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            sb = rs.open_sandbox("docker", limits=rs.Limits(memory_mb=256))
            with lock:
                boxes.append(sb)
            r = sb.execute(f"print({i} * {i})")
            results[i] = r.stdout.strip()
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors[:3]
        assert results == {i: str(i * i) for i in range(32)}
        # All 32 are open at once and each still answers.
        assert all(sb.execute("x = 1").ok for sb in boxes)
    finally:
        for sb in boxes:
            sb.close()


def test_cli_builds_the_image_and_it_runs_sandboxes() -> None:
    import docker

    _need_base_image()
    tag = "rlm-sandbox:cli-build-test"
    out = subprocess.run(
        [sys.executable, "-m", "rlm_sandbox.cli", "image", "build", "--base", "rlm-sandbox-base:bookworm",
         "--tag", tag, "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    client = docker.from_env()
    try:
        labels = client.images.get(tag).labels
        assert labels.get("org.rlm-sandbox.runtime-sha256")
        with rs.open_sandbox("docker", image=tag) as sb:
            assert sb.execute("import os\nprint(os.getuid())").stdout == "10001\n"
    finally:
        client.images.remove(tag, force=True)
        client.close()


def test_any_image_with_python3_works() -> None:
    """An image without the baked runtime (the bare offline base): the source is sent at start."""
    _need_base_image()
    with rs.open_sandbox("docker", image="rlm-sandbox-base:bookworm") as sb:
        assert sb.box.baked_runtime is None  # type: ignore[attr-defined]
        sb.load_context("bare image")
        r = sb.execute("import os\nprint(os.getuid(), context)")
        assert r.stdout == "10001 bare image\n"
