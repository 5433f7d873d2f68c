"""The contract suite every backend passes, ours and third parties' alike.

Subclass the mixins in one line and override the ``open_box`` fixture::

    import functools, pytest
    import rlm_sandbox as rs
    from rlm_sandbox.testing import SandboxContract

    class TestMyBackend(SandboxContract):
        @pytest.fixture
        def open_box(self):
            return functools.partial(rs.open_sandbox, "mybackend", some_option=1)

``open_box(limits=None, functions=None)`` must return an open :class:`~rlm_sandbox.Sandbox`.
Capabilities a backend may lack are fixtures to override (``supports_network_isolation``,
``supports_pids_limit``, ``big_context_mb``).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from . import runtime as rt
from ._errors import SandboxClosed, SandboxError, SandboxFileNotFound, VariableNotFound
from ._limits import Limits
from ._results import Outcome
from ._sandbox import Sandbox

__all__ = [
    "ContextContract",
    "ExecutionContract",
    "FileContract",
    "HostFunctionContract",
    "IsolationContract",
    "LifecycleContract",
    "OutputContract",
    "SandboxContract",
    "SandboxFixtures",
    "TimeoutContract",
]

OpenBox = Callable[..., Sandbox]


class SandboxFixtures:
    """Fixtures the suite needs. Override ``open_box``; the capability fixtures are optional."""

    @pytest.fixture
    def open_box(self) -> OpenBox:
        raise NotImplementedError("override the open_box fixture: return a callable that opens a sandbox")

    @pytest.fixture
    def sandbox(self, open_box: OpenBox) -> Iterator[Sandbox]:
        sb = open_box()
        try:
            yield sb
        finally:
            sb.close()

    @pytest.fixture
    def supports_network_isolation(self) -> bool:
        return True

    @pytest.fixture
    def supports_pids_limit(self) -> bool:
        return True

    @pytest.fixture
    def big_context_mb(self) -> int:
        return 100

    @pytest.fixture
    def kill_grace_slack_s(self) -> float:
        """Allowed time beyond timeout + grace for a KILLED cell to come back."""
        return 3.0


def _run(sb: Sandbox, code: str, **kw: Any) -> Any:
    r = sb.execute(code, **kw)
    assert r.outcome is Outcome.OK, (r.outcome, r.error, r.stderr, r.message)
    return r


class ExecutionContract(SandboxFixtures):
    def test_variables_persist(self, sandbox: Sandbox) -> None:
        _run(sandbox, "x = 40\ndef f(y):\n    return x + y")
        r = _run(sandbox, "print(f(2))")
        assert r.stdout == "42\n"
        assert sandbox.get_variable("x") == 40

    def test_error_is_data(self, sandbox: Sandbox) -> None:
        _run(sandbox, "kept = 'yes'")
        r = sandbox.execute("def g():\n    raise ValueError('bad value')\ng()")
        assert r.outcome is Outcome.ERROR
        assert r.error is not None
        assert r.error.name == "ValueError"
        assert r.error.message == "bad value"
        assert "line 2" in r.error.traceback and "raise ValueError" in r.error.traceback
        assert "rlm_runtime" not in r.error.traceback
        assert not r.state_lost
        assert sandbox.get_variable("kept") == "yes"

    def test_syntax_error_and_exit_are_data(self, sandbox: Sandbox) -> None:
        r = sandbox.execute("def (:")
        assert r.outcome is Outcome.ERROR and r.error is not None and r.error.name == "SyntaxError"
        r = sandbox.execute("raise SystemExit(3)")
        assert r.outcome is Outcome.ERROR and r.error is not None and r.error.name == "SystemExit"
        assert _run(sandbox, "print('alive')").stdout == "alive\n"

    def test_stdout_and_stderr(self, sandbox: Sandbox) -> None:
        r = _run(sandbox, "import sys\nprint('out')\nprint('err', file=sys.stderr)")
        assert r.stdout == "out\n"
        assert r.stderr == "err\n"

    def test_variables_roundtrip(self, sandbox: Sandbox) -> None:
        value = {"a": [1, 2.5, None, True], "b": b"\x00\xff", "c": "\u00e9"}
        sandbox.set_variable("v", value)
        assert sandbox.get_variable("v") == value
        with pytest.raises(VariableNotFound):
            sandbox.get_variable("nope")
        _run(sandbox, "obj = object()")
        with pytest.raises(TypeError):
            sandbox.get_variable("obj")
        names = sandbox.list_variables()
        assert names["v"] == "dict" and names["obj"] == "object"


class TimeoutContract(SandboxFixtures):
    def test_timeout_interrupts_and_keeps_state(self, sandbox: Sandbox) -> None:
        _run(sandbox, "kept = [1, 2, 3]")
        start = time.monotonic()
        r = sandbox.execute("import time\nwhile True:\n    time.sleep(0.01)", timeout_s=0.5)
        assert r.outcome is Outcome.INTERRUPTED
        assert r.timed_out and not r.state_lost
        assert r.error is not None and r.error.name == "KeyboardInterrupt"
        assert time.monotonic() - start < 0.5 + 3
        assert sandbox.get_variable("kept") == [1, 2, 3]

    def test_timeout_stops_the_cells_processes(self, sandbox: Sandbox) -> None:
        code = (
            "import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(1)'],"
            " start_new_session=True)\n"
            "child = p.pid\n"
            "while True:\n    time.sleep(0.01)\n"
        )
        r = sandbox.execute(code, timeout_s=1.0)
        assert r.outcome is Outcome.INTERRUPTED and not r.state_lost
        r = _run(
            sandbox,
            "import os\ntry:\n    os.kill(child, 0)\n    print('alive')\nexcept ProcessLookupError:\n    print('gone')",
        )
        assert r.stdout == "gone\n"

    def test_ignoring_the_interrupt_gets_killed(
        self, open_box: OpenBox, kill_grace_slack_s: float
    ) -> None:
        with open_box(limits=Limits(grace_s=0.5)) as sb:
            sb.load_context("still here")
            _run(sb, "lost = 1")
            # A grandchild in its own session, which a process-group kill would miss.
            code = (
                "import subprocess, sys, time\n"
                "p = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(1)'],"
                " start_new_session=True)\n"
                "open('child.pid', 'w').write(str(p.pid))\n"
                "while True:\n"
                "    try:\n"
                "        time.sleep(0.01)\n"
                "    except KeyboardInterrupt:\n"
                "        pass\n"
            )
            start = time.monotonic()
            r = sb.execute(code, timeout_s=1.0)
            elapsed = time.monotonic() - start
            assert r.outcome is Outcome.KILLED, (r.outcome, r.message, r.stderr)
            assert r.timed_out and r.state_lost
            assert elapsed < 1.0 + 0.5 + kill_grace_slack_s
            r = _run(
                sb,
                "import os\npid = int(open('child.pid').read())\n"
                "try:\n    os.kill(pid, 0)\n    print('alive')\nexcept ProcessLookupError:\n    print('gone')\n"
                "print(context)\nprint('lost' in globals())",
            )
            assert r.stdout == "gone\nstill here\nFalse\n"

    def test_crash_is_reported_and_recovered(self, sandbox: Sandbox) -> None:
        sandbox.load_context("ctx survives")
        _run(sandbox, "lost = 1")
        r = sandbox.execute("import os\nprint('before', flush=True)\nos._exit(7)")
        assert r.outcome is Outcome.CRASHED
        assert r.state_lost
        assert "7" in r.message
        assert "before" in r.stdout
        r = _run(sandbox, "print(context, 'lost' in globals())")
        assert r.stdout == "ctx survives False\n"

    def test_segfault_is_a_crash(self, sandbox: Sandbox) -> None:
        r = sandbox.execute("import ctypes\nctypes.string_at(0)")
        assert r.outcome is Outcome.CRASHED
        assert "SIGSEGV" in r.message
        _run(sandbox, "pass")

    def test_interrupt_from_another_thread(self, sandbox: Sandbox) -> None:
        timer = threading.Timer(0.3, sandbox.interrupt)
        timer.start()
        try:
            r = sandbox.execute("import time\nn = 0\nwhile True:\n    n += 1\n    time.sleep(0.001)", timeout_s=30)
        finally:
            timer.cancel()
        assert r.outcome is Outcome.INTERRUPTED
        assert sandbox.get_variable("n") > 0


class OutputContract(SandboxFixtures):
    def test_output_is_truncated_head_and_tail(self, open_box: OpenBox) -> None:
        with open_box(limits=Limits(output_bytes=10_000)) as sb:
            r = _run(sb, "print('HEAD')\nfor i in range(100000):\n    print('x' * 50)\nprint('TAIL')")
            assert r.truncated
            assert r.stdout.startswith("HEAD\n")
            assert r.stdout.endswith("TAIL\n")
            assert "bytes truncated" in r.stdout
            assert len(r.stdout) < 10_000 + 200

    def test_a_huge_output_does_not_grow_the_host(self, open_box: OpenBox) -> None:
        with open_box(limits=Limits(output_bytes=100_000)) as sb:
            before = _rss()
            code = "import os\nb = b'y' * (1 << 20)\nfor i in range(512):\n    os.write(1, b)\n"
            r = _run(sb, code, timeout_s=120)
            assert r.truncated and len(r.stdout) < 100_000 + 200
            assert _rss() - before < 64 << 20

    def test_fd_writes_and_subprocesses_are_captured(self, sandbox: Sandbox) -> None:
        code = (
            "import os, subprocess, sys\n"
            "os.write(1, b'fd1\\n')\n"
            "os.write(2, b'fd2\\n')\n"
            "subprocess.run([sys.executable, '-c', 'print(\"child\")'])\n"
            "subprocess.run(['sh', '-c', 'echo shell >&2'])\n"
        )
        r = _run(sandbox, code)
        assert r.stdout == "fd1\nchild\n"
        assert r.stderr == "fd2\nshell\n"

    def test_non_utf8_and_one_huge_line(self, sandbox: Sandbox) -> None:
        r = _run(sandbox, "import os\nos.write(1, b'\\xff\\xfe ok\\n')\nprint('z' * 300000)")
        assert "\ufffd" in r.stdout and "ok" in r.stdout
        assert "z" * 1000 in r.stdout

    def test_frames_printed_by_user_code_are_just_output(self, sandbox: Sandbox) -> None:
        forged = rt.message({"op": "result", "id": 1, "outcome": "ok", "error": None})
        code = f"import os\nos.write(1, {forged!r})\nos.write(1, b'\\xb5R\\xff\\xff\\xff\\xff')\nprint()"
        r = _run(sandbox, code)
        assert '"op":"result"' in r.stdout
        assert _run(sandbox, "print('fine')").stdout == "fine\n"


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class ContextContract(SandboxFixtures):
    def test_context_kinds(self, sandbox: Sandbox) -> None:
        assert sandbox.load_context("text \u00e9") == "context_0"
        assert sandbox.load_context(b"\x00\x01") == "context_1"
        assert sandbox.load_context({"k": [1, 2]}) == "context_2"
        assert sandbox.load_context([1, "a"]) == "context_3"
        r = _run(sandbox, "print(repr(context), repr(context_1), context_2['k'], context_3)")
        assert r.stdout == "'text \u00e9' b'\\x00\\x01' [1, 2] [1, 'a']\n"
        assert sandbox.load_context("named", name="doc") == "doc"
        assert _run(sandbox, "print(doc)").stdout == "named\n"

    def test_contexts_are_replaced_by_name_and_survive_a_crash(self, sandbox: Sandbox) -> None:
        sandbox.load_context("first")
        sandbox.load_context("v1", name="doc")
        sandbox.load_context("v2", name="doc")
        sandbox.load_context("second")
        assert sandbox.execute("import os\nos._exit(1)").outcome is Outcome.CRASHED
        r = _run(sandbox, "print(context, context_0, context_1, doc)")
        assert r.stdout == "first first second v2\n"

    def test_context_with_quotes_and_newlines(self, sandbox: Sandbox) -> None:
        text = 'ends with quotes """ and \'\'\' and \\ and\n"'
        sandbox.load_context(text)
        assert sandbox.get_variable("context") == text

    def test_big_context(self, open_box: OpenBox, big_context_mb: int) -> None:
        size = big_context_mb << 20
        text = "a" * (size - 6) + "NEEDLE"
        with open_box(limits=Limits(memory_mb=2048)) as sb:
            sb.load_context(text)
            r = _run(sb, "print(len(context), context[-6:])")
            assert r.stdout == f"{size} NEEDLE\n"


