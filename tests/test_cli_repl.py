"""`rlm-sandbox repl` driven through a real pseudo-terminal."""

from __future__ import annotations

import shutil
import sys

import pexpect


def _spawn() -> pexpect.spawn:
    exe = shutil.which("rlm-sandbox")
    cmd, args = (exe, ["repl"]) if exe else (sys.executable, ["-m", "rlm_sandbox.cli", "repl"])
    child = pexpect.spawn(cmd, args, encoding="utf-8", timeout=30)
    child.expect(">>> ")
    return child


def test_repl_multiline_history_and_ctrl_c_keeps_state() -> None:
    child = _spawn()
    try:
        child.sendline("x = 20")
        child.expect(">>> ")
        child.sendline("def f(y):")
        child.expect(r"\.\.\. ")
        child.sendline("    return x + y")
        child.expect(r"\.\.\. ")
        child.sendline("")
        child.expect(">>> ")
        child.sendline("f(22)")
        child.expect("42")
        child.expect(">>> ")
        child.sendline("import time")
        child.expect(">>> ")
        child.sendline("while True: time.sleep(0.01)")
        child.expect(pexpect.TIMEOUT, timeout=1)
        child.sendintr()
        child.expect("KeyboardInterrupt")
        child.expect(">>> ")
        # A cell that takes a while to stop after the interrupt (the REPL must keep waiting).
        child.sendline("try:")
        child.sendline("    while True: pass")
        child.sendline("except KeyboardInterrupt:")
        child.sendline("    time.sleep(0.5); raise")
        child.sendline("")
        child.expect(pexpect.TIMEOUT, timeout=1)
        child.sendintr()
        child.expect("KeyboardInterrupt")
        child.expect(">>> ")
        child.sendline("print('still', x)")
        child.expect("still 20")
        child.expect(">>> ")
        child.sendline("1/0")
        child.expect("ZeroDivisionError")
        child.expect(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0 or child.signalstatus is None


def test_repl_exits_on_eof() -> None:
    child = _spawn()
    try:
        child.sendline("print('A' * 3)")
        child.expect("AAA")
        child.expect(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
