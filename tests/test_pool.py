"""SandboxPool on the local backend."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import rlm_sandbox as rs
from rlm_sandbox.pool import PooledSandbox, PoolExhausted, SandboxPool


@pytest.fixture
def boxes(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Backend options putting every sandbox under one temp dir, checked empty at the end."""
    root = tmp_path / "boxes"
    root.mkdir()
    yield {"root": str(root)}
    assert list(root.iterdir()) == []


@pytest.fixture
def pool(boxes: dict[str, Any]) -> Iterator[SandboxPool]:
    p = SandboxPool(max_size=3, min_idle=1, acquire_timeout_s=30)
    yield p
    p.close()
    assert p.stats().open == 0


def ok(sb: rs.Sandbox, code: str) -> str:
    r = sb.execute(code)
    assert r.ok, (r.outcome, r.error, r.stderr)
    return r.stdout


def test_a_warm_acquire_takes_well_under_5_ms(pool: SandboxPool, boxes: dict[str, Any]) -> None:
    pool.prewarm("local", options=boxes, function_names=["f"], count=2)
    samples = []
    for i in range(200):
        assert pool.wait_idle(1, timeout_s=10)
        t = time.perf_counter()
        sb = pool.acquire("local", options=boxes, functions={"f": lambda i=i: i})
        samples.append(time.perf_counter() - t)
        assert sb.warm
        sb.release()
    p50 = statistics.median(samples) * 1000
    assert p50 <= 5.0, f"warm acquire p50 {p50:.3f} ms"
    s = pool.stats()
    assert s.acquired == 200 and s.warm == 200 and s.created <= 3


def test_the_next_user_gets_a_fresh_runtime(boxes: dict[str, Any]) -> None:
    with SandboxPool(max_size=1, min_idle=0) as pool:
        with pool.acquire("local", options=boxes) as first:
            first.load_context("the first user's context")
            first.write_file("notes.txt", "private")
            ok(first, "x = 41\nimport json")
            first_id = first.id
        assert first.closed
        with pytest.raises(rs.SandboxClosed):
            first.execute("print(1)")
        with pool.acquire("local", options=boxes) as second:
            assert second.id == first_id and second.lease != first.lease  # the same box, reset
            assert second.list_variables() == {}
            assert ok(second, "print('x' in globals(), 'context' in globals())") == "False False\n"
            with pytest.raises(rs.SandboxFileNotFound):
                second.read_file("notes.txt")
            # The private temp dir is back after the reset: tempfile stays inside the box.
            assert ok(second, "import tempfile, os\nprint(tempfile.gettempdir() == os.environ['TMPDIR'])") == "True\n"
            assert second.load_context("mine") == "context_0"


def test_host_functions_dispatch_to_the_current_lease(boxes: dict[str, Any]) -> None:
    with SandboxPool(max_size=1, min_idle=0) as pool:
        with pool.acquire("local", options=boxes, functions={"who": lambda: "alice"}) as a:
            assert ok(a, "print(who())") == "alice\n"
            a_id = a.id
        with pool.acquire("local", options=boxes, functions={"who": lambda: "bob"}) as b:
            assert b.id == a_id
            assert ok(b, "print(who())") == "bob\n"


def test_different_configs_get_different_sandboxes(pool: SandboxPool, boxes: dict[str, Any]) -> None:
    with pool.acquire("local", options=boxes, functions={"f": lambda: 1}) as a:
        a_id = a.id
    pool.wait_idle(1)
    with pool.acquire("local", options=boxes, functions={"f": lambda: 2}) as same:
        assert same.id == a_id and same.warm
    with pool.acquire("local", options=boxes, functions={"g": lambda: 1}) as other_names:
        assert other_names.id != a_id
        r = other_names.execute("f()")
        assert r.error is not None and r.error.name == "NameError"
    with pool.acquire("local", options=boxes, limits=rs.Limits(exec_timeout_s=5), functions={"f": lambda: 1}) as lim:
        assert lim.id != a_id and lim.limits.exec_timeout_s == 5
    assert pool.stats().keys == 3


def test_max_size_bounds_concurrency_and_acquire_waits_or_raises(boxes: dict[str, Any]) -> None:
    with SandboxPool(max_size=2, min_idle=0) as pool:
        a = pool.acquire("local", options=boxes)
        b = pool.acquire("local", options=boxes)
        t = time.monotonic()
        with pytest.raises(PoolExhausted) as info:
            pool.acquire("local", options=boxes, timeout_s=0.3)
        assert 0.25 <= time.monotonic() - t < 2
        assert isinstance(info.value, rs.SandboxTimeout) and isinstance(info.value, TimeoutError)
        threading.Timer(0.3, a.release).start()
        t = time.monotonic()
        c = pool.acquire("local", options=boxes, timeout_s=10)
        assert 0.25 <= time.monotonic() - t < 5
        assert c.id == a.id and pool.stats().created == 2
        c.release()
        b.release()