class FileContract(SandboxFixtures):
    def test_binary_roundtrip(self, sandbox: Sandbox) -> None:
        data = bytes(range(256)) * 4096 + os.urandom(3 << 20)
        sandbox.write_file("sub/dir/blob.bin", data)
        assert sandbox.read_file("sub/dir/blob.bin") == data
        r = _run(sandbox, "print(len(open('sub/dir/blob.bin', 'rb').read()))")
        assert r.stdout == f"{len(data)}\n"

    def test_files_written_inside_are_readable(self, sandbox: Sandbox) -> None:
        _run(sandbox, "open('made.txt', 'w').write('from inside')")
        assert sandbox.read_file("made.txt") == b"from inside"
        sandbox.write_file("text.txt", "str data \u00e9")
        assert sandbox.read_file("text.txt") == "str data \u00e9".encode()

    def test_missing_file(self, sandbox: Sandbox) -> None:
        with pytest.raises(SandboxFileNotFound):
            sandbox.read_file("does/not/exist")
        with pytest.raises(FileNotFoundError):
            sandbox.read_file("nope.txt")

    def test_files_survive_a_restart(self, sandbox: Sandbox) -> None:
        sandbox.write_file("keep.txt", b"kept")
        assert sandbox.execute("import os\nos._exit(1)").outcome is Outcome.CRASHED
        assert sandbox.read_file("keep.txt") == b"kept"


