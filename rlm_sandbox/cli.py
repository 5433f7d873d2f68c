"""The ``rlm-sandbox`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

from ._errors import SandboxError
from ._limits import Limits
from ._registry import available_backends, open_sandbox
from ._results import ExecResult, Outcome
from ._sandbox import RuntimeSandbox, Sandbox

__all__ = ["main"]

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


def _run_interruptible(sb: Sandbox, code: str) -> ExecResult:
    """Run a cell in a thread so that Ctrl-C interrupts the cell, not this process."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            if isinstance(sb, RuntimeSandbox):
                box["r"] = sb.execute(code, echo=True)
            else:
                box["r"] = sb.execute(code)
        except BaseException as exc:
            box["e"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    while t.is_alive():
        try:
            t.join(0.1)
        except KeyboardInterrupt:
            sys.stderr.write("\nKeyboardInterrupt (interrupting the cell)\n")
            sb.interrupt()
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
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except SandboxError as exc:
        print(f"rlm-sandbox: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