def test_broken_sandboxes_are_replaced(boxes: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    with SandboxPool(max_size=2, min_idle=1) as pool:
        sb = pool.acquire("local", options=boxes)
        first = sb.id
        sb.release(broken=True)  # the user saw it fail
        assert pool.wait_idle(1, timeout_s=10)
        with pool.acquire("local", options=boxes) as again:
            assert again.id != first
            second = again.id
            real_reset = rs.RuntimeSandbox.reset

            def reset(self: rs.RuntimeSandbox) -> None:
                if self.id == second:
                    raise rs.SandboxCrashed("the runtime was lost during the operation")
                real_reset(self)

            monkeypatch.setattr(rs.RuntimeSandbox, "reset", reset)
        deadline = time.monotonic() + 10
        while pool.stats().replaced < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.stats().replaced == 2
        assert pool.wait_idle(1, timeout_s=10)
        with pool.acquire("local", options=boxes) as third:
            assert third.id not in (first, second)
            assert ok(third, "print('fine')") == "fine\n"
        assert pool.stats().destroyed == 2  # both broken ones were closed, not kept


def test_a_sandbox_that_died_while_idle_is_not_handed_out(boxes: dict[str, Any]) -> None:
    with SandboxPool(max_size=2, min_idle=0, health_check_after_s=0) as pool:
        with pool.acquire("local", options=boxes) as sb:
            first = sb.id
            inner = sb._box()
        assert pool.wait_idle(1, timeout_s=10)
        inner.box.kill_runtime()  # type: ignore[attr-defined]  # its runtime dies while idle
        with pool.acquire("local", options=boxes) as again:
            assert again.id != first
            assert ok(again, "print('fine')") == "fine\n"
        assert pool.stats().replaced >= 1


def test_the_pool_refills_in_the_background(boxes: dict[str, Any]) -> None:
    with SandboxPool(max_size=4, min_idle=2) as pool:
        a = pool.acquire("local", options=boxes)  # cold: opened in this call
        assert not a.warm
        assert pool.wait_idle(2, timeout_s=10)
        b = pool.acquire("local", options=boxes)
        assert b.warm
        assert pool.wait_idle(2, timeout_s=10)
        s = pool.stats()
        assert (s.leased, s.idle, s.created) == (2, 2, 4)
        a.release()
        b.release()


def test_close_closes_leased_and_idle_sandboxes(boxes: dict[str, Any]) -> None:
    pool = SandboxPool(max_size=3, min_idle=2)
    leased = pool.acquire("local", options=boxes)
    assert pool.wait_idle(2, timeout_s=10)
    with pool:
        pass
    assert pool.closed and leased.closed
    with pytest.raises(rs.SandboxClosed):
        leased.execute("print(1)")
    with pytest.raises(rs.SandboxClosed):
        pool.acquire("local", options=boxes)
    leased.release()  # after close: harmless
    pool.close()  # idempotent
    s = pool.stats()
    assert s.open == 0 and s.created == 3


def test_prewarm_reports_a_backend_that_cannot_start(tmp_path: Path) -> None:
    bad = rs.LocalConfig(python=str(tmp_path / "no-python"), root=str(tmp_path))
    with SandboxPool(max_size=2, min_idle=1) as pool:
        with pytest.raises(rs.SandboxStartError):
            pool.prewarm(bad, count=1, timeout_s=30)
        with pytest.raises(rs.SandboxStartError):
            pool.acquire(bad)
        s = pool.stats()
        assert s.starting == 0 and s.failures >= 2 and s.open == 0


def test_a_pooled_sandbox_is_a_sandbox(pool: SandboxPool, boxes: dict[str, Any]) -> None:
    with pool.acquire("local", options=boxes, functions={"double": lambda x: 2 * x}) as sb:
        assert isinstance(sb, PooledSandbox) and isinstance(sb, rs.Sandbox)
        assert sb.backend == "local"
        sb.set_variable("v", [1, 2])
        assert sb.get_variable("v") == [1, 2]
        assert ok(sb, "print(double(21))") == "42\n"
        sb.write_file("a.bin", b"\x00\x01")
        assert sb.read_file("a.bin") == b"\x00\x01"
        sb.reset()
        assert sb.list_variables() == {}
        assert "lease=" in repr(sb)


@pytest.mark.parametrize("kwargs", [{"max_size": 0}, {"min_idle": 5, "max_size": 2}, {"acquire_timeout_s": -1}])
def test_bad_pool_settings_are_config_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(rs.ConfigError):
        SandboxPool(**kwargs)
