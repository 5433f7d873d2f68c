"""What the E2B backend asks of E2B, and what it costs: the real SDK against the loopback fake."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2b import Sandbox
from e2b_testkit import ROOT, E2BFake, clean_e2b_env, fake_server, options
from rlm_sandbox_e2b import E2BBox, E2BConfig

import rlm_sandbox as rs
from rlm_sandbox._owner import LABEL, LABEL_CREATED, LABEL_EXPIRES, LABEL_HOST, LABEL_PID, owner_labels
from rlm_sandbox.cli import main as cli_main


@pytest.fixture(scope="module")
def fake() -> Iterator[E2BFake]:
    with fake_server() as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_counts(fake: E2BFake) -> Iterator[None]:
    fake.requests.clear()
    fake.create_bodies.clear()
    fake.create_keys.clear()
    fake.upload_kinds.clear()
    yield
    for sandbox in fake.live_sandboxes():  # what a test left open (gc tests make some on purpose)
        Sandbox.kill(sandbox.sandbox_id, **fake.sdk_opts())


def _delta(fake: E2BFake, before: Counter[str]) -> dict[str, int]:
    return {k: v - before[k] for k, v in fake.requests.items() if v != before[k]}


# -- what is created ------------------------------------------------------------------------------


def test_create_asks_for_the_limits_e2b_enforces(fake: E2BFake) -> None:
    limits = rs.Limits(lifetime_s=600.5, network=False)
    with rs.open_sandbox("e2b", limits=limits, template="my-tpl", labels={"team": "a"}, **options(fake)) as sb:
        body = fake.create_bodies[0]
        assert body["templateID"] == "my-tpl"
        assert body["timeout"] == 601
        assert body["allow_internet_access"] is False
        meta = body["metadata"]
        assert meta[LABEL] == "1" and meta[LABEL_PID] == str(os.getpid()) and meta["team"] == "a"
        assert float(meta[LABEL_EXPIRES]) - time.time() == pytest.approx(600.5, abs=5)
        assert fake.create_keys[0]  # an idempotency key: the create may be retried
        assert fake.sandbox(sb.id).metadata == meta
    with rs.open_sandbox("e2b", limits=rs.Limits(network=True), **options(fake)):
        body = fake.create_bodies[1]
        assert body["allow_internet_access"] is True
        assert body["timeout"] == 3600  # the config's default lifetime
        assert body["templateID"] == "base"


def test_runtime_options_carry_the_limits_the_runtime_enforces(fake: E2BFake) -> None:
    limits = rs.Limits(memory_mb=300, pids=40, file_size_mb=5, cpu_time_s=30)
    with rs.open_sandbox("e2b", limits=limits, **options(fake)) as sb:
        assert isinstance(sb, rs.RuntimeSandbox)
        box = sb.box
        assert isinstance(box, E2BBox)
        assert box.runtime_options == {
            "rlimits": {"memory_bytes": 300 << 20, "file_size_bytes": 5 << 20, "cpu_time_s": 30},
            "tmpdir": ".tmp",
            "cgroup_pids": 40,
            "pids_nproc_fallback": True,
            "unshare_net": "try",
        }
        code = (
            "import resource\n"
            "print(resource.getrlimit(resource.RLIMIT_AS)[0] >> 20, resource.getrlimit(resource.RLIMIT_FSIZE)[0] >> 20,"
            " resource.getrlimit(resource.RLIMIT_CPU)[0])\n"
            "try:\n    open('big', 'wb').write(b'x' * (6 << 20))\nexcept OSError as e:\n    print('fsize', e.errno)\n"
        )
        r = sb.execute(code)
        assert r.stdout.splitlines() == ["300 5 30", "fsize 27"]  # EFBIG


def test_cpus_and_disk_are_refused_before_anything_is_created(fake: E2BFake) -> None:
    with pytest.raises(rs.LimitNotSupported) as refused:
        rs.open_sandbox("e2b", limits=rs.Limits(cpus=1, disk_mb=100), **options(fake))
    assert set(refused.value.limits) == {"cpus", "disk_mb"}
    assert "template" in refused.value.limits["cpus"]
    assert fake.requests["POST /v2/sandboxes"] == 0
    with rs.open_sandbox("e2b", limits=rs.Limits(cpus=1, best_effort=True), **options(fake)) as sb:
        assert set(sb.unenforced_limits) == {"cpus"}
        assert sb.execute("print('ran')").stdout == "ran\n"


def test_workdir_layout_and_environment(fake: E2BFake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLM_E2B_TEST_SHARED", "shared-value")
    monkeypatch.setenv("RLM_E2B_TEST_SECRET", "secret-value")
    opts = options(fake, env={"GREETING": "hi"}, env_passthrough=("RLM_E2B_TEST_SHARED",))
    with rs.open_sandbox("e2b", **opts) as sb:
        root = fake.sandbox(sb.id).root
        r = sb.execute(
            "import os\nprint(os.getcwd())\n"
            "print(os.environ.get('GREETING'), os.environ.get('RLM_E2B_TEST_SHARED'),"
            " os.environ.get('RLM_E2B_TEST_SECRET'))"
        )
        assert r.stdout.splitlines() == [f"{root}/home/user/work", "hi shared-value None"]
        assert (root / "home/user/.rlm/contexts").is_dir()  # the state dir, next to the work dir
        sb.write_file("a/b.txt", b"data")
        assert (root / "home/user/work/a/b.txt").read_bytes() == b"data"


# -- what it costs --------------------------------------------------------------------------------


def test_one_request_per_execute(fake: E2BFake) -> None:
    with rs.open_sandbox("e2b", functions={"echo": lambda x: x}, **options(fake)) as sb:
        sb.execute("pass")
        before = Counter(fake.requests)
        for _ in range(20):
            sb.execute("x = 1")
        assert _delta(fake, before) == {"POST /process.Process/SendInput": 20}
        before = Counter(fake.requests)
        sb.execute("for i in range(5):\n    echo(i)")
        # The cell, then one reply per host-function call; output comes back on the open stream.
        assert _delta(fake, before) == {"POST /process.Process/SendInput": 1 + 5}


def test_open_and_close_requests(fake: E2BFake) -> None:
    sb = rs.open_sandbox("e2b", **options(fake))
    assert dict(fake.requests) == {
        "POST /v2/sandboxes": 1,
        "POST /process.Process/Start": 1,
        "POST /process.Process/SendInput": 2,  # the runtime's source, then init
    }
    sandbox_id = sb.id
    before = Counter(fake.requests)
    sb.close()
    sb.close()
    assert _delta(fake, before) == {  # shutdown, EOF, delete
        "POST /process.Process/SendInput": 1,
        "POST /process.Process/CloseStdin": 1,
        "DELETE /sandboxes/{id}": 1,
    }
    assert not fake.sandbox(sandbox_id).alive


def test_contexts_go_through_the_file_api(fake: E2BFake) -> None:
    text = "x" * (5 << 20) + "NEEDLE"
    with rs.open_sandbox("e2b", **options(fake)) as sb:
        before = Counter(fake.requests)
        sb.load_context(text)
        delta = _delta(fake, before)
        assert delta == {"POST /files": 1, "POST /process.Process/SendInput": 1}
        assert fake.upload_kinds == {"octet-stream": 1}  # streamed, never one 5 MB body in memory
        r = sb.execute("print(len(context), context[-6:])")
        assert r.stdout == f"{len(text)} NEEDLE\n"
        root = fake.sandbox(sb.id).root
        assert not list((root / "home/user/work").glob(".rlm-upload-*"))  # moved into the state dir


# -- configuration ----------------------------------------------------------------------------------


def test_sdk_environment_variables_still_work(fake: E2BFake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_API_KEY", fake.api_key)
    monkeypatch.setenv("E2B_API_URL", fake.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", fake.url)
    assert E2BConfig().check() is None
    with rs.open_sandbox("e2b") as sb:
        assert sb.execute("print(6 * 7)").stdout == "42\n"


def test_check_is_cheap_and_says_what_is_missing(fake: E2BFake) -> None:
    with clean_e2b_env():
        assert "E2B_API_KEY" in (E2BConfig().check() or "")
        assert E2BConfig(api_key="k").check() is None
    assert fake.requests == Counter()
    assert "k" not in repr(E2BConfig(api_key="k").api_key)  # a SecretStr


def test_registry_scan_does_not_import_the_sdk() -> None:
    code = (
        "import sys, rlm_sandbox as rs\n"
        "print(rs.available_backends()['e2b'])\n"
        "from rlm_sandbox._registry import backend_config\n"
        "backend_config('e2b')\n"
        "print('e2b' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.splitlines()[1:] == ["False"]


# -- gc ---------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_gc_kills_what_dead_owners_left_and_keeps_the_rest(fake: E2BFake) -> None:
    sdk = fake.sdk_opts()
    orphan = Sandbox.create(metadata={**owner_labels(3600), LABEL_PID: str(_dead_pid())}, **sdk)
    expired = Sandbox.create(metadata=owner_labels(-10), **sdk)
    other_host = Sandbox.create(
        metadata={**owner_labels(3600), LABEL_HOST: "elsewhere", LABEL_CREATED: f"{time.time() - 7200:.0f}"}, **sdk
    )
    not_ours = Sandbox.create(metadata={"app": "x"}, **sdk)
    config = E2BConfig(**options(fake))
    with rs.open_sandbox(config) as mine:
        assert sorted(config.gc(dry_run=True)) == sorted([orphan.sandbox_id, expired.sandbox_id])
        assert {s.sandbox_id for s in fake.live_sandboxes()} >= {orphan.sandbox_id, expired.sandbox_id}
        assert sorted(config.gc()) == sorted([orphan.sandbox_id, expired.sandbox_id])
        alive = {s.sandbox_id for s in fake.live_sandboxes()}
        assert alive == {mine.id, other_host.sandbox_id, not_ours.sandbox_id}
        assert config.gc() == []
        assert config.gc(older_than_s=3600) == []  # other hosts' sandboxes only with all_hosts
        assert config.gc(older_than_s=3600, all_hosts=True) == [other_host.sandbox_id]
        assert {s.sandbox_id for s in fake.live_sandboxes()} == {mine.id, not_ours.sandbox_id}
        assert mine.execute("print('still mine')").stdout == "still mine\n"


def test_gc_pages_through_the_list(fake: E2BFake) -> None:
    sdk = fake.sdk_opts()
    ids = {Sandbox.create(metadata=owner_labels(-1), **sdk).sandbox_id for _ in range(5)}
    from rlm_sandbox_e2b._gc import collect

    assert set(collect(E2BConfig(**options(fake)), dry_run=True)) == ids
    before = fake.requests["GET /v2/sandboxes"]
    from rlm_sandbox_e2b._gc import list_owned

    assert {s.sandbox_id for s in list_owned(E2BConfig(**options(fake)), page_size=2)} == ids
    assert fake.requests["GET /v2/sandboxes"] - before == 3


def test_gc_cli(fake: E2BFake, capsys: pytest.CaptureFixture[str]) -> None:
    orphan = Sandbox.create(metadata={**owner_labels(60), LABEL_PID: str(_dead_pid())}, **fake.sdk_opts())
    argv = ["gc", "--backend", "e2b", "-o", f"api_url={fake.url}", "-o", f"sandbox_url={fake.url}",
            "-o", f"api_key={fake.api_key}"]
    assert cli_main(argv) == 0
    out = capsys.readouterr()
    assert out.out == f"removed {orphan.sandbox_id}\n"
    assert "e2b: removed 1 sandbox(es)" in out.err
    assert not fake.sandbox(orphan.sandbox_id).alive


def test_exec_cli(fake: E2BFake, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["exec", "--backend", "e2b", "-o", f"api_url={fake.url}", "-o", f"sandbox_url={fake.url}",
            "-o", f"api_key={fake.api_key}", "-c", "print(1 + 1)"]
    assert cli_main(argv) == 0
    assert capsys.readouterr().out == "2\n"
    assert fake.live_sandboxes() == []


# -- the translation table, with the SDK's own exception classes ------------------------------------


def _translated(exc: BaseException, **kw: Any) -> BaseException:
    from rlm_sandbox_e2b._errors import translate_e2b_errors

    with pytest.raises(rs.SandboxError) as caught, translate_e2b_errors("doing it", **kw):
        raise exc
    assert caught.value.__cause__ is exc
    assert str(caught.value).startswith("doing it: ")
    return caught.value


def test_error_translation() -> None:
    import httpx
    from e2b import exceptions as ex

    quota = "429: Rate limit exceeded - you have reached the maximum number of concurrent E2B sandboxes (20)"
    cases: list[tuple[BaseException, dict[str, Any], type[rs.SandboxError]]] = [
        (ex.AuthenticationException("401: Unauthorized"), {}, rs.AuthenticationError),
        (ex.RateLimitException(quota), {}, rs.QuotaExceeded),
        (ex.RateLimitException("429: Rate limit exceeded, please try again later."), {}, rs.TransientSandboxError),
        (ex.ServiceBusyException("503: no capacity"), {}, rs.TransientSandboxError),
        (ex.SandboxException("500: boom", status_code=500), {}, rs.TransientSandboxError),
        (ex.SandboxException("502: bad gateway", status_code=502), {}, rs.TransientSandboxError),
        (ex.SandboxException("403: team blocked: billing", status_code=403), {}, rs.QuotaExceeded),
        (ex.SandboxException("403: Access denied", status_code=403), {}, rs.AuthenticationError),
        (ex.SandboxException("404: gone", status_code=404), {"sandbox_id": "sb1"}, rs.SandboxNotFound),
        (ex.SandboxException("404: no template", status_code=404), {"starting": True}, rs.SandboxStartError),
        (ex.SandboxException("400: timeout too long", status_code=400), {}, rs.ConfigError),
        (ex.SandboxNotRunningException("sandbox was not found"), {"sandbox_id": "sb1"}, rs.SandboxNotFound),
        (ex.SandboxNotFoundException("Sandbox sb1 not found"), {"sandbox_id": "sb1"}, rs.SandboxNotFound),
        (ex.SandboxUnreachableException("port is not open"), {}, rs.TransientSandboxError),
        (ex.FileNotFoundException("path '/x' does not exist"), {}, rs.SandboxFileNotFound),
        (ex.NotEnoughSpaceException("507: disk full"), {}, rs.QuotaExceeded),
        (ex.InvalidArgumentException("bad key"), {}, rs.ConfigError),
        (ex.TimeoutException("deadline exceeded"), {}, rs.SandboxTimeout),
        (ex.TemplateException("old envd"), {"starting": True}, rs.SandboxStartError),
        (httpx.ConnectError("refused"), {}, rs.TransientSandboxError),
        (httpx.ReadError("connection reset"), {}, rs.TransientSandboxError),
        (httpx.ReadTimeout("slow"), {}, rs.SandboxTimeout),
        (ValueError("odd"), {"starting": True}, rs.SandboxStartError),
    ]
    for exc, kw, expected in cases:
        got = _translated(exc, **kw)
        assert type(got) is expected, (exc, got)
    assert type(_translated(ValueError("odd"))) is rs.SandboxError
    assert "sb1" in str(_translated(ex.SandboxNotRunningException("x"), sandbox_id="sb1"))
    already = rs.SandboxClosed("ours")
    from rlm_sandbox_e2b._errors import translate_e2b_errors

    with pytest.raises(rs.SandboxClosed) as kept, translate_e2b_errors("doing it"):
        raise already
    assert kept.value is already
