"""The in-sandbox runtime: one stdlib-only file, Python 3.8 or newer.

It is the only code rlm_sandbox runs inside a box, on every backend. The host starts it with
``python3 -u -c BOOTSTRAP`` and sends this file's source over stdin, so any machine or image with
``python3`` works; the host also imports it for the framing code, so both ends share one source.

Two processes run in the box:

* the **supervisor** owns the channel (its stdin/stdout). It never runs user code. It enforces
  timeouts (SIGINT, then a kill of the whole process tree after a grace period), captures and bounds
  the worker's output, stores contexts and files, reaps orphans (it is a child subreaper), and
  restarts the worker after a kill or a crash. It is marked non-dumpable, so user code cannot reach
  its file descriptors through ``/proc``.
* the **worker** is forked from the supervisor for each runtime generation. It runs the cells in a
  persistent namespace. Its fd 1 and 2 are capture pipes read by the supervisor, so ``print``,
  ``os.write(1, ...)``, subprocesses and C code can never write into the channel.

Frames: ``MAGIC (2 bytes) | type (1 byte) | length (4 bytes, big-endian) | payload``. Type ``J`` is a
JSON message, type ``D`` is a data chunk whose payload starts with a 4-byte transfer id. Every frame
is validated on arrival: a wrong magic or an oversized length is a protocol error at once, never a
wait for bytes that will not come. In text mode (for channels that are not binary-safe) every frame
is base64-encoded on its own line in both directions.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import errno
import io
import itertools
import json
import linecache
import os
import select
import shutil
import signal
import stat
import struct
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple, Union

PROTOCOL_VERSION = 1
MAGIC = b"\xb5R"
HEADER = struct.Struct(">2sBI")
HEADER_SIZE = HEADER.size
T_JSON = 0x4A  # "J"
T_DATA = 0x44  # "D"
DATA_ID = struct.Struct(">I")
#: Largest data chunk either side sends; the receiver accepts a little more (the id prefix).
CHUNK = 1 << 20
#: Default bound on one JSON frame (the host may configure a different one).
DEFAULT_MAX_MESSAGE = 64 << 20
BYTES_KEY = "__rlm_bytes__"

#: What the host runs in the box: read one header line ``<length> <mode>``, then exactly
#: ``length`` bytes of this file's source, then run it. Nothing is buffered past the source, so
#: the runtime reads the rest of stdin itself.
BOOTSTRAP = (
    "import os\n"
    "h=b''\n"
    "while not h.endswith(b'\\n'):\n"
    " c=os.read(0,1)\n"
    " if not c:raise SystemExit(3)\n"
    " h+=c\n"
    "n,m=h.split()\n"
    "n=int(n);s=b''\n"
    "while len(s)<n:\n"
    " c=os.read(0,n-len(s))\n"
    " if not c:raise SystemExit(3)\n"
    " s+=c\n"
    "g={'__name__':'__rlm_runtime__','__file__':'rlm_runtime'}\n"
    "exec(compile(s,'rlm_runtime','exec'),g)\n"
    "g['main'](m.decode())\n"
)


#: What the host runs when the box already holds an identical copy of this file (``%r`` is its
#: path, then the mode): imported as a module, so a precompiled ``.pyc`` next to it is used.
LOAD_BAKED = (
    "import importlib.util as u\n"
    "s=u.spec_from_file_location('rlm_runtime',%r)\n"
    "m=u.module_from_spec(s)\n"
    "s.loader.exec_module(m)\n"
    "m.main(%r)\n"
)


class ProtocolError(Exception):
    """The byte stream does not follow the protocol (bad magic, oversized frame, bad JSON)."""


# --------------------------------------------------------------------------------------------
# Values: JSON plus bytes. Never pickle: the host must not unpickle what a sandbox sends.


def _enc(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {BYTES_KEY: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError("dict keys must be str, not %s" % type(k).__name__)
            out[k] = _enc(v)
        return out
    if isinstance(value, (list, tuple)):
        return [_enc(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError("a value of type %s cannot cross the sandbox boundary" % type(value).__name__)


def encode_value(value: Any) -> Any:
    """Turn a value into a JSON-ready structure (str, numbers, bools, None, lists, dicts, bytes)."""
    return _enc(value)


def decode_value(value: Any) -> Any:
    """Inverse of :func:`encode_value`."""
    if isinstance(value, dict):
        if len(value) == 1 and BYTES_KEY in value:
            data = value[BYTES_KEY]
            if not isinstance(data, str):
                raise ProtocolError("bad bytes value")
            try:
                return base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ProtocolError("bad bytes value") from exc
        return {k: decode_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Frames


def frame(kind: int, payload: bytes, text_mode: bool = False) -> bytes:
    """Encode one frame."""
    raw = HEADER.pack(MAGIC, kind, len(payload)) + payload
    if text_mode:
        return base64.b64encode(raw) + b"\n"
    return raw


def message(msg: Dict[str, Any], text_mode: bool = False) -> bytes:
    """Encode one JSON message frame."""
    return frame(T_JSON, json.dumps(msg, separators=(",", ":")).encode("utf-8"), text_mode)


def data_frame(transfer_id: int, chunk: bytes, text_mode: bool = False) -> bytes:
    """Encode one data chunk of a transfer."""
    return frame(T_DATA, DATA_ID.pack(transfer_id) + chunk, text_mode)


class FrameReader:
    """Incremental, validating frame parser. ``feed`` returns complete frames as (type, payload)."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE, text_mode: bool = False) -> None:
        self.max_message = max_message
        self.text_mode = text_mode
        self._buf = bytearray()
        self._pos = 0
        self._lines = bytearray()

    def feed(self, data: bytes) -> List[Tuple[int, bytes]]:
        if self.text_mode:
            return self._feed_text(data)
        buf = self._buf
        buf += data
        out = []
        pos = self._pos
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            magic, kind, length = HEADER.unpack_from(buf, pos)
            if magic != MAGIC:
                raise ProtocolError("bad frame magic %r" % bytes(buf[pos : pos + 2]))
            if kind == T_JSON:
                limit = self.max_message
            elif kind == T_DATA:
                limit = CHUNK + DATA_ID.size
            else:
                raise ProtocolError("unknown frame type %r" % kind)
            if length > limit:
                raise ProtocolError("frame of %d bytes exceeds the limit of %d" % (length, limit))
            if end - pos - HEADER_SIZE < length:
                break
            start = pos + HEADER_SIZE
            out.append((kind, bytes(buf[start : start + length])))
            pos = start + length
        if pos == end:
            del buf[:]
            pos = 0
        elif pos > (1 << 20) and pos > end // 2:
            del buf[:pos]
            pos = 0
        self._pos = pos
        return out

    def _feed_text(self, data: bytes) -> List[Tuple[int, bytes]]:
        self._lines += data
        out: List[Tuple[int, bytes]] = []
        limit = 4 * (max(self.max_message, CHUNK + DATA_ID.size) + HEADER_SIZE) // 3 + 8
        while True:
            nl = self._lines.find(b"\n")
            if nl < 0:
                if len(self._lines) > limit:
                    raise ProtocolError("text frame line exceeds the limit")
                return out
            line = bytes(self._lines[:nl]).strip()
            del self._lines[: nl + 1]
            if not line:
                continue
            try:
                raw = base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ProtocolError("bad base64 frame line") from exc
            saved_mode, self.text_mode = self.text_mode, False
            try:
                frames = self.feed(raw)
                if self._pos != len(self._buf):
                    raise ProtocolError("truncated frame in a text line")
            finally:
                self.text_mode = saved_mode
            out.extend(frames)