class HostFunctionContract(SandboxFixtures):
    def test_values_and_errors(self, open_box: OpenBox) -> None:
        class Custom(Exception):
            pass

        def echo(*args: Any, **kwargs: Any) -> Any:
            return {"args": list(args), "kwargs": kwargs}

        def fails(kind: str) -> None:
            if kind == "value":
                raise ValueError("host says no")
            raise Custom("custom trouble")

        with open_box(functions={"echo": echo, "fails": fails}) as sb:
            r = _run(sb, "r = echo(1, 'two', b'\\x03', k=[None])\nprint(r)")
            assert r.stdout == "{'args': [1, 'two', b'\\x03'], 'kwargs': {'k': [None]}}\n"
            r = _run(
                sb,
                "try:\n    fails('value')\nexcept ValueError as e:\n    print('V', e)\n"
                "try:\n    fails('custom')\nexcept HostFunctionError as e:\n    print('H', e)",
            )
            assert r.stdout == "V host says no\nH Custom: custom trouble\n"
            r = sb.execute("echo(object())")
            assert r.outcome is Outcome.ERROR and r.error is not None and r.error.name == "TypeError"

    def test_concurrent_calls_are_served_concurrently(self, open_box: OpenBox) -> None:
        active = 0
        peak = 0
        lock = threading.Lock()

        def slow(i: int) -> int:
            nonlocal active, peak
            with lock:
                active += 1
                peak = max(peak, active)
            time.sleep(0.5)
            with lock:
                active -= 1
            return i * i

        with open_box(functions={"slow": slow}) as sb:
            code = (
                "import time\nfrom concurrent.futures import ThreadPoolExecutor\n"
                "t = time.monotonic()\n"
                "with ThreadPoolExecutor(16) as ex:\n    out = list(ex.map(slow, range(16)))\n"
                "elapsed = time.monotonic() - t\n"
            )
            _run(sb, code, timeout_s=60)
            assert sb.get_variable("out") == [i * i for i in range(16)]
            assert sb.get_variable("elapsed") < 0.5 * 3
            assert peak >= 8

    def test_forked_children_cannot_call_host_functions(self, open_box: OpenBox) -> None:
        with open_box(functions={"f": lambda: "parent"}) as sb:
            code = (
                "import os\n"
                "pid = os.fork()\n"
                "if pid == 0:\n"
                "    try:\n"
                "        f()\n"
                "        os._exit(0)\n"
                "    except RuntimeError:\n"
                "        os._exit(3)\n"
                "_, status = os.waitpid(pid, 0)\n"
                "print(os.WEXITSTATUS(status), f())\n"
            )
            assert _run(sb, code).stdout == "3 parent\n"

    def test_calls_interrupted_by_timeout(self, open_box: OpenBox) -> None:
        def hang() -> None:
            time.sleep(3)

        with open_box(functions={"hang": hang}) as sb:
            r = sb.execute("hang()", timeout_s=0.5)
            assert r.outcome is Outcome.INTERRUPTED
            assert _run(sb, "print('next')").stdout == "next\n"

    def test_forged_and_garbage_frames_from_inside(self, open_box: OpenBox) -> None:
        calls: list[str] = []

        def allowed() -> str:
            calls.append("allowed")
            return "ok"

        with open_box(functions={"allowed": allowed}) as sb:
            # Forge frames on every writable pipe of the worker (its link to the supervisor).
            forged_unknown = rt.message({"op": "call", "id": 999, "name": "os_system", "args": [], "kwargs": {}})
            forged_allowed = rt.message({"op": "call", "id": 998, "name": "allowed", "args": [], "kwargs": {}})
            code = (
                "import os, fcntl\n"
                "fds = [fd for fd in range(3, 64) if _is_wpipe(fd)]\n"
                f"for fd in fds:\n    os.write(fd, {forged_unknown!r})\n    os.write(fd, {forged_allowed!r})\n"
                "import time\ntime.sleep(0.3)\nprint(len(fds))\n"
            )
            helper = (
                "def _is_wpipe(fd):\n"
                "    import os, fcntl, stat\n"
                "    try:\n"
                "        return stat.S_ISFIFO(os.fstat(fd).st_mode) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_WRONLY\n"
                "    except OSError:\n"
                "        return False\n"
            )
            _run(sb, helper)
            r = sb.execute(code)
            assert r.outcome is Outcome.OK, (r.error, r.message)
            assert r.stdout.strip() != "0"
            # The forged call to an unregistered name ran nothing; the registered one may run.
            assert set(calls) <= {"allowed"}
            r = sb.execute("for fd in [fd for fd in range(3, 64) if _is_wpipe(fd)]:\n    os.write(fd, b'garbage!')")
            assert r.outcome in (Outcome.CRASHED, Outcome.OK)
            assert _run(sb, "print('usable')").stdout == "usable\n"


