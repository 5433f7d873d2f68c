"""Measure the E2B channel mechanism against the loopback fake (real SDK, real HTTP).

Run from the repository root::

    python backends/e2b/bench_channel.py

Prints: echo round trip through ``cat`` (p50/p90 over 200 round trips), 20 MB into stdin
(``cat > /dev/null``), 20 MB echoed through ``cat``, the same 20 MB through ``stream_input``,
and an echo round trip when stdin is fed through one long ``stream_input`` call instead of one
``send_stdin`` request per write. Figures are for loopback HTTP/1.1: they show the SDK's and
the protocol's own overhead, not E2B's network.
"""

from __future__ import annotations

import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "backends" / "e2b" / "src")]
os.environ["NO_PROXY"] = "127.0.0.1,localhost"

from e2b import Sandbox  # noqa: E402
from rlm_sandbox_e2b import E2BChannel  # noqa: E402

from tests.fakes.e2b_fake import E2BFake  # noqa: E402

MB = 1 << 20


def _recv_exactly(channel: E2BChannel, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = channel.recv(30)
        if not chunk:
            raise EOFError(f"EOF after {len(got)} of {size} bytes")
        got += chunk
    return bytes(got)


def echo_rtt(sandbox: Sandbox, rounds: int = 200) -> list[float]:
    channel = E2BChannel(sandbox, "cat")
    try:
        times = []
        for i in range(rounds):
            line = b"%08d\n" % i
            start = time.perf_counter()
            channel.send(line)
            assert _recv_exactly(channel, len(line)) == line
            times.append(time.perf_counter() - start)
        return times
    finally:
        channel.close()


def stdin_throughput(sandbox: Sandbox, size: int = 20 * MB) -> float:
    """Seconds to push ``size`` bytes into ``cat > /dev/null`` and see it exit."""
    channel = E2BChannel(sandbox, "cat > /dev/null")
    payload = b"A" * size
    start = time.perf_counter()
    channel.send(payload)
    channel.close()  # close_stdin, then wait for the end event
    assert channel.recv(30) == b"" and channel.exit_code == 0
    return time.perf_counter() - start


def echo_throughput(sandbox: Sandbox, size: int = 20 * MB) -> float:
    channel = E2BChannel(sandbox, "cat")
    payload = (b"0123456789abcdef" * (size // 16 // 64 + 1))[: size // 64]
    payload = (payload[:-1] + b"\n") * 64
    start = time.perf_counter()
    writer = threading.Thread(target=channel.send, args=(payload,))
    writer.start()
    got = _recv_exactly(channel, len(payload))
    writer.join()
    elapsed = time.perf_counter() - start
    channel.close()
    assert got == payload
    return elapsed


def stream_input_throughput(sandbox: Sandbox, size: int = 20 * MB, chunk: int = MB) -> float:
    handle = sandbox.commands.run("cat > /dev/null", background=True, stdin=True, timeout=0)
    block = b"A" * chunk
    start = time.perf_counter()
    sandbox.commands.stream_input(handle.pid, (block for _ in range(size // chunk)), timeout=0)
    sandbox.commands.close_stdin(handle.pid)
    handle.wait()
    return time.perf_counter() - start


def stream_input_rtt(sandbox: Sandbox, rounds: int = 200) -> list[float]:
    """Echo round trips when writes go into one long-lived StreamInput request."""
    handle = sandbox.commands.run("cat", background=True, stdin=True, timeout=0, retain_output=False)
    feed: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def chunks() -> Iterator[bytes]:
        while (item := feed.get()) is not None:
            yield item

    pump = threading.Thread(target=sandbox.commands.stream_input, args=(handle.pid, chunks()), kwargs={"timeout": 0})
    pump.start()
    events = iter(handle)
    times = []
    for i in range(rounds):
        line = f"{i:08d}\n"
        start = time.perf_counter()
        feed.put(line.encode())
        got = ""
        while len(got) < len(line):
            stdout, _, _ = next(events)
            got += stdout or ""
        times.append(time.perf_counter() - start)
    feed.put(None)
    pump.join()
    sandbox.commands.close_stdin(handle.pid)
    for _ in events:
        pass
    return times


def _ms(times: list[float]) -> str:
    p90 = statistics.quantiles(times, n=10)[-1]
    return f"p50 {statistics.median(times) * 1e3:.2f} ms, p90 {p90 * 1e3:.2f} ms"


def main() -> None:
    with E2BFake() as fake:
        sandbox = Sandbox.create(timeout=600, **fake.sdk_opts())
        before = fake.requests["POST /process.Process/SendInput"]
        rtt = echo_rtt(sandbox)
        sends = fake.requests["POST /process.Process/SendInput"] - before
        print(f"echo via cat, send_stdin per write (200 round trips): {_ms(rtt)}; {sends} SendInput requests")
        print(f"echo via cat, one StreamInput request (200 round trips): {_ms(stream_input_rtt(sandbox))}")
        secs = stdin_throughput(sandbox)
        print(f"20 MB into stdin via send_stdin (1 MiB per request): {secs:.2f} s = {20 / secs:.0f} MB/s")
        secs = echo_throughput(sandbox)
        print(f"20 MB echoed through cat (send_stdin + output stream): {secs:.2f} s = {20 / secs:.0f} MB/s")
        secs = stream_input_throughput(sandbox)
        print(f"20 MB into stdin via one stream_input (1 MiB chunks): {secs:.2f} s = {20 / secs:.0f} MB/s")
        sandbox.kill()


if __name__ == "__main__":
    main()
