"""The ``rlm-sandbox`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ._errors import SandboxError
from ._limits import Limits
from ._registry import available_backends, open_sandbox
from ._results import ExecResult, Outcome
from ._sandbox import ContextPayload, RuntimeSandbox, Sandbox, install_exit_hooks

if TYPE_CHECKING:
    from .driver import RLMResult
    from .trajectory import TrajectoryEvent

__all__ = ["Progress", "main"]

_EXIT = {Outcome.OK: 0, Outcome.ERROR: 1, Outcome.INTERRUPTED: 124, Outcome.KILLED: 137, Outcome.CRASHED: 134}


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--option takes key=value, not {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _limits(args: argparse.Namespace) -> Limits:
    fields: dict[str, Any] = {}
    for name in ("exec_timeout_s", "memory_mb", "cpus", "pids", "output_bytes"):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if getattr(args, "network", False):
        fields["network"] = True
    if getattr(args, "best_effort", False):
        fields["best_effort"] = True
    return Limits(**fields)


def _add_sandbox_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", "-b", default="local", help="backend name (default: local)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="a backend config field (JSON values allowed); repeatable")
    p.add_argument("--timeout", dest="exec_timeout_s", type=float, help="seconds per cell")
    p.add_argument("--memory-mb", dest="memory_mb", type=int)
    p.add_argument("--cpus", type=float)
    p.add_argument("--pids", type=int)
    p.add_argument("--output-bytes", dest="output_bytes", type=int)
    p.add_argument("--network", action="store_true", help="allow network access")
    p.add_argument("--best-effort", action="store_true", help="skip limits the backend cannot enforce")


def _open(args: argparse.Namespace) -> Sandbox:
    return open_sandbox(args.backend, limits=_limits(args), **_options(args.option))


def _print_result(r: ExecResult) -> None:
    if r.stdout:
        sys.stdout.write(r.stdout)
        sys.stdout.flush()
    if r.stderr:
        sys.stderr.write(r.stderr)
    if r.error is not None:
        sys.stderr.write(r.error.traceback if r.error.traceback.endswith("\n") else r.error.traceback + "\n")
    if r.outcome in (Outcome.KILLED, Outcome.CRASHED) or (r.outcome is Outcome.INTERRUPTED and r.timed_out):
        note = r.message or r.outcome.value
        lost = "variables were lost" if r.state_lost else "variables are kept"
        sys.stderr.write(f"[{r.outcome.value}] {note} ({lost})\n")
    sys.stderr.flush()


def cmd_exec(args: argparse.Namespace) -> int:
    if args.code is not None:
        code = args.code
    elif args.file:
        with open(args.file, encoding="utf-8") as f:
            code = f.read()
    else:
        code = sys.stdin.read()
    with _open(args) as sb:
        if args.context:
            with open(args.context, "rb") as f:
                data = f.read()
            try:
                sb.load_context(data.decode("utf-8"))
            except UnicodeDecodeError:
                sb.load_context(data)
        r = sb.execute(code)
        _print_result(r)
        return _EXIT[r.outcome]


def _wait_interruptibly(done: threading.Event, on_interrupt: Callable[[], None]) -> None:
    """Wait for ``done``; each Ctrl-C calls ``on_interrupt`` and keeps waiting.

    Not ``Thread.join()``: a KeyboardInterrupt inside ``join`` makes CPython 3.11 report the thread
    as stopped while it still runs.
    """
    while True:
        try:
            if done.wait(0.1):
                return
        except KeyboardInterrupt:
            on_interrupt()


def _run_interruptible(sb: Sandbox, code: str) -> ExecResult:
    """Run a cell in a thread so that Ctrl-C interrupts the cell, not this process."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            if isinstance(sb, RuntimeSandbox):
                box["r"] = sb.execute(code, echo=True)
            else:
                box["r"] = sb.execute(code)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["e"] = exc
        finally:
            done.set()

    def interrupt() -> None:
        sys.stderr.write("\nKeyboardInterrupt (interrupting the cell)\n")
        sb.interrupt()

    threading.Thread(target=target, daemon=True).start()
    _wait_interruptibly(done, interrupt)
    if "e" in box:
        raise box["e"]
    result: ExecResult = box["r"]
    return result


