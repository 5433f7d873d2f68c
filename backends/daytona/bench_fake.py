"""Measure the two ways to talk to a long-lived process in a Daytona box, against the fake.

Run from the repository root::

    python backends/daytona/bench_fake.py

It prints, for the PTY channel (``DaytonaChannel``) and for a session command (``run_async`` +
``send_session_command_input`` + the log WebSocket): the round-trip latency of a small line echoed
by ``cat`` (p50/p90 over 200), the time to write 20 MiB to the process's stdin (until the process
has read it all), and the requests each costs. Loopback only: real numbers add the network RTT to
every round trip, and for sessions the daemon's 20 ms log-file polling.
"""

from __future__ import annotations

import asyncio
import base64
import os
import queue
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "backends" / "daytona" / "src")]

from daytona import Daytona, DaytonaConfig, SessionExecuteRequest  # noqa: E402
from rlm_sandbox_daytona._channel import DaytonaChannel  # noqa: E402

from tests.fakes.daytona_fake import DaytonaFake  # noqa: E402

N_ROUND_TRIPS = 200
N_BYTES = 20 << 20
COUNT_STDIN = (
    "import sys\nn, t = int(sys.argv[1]), 0\n"
    "while t < n: t += len(sys.stdin.buffer.read1(1 << 20))\nprint(t, flush=True)\n"
)
COUNT_B64_LINES = (
    "import base64, sys\nn, t = int(sys.argv[1]), 0\n"
    "for line in sys.stdin:\n    t += len(base64.b64decode(line))\n"
    "    if t >= n: break\nprint(t, flush=True)\n"
)


def _percentiles(samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=10)
    return f"p50 {statistics.median(samples) * 1e3:.3f} ms, p90 {q[8] * 1e3:.3f} ms"


def bench_pty(sandbox: Any, fake: DaytonaFake) -> None:
    channel = DaytonaChannel.start(sandbox, ["cat"])
    lat = []
    for i in range(N_ROUND_TRIPS):
        line = b"ping %06d\n" % i
        t = time.perf_counter()
        channel.send(line)
        got = b""
        while len(got) < len(line):
            got += channel.recv(10)
        lat.append(time.perf_counter() - t)
        assert got == line
    print(f"PTY      round trip via cat: {_percentiles(lat)}")
    data = os.urandom(N_BYTES)
    echoed = bytearray()

    def read_all() -> None:
        while len(echoed) < N_BYTES:
            echoed.extend(channel.recv(60))

    reader = threading.Thread(target=read_all)
    t = time.perf_counter()
    reader.start()
    channel.send(data)
    reader.join()
    elapsed = time.perf_counter() - t
    assert echoed == data
    channel.close()
    print(f"PTY      20 MiB echoed by cat (both ways at once): {elapsed:.3f} s")

    before = sum(fake.counts.values())
    channel = DaytonaChannel.start(sandbox, ["python3", "-c", COUNT_STDIN, str(N_BYTES)])
    data = os.urandom(N_BYTES)
    t = time.perf_counter()
    channel.send(data)
    out = b""
    while not out.endswith(b"\n"):
        out += channel.recv(60)
    elapsed = time.perf_counter() - t
    assert int(out) == N_BYTES
    channel.close()
    requests = sum(fake.counts.values()) - before
    print(
        f"PTY      20 MiB to stdin: {elapsed:.3f} s ({N_BYTES / elapsed / 2**20:.0f} MiB/s), "
        f"{requests} HTTP requests in total (connect + kill), {N_BYTES // (32 << 10)} WS frames"
    )


def _follow(sandbox: Any, session: str, cmd: str) -> tuple[threading.Thread, queue.Queue[str]]:
    out: queue.Queue[str] = queue.Queue()

    def run() -> None:
        asyncio.run(sandbox.process.get_session_command_logs_async(session, cmd, out.put, lambda s: None))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def bench_session(sandbox: Any, fake: DaytonaFake) -> None:
    proc = sandbox.process
    proc.create_session("bench")
    req = SessionExecuteRequest(command="cat", run_async=True, suppress_input_echo=True)
    cmd = proc.execute_session_command("bench", req).cmd_id
    thread, out = _follow(sandbox, "bench", cmd)
    lat = []
    for i in range(N_ROUND_TRIPS):
        line = f"ping {i:06d}"
        t = time.perf_counter()
        proc.send_session_command_input("bench", cmd, line)
        got = ""
        while len(got) < len(line) + 1:
            got += out.get(timeout=10)
        lat.append(time.perf_counter() - t)
        assert got == line + "\n"
    proc.delete_session("bench")
    thread.join(10)
    print(f"Session  round trip via cat: {_percentiles(lat)}")

    proc.create_session("bench2")
    script = f"python3 -c {shlex.quote(COUNT_B64_LINES)} {N_BYTES}"
    req = SessionExecuteRequest(command=script, run_async=True, suppress_input_echo=True)
    cmd = proc.execute_session_command("bench2", req).cmd_id
    thread, out = _follow(sandbox, "bench2", cmd)
    data = os.urandom(N_BYTES)
    step = 48 << 10  # 64 KiB of base64 per request
    before = fake.counts["command_input"]
    t = time.perf_counter()
    for i in range(0, N_BYTES, step):
        proc.send_session_command_input("bench2", cmd, base64.b64encode(data[i : i + step]).decode())
    got = ""
    while not got.endswith("\n"):
        got += out.get(timeout=60)
    elapsed = time.perf_counter() - t
    assert int(got) == N_BYTES
    requests = fake.counts["command_input"] - before
    proc.delete_session("bench2")
    thread.join(10)
    print(
        f"Session  20 MiB to stdin (base64 lines): {elapsed:.3f} s "
        f"({N_BYTES / elapsed / 2**20:.0f} MiB/s), {requests} HTTP POSTs (1 per input)"
    )


def main() -> None:
    with DaytonaFake() as fake:
        client = Daytona(DaytonaConfig(api_url=fake.api_url, api_key="test"))
        sandbox = client.create()
        try:
            bench_pty(sandbox, fake)
            bench_session(sandbox, fake)
        finally:
            sandbox.delete()


if __name__ == "__main__":
    main()
