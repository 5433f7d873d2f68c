"""``rlm-sandbox bench``: the speed figures of a backend (p50/p95), not timed tests."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._limits import Limits
from ._registry import open_sandbox

__all__ = ["BenchResult", "run_bench"]


@dataclass
class BenchResult:
    """One measured figure."""

    name: str
    samples: list[float] = field(default_factory=list)
    unit: str = "ms"
    goal: str = ""

    def pct(self, q: float) -> float:
        data = sorted(self.samples)
        if not data:
            return float("nan")
        k = min(len(data) - 1, max(0, round(q / 100 * (len(data) - 1))))
        return data[k]

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": len(self.samples),
            "p50": self.pct(50),
            "p95": self.pct(95),
            "mean": statistics.fmean(self.samples) if self.samples else float("nan"),
            "unit": self.unit,
            "goal": self.goal,
        }


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def run_bench(
    backend: str,
    *,
    options: dict[str, Any] | None = None,
    n_exec: int = 2000,
    n_open: int = 20,
    n_calls: int = 2000,
    context_mb: int = 100,
    n_context: int = 3,
    with_context_exec: bool = True,
    n_scale: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[BenchResult]:
    """Measure a backend. Each figure is taken on warm sandboxes except open-to-first-result."""
    opts = dict(options or {})
    say = progress or (lambda _m: None)
    results: list[BenchResult] = []
    limits = Limits(memory_mb=max(2048, context_mb * 6))

    def echo(x: Any) -> Any:
        return x

    say("trivial execute")
    with open_sandbox(backend, limits=limits, functions={"echo": echo}, **opts) as sb:
        for _ in range(50):
            sb.execute("pass")
        r = BenchResult("execute round trip (x = 1)", goal="local p50 <= 0.25 ms; docker p50 <= 0.5 ms")
        for _ in range(n_exec):
            t = time.perf_counter()
            sb.execute("x = 1")
            r.samples.append(_ms(time.perf_counter() - t))
        results.append(r)

        say("host-function round trip")
        code = (
            f"import time\n_d = []\nfor _i in range({n_calls}):\n"
            "    _t = time.perf_counter()\n    echo(1)\n    _d.append(time.perf_counter() - _t)\n"
        )
        res = sb.execute(code, timeout_s=600)
        if not res.ok:
            raise RuntimeError(f"bench cell failed: {res.error or res.message}")
        r = BenchResult("host-function round trip", goal="local p50 <= 0.3 ms; docker p50 <= 0.8 ms")
        r.samples = [_ms(d) for d in sb.get_variable("_d")]
        results.append(r)

        if context_mb:
            say(f"{context_mb} MB context")
            text = "x" * ((context_mb << 20) - 6) + "NEEDLE"
            r = BenchResult(f"{context_mb} MB context usable as a variable", goal="local <= 350 ms; docker <= 400 ms")
            for i in range(n_context):
                t = time.perf_counter()
                sb.load_context(text, name=f"big{i}")
                res = sb.execute(f"_n = len(big{i})")
                r.samples.append(_ms(time.perf_counter() - t))
                if not res.ok:
                    raise RuntimeError(f"bench context cell failed: {res.error or res.message}")
                sb.execute(f"del big{i}")
            results.append(r)
            if with_context_exec:
                sb.load_context(text, name="big")
                r = BenchResult(f"execute round trip with {context_mb} MB loaded")
                for _ in range(min(n_exec, 500)):
                    t = time.perf_counter()
                    sb.execute("x = 1")
                    r.samples.append(_ms(time.perf_counter() - t))
                results.append(r)
            del text

    if n_scale:
        say(f"{n_scale} sandboxes at once")
        results.extend(_scale(backend, opts, n_scale))

    say("open to first result")
    r = BenchResult("open to first result", goal="local p50 <= 60 ms; docker p50 <= 400 ms")
    closers = []
    for _ in range(n_open):
        t = time.perf_counter()
        sb2 = open_sandbox(backend, **opts)
        sb2.execute("pass")
        r.samples.append(_ms(time.perf_counter() - t))
        closers.append(sb2)
        if len(closers) > 4:
            closers.pop(0).close()
    for sb2 in closers:
        sb2.close()
    results.append(r)
    return results


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _scale(backend: str, opts: dict[str, Any], n: int) -> list[BenchResult]:
    """Open ``n`` sandboxes at once (from n threads), each runs a cell; host cost per sandbox."""
    import gc

    gc.collect()
    rss0, threads0 = _rss_bytes(), threading.active_count()
    boxes: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            sb = open_sandbox(backend, limits=Limits(memory_mb=256), **opts)
            with lock:
                boxes.append(sb)
            r = sb.execute(f"print({i} * 2)")
            if r.stdout != f"{i * 2}\n":
                raise RuntimeError(f"wrong answer from sandbox {i}: {r}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t0 = time.perf_counter()
    workers = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    try:
        if errors:
            raise RuntimeError(f"{len(errors)} of {n} sandboxes failed: {errors[0]!r}")
        gc.collect()
        per_box = (_rss_bytes() - rss0) / max(len(boxes), 1)
        per_threads = (threading.active_count() - threads0) / max(len(boxes), 1)
    finally:
        for sb in boxes:
            sb.close()
    return [
        BenchResult(f"{n} sandboxes opened at once, each ran a cell", [_ms(wall)], goal="docker: 32, all correct"),
        BenchResult("host memory per open sandbox", [per_box / (1 << 20)], unit="MB", goal="docker <= 5 MB"),
        BenchResult("host threads per open sandbox", [per_threads], unit="", goal=""),
    ]


def format_table(backend: str, results: list[BenchResult]) -> str:
    lines = [f"rlm-sandbox bench --backend {backend}", ""]
    lines.append(f"{'figure':48} {'n':>6} {'p50':>10} {'p95':>10}   goal")
    for res in results:
        row = res.row()
        lines.append(
            f"{row['name']:48} {row['n']:>6} {row['p50']:>8.3f}{res.unit} {row['p95']:>8.3f}{res.unit}   {row['goal']}"
        )
    return "\n".join(lines)
