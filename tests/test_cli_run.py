"""``rlm-sandbox run`` against a fake OpenAI-compatible server, ``run --scripted`` and ``demo``."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlm_sandbox.cli import Progress, main
from rlm_sandbox.demo import DEFAULT_QUESTION, make_haystack, offline_reply
from rlm_sandbox.trajectory import AgentStartEvent, LMCallEvent, RunEndEvent, read_trajectory
from tests.fakes.openai_fake import FakeOpenAIServer

CODE = "3141-ALPHA-5926"
NEEDLE = f"The secret access code is {CODE}."
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "RLM_SANDBOX_MODEL", "RLM_SANDBOX_RUNS_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def boxes(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "boxes"
    root.mkdir()
    yield root
    assert list(root.iterdir()) == []


@pytest.fixture
def context_file(tmp_path: Path) -> Path:
    path = tmp_path / "haystack.txt"
    path.write_text(make_haystack(1_000_000, needle=NEEDLE))
    return path


def trajectory_from(stderr: str) -> Path:
    line = next(x for x in stderr.splitlines() if x.startswith("[rlm] trajectory: "))
    return Path(line.removeprefix("[rlm] trajectory: "))


def test_run_against_an_openai_compatible_server(
    tmp_path: Path, boxes: Path, context_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with FakeOpenAIServer(offline_reply, require_api_key="sk-test") as srv:
        rc = main(
            [
                "run",
                "--backend", "local",
                "-o", f"root={boxes}",
                "--context", str(context_file),
                "--model", "fake-root",
                "--base-url", srv.base_url,
                "--trajectory-dir", str(tmp_path / "runs"),
                DEFAULT_QUESTION,
            ]
        )  # fmt: skip
        requests = srv.requests
        statuses = srv.statuses
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip() == NEEDLE
    assert "[rlm] iteration 2 | LM calls" in err and "sub-agents 1" in err
    assert "[rlm] answer: 2 iterations" in err

    # Every request reached the server with the key from OPENAI_API_KEY and the model given.
    assert statuses and set(statuses) == {200}
    assert all(r.headers.get("authorization") == "Bearer sk-test" for r in requests)
    assert {r.model for r in requests} == {"fake-root"}
    agent_turns = [r for r in requests if r.messages[0]["role"] == "system"]
    sub_calls = [r for r in requests if r.messages[0]["role"] != "system"]
    assert len(agent_turns) == 3  # root turns 1 and 2, and the sub-agent's turn
    assert len(sub_calls) == 3 + 1  # one per 500 kB chunk, and the sub-agent's llm_query
    assert all(CODE not in m["content"] for m in agent_turns[0].messages)

    events = read_trajectory(trajectory_from(err))
    end = events[-1]
    assert isinstance(end, RunEndEvent) and end.answer == NEEDLE and end.lm_calls == len(requests)
    starts = [e for e in events if isinstance(e, AgentStartEvent)]
    assert len({s.sandbox_id for s in starts}) == 2
    assert {e.model for e in events if isinstance(e, LMCallEvent)} == {"fake-root"}


def test_a_refused_key_is_reported(
    tmp_path: Path, boxes: Path, context_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    with FakeOpenAIServer(offline_reply, require_api_key="sk-test") as srv:
        rc = main(
            ["run", "-o", f"root={boxes}", "--context", str(context_file), "--model", "m", "--base-url", srv.base_url,
             "--trajectory-dir", str(tmp_path / "runs"), "-q", "q"]
        )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert "the model failed: LMAuthError" in err and "401" in err


def test_run_needs_a_model(context_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--context", str(context_file), "q"]) == 2
    assert "--model" in capsys.readouterr().err


def test_run_scripted_as_a_command(tmp_path: Path, boxes: Path, context_file: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "rlm_sandbox.cli", "run", "--scripted", "-o", f"root={boxes}",
         "--context", str(context_file), "--trajectory-dir", str(tmp_path / "runs"), DEFAULT_QUESTION],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == NEEDLE
    lines = proc.stderr.splitlines()
    assert any(x.startswith("[rlm] iteration 1 |") for x in lines)  # plain lines when not a tty
    assert "\r" not in proc.stderr
    assert trajectory_from(proc.stderr).is_file()


def test_demo_prints_the_run_and_finishes_in_seconds(tmp_path: Path, boxes: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "rlm_sandbox.cli", "demo", "-o", f"root={boxes}",
         "--trajectory-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    took = time.monotonic() - t
    assert proc.returncode == 0, proc.stderr
    for label in ("answer:", "iterations:", "LM calls:", "sub-agents:", "elapsed:", "trajectory:"):
        assert label in proc.stdout
    assert "(found)" in proc.stdout
    assert took < 15, f"the demo took {took:.1f}s"
    (path,) = list((tmp_path / "runs").iterdir())
    assert str(path) in proc.stdout


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_one_line_on_a_terminal() -> None:
    stream = _Tty()
    progress = Progress(stream, interval_s=0.01).start()
    common = {"run_id": "r", "t": 0.0, "sandbox_id": "s", "backend": "local", "lease": 1, "warm": True,
              "acquire_s": 0.0, "prompt": "", "context": {"type": "str", "total_length": 1, "chunk_lengths": [1],
                                                          "n_chunks": 1}}  # fmt: skip
    progress(AgentStartEvent(agent_id="0", parent_id=None, depth=0, **common))
    progress(
        LMCallEvent(run_id="r", t=0.0, agent_id="0", kind="root", iteration=3, model="m", start=0.0, end=0.1,
                    prompt="p", prompt_chars=1, n_messages=2, response="x", response_chars=1)
    )  # fmt: skip
    progress(AgentStartEvent(agent_id="0.1", parent_id="0", depth=1, **common))
    time.sleep(0.1)
    progress.stop()
    text = stream.getvalue()
    assert text.count("\r") >= 2 and text.endswith("\n") and text.count("\n") == 1
    assert "iteration 3 | LM calls 1 | sub-agents 1 (1 running) | sandboxes in use 2" in text