def cmd_repl(args: argparse.Namespace) -> int:
    import codeop

    try:
        import readline

        hist = os.path.expanduser("~/.rlm_sandbox_history")
        try:
            readline.read_history_file(hist)
        except OSError:
            pass
    except ImportError:  # pragma: no cover - no readline on this platform
        readline = None  # type: ignore[assignment]
        hist = ""
    compiler = codeop.CommandCompiler()
    with _open(args) as sb:
        print(f"rlm-sandbox repl on {args.backend} ({sb.id}). Ctrl-C interrupts a cell; Ctrl-D quits.")
        buf: list[str] = []
        while True:
            try:
                line = input("... " if buf else ">>> ")
            except EOFError:
                print()
                break
            except KeyboardInterrupt:
                print("\nKeyboardInterrupt")
                buf = []
                continue
            buf.append(line)
            source = "\n".join(buf)
            try:
                incomplete = compiler(source, "<input>", "single") is None
            except (SyntaxError, ValueError, OverflowError):
                incomplete = False  # let the sandbox report the error
            if incomplete and line.strip():
                continue
            buf = []
            if not source.strip():
                continue
            try:
                _print_result(_run_interruptible(sb, source))
            except SandboxError as exc:
                sys.stderr.write(f"[sandbox error] {type(exc).__name__}: {exc}\n")
        if readline is not None and hist:
            try:
                readline.write_history_file(hist)
            except OSError:
                pass
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    rows = available_backends()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for name, reason in rows.items():
        status = "usable" if reason is None else f"not usable: {reason}"
        print(f"{name:10} {status}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_table, run_bench

    results = run_bench(
        args.backend,
        options=_options(args.option),
        n_exec=args.n,
        n_open=args.n_open,
        n_calls=args.n,
        context_mb=args.context_mb,
        n_scale=args.scale,
        progress=(lambda m: print(f"... {m}", file=sys.stderr)) if not args.json else None,
    )
    if args.json:
        print(json.dumps([r.row() for r in results], indent=2))
    else:
        print(format_table(args.backend, results))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from ._registry import make_config

    config = make_config(args.backend, _options(args.option))
    ids = config.gc(older_than_s=args.older_than, dry_run=args.dry_run, all_hosts=args.all_hosts)
    verb = "would remove" if args.dry_run else "removed"
    for box_id in ids:
        print(f"{verb} {box_id}")
    print(f"{args.backend}: {verb} {len(ids)} sandbox(es)", file=sys.stderr)
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    try:
        from rlm_sandbox_docker import build_image
    except ImportError:
        print('rlm-sandbox: the docker backend is not installed: pip install "rlm-sandbox[docker]"', file=sys.stderr)
        return 2
    image = build_image(tag=args.tag, base=args.base, progress=None if args.quiet else print)
    print(f"built {args.tag} ({image})")
    return 0


class Progress:
    """A live progress display of an RLM run on a stream (stderr): iteration, LM calls, sub-agents,
    sandboxes in use, elapsed time. On a terminal one line is redrawn with ``\\r``; otherwise a
    plain line is printed when something notable happens (at most every ``every_s`` seconds for
    LM-call counts alone)."""

    def __init__(self, stream: IO[str], *, tty: bool | None = None, interval_s: float = 0.2, every_s: float = 2.0):
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.interval_s = interval_s
        self.every_s = every_s
        self.started = time.monotonic()
        self.iteration = 0
        self.lm_calls = 0
        self.sub_agents = 0
        self.active: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_print = 0.0
        self._width = 0

    def line(self) -> str:
        """The current status line."""
        with self._lock:
            running = len(self.active - {"0"})
            return (
                f"[rlm] iteration {self.iteration} | LM calls {self.lm_calls} | sub-agents {self.sub_agents} "
                f"({running} running) | sandboxes in use {len(self.active)} | {time.monotonic() - self.started:.1f}s"
            )

    def __call__(self, event: TrajectoryEvent) -> None:
        notable = False
        with self._lock:
            if event.type == "lm_call":
                self.lm_calls += 1
                if event.agent_id == "0" and event.iteration is not None and event.kind == "root":
                    notable = event.iteration != self.iteration
                    self.iteration = event.iteration
            elif event.type == "agent_start":
                self.active.add(event.agent_id)
                if event.parent_id is not None:
                    self.sub_agents += 1
                notable = True
            elif event.type == "agent_end":
                self.active.discard(event.agent_id)
                notable = True
        if not self.tty:
            now = time.monotonic()
            if notable or now - self._last_print >= self.every_s:
                self._last_print = now
                self._write(self.line() + "\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def _redraw(self) -> None:
        text = self.line()
        pad = max(0, self._width - len(text))
        self._width = len(text)
        self._write("\r" + text + " " * pad)

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._redraw()

    def start(self) -> Progress:
        """Start redrawing (on a terminal)."""
        self.started = time.monotonic()
        if self.tty:
            self._thread = threading.Thread(target=self._tick, name="rlm-progress", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop redrawing and end the line."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._redraw()
            self._write("\n")
        else:
            self._write(self.line() + "\n")


def _read_context(path: str) -> ContextPayload:
    data = Path(path).read_bytes()
    if path.endswith(".json"):
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise SystemExit(f"rlm-sandbox: {path} is not valid JSON: {exc}") from None
        if isinstance(value, (list, dict, str)):
            return value
        return json.dumps(value)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data


def _print_summary(result: RLMResult) -> None:
    print(
        f"[rlm] {result.reason}: {result.iterations} iterations, {result.lm_calls} LM calls, "
        f"{result.sub_agents} sub-agents, {result.sandboxes} sandboxes, {result.elapsed_s:.2f}s",
        file=sys.stderr,
    )
    print(f"[rlm] trajectory: {result.trajectory_path}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from .driver import RLMBudget, RLMRunner
    from .lm import LM, LMError, OpenAICompatibleLM, ScriptedLM

    context = _read_context(args.context)
    lm: LM
    sub_lm: LM
    if args.scripted:
        from .demo import ChunkReaderLM, needle_script

        lm, sub_lm = ScriptedLM(needle_script, model="scripted-root"), ChunkReaderLM()
    else:
        model = args.model or os.environ.get("RLM_SANDBOX_MODEL")
        if not model:
            print("rlm-sandbox: give a model with --model (or $RLM_SANDBOX_MODEL), or --scripted", file=sys.stderr)
            return 2
        lm = OpenAICompatibleLM(base_url=args.base_url, model=model)
        sub_lm = OpenAICompatibleLM(base_url=args.base_url, model=args.sub_model) if args.sub_model else lm
    budget_fields = {
        name: getattr(args, name)
        for name in ("max_depth", "max_iterations", "max_wall_s", "max_lm_calls", "max_sandboxes")
        if getattr(args, name) is not None
    }
    progress = Progress(sys.stderr) if not args.quiet else None
    cancel = threading.Event()
    box: dict[str, Any] = {}
    try:
        with RLMRunner(
            args.backend,
            _options(args.option),
            lm=lm,
            sub_lm=sub_lm,
            limits=_limits(args),
            budget=RLMBudget(**budget_fields),
            trajectory_dir=args.trajectory_dir,
            on_event=progress,
        ) as runner:

            done = threading.Event()

            def target() -> None:
                try:
                    box["result"] = runner.run(args.question, context, cancel=cancel)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    box["error"] = exc
                finally:
                    done.set()

            def stop() -> None:
                print("\n[rlm] interrupted: stopping the run", file=sys.stderr)
                cancel.set()

            if progress is not None:
                progress.start()
            threading.Thread(target=target, name="rlm-run", daemon=True).start()
            _wait_interruptibly(done, stop)
            if progress is not None:
                progress.stop()
    finally:
        lm.close()
        sub_lm.close()
    if "error" in box:
        error = box["error"]
        if isinstance(error, LMError):
            print(f"rlm-sandbox: the model failed: {type(error).__name__}: {error}", file=sys.stderr)
            return 2
        raise error
    result: RLMResult = box["result"]
    if result.answer is not None:
        print(result.answer)
    _print_summary(result)
    return 0 if result.answer is not None else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import print_report, run_demo

    progress = Progress(sys.stderr) if not args.quiet else None
    if progress is not None:
        print(
            f"rlm-sandbox demo: an RLM finds a needle in a {args.size_mb:g} MB generated context, offline, "
            f"on the {args.backend} backend (scripted root model, chunk-reading sub-LM)",
            file=sys.stderr,
        )
        progress.start()
    try:
        report = run_demo(
            size_mb=args.size_mb,
            backend=args.backend,
            backend_options=_options(args.option),
            trajectory_dir=args.trajectory_dir,
            on_event=progress,
        )
    finally:
        if progress is not None:
            progress.stop()
    print_report(report)
    return 0 if report.found else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlm-sandbox", description="Sandboxed REPLs for Recursive Language Models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("exec", help="run code in a fresh sandbox")
    _add_sandbox_args(p)
    p.add_argument("-c", dest="code", help="code to run")
    p.add_argument("file", nargs="?", help="a Python file to run (default: stdin)")
    p.add_argument("--context", help="a file loaded as the variable `context` first")
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser("repl", help="an interactive persistent REPL in a sandbox")
    _add_sandbox_args(p)
    p.set_defaults(func=cmd_repl)

    p = sub.add_parser("backends", help="installed backends and whether each is usable here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_backends)

    p = sub.add_parser("gc", help="remove sandboxes that crashed hosts left behind")
    p.add_argument("--backend", "-b", required=True)
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--older-than", type=float, metavar="SECONDS", help="also remove sandboxes older than this")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--all-hosts", action="store_true", help="consider sandboxes created by other hosts (by age)")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("image", help="build the default Docker sandbox image")
    p.add_argument("action", choices=["build"])
    p.add_argument("--tag", default="rlm-sandbox:latest")
    p.add_argument("--base", default="python:3.12-slim", help="base image with python3 (3.8+)")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_image)

    p = sub.add_parser("bench", help="measure a backend's speed (p50/p95)")
    p.add_argument("--backend", "-b", default="local")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("-n", type=int, default=2000, help="round trips per figure")
    p.add_argument("--n-open", type=int, default=20)
    p.add_argument("--context-mb", type=int, default=100)
    p.add_argument("--scale", type=int, default=32, help="sandboxes opened at once (0: skip)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("run", help="answer a question about a context file with an RLM")
    _add_sandbox_args(p)
    p.add_argument("--context", required=True, help="the context file (text; .json: a JSON value)")
    p.add_argument("--model", "-m", help="the root model (default: $RLM_SANDBOX_MODEL)")
    p.add_argument("--sub-model", help="the model behind llm_query (default: the root model)")
    p.add_argument("--base-url", help="OpenAI-compatible API root (default: $OPENAI_BASE_URL or OpenAI); "
                   "the key is $OPENAI_API_KEY")
    p.add_argument("--scripted", action="store_true",
                   help="offline demo mode: the scripted needle-search model and a chunk-reading fake sub-LM")
    p.add_argument("--max-iterations", type=int)
    p.add_argument("--max-depth", type=int)
    p.add_argument("--max-wall-s", type=float)
    p.add_argument("--max-lm-calls", type=int)
    p.add_argument("--max-sandboxes", type=int)
    p.add_argument("--trajectory-dir", help="where the trajectory goes (default: $RLM_SANDBOX_RUNS_DIR or .rlm-runs)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    p.add_argument("question")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="an offline RLM needle search over a generated context")
    p.add_argument("--backend", "-b", default="local")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--size-mb", type=float, default=8.0, help="size of the generated context (default: 8)")
    p.add_argument("--trajectory-dir")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``rlm-sandbox`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    install_exit_hooks()  # sandboxes may be opened in worker threads (run): hook SIGTERM here
    try:
        code: int = args.func(args)
    except SandboxError as exc:
        print(f"rlm-sandbox: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
