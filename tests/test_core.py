"""Core pieces: registry, public surface, frames, the runtime's portability."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

import rlm_sandbox as rs
from rlm_sandbox import runtime as rt


def test_public_surface_is_sorted_and_complete() -> None:
    assert rs.__all__ == sorted(rs.__all__)
    for name in rs.__all__:
        assert hasattr(rs, name), name
    public = {n for n in dir(rs) if not n.startswith("_") and n not in {"backends", "runtime", "annotations"}}
    modules = {n for n in public if type(getattr(rs, n)).__name__ == "module"}
    assert public - modules <= set(rs.__all__)


def test_errors_inherit_builtins() -> None:
    assert issubclass(rs.SandboxTimeout, TimeoutError)
    assert issubclass(rs.SandboxFileNotFound, FileNotFoundError)
    assert issubclass(rs.BackendNotFound, LookupError)
    assert issubclass(rs.LimitNotSupported, NotImplementedError)
    for name in rs.__all__:
        obj = getattr(rs, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, Exception)
            and obj is not rs.SandboxError
            and obj.__module__.startswith("rlm_sandbox._errors")
        ):
            assert issubclass(obj, rs.SandboxError), name


def test_unknown_backend_lists_installed_and_hints() -> None:
    with pytest.raises(rs.BackendNotFound) as info:
        rs.open_sandbox("nosuch")
    assert "local" in str(info.value)
    with pytest.raises(LookupError):
        rs.backend_config("nosuch")


def test_known_uninstalled_backend_gets_pip_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    from rlm_sandbox import _registry

    monkeypatch.setattr(_registry, "_entry_points", {})
    monkeypatch.setattr(_registry, "_registry", {})
    monkeypatch.setattr(_registry, "_scanned", True)
    with pytest.raises(rs.BackendNotFound, match=r'pip install "rlm-sandbox\[e2b\]"'):
        rs.backend_config("e2b")


def test_local_is_registered_through_its_entry_point() -> None:
    import importlib.metadata

    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="rlm_sandbox.backends")}
    assert eps["local"] == "rlm_sandbox.backends.local:LocalConfig"
    assert rs.backend_config("local") is rs.LocalConfig


def test_register_backend_refuses_silent_overwrite() -> None:
    class Other(rs.LocalConfig):
        pass

    rs.register_backend("other-local", Other)
    try:
        with pytest.raises(rs.ConfigError):
            rs.register_backend("other-local", rs.LocalConfig)
        rs.register_backend("other-local", rs.LocalConfig, replace=True)
        assert rs.backend_config("other-local") is rs.LocalConfig
    finally:
        from rlm_sandbox import _registry

        _registry._registry.pop("other-local", None)


def test_configs_forbid_unknown_options() -> None:
    with pytest.raises(rs.ConfigError, match="no_such_option"):
        rs.open_sandbox("local", no_such_option=1)
    with pytest.raises(ValueError):
        rs.Limits(memory_mb=-1)
    with pytest.raises(ValueError):
        rs.Limits(unknown=1)  # type: ignore[call-arg]


def test_unenforceable_limit_raises_unless_best_effort() -> None:
    with pytest.raises(rs.LimitNotSupported, match="disk_mb"):
        rs.open_sandbox("local", limits=rs.Limits(disk_mb=100))
    with rs.open_sandbox("local", limits=rs.Limits(disk_mb=100, best_effort=True)) as sb:
        assert "disk_mb" in sb.unenforced_limits
        assert sb.execute("print(1)").stdout == "1\n"


def test_fractional_cpus_locally() -> None:
    with pytest.raises(rs.LimitNotSupported, match="cpus"):
        rs.open_sandbox("local", limits=rs.Limits(cpus=0.5))
    with rs.open_sandbox("local", limits=rs.Limits(cpus=1)) as sb:
        r = sb.execute("import os\nprint(len(os.sched_getaffinity(0)))")
        assert r.stdout == "1\n"


def test_frames_reject_garbage_at_once() -> None:
    reader = rt.FrameReader(max_message=1024)
    with pytest.raises(rt.ProtocolError, match="magic"):
        reader.feed(b"garbage!")
    reader = rt.FrameReader(max_message=1024)
    with pytest.raises(rt.ProtocolError, match="exceeds"):
        reader.feed(rt.HEADER.pack(rt.MAGIC, rt.T_JSON, 1 << 31))
    reader = rt.FrameReader(max_message=1024)
    with pytest.raises(rt.ProtocolError, match="type"):
        reader.feed(rt.HEADER.pack(rt.MAGIC, 0x01, 3) + b"abc")


def test_frames_split_anywhere_and_text_mode() -> None:
    frames = rt.message({"op": "a", "x": "\u00e9"}) + rt.data_frame(7, b"\x00\xff" * 1000) + rt.message({"op": "b"})
    for text_mode in (False, True):
        raw = frames
        if text_mode:
            raw = (
                rt.message({"op": "a", "x": "\u00e9"}, True)
                + rt.data_frame(7, b"\x00\xff" * 1000, True)
                + rt.message({"op": "b"}, True)
            )
        reader = rt.FrameReader(text_mode=text_mode)
        out = []
        for i in range(0, len(raw), 3):
            out += reader.feed(raw[i : i + 3])
        assert [k for k, _ in out] == [rt.T_JSON, rt.T_DATA, rt.T_JSON]
        assert rt.parse_message(out[0][1]) == {"op": "a", "x": "\u00e9"}
        assert rt.split_data(out[1][1]) == (7, b"\x00\xff" * 1000)


def test_values_codec() -> None:
    value = {"a": [1, 2.5, None, True, "s", b"\x00"], "t": (1, 2)}
    assert rt.decode_value(rt.encode_value(value)) == {"a": [1, 2.5, None, True, "s", b"\x00"], "t": [1, 2]}
    with pytest.raises(TypeError):
        rt.encode_value({1: 2})
    with pytest.raises(TypeError):
        rt.encode_value(object())


def test_runtime_is_stdlib_only_and_python38_syntax() -> None:
    src = Path(rt.__file__).read_text()
    tree = ast.parse(src, feature_version=(3, 8))
    import sys

    allowed = set(sys.stdlib_module_names) | {"__future__"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            continue
        for name in names:
            assert name in allowed, f"runtime imports non-stdlib {name}"


def test_bootstrap_is_small_and_binary_safe() -> None:
    assert len(rt.BOOTSTRAP) < 600
    assert "\x00" not in rt.BOOTSTRAP


def test_open_by_config_object() -> None:
    cfg = rs.LocalConfig(env={"GREETING": "hi"})
    opener = functools.partial(rs.open_sandbox, cfg)
    with opener() as sb:
        assert sb.execute("import os\nprint(os.environ['GREETING'])").stdout == "hi\n"
    with pytest.raises(rs.ConfigError):
        rs.open_sandbox(cfg, python="x")


def test_env_passthrough_is_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_VAR", "yes")
    monkeypatch.setenv("OTHER_SECRET", "no")
    with rs.open_sandbox("local", env_passthrough=("ALLOWED_VAR",)) as sb:
        r = sb.execute("import os\nprint(os.environ.get('ALLOWED_VAR'), os.environ.get('OTHER_SECRET'))")
        assert r.stdout == "yes None\n"


def test_echo_mode_prints_last_expression() -> None:
    with rs.open_sandbox("local") as sb:
        assert sb.execute("1 + 1").stdout == ""
        assert isinstance(sb, rs.RuntimeSandbox)
        assert sb.execute("x = 2\nx * 21", echo=True).stdout == "42\n"


def test_cli_exec_and_backends(capsys: pytest.CaptureFixture[str]) -> None:
    from rlm_sandbox.cli import main

    assert main(["exec", "-c", "print(6 * 7)"]) == 0
    assert capsys.readouterr().out == "42\n"
    assert main(["exec", "-c", "1/0"]) == 1
    assert "ZeroDivisionError" in capsys.readouterr().err
    assert main(["backends"]) == 0
    assert "local" in capsys.readouterr().out


class _SendSourceConfig(rs.LocalConfig):
    """The local backend, but the runtime's source goes over the channel (as for bare images)."""

    def create_box(self, limits: rs.Limits) -> rs.Box:
        box = super().create_box(limits)
        box.baked_runtime = None
        return box