def parse_message(payload: bytes) -> Dict[str, Any]:
    """Decode a JSON frame payload into a dict with a string ``op``."""
    try:
        msg = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("bad JSON message") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("message without an op")
    return msg


def split_data(payload: bytes) -> Tuple[int, bytes]:
    """Split a data frame payload into (transfer id, chunk)."""
    if len(payload) < DATA_ID.size:
        raise ProtocolError("short data frame")
    return DATA_ID.unpack_from(payload)[0], payload[DATA_ID.size :]


# --------------------------------------------------------------------------------------------
# Small OS helpers (Linux features are optional: each returns an error string or None)


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> Optional[str]:
    try:
        import ctypes

        libc = _libc()
        if libc.prctl(option, arg, 0, 0, 0) != 0:
            return os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        return str(exc)
    return None


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _unshare_network() -> Optional[str]:
    """Move this process into a new network namespace with only loopback (brought up)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    try:
        import ctypes

        libc = _libc()
    except (OSError, AttributeError) as exc:
        return str(exc)
    clone_newnet, clone_newuser = 0x40000000, 0x10000000
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(clone_newnet) != 0:
        first = os.strerror(ctypes.get_errno())
        if libc.unshare(clone_newuser | clone_newnet) != 0:
            return "unshare(CLONE_NEWNET) failed (%s); with a user namespace too: %s" % (
                first,
                os.strerror(ctypes.get_errno()),
            )
        try:
            _write_text("/proc/self/setgroups", "deny")
            _write_text("/proc/self/uid_map", "%d %d 1" % (uid, uid))
            _write_text("/proc/self/gid_map", "%d %d 1" % (gid, gid))
        except OSError as exc:
            return "user namespace id maps: %s" % exc
    _loopback_up()
    return None


def _loopback_up() -> None:
    try:
        import fcntl
        import socket

        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
            req = struct.pack("16sH14s", b"lo", 0, b"")
            flags = struct.unpack("16sH14s", fcntl.ioctl(s.fileno(), siocgifflags, req))[1]
            fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sH14s", b"lo", flags | iff_up, b""))
        finally:
            s.close()
    except OSError:
        pass


def _children_map(live_only: bool = False) -> Dict[int, List[int]]:
    """ppid -> children from /proc (``live_only``: leave zombies out, but walk through them)."""
    kids: Dict[int, List[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return kids
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        try:
            fields = stat[stat.rindex(b")") + 2 :].split()
            ppid = int(fields[1])
        except (ValueError, IndexError):
            continue
        pid = int(name)
        if live_only and fields[0] in (b"Z", b"X"):
            pid = -pid  # a zombie: not alive, but its pid may still parent live processes
        kids.setdefault(ppid, []).append(pid)
    return kids


def _descendants(pid: int, live_only: bool = False) -> List[int]:
    kids = _children_map(live_only)
    out: List[int] = []
    todo = [pid]
    while todo:
        for child in kids.get(todo.pop(), ()):
            if child > 0:
                out.append(child)
            todo.append(abs(child))
    return out


def _user_tasks() -> int:
    """Tasks (processes and threads) of this uid, as RLIMIT_NPROC counts them."""
    uid = os.getuid()
    count = 0
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not name.isdigit():
            continue
        try:
            st = os.stat("/proc/" + name)
            if st.st_uid == uid:
                count += len(os.listdir("/proc/%s/task" % name))
        except OSError:
            continue
    return count


def _oom_kills() -> Optional[int]:
    """The box's cgroup OOM-kill counter (v2 memory.events or v1 memory.oom_control)."""
    for path, key in (
        ("/sys/fs/cgroup/memory.events", "oom_kill"),
        ("/sys/fs/cgroup/memory/memory.oom_control", "oom_kill"),
    ):
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 2 and parts[0] == key:
                        return int(parts[1])
        except (OSError, ValueError):
            continue
    return None


def _signal(pid: int, sig: int, group: bool = False) -> None:
    """Send a signal to a process (or its group) that may already be gone."""
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except OSError:
        pass


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return "killed by signal %d (%s)" % (sig, name)
    if os.WIFEXITED(status):
        return "exited with status %d" % os.WEXITSTATUS(status)
    return "ended (status %d)" % status


class OutputBuffer:
    """Keeps the first and last ``limit // 2`` bytes of a stream and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = max(limit, 0)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        half = self.limit // 2
        room = half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            keep = self.limit - half
            if len(self.tail) > 2 * keep + CHUNK:
                del self.tail[: len(self.tail) - keep]

    def take(self) -> Tuple[str, bool]:
        keep = self.limit - self.limit // 2
        tail = bytes(self.tail[-keep:]) if keep else b""
        kept = len(self.head) + len(tail)
        truncated = self.total > kept
        if truncated:
            marker = "\n... [%d bytes truncated] ...\n" % (self.total - kept)
            text = _decode(bytes(self.head)) + marker + _decode(tail)
        else:
            text = _decode(bytes(self.head) + tail)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        return text, truncated


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "replace")


class ReadBuffer:
    """Reads from a file descriptor into one reused buffer: no allocation (and, for large
    sizes, no mmap/munmap and fresh page faults) per read."""

    def __init__(self, size: int = 1 << 18) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)

    def read(self, fd: int) -> bytes:
        n = os.readv(fd, [self.buf])
        return self.view[:n].tobytes()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _resolve(base: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base, path)


# --------------------------------------------------------------------------------------------
# The worker: runs cells in a persistent namespace.


class _Interrupts:
    """SIGINT becomes KeyboardInterrupt only while a cell runs, and never in the middle of
    reading or writing a frame on the worker's link (it is deferred to the end of that step)."""

    def __init__(self) -> None:
        self.in_cell = False
        self.critical = 0
        self.pending = False
        self.main = threading.main_thread()

    def handler(self, signum: int, frame: Any) -> None:
        if not self.in_cell:
            return
        if self.critical:
            self.pending = True
            return
        raise KeyboardInterrupt

    def enter(self) -> None:
        if threading.current_thread() is self.main:
            self.critical += 1

    def leave(self) -> None:
        if threading.current_thread() is self.main:
            self.critical -= 1

    def check(self) -> None:
        if self.pending and not self.critical and threading.current_thread() is self.main:
            self.pending = False
            if self.in_cell:
                raise KeyboardInterrupt