class IsolationContract(SandboxFixtures):
    def test_host_environment_does_not_leak(self, open_box: OpenBox, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-host-secret")
        with open_box() as sb:
            r = _run(sb, "import os\nprint(os.environ.get('OPENAI_API_KEY'))\nprint(sorted(os.environ))")
            assert r.stdout.splitlines()[0] == "None"
            assert "sk-host-secret" not in r.stdout

    def test_network_is_off_by_default(self, sandbox: Sandbox, supports_network_isolation: bool) -> None:
        if not supports_network_isolation:
            pytest.skip("this backend declares no network isolation")
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        try:
            code = (
                "import socket\ns = socket.socket()\ns.settimeout(2)\n"
                f"try:\n    s.connect(('127.0.0.1', {port}))\n    print('connected')\n"
                "except OSError as e:\n    print('blocked')\n"
            )
            assert _run(sandbox, code).stdout == "blocked\n"
        finally:
            server.close()

    def test_memory_limit(self, open_box: OpenBox) -> None:
        with open_box(limits=Limits(memory_mb=256)) as sb:
            r = sb.execute("x = bytearray(600 * 1024 * 1024)\nx[::4096] = b'1' * len(x[::4096])")
            if r.outcome is Outcome.ERROR:
                assert r.error is not None and r.error.name == "MemoryError"
            else:
                assert r.outcome is Outcome.CRASHED, r
                assert "memory" in r.message
            assert _run(sb, "print('after')").stdout == "after\n"

    def test_pids_limit(self, open_box: OpenBox, supports_pids_limit: bool) -> None:
        if not supports_pids_limit:
            pytest.skip("this backend declares no pids limit")
        with open_box(limits=Limits(pids=32)) as sb:
            code = (
                "import threading, time\nstarted = 0\nerr = None\nev = threading.Event()\n"
                "try:\n    for i in range(200):\n"
                "        threading.Thread(target=ev.wait, daemon=True).start()\n        started += 1\n"
                "except RuntimeError as e:\n    err = str(e)\nev.set()\n"
            )
            _run(sb, code)
            assert sb.get_variable("started") < 32
            assert sb.get_variable("err")


class LifecycleContract(SandboxFixtures):
    def test_close_is_idempotent(self, open_box: OpenBox) -> None:
        sb = open_box()
        _run(sb, "x = 1")
        sb.close()
        sb.close()
        assert sb.closed
        with pytest.raises(SandboxClosed):
            sb.execute("x")
        with pytest.raises(SandboxError):
            sb.get_variable("x")

    def test_close_does_not_wait_for_a_running_cell(self, open_box: OpenBox) -> None:
        sb = open_box(limits=Limits(exec_timeout_s=60))
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                sb.execute("while True:\n    pass")
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - asserted below
                outcome.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.5)
        start = time.monotonic()
        sb.close()
        worker.join(30)
        assert time.monotonic() - start < 15
        assert not worker.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], SandboxClosed)

    def test_reset_forgets_everything(self, sandbox: Sandbox) -> None:
        sandbox.load_context("old")
        sandbox.write_file("old.txt", b"old")
        _run(sandbox, "x = 1")
        _run(sandbox, "import tempfile\nopen(tempfile.gettempdir() + '/old-tmp.txt', 'w').write('x')")
        sandbox.reset()
        r = _run(sandbox, "import os\nprint('x' in globals(), 'context' in globals(), os.path.exists('old.txt'))")
        assert r.stdout == "False False False\n"
        r = _run(sandbox, "import os, tempfile\nprint(os.path.exists(tempfile.gettempdir() + '/old-tmp.txt'))")
        assert r.stdout == "False\n"
        assert sandbox.load_context("new") == "context_0"


class SandboxContract(
    ExecutionContract,
    TimeoutContract,
    OutputContract,
    ContextContract,
    FileContract,
    HostFunctionContract,
    IsolationContract,
    LifecycleContract,
):
    """Every contract at once."""