def test_runtime_source_sent_over_the_channel() -> None:
    with rs.open_sandbox(_SendSourceConfig(), functions={"twice": lambda x: 2 * x}) as sb:
        assert sb.box.baked_runtime is None  # type: ignore[attr-defined]
        sb.load_context("ctx")
        r = sb.execute("print(twice(21), context)")
        assert r.stdout == "42 ctx\n"
        assert sb.execute("import os\nos._exit(1)").outcome is rs.Outcome.CRASHED
        assert sb.execute("print(context)").stdout == "ctx\n"


def test_local_gc_removes_what_a_killed_host_left(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = (
        "import rlm_sandbox as rs, sys\n"
        f"sb = rs.open_sandbox('local', root={str(tmp_path)!r})\n"
        "sb.execute('x = 1')\nprint('ready', flush=True)\nimport time\ntime.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        live = rs.LocalConfig(root=str(tmp_path))
        assert live.gc(dry_run=True) == []  # its owner is alive
        proc.kill()
        proc.wait()
    left = list(tmp_path.glob("rlm-sandbox-*"))
    assert len(left) == 1
    assert len(rs.LocalConfig(root=str(tmp_path)).gc(dry_run=True)) == 1
    assert len(rs.LocalConfig(root=str(tmp_path)).gc()) == 1
    assert list(tmp_path.glob("rlm-sandbox-*")) == []


def test_reset_keeps_tmpdir_usable() -> None:
    with rs.open_sandbox("local") as sb:
        sb.execute("import tempfile\nopen(tempfile.gettempdir() + '/old', 'w').write('x')")
        sb.reset()
        r = sb.execute(
            "import os, tempfile\nd = tempfile.gettempdir()\nprint(d == os.environ['TMPDIR'], os.listdir(d))"
        )
        assert r.stdout == "True []\n"


def test_sigterm_closes_sandboxes_opened_in_worker_threads(tmp_path: Path) -> None:
    """Like `rlm-sandbox run`: the main thread builds a pool, a worker thread runs a busy cell."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import threading, time, rlm_sandbox as rs\n"
        "pool = rs.SandboxPool(min_idle=0)\n"
        "def work():\n"
        f"    sb = rs.open_sandbox('local', root={str(tmp_path)!r})\n"
        "    print('ready', flush=True)\n"
        "    sb.execute('while True:\\n    pass')\n"
        "threading.Thread(target=work, daemon=True).start()\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert len(list(tmp_path.glob("rlm-sandbox-*"))) == 1
        time.sleep(0.3)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == -signal.SIGTERM
        assert time.monotonic() - start < 10  # not the cell's 600 s timeout
    assert list(tmp_path.glob("rlm-sandbox-*")) == []


def test_queued_host_call_bytes_are_bounded() -> None:
    """Eight 1 MiB calls wait on the host while the bound is 3 MiB: the rest are refused at once."""
    import threading as th

    gate = th.Event()

    def slow(data: str) -> int:
        gate.wait(10)
        return len(data)

    code = (
        "from concurrent.futures import ThreadPoolExecutor\n"
        "import time\n"
        "def one(i):\n"
        "    try:\n"
        "        return slow('x' * (1 << 20))\n"
        "    except RuntimeError as e:\n"
        "        return str(e)\n"
        "with ThreadPoolExecutor(8) as ex:\n"
        "    futs = [ex.submit(one, i) for i in range(8)]\n"
        "    time.sleep(1.0)\n"
        "    release()\n"
        "    out = [f.result() for f in futs]\n"
    )
    functions = {"slow": slow, "release": gate.set}
    with rs.open_sandbox("local", functions=functions, max_pending_call_bytes=3 << 20) as sb:
        r = sb.execute(code, timeout_s=60)
        assert r.ok, r
        out = sb.get_variable("out")
        refused = [o for o in out if isinstance(o, str)]
        served = [o for o in out if o == 1 << 20]
        assert refused and all("pending" in o for o in refused)
        assert 1 <= len(served) <= 3


def test_the_repl_dies_with_its_supervisor() -> None:
    """SIGKILL of the supervisor alone (not its tree) must not leave a spinning REPL behind."""
    import os
    import signal
    import threading as th
    import time

    sb = rs.open_sandbox("local", limits=rs.Limits(exec_timeout_s=60))
    try:
        supervisor = sb.box._proc.pid  # type: ignore[attr-defined]
        worker = int(Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()[0])
        runner = th.Thread(target=lambda: sb.execute("while True:\n    pass"), daemon=True)
        runner.start()
        time.sleep(0.3)
        os.kill(supervisor, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
            stat = Path(f"/proc/{worker}/stat").read_text() if Path(f"/proc/{worker}").exists() else ""
            if stat and stat[stat.rindex(")") + 2] == "Z":
                break
            time.sleep(0.05)
        alive = Path(f"/proc/{worker}").exists() and Path(f"/proc/{worker}/stat").read_text().split(") ")[1][0] != "Z"
        assert not alive
        runner.join(10)
    finally:
        sb.close()