class HostFunctionError(Exception):
    """A host function raised an exception that is not a Python builtin exception."""


class _Link:
    """The worker's end of its pipes to the supervisor. Any thread may send; whichever thread
    is waiting reads (leader/follower), so no extra thread or hand-off sits on the hot path."""

    def __init__(self, rfd: int, wfd: int, interrupts: _Interrupts) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.intr = interrupts
        self.reader = FrameReader(max_message=1 << 40)
        self.cond = threading.Condition(threading.Lock())
        self.wlock = threading.Lock()
        self.reading = False
        self.results: Dict[int, Dict[str, Any]] = {}
        self.abandoned: Set[int] = set()
        self.commands: Deque[Dict[str, Any]] = deque()
        self.ids = itertools.count(1)
        self.rbuf = ReadBuffer()
        self.pid = os.getpid()

    def send(self, msg: Dict[str, Any]) -> None:
        data = message(msg)
        self.intr.enter()
        try:
            with self.wlock:
                _write_all(self.wfd, data)
        finally:
            self.intr.leave()
        self.intr.check()

    def _dispatch(self, kind: int, payload: bytes) -> None:
        if kind != T_JSON:
            return
        msg = parse_message(payload)
        if msg["op"] == "call_result":
            cid = msg.get("id")
            if cid in self.abandoned:
                self.abandoned.discard(cid)
            elif isinstance(cid, int):
                self.results[cid] = msg
        else:
            self.commands.append(msg)

    def wait(self, ready: Callable[[], Any]) -> Any:
        cond = self.cond
        cond.acquire()
        try:
            while True:
                value = ready()
                if value is not None:
                    return value
                if self.reading:
                    cond.wait()
                    continue
                self.reading = True
                cond.release()
                try:
                    select.select([self.rfd], [], [])
                    self.intr.enter()
                    try:
                        data = self.rbuf.read(self.rfd)
                        if not data:
                            os._exit(70)
                        frames = self.reader.feed(data)
                    finally:
                        self.intr.leave()
                finally:
                    cond.acquire()
                    self.reading = False
                    cond.notify_all()
                for kind, payload in frames:
                    self._dispatch(kind, payload)
                cond.release()
                try:
                    self.intr.check()
                finally:
                    cond.acquire()
        finally:
            cond.release()

    def call(self, name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if os.getpid() != self.pid:
            # A child forked by user code shares the REPL's pipes: its frames would interleave with
            # the REPL's and answers would reach the wrong process.
            raise RuntimeError("host functions cannot be called from a forked child process; call them from the REPL")
        cid = next(self.ids)
        msg = {"op": "call", "id": cid, "name": name, "args": _enc(list(args)), "kwargs": _enc(kwargs)}
        try:
            self.send(msg)
            reply = self.wait(lambda: self.results.pop(cid, None))
        except BaseException:
            with self.cond:
                if self.results.pop(cid, None) is None:
                    self.abandoned.add(cid)
            raise
        if reply.get("ok"):
            return decode_value(reply.get("value"))
        err = reply.get("error") or {}
        name_ = str(err.get("name", "Exception"))
        text = str(err.get("message", ""))
        cls = getattr(builtins, name_, None)
        if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == "builtins":
            try:
                raise cls(text)
            except TypeError:
                pass
        raise HostFunctionError("%s: %s" % (name_, text) if text else name_)


class Worker:
    def __init__(self, config: Dict[str, Any], rfd: int, wfd: int) -> None:
        self.config = config
        self.intr = _Interrupts()
        self.link = _Link(rfd, wfd, self.intr)
        self.ns: Dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        self.functions: Dict[str, Callable[..., Any]] = {}
        self.cells = 0

    def make_function(self, name: str) -> Callable[..., Any]:
        link = self.link

        def host_function(*args: Any, **kwargs: Any) -> Any:
            return link.call(name, args, kwargs)

        host_function.__name__ = host_function.__qualname__ = name
        host_function.__doc__ = "Calls the host function %r." % name
        return host_function

    def setup(self) -> Dict[str, str]:
        failed: Dict[str, str] = {}
        cfg = self.config
        signal.signal(signal.SIGINT, self.intr.handler)
        # Forked from the non-dumpable supervisor: become dumpable again (the REPL is the user's
        # own process), which also makes /proc/self/oom_score_adj ours to write. Raising it makes
        # the kernel's OOM killer pick the user's code, never the supervisor.
        _prctl(4, 1)
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass  # no /proc (macOS): nothing to adjust
        cgroup = cfg.get("cgroup_procs")
        if cgroup:
            try:
                _write_text(cgroup, str(os.getpid()))
            except OSError as exc:
                failed["pids"] = "cannot join the pids cgroup: %s" % exc
        try:
            import resource
        except ImportError:
            resource = None  # type: ignore[assignment]
        for key, which in (
            ("memory_bytes", "RLIMIT_AS"),
            ("file_size_bytes", "RLIMIT_FSIZE"),
            ("cpu_time_s", "RLIMIT_CPU"),
            ("nproc", "RLIMIT_NPROC"),
        ):
            value = cfg.get("rlimits", {}).get(key)
            if value is None:
                continue
            try:
                if resource is None:
                    raise OSError("no resource module")
                lim = getattr(resource, which)
                resource.setrlimit(lim, (int(value), int(value)))
            except (OSError, ValueError, AttributeError) as exc:
                failed[key] = "setrlimit(%s): %s" % (which, exc)
        cpus = cfg.get("affinity")
        if cpus:
            try:
                os.sched_setaffinity(0, cpus)
            except (OSError, AttributeError) as exc:
                failed["cpus"] = "sched_setaffinity: %s" % exc
        if cfg.get("tmpdir"):
            os.environ["TMPDIR"] = cfg["tmpdir"]
        workdir = cfg["workdir"]
        os.chdir(workdir)
        if workdir not in sys.path:
            sys.path.insert(0, workdir)
        sys.argv = [""]
        for name in cfg.get("functions", []):
            fn = self.make_function(name)
            self.functions[name] = fn
        self.ns.update(self.functions)
        self.ns["HostFunctionError"] = HostFunctionError
        return failed

    def load_contexts(self) -> None:
        for ctx in self.config.get("contexts", []):
            try:
                self.load_one(ctx)
            except Exception as exc:  # noqa: BLE001 - a context file deleted by user code
                sys.stderr.write("rlm-sandbox: cannot reload context %s: %s\n" % (ctx["name"], exc))

    def load_one(self, ctx: Dict[str, Any]) -> None:
        kind = ctx["kind"]
        value: Any
        with open(ctx["path"], "rb") as f:
            if kind == "bytes":
                value = f.read()
            else:
                # Decode straight from the page cache: no intermediate bytes copy.
                import mmap

                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    text = ""
                else:
                    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                        text = str(mm, "utf-8")
                value = text if kind == "str" else json.loads(text)
                del text
        self.ns[ctx["name"]] = value
        for alias in ctx.get("aliases", []):
            self.ns[alias] = value

    def run(self) -> None:
        failed = self.setup()
        self.link.send({"op": "ready", "pid": os.getpid(), "failed": failed})
        self.load_contexts()
        while True:
            msg = self.link.wait(lambda: self.link.commands.popleft() if self.link.commands else None)
            op = msg["op"]
            try:
                if op == "exec":
                    self.do_exec(msg)
                elif op == "get_var":
                    self.do_get_var(msg)
                elif op == "set_var":
                    self.ns[msg["name"]] = decode_value(msg.get("value"))
                    self.link.send({"op": "done", "id": msg["id"]})
                elif op == "list_vars":
                    self.do_list_vars(msg)
                elif op == "load_context":
                    self.load_one(msg["context"])
                    self.link.send({"op": "done", "id": msg["id"]})
                elif op == "ping":
                    self.link.send({"op": "pong", "id": msg.get("id")})
                elif op == "reap":
                    for pid in msg.get("pids", []):
                        try:
                            os.waitpid(int(pid), 0)
                        except (ChildProcessError, OSError, ValueError):
                            pass
            except KeyboardInterrupt:
                self.link.send({"op": "error", "id": msg.get("id"), "kind": "interrupted"})
            except Exception as exc:  # noqa: BLE001 - the op fails, the REPL lives on
                self.link.send(
                    {"op": "error", "id": msg.get("id"), "kind": "failed", "message": repr(exc)}
                )

    def do_get_var(self, msg: Dict[str, Any]) -> None:
        name = msg["name"]
        if name not in self.ns:
            self.link.send({"op": "error", "id": msg["id"], "kind": "name", "message": name})
            return
        try:
            value = _enc(self.ns[name])
        except TypeError as exc:
            self.link.send({"op": "error", "id": msg["id"], "kind": "type", "message": str(exc)})
            return
        self.link.send({"op": "value", "id": msg["id"], "value": value})

    def do_list_vars(self, msg: Dict[str, Any]) -> None:
        import types

        out = {}
        for k, v in self.ns.items():
            if k.startswith("_") or k in self.functions or k == "HostFunctionError":
                continue
            if isinstance(v, types.ModuleType):
                continue
            out[k] = type(v).__name__
        self.link.send({"op": "value", "id": msg["id"], "value": out})

    def do_exec(self, msg: Dict[str, Any]) -> None:
        self.cells += 1
        filename = "<cell-%d>" % self.cells
        code = msg["code"]
        start = time.perf_counter()
        outcome = "ok"
        error = None
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        try:
            compiled, last = self.compile(code, filename, bool(msg.get("echo")))
        except (SyntaxError, ValueError, OverflowError) as exc:
            compiled, last = None, None
            outcome = "error"
            error = {
                "name": type(exc).__name__,
                "message": str(exc),
                "traceback": "".join(traceback.format_exception_only(type(exc), exc)),
            }
        if compiled is not None:
            intr = self.intr
            try:
                intr.in_cell = True
                try:
                    exec(compiled, self.ns)
                    if last is not None:
                        value = eval(last, self.ns)
                        if value is not None:
                            print(repr(value))
                finally:
                    intr.in_cell = False
                    intr.pending = False
            except KeyboardInterrupt:
                outcome = "interrupted"
                error = self.describe(sys.exc_info())
            except BaseException:  # noqa: BLE001 - the worker must never die of its own error handling
                outcome = "error"
                error = self.describe(sys.exc_info())
        for name, fn in self.functions.items():
            self.ns[name] = fn
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        self.link.send(
            {
                "op": "result",
                "id": msg["id"],
                "outcome": outcome,
                "error": error,
                "duration": time.perf_counter() - start,
            }
        )

    @staticmethod
    def compile(code: str, filename: str, echo: bool) -> Tuple[Any, Any]:
        if not echo:
            return compile(code, filename, "exec"), None
        import ast

        tree = ast.parse(code, filename, "exec")
        tail = tree.body[-1] if tree.body else None
        if isinstance(tail, ast.Expr):
            tree.body.pop()
            last = ast.Expression(tail.value)
            return compile(tree, filename, "exec"), compile(last, filename, "eval")
        return compile(tree, filename, "exec"), None

    @staticmethod
    def describe(info: Any) -> Dict[str, str]:
        etype, exc, tb = info
        # Drop the runtime's own frames: the traceback starts at the cell.
        while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell-"):
            tb = tb.tb_next
        text = "".join(traceback.format_exception(etype, exc, tb))
        return {"name": etype.__name__, "message": str(exc), "traceback": text}


def _worker_main(config: Dict[str, Any], fds: Dict[str, int]) -> None:
    """Entry point of a freshly forked worker (never returns)."""
    code = 1
    try:
        # Die with the supervisor (it is single-threaded, so its thread's exit is its death): a
        # worker busy in user code would otherwise outlive a killed supervisor. If it already died
        # between fork and here, we have been re-parented: leave at once.
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != config.get("supervisor_pid", os.getppid()):
            os._exit(1)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(fds["out_w"], 1)
        os.dup2(fds["err_w"], 2)
        keep = {0, 1, 2, fds["cmd_r"], fds["rep_w"]}
        for fd in [*fds.values(), devnull, *config.get("close_fds", [])]:
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(
            io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace"
        )
        sys.stderr = io.TextIOWrapper(
            io.FileIO(2, "w", closefd=False),
            encoding="utf-8",
            errors="backslashreplace",
            line_buffering=True,
        )
        sys.__stdout__, sys.__stderr__ = sys.stdout, sys.stderr  # type: ignore[misc]
        Worker(config, fds["cmd_r"], fds["rep_w"]).run()
        code = 0
    except BaseException:  # noqa: BLE001 - report why the worker died, then exit
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001 - nothing left to report to
            pass
    finally:
        os._exit(code)


# --------------------------------------------------------------------------------------------
# The supervisor: owns the channel, the worker's lifecycle, timeouts and output.


class _Upload:
    def __init__(self, msg: Dict[str, Any], path: str, size: int) -> None:
        self.msg = msg
        self.path = path
        self.remaining = size
        self.tmp = path + ".part"
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(self, chunk: bytes) -> bool:
        if len(chunk) > self.remaining:
            raise ProtocolError("more data than announced")
        _write_all(self.fd, chunk)
        self.remaining -= len(chunk)
        return self.remaining == 0

    def finish(self) -> None:
        os.close(self.fd)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


class Supervisor:
    def __init__(self, text_mode: bool) -> None:
        self.text_mode = text_mode
        # The channel: keep private copies of fd 0/1 and point 0/1 at /dev/null, so nothing
        # printed by accident in this process can reach the channel.
        self.in_fd = os.dup(0)
        self.out_fd = os.dup(1)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        for fd in (self.in_fd, self.out_fd):
            os.set_inheritable(fd, False)
        self.reader = FrameReader(text_mode=text_mode)
        self.rbuf = ReadBuffer(1 << 20)
        self.wlock = threading.Lock()
        self.config: Dict[str, Any] = {}
        self.worker_pid = 0
        self.fds: Dict[str, int] = {}
        self.worker_reader = FrameReader(max_message=DEFAULT_MAX_MESSAGE)
        self.worker_out: Deque[bytes] = deque()
        self.stdout = OutputBuffer(0)
        self.stderr = OutputBuffer(0)
        self.current: Optional[Dict[str, Any]] = None  # the exec in flight
        self.pending: Dict[Any, Dict[str, Any]] = {}  # other worker requests in flight
        self.upload: Optional[Union[_Upload, _Sink]] = None
        self.contexts: List[Dict[str, Any]] = []
        self.generation = 0
        self.ready_failed: Dict[str, str] = {}
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        signal.signal(signal.SIGCHLD, lambda s, f: None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.set_wakeup_fd(self.wake_w)
        self.cgroup_dir: Optional[str] = None
        self.worker_status: Optional[int] = None
        self.oom_at_start: Optional[int] = None
        self.ready = False
        self.lost_note = ""

    # ---- channel --------------------------------------------------------------------------

    def send(self, msg: Dict[str, Any]) -> None:
        _write_all(self.out_fd, message(msg, self.text_mode))

    def send_data(self, transfer_id: int, chunk: bytes) -> None:
        _write_all(self.out_fd, data_frame(transfer_id, chunk, self.text_mode))

    # ---- worker lifecycle -------------------------------------------------------------------

    def spawn(self) -> None:
        cmd_r, cmd_w = os.pipe()
        rep_r, rep_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        fds = {
            "cmd_r": cmd_r,
            "cmd_w": cmd_w,
            "rep_r": rep_r,
            "rep_w": rep_w,
            "out_r": out_r,
            "out_w": out_w,
            "err_r": err_r,
            "err_w": err_w,
        }
        config = dict(self.config)
        config["contexts"] = list(self.contexts)
        config["close_fds"] = [self.in_fd, self.out_fd, self.wake_r, self.wake_w]
        config["supervisor_pid"] = os.getpid()
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            _worker_main(config, fds)
        for key in ("cmd_r", "rep_w", "out_w", "err_w"):
            os.close(fds.pop(key))
        for key in ("cmd_w", "out_r", "err_r", "rep_r"):
            os.set_blocking(fds[key], False)
            os.set_inheritable(fds[key], False)
        self.fds = fds
        self.worker_pid = pid
        self.worker_reader = FrameReader(max_message=self.config.get("max_message", DEFAULT_MAX_MESSAGE))
        self.worker_out.clear()
        self.generation += 1

    def kill_tree(self) -> None:
        """SIGKILL the worker and every descendant (orphans are ours: we are a subreaper)."""
        if self.worker_pid:
            _signal(self.worker_pid, signal.SIGKILL, group=True)
        self.kill_descendants(keep=None)
        self.reap()

    def kill_strays(self) -> List[int]:
        """SIGKILL every descendant except the worker itself; returns their pids."""
        return self.kill_descendants(keep=self.worker_pid)

    def kill_descendants(self, keep: Optional[int]) -> List[int]:
        """SIGKILL all our descendants but ``keep`` until none is left alive; returns their pids.

        A killed process stays "running" until it gets CPU time to die, and may fork once more
        before that, so this loops until a scan finds no live process (bounded in time).
        """
        if not sys.platform.startswith("linux"):
            return []
        me, seen = os.getpid(), set()  # type: int, Set[int]
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            pids = [p for p in _descendants(me, live_only=True) if p != keep]
            if not pids:
                break
            seen.update(pids)
            for pid in pids:
                _signal(pid, signal.SIGKILL)
            self.reap(block_for=0.01)
        return sorted(seen)

    def reap(self, block_for: float = 0.0) -> Optional[int]:
        """Reap every exited child; return the worker's status if it was among them."""
        status_of_worker = None
        deadline = time.monotonic() + block_for
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid == 0:
                if time.monotonic() < deadline:
                    time.sleep(0.001)
                    continue
                break
            if pid == self.worker_pid:
                status_of_worker = status
                self.worker_status = status
        return status_of_worker

    def close_worker_fds(self) -> None:
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = {}

    def restart(self) -> Optional[int]:
        """Kill the worker's tree, reap it, and start a fresh worker. Returns the old status."""
        status = self.stop_worker()
        self.spawn()
        return status

    def stop_worker(self) -> Optional[int]:
        """Kill the worker's tree and reap it; fail the requests it had. Returns its status."""
        self.worker_status = None
        # Drain what the worker printed before it died: it belongs to the current cell.
        self.drain_output()
        self.kill_tree()
        deadline = time.monotonic() + 5.0
        while self.worker_status is None and time.monotonic() < deadline:
            try:
                pid, wstatus = os.waitpid(self.worker_pid, 0)
                if pid == self.worker_pid:
                    self.worker_status = wstatus
            except ChildProcessError:
                break
            except InterruptedError:
                continue
        status = self.worker_status
        self.close_worker_fds()
        for req in list(self.pending.values()):
            self.send({"op": "error", "id": req["id"], "kind": "restarted", "message": "runtime restarted"})
        self.pending.clear()
        return status

    # ---- output -----------------------------------------------------------------------------

    def drain_output(self) -> None:
        for key, buf in (("out_r", self.stdout), ("err_r", self.stderr)):
            fd = self.fds.get(key)
            if fd is None:
                continue
            while True:
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if not data:
                    break
                buf.add(data)

    # ---- main loop --------------------------------------------------------------------------

    def run(self) -> None:
        # No PR_SET_PDEATHSIG: it fires when the host *thread* that started us exits. EOF on
        # stdin is what tells us the host is gone.
        _prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
        try:
            self.loop()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        try:
            self.kill_tree()
        except Exception:  # noqa: BLE001 - shutting down regardless
            pass
        if self.cgroup_dir:
            try:
                os.rmdir(self.cgroup_dir)
            except OSError:
                pass

    def loop(self) -> None:
        while True:
            rlist = [self.in_fd, self.wake_r]
            wlist = []
            fds = self.fds
            if fds:
                rlist += [fds["rep_r"], fds["out_r"], fds["err_r"]]
                if self.worker_out:
                    wlist.append(fds["cmd_w"])
            timeout = self.next_deadline()
            try:
                r, w, _ = select.select(rlist, wlist, [], timeout)
            except InterruptedError:
                continue
            if self.wake_r in r:
                try:
                    os.read(self.wake_r, 4096)
                except OSError:
                    pass
                status = self.reap()
                if status is not None:
                    self.worker_died(status)
                    continue
            if fds and fds.get("out_r") in r:
                self.read_output("out_r", self.stdout)
            if fds and fds.get("err_r") in r:
                self.read_output("err_r", self.stderr)
            if self.fds and self.fds.get("cmd_w") in w:
                self.flush_worker()
            if self.fds and self.fds.get("rep_r") in r:
                self.read_worker()
            if self.in_fd in r:
                try:
                    data = self.rbuf.read(self.in_fd)
                except OSError:
                    data = b""
                if not data:
                    return
                try:
                    frames = self.reader.feed(data)
                    for kind, payload in frames:
                        if self.handle_host(kind, payload) is False:
                            return
                except ProtocolError as exc:
                    self.send({"op": "fatal", "message": "protocol error from host: %s" % exc})
                    return
            self.check_deadlines()

    def read_output(self, key: str, buf: OutputBuffer) -> None:
        try:
            data = os.read(self.fds[key], 1 << 16)
        except (BlockingIOError, KeyError):
            return
        except OSError:
            data = b""
        if data:
            buf.add(data)

    def flush_worker(self) -> None:
        fd = self.fds["cmd_w"]
        while self.worker_out:
            chunk = self.worker_out[0]
            try:
                n = os.write(fd, chunk)
            except BlockingIOError:
                return
            except OSError:
                self.worker_out.clear()
                return
            if n < len(chunk):
                self.worker_out[0] = chunk[n:]
                return
            self.worker_out.popleft()

    def to_worker(self, msg: Dict[str, Any]) -> None:
        self.worker_out.append(message(msg))
        if self.fds:
            self.flush_worker()

    def read_worker(self) -> None:
        try:
            data = self.rbuf.read(self.fds["rep_r"])
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            # EOF: the worker died or closed its link. Either way it is gone.
            self.worker_died(None)
            return
        try:
            frames = self.worker_reader.feed(data)
            for kind, payload in frames:
                if kind != T_JSON:
                    raise ProtocolError("unexpected data frame from the worker")
                self.handle_worker(parse_message(payload))
        except ProtocolError as exc:
            self.worker_died(None, "the runtime's link was corrupted (%s)" % exc)

    def handle_worker(self, msg: Dict[str, Any]) -> None:
        op = msg["op"]
        if op == "call":
            if not isinstance(msg.get("id"), int) or not isinstance(msg.get("name"), str):
                raise ProtocolError("malformed call")
            self.send(msg)
        elif op == "result":
            cur = self.current
            if cur is None or msg.get("id") != cur["id"]:
                raise ProtocolError("unexpected result")
            self.finish_exec(msg)
        elif op == "ready":
            self.ready_failed = msg.get("failed") or {}
            self.ready = True
        elif op in ("value", "done", "error", "pong"):
            req = self.pending.pop(msg.get("id"), None)
            if req is None:
                raise ProtocolError("unexpected reply")
            self.send(msg)
        else:
            raise ProtocolError("unknown op from the worker: %r" % op)

    def next_deadline(self) -> Optional[float]:
        cur = self.current
        if cur is None:
            return None
        now = time.monotonic()
        if cur.get("kill_at") is not None:
            return max(float(cur["kill_at"]) - now, 0.0)
        if cur.get("interrupt_at") is not None:
            return max(float(cur["interrupt_at"]) - now, 0.0)
        return None

    def check_deadlines(self) -> None:
        cur = self.current
        if cur is None:
            return
        now = time.monotonic()
        if cur.get("kill_at") is not None and now >= cur["kill_at"]:
            self.restart_and_report("killed", "the cell ignored the interrupt; its processes were killed")
            return
        if cur.get("interrupt_at") is not None and now >= cur["interrupt_at"]:
            cur["interrupt_at"] = None
            cur["timed_out"] = True
            self.interrupt()
            cur["kill_at"] = now + float(self.config.get("grace_s", 2.0))

    def interrupt(self) -> None:
        if self.worker_pid:
            _signal(self.worker_pid, signal.SIGINT)

    def finish_exec(self, msg: Dict[str, Any], extra: Optional[Dict[str, Any]] = None) -> None:
        cur = self.current
        assert cur is not None
        self.current = None
        self.drain_output()
        out, out_trunc = self.stdout.take()
        err, err_trunc = self.stderr.take()
        reply = dict(msg)
        reply["stdout"] = out
        reply["stderr"] = err
        reply["truncated"] = out_trunc or err_trunc
        reply["timed_out"] = bool(cur.get("timed_out"))
        reply["duration"] = time.monotonic() - cur["started"]
        if cur.get("timed_out") and reply.get("outcome") == "ok":
            reply["outcome"] = "interrupted"
        if cur.get("timed_out") and reply.get("outcome") == "interrupted":
            # Runaway code stops: every process the cells started (a fork bomb's copies of the
            # REPL included) dies with the timeout; the REPL and its variables stay.
            killed = self.kill_strays()
            reply["killed_processes"] = len(killed)
            if killed:
                # Those that were the REPL's own children are zombies until it reaps them.
                self.to_worker({"op": "reap", "pids": killed})
        if self.lost_note:
            reply["state_lost"] = True
            reply["message"] = "earlier, between cells: " + self.lost_note
            self.lost_note = ""
        if extra:
            reply.update(extra)
        self.send(reply)

    def oom_count(self) -> Optional[int]:
        return _oom_kills() if self.config.get("oom_detect") else None

    def restart_and_report(self, outcome: str, message_: str) -> None:
        before = self.oom_count()
        status = self.restart()
        self.report_dead(outcome, message_, status, before)

    def report_dead(self, outcome: str, message_: str, status: Optional[int], oom_before: Optional[int]) -> None:
        after = self.oom_count()
        detail = message_
        oom = False
        if oom_before is not None and after is not None and after > oom_before:
            oom = True
        if status is not None and outcome == "crashed":
            detail = "%s: the runtime %s" % (message_, _describe_status(status))
        if oom:
            mb = self.config.get("memory_mb")
            detail = "out of memory: the kernel killed the cell's process (memory limit %s)" % (
                "%s MB" % mb if mb else "of the box"
            )
        cur = self.current
        if cur is not None:
            self.finish_exec(
                {"op": "result", "id": cur["id"], "outcome": outcome, "error": None},
                {"message": detail, "state_lost": True, "oom": oom},
            )
        else:
            # Between cells: the next result says that the variables are gone.
            self.lost_note = detail
            self.send({"op": "notice", "message": detail, "state_lost": True})

    def worker_died(self, status: Optional[int], why: str = "") -> None:
        """The worker exited or broke its link: restart it; a running cell CRASHED."""
        before = self.oom_at_start if self.current is not None else None
        old = self.restart()
        if status is None:
            status = old
        cur = self.current
        if cur is not None and cur.get("kill_at") is not None and not why:
            # Died during the grace period after our SIGINT (e.g. a handler exiting): killed.
            self.report_dead("killed", "the cell did not stop after the interrupt", status, before)
            return
        self.report_dead("crashed", why or "the runtime died", status, before)

    def handle_host(self, kind: int, payload: bytes) -> Optional[bool]:
        if kind == T_DATA:
            tid, chunk = split_data(payload)
            up = self.upload
            if up is None or up.msg["id"] != tid:
                raise ProtocolError("data for no transfer")
            if up.write(chunk):
                self.upload = None
                if isinstance(up, _Upload):
                    up.finish()
                    self.upload_done(up)
            return None
        msg = parse_message(payload)
        op = msg["op"]
        if op == "exec":
            if self.config.get("oom_detect"):
                self.oom_at_start = _oom_kills()
            timeout = msg.get("timeout")
            now = time.monotonic()
            self.current = {
                "id": msg["id"],
                "started": now,
                "interrupt_at": now + float(timeout) if timeout is not None else None,
                "kill_at": None,
            }
            self.to_worker({"op": "exec", "id": msg["id"], "code": msg["code"], "echo": msg.get("echo")})
        elif op == "call_result":
            self.to_worker(msg)
        elif op == "interrupt":
            if self.current is not None:
                self.interrupt()
                if self.current.get("kill_at") is None:
                    self.current["kill_at"] = time.monotonic() + float(self.config.get("grace_s", 2.0))
                    self.current["interrupt_at"] = None
        elif op in ("get_var", "set_var", "list_vars", "ping"):
            self.pending[msg["id"]] = msg
            self.to_worker(msg)
        elif op == "load_context":
            self.begin_context(msg)
        elif op == "put_file":
            self.begin_put(msg)
        elif op == "get_file":
            self.get_file(msg)
        elif op == "reset":
            self.reset(msg)
        elif op == "init":
            self.init(msg)
        elif op == "shutdown":
            self.send({"op": "bye", "id": msg.get("id")})
            return False
        else:
            self.send({"op": "error", "id": msg.get("id"), "kind": "unknown_op", "message": op})
        return None

    # ---- ops ----------------------------------------------------------------------------------

    def init(self, msg: Dict[str, Any]) -> None:
        cfg = dict(msg.get("config") or {})
        failed: Dict[str, str] = {}
        for key in ("workdir", "statedir"):
            path = os.path.abspath(cfg.get(key) or ".")
            os.makedirs(path, exist_ok=True)
            cfg[key] = path
        os.makedirs(os.path.join(cfg["statedir"], "contexts"), exist_ok=True)
        if cfg.get("tmpdir"):
            # The code's TMPDIR: private to this sandbox, and emptied by reset().
            cfg["tmpdir"] = os.path.abspath(_resolve(cfg["workdir"], cfg["tmpdir"]))
            os.makedirs(cfg["tmpdir"], exist_ok=True)
            cfg["scratch_dirs"] = [cfg["tmpdir"], *cfg.get("scratch_dirs", [])]
        # "try": isolate if the OS lets us, but the box already keeps the network out.
        isolated = False
        if cfg.get("unshare_net"):
            err = _unshare_network()
            isolated = err is None
            if err and cfg["unshare_net"] != "try":
                failed["network"] = err
        pids = cfg.get("cgroup_pids")
        if pids:
            err = self.make_pids_cgroup(int(pids), cfg)
            if err and cfg.get("pids_nproc_fallback") and os.getuid() != 0:
                # Not root: RLIMIT_NPROC counts this user's tasks, which in a box are ours.
                cfg.setdefault("rlimits", {})["nproc"] = _user_tasks() + int(pids)
                err = None
            if err:
                failed["pids"] = err
        # Only now (writing a user namespace's id maps needs it dumpable): user code running as
        # the same uid must not open our channel's fds through /proc/<pid>/fd, nor ptrace us.
        _prctl(4, 0)  # PR_SET_DUMPABLE = 0
        self.config = cfg
        self.stdout = OutputBuffer(int(cfg.get("output_bytes", 1 << 20)))
        self.stderr = OutputBuffer(int(cfg.get("output_bytes", 1 << 20)))
        self.contexts = self.scan_contexts()
        self.ready = False
        self.spawn()
        # Wait for the worker's own set-up report (rlimits, affinity) before saying hello.
        deadline = time.monotonic() + 30.0
        while not self.ready and self.fds and time.monotonic() < deadline:
            r, _, _ = select.select([self.fds["rep_r"]], [], [], max(deadline - time.monotonic(), 0))
            if r:
                self.read_worker()
        if not self.ready:
            failed["runtime"] = "the worker did not start"
        failed.update(self.ready_failed)
        self.send(
            {
                "op": "hello",
                "id": msg.get("id"),
                "version": PROTOCOL_VERSION,
                "pid": os.getpid(),
                "python": "%d.%d.%d" % sys.version_info[:3],
                "platform": sys.platform,
                "failed": failed,
                "workdir": cfg["workdir"],
                "contexts": [c["name"] for c in self.contexts],
                "network_namespace": isolated,
            }
        )

    def make_pids_cgroup(self, pids: int, cfg: Dict[str, Any]) -> Optional[str]:
        name = "rlm-sandbox-%d-%d" % (os.getpid(), int(time.time() * 1000))
        candidates = []
        try:
            with open("/proc/self/cgroup") as f:
                for line in f:
                    parts = line.strip().split(":", 2)
                    if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
                        candidates.append(("v2", "/sys/fs/cgroup" + parts[2]))
        except OSError:
            pass
        candidates.insert(0, ("v1", "/sys/fs/cgroup/pids"))
        errors = []
        for version, base in candidates:
            if version == "v1" and not os.path.exists(os.path.join(base, "cgroup.procs")):
                continue
            if version == "v1" and not os.path.exists(os.path.join(base, "pids.max")) and not os.path.isdir(base):
                continue
            path = os.path.join(base, name)
            try:
                os.mkdir(path)
            except OSError as exc:
                errors.append("%s: %s" % (base, exc))
                continue
            try:
                _write_text(os.path.join(path, "pids.max"), str(pids))
            except OSError as exc:
                errors.append("%s: %s" % (path, exc))
                try:
                    os.rmdir(path)
                except OSError:
                    pass
                continue
            self.cgroup_dir = path
            cfg["cgroup_procs"] = os.path.join(path, "cgroup.procs")
            return None
        return "no writable pids cgroup (%s)" % ("; ".join(errors) or "none found")

    def scan_contexts(self) -> List[Dict[str, Any]]:
        directory = os.path.join(self.config["statedir"], "contexts")
        found = []
        for entry in sorted(os.listdir(directory)):
            if entry.endswith(".meta.json"):
                try:
                    with open(os.path.join(directory, entry)) as f:
                        meta = json.load(f)
                    if os.path.exists(meta["path"]):
                        found.append(meta)
                except (OSError, ValueError, KeyError):
                    continue
        return found

    def context_meta(self, msg: Dict[str, Any], path: str) -> Dict[str, Any]:
        return {
            "name": msg["name"],
            "aliases": list(msg.get("aliases") or []),
            "kind": msg["kind"],
            "path": path,
            "seq": msg.get("seq", len(self.contexts)),
        }

    def next_seq(self) -> int:
        return 1 + max([int(c.get("seq", 0)) for c in self.contexts] or [-1])

    def begin_context(self, msg: Dict[str, Any]) -> None:
        seq = self.next_seq()
        directory = os.path.join(self.config["statedir"], "contexts")
        path = os.path.join(directory, "%04d.data.%s" % (seq, msg["kind"]))
        src = msg.get("path")
        if src is not None:
            # Already uploaded into the box by the backend: move it out of sight, or use it in
            # place where it cannot move (a read-only mount of the host's upload directory).
            src = _resolve(self.config["workdir"], src)
            try:
                os.replace(src, path)
            except OSError:
                if not os.access(src, os.R_OK):
                    self.send({"op": "error", "id": msg["id"], "kind": "not_found", "message": src})
                    return
                path = src
            self.commit_context(msg, path, seq)
            return
        msg["seq"] = seq
        try:
            up = _Upload(msg, path, int(msg["size"]))
        except OSError as exc:
            self.send({"op": "error", "id": msg["id"], "kind": "os", "message": str(exc)})
            return
        self.upload = up
        if up.remaining == 0:
            self.upload = None
            up.finish()
            self.upload_done(up)

    def upload_done(self, up: _Upload) -> None:
        msg = up.msg
        if msg["op"] == "put_file":
            self.send({"op": "done", "id": msg["id"]})
        else:
            self.commit_context(msg, up.path, int(msg["seq"]))

    def commit_context(self, msg: Dict[str, Any], path: str, seq: int) -> None:
        meta = self.context_meta(msg, path)
        meta["seq"] = seq
        # Replace an earlier context of the same name (and drop its files).
        for old in self.contexts:
            if old["name"] == meta["name"]:
                meta_file = os.path.join(self.config["statedir"], "contexts", "%04d.meta.json" % old["seq"])
                for stale in (old["path"], meta_file):
                    try:
                        os.unlink(stale)
                    except OSError:
                        pass
        self.contexts = [c for c in self.contexts if c["name"] != meta["name"]]
        self.contexts.append(meta)
        meta_path = os.path.join(self.config["statedir"], "contexts", "%04d.meta.json" % seq)
        with open(meta_path + ".part", "w") as f:
            json.dump(meta, f)
        os.replace(meta_path + ".part", meta_path)
        self.pending[msg["id"]] = msg
        self.to_worker({"op": "load_context", "id": msg["id"], "context": meta})

    def begin_put(self, msg: Dict[str, Any]) -> None:
        path = _resolve(self.config["workdir"], msg["path"])
        try:
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            up = _Upload(msg, path, int(msg["size"]))
        except OSError as exc:
            self.send({"op": "error", "id": msg["id"], "kind": _os_kind(exc), "message": str(exc)})
            # Swallow the data frames that follow: a sink upload to /dev/null.
            sink = _Sink(msg, int(msg["size"]))
            self.upload = sink if sink.remaining else None
            return
        self.upload = up
        if up.remaining == 0:
            self.upload = None
            up.finish()
            self.upload_done(up)

    def get_file(self, msg: Dict[str, Any]) -> None:
        path = _resolve(self.config["workdir"], msg["path"])
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            self.send({"op": "error", "id": msg["id"], "kind": _os_kind(exc), "message": str(exc)})
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self.send({"op": "error", "id": msg["id"], "kind": "is_dir", "message": "not a file: %s" % path})
                return
            size = st.st_size
            self.send({"op": "file", "id": msg["id"], "size": size})
            sent = 0
            while True:
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    break
                self.send_data(msg["id"], chunk)
                sent += len(chunk)
            self.send({"op": "done", "id": msg["id"], "size": sent})
        finally:
            os.close(fd)

    def reset(self, msg: Dict[str, Any]) -> None:
        """A fresh runtime with nothing from before: no variables, contexts or files."""
        self.current = None
        self.worker_out.clear()
        self.stop_worker()
        for key in ("workdir", "statedir"):
            root = self.config[key]
            for entry in os.listdir(root):
                full = os.path.join(root, entry)
                if key == "workdir" and os.path.abspath(full) == os.path.abspath(self.config["statedir"]):
                    continue
                if os.path.isdir(full) and not os.path.islink(full):
                    shutil.rmtree(full, ignore_errors=True)
                else:
                    try:
                        os.unlink(full)
                    except OSError:
                        pass
        os.makedirs(os.path.join(self.config["statedir"], "contexts"), exist_ok=True)
        # Scratch dirs outside the work dir (a box's /tmp, /dev/shm) hold the previous user's files
        # too: empty them, and re-create any that lived inside the work dir.
        for path in self.config.get("scratch_dirs", []):
            path = _resolve(self.config["workdir"], path)
            if os.path.isdir(path):
                for entry in os.listdir(path):
                    full = os.path.join(path, entry)
                    if os.path.isdir(full) and not os.path.islink(full):
                        shutil.rmtree(full, ignore_errors=True)
                    else:
                        try:
                            os.unlink(full)
                        except OSError:
                            pass
            os.makedirs(path, exist_ok=True)
        self.contexts = []
        self.stdout.take()
        self.stderr.take()
        self.spawn()
        self.send({"op": "done", "id": msg.get("id")})


class _Sink:
    """Consumes the data frames of a failed upload."""

    def __init__(self, msg: Dict[str, Any], size: int) -> None:
        self.msg = msg
        self.remaining = size

    def write(self, chunk: bytes) -> bool:
        self.remaining -= len(chunk)
        if self.remaining < 0:
            raise ProtocolError("more data than announced")
        return self.remaining == 0

    def finish(self) -> None:
        pass

    @property
    def path(self) -> str:
        return os.devnull


def _os_kind(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "not_found"
    if exc.errno == errno.EISDIR:
        return "is_dir"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission"
    return "os"


def main(mode: str = "raw") -> None:
    """Run the supervisor on this process's stdin/stdout."""
    sup = Supervisor(text_mode=(mode == "b64"))
    sup.run()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "raw")
