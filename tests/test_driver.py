"""The RLM driver on the local backend, with scripted models."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import rlm_sandbox as rs
from rlm_sandbox.driver import HOST_FUNCTIONS, RLMBudget, RLMRunner, describe_context, find_code_blocks, find_final
from rlm_sandbox.lm import LMError, Messages, ScriptedLM
from rlm_sandbox.pool import SandboxPool
from rlm_sandbox.trajectory import (
    AgentEndEvent,
    AgentStartEvent,
    CellEvent,
    LMCallEvent,
    RunEndEvent,
    RunStartEvent,
    UnknownEvent,
    read_trajectory,
)


def repl(code: str, text: str = "") -> str:
    return f"{text}\n```repl\n{code}\n```\n"


ANSWER_42 = repl('answer["content"] = "42"\nanswer["ready"] = True')


class Env:
    """Runners on the local backend whose sandboxes live under one temp dir, checked empty after."""

    def __init__(self, tmp_path: Path) -> None:
        self.boxes = tmp_path / "boxes"
        self.boxes.mkdir()
        self.runs = tmp_path / "runs"
        self.runners: list[RLMRunner] = []

    def runner(self, lm: Any, sub_lm: Any = None, **kwargs: Any) -> RLMRunner:
        kwargs.setdefault("budget", RLMBudget(max_wall_s=60))
        kwargs.setdefault("limits", rs.Limits(exec_timeout_s=30))
        r = RLMRunner("local", {"root": str(self.boxes)}, lm=lm, sub_lm=sub_lm, trajectory_dir=self.runs, **kwargs)
        self.runners.append(r)
        return r

    def close(self) -> None:
        for r in self.runners:
            r.close()
            assert r.pool.stats().open == 0
        assert sorted(p.name for p in self.boxes.iterdir()) == []


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.close()


def events(path: Path, kind: type[Any]) -> list[Any]:
    return [e for e in read_trajectory(path) if isinstance(e, kind)]


def sub_echo(prefix: str = "sub:") -> ScriptedLM:
    return ScriptedLM(lambda m: prefix + m[-1]["content"], model="sub")


# ---- parsing helpers --------------------------------------------------------------------------------


def test_code_blocks_and_final_forms_are_parsed() -> None:
    text = "I'll look.\n```repl\nx = 1\nprint(x)\n```\nthen\n```repl\ny = 2\n```\n```python\nnot_run()\n```"
    assert find_code_blocks(text) == ["x = 1\nprint(x)", "y = 2"]
    assert find_final("Done.\nFINAL(the answer is 42)\n") == ("text", "the answer is 42")
    assert find_final("FINAL_VAR(result)") == ("var", "result")
    assert find_final('FINAL_VAR("result")') == ("var", "result")
    assert find_final("```repl\nFINAL(x)\n```") is None  # inside code it is code, not text
    assert find_final("no answer here") is None


def test_context_description() -> None:
    info = describe_context(["aa", "bbbb", "c"])
    assert (info.type, info.total_length, info.chunk_lengths, info.n_chunks) == ("list", 7, [2, 4, 1], 3)
    long = describe_context(["x"] * 250)
    assert long.n_chunks == 250 and len(long.chunk_lengths) == 100
    assert describe_context("hello").chunk_lengths == [5]
    assert describe_context(b"\x00\x01").type == "bytes"


# ---- the loop ---------------------------------------------------------------------------------------


def test_answer_ends_the_run_and_the_root_model_never_sees_the_context(env: Env) -> None:
    context = "ZEBRA-MARKER " + "x" * 100_000
    lm = ScriptedLM(
        [
            repl("n = len(context)\nprint('length', n)"),
            repl('answer["content"] = str(n)\nanswer["ready"] = True\nprint("not reached by later blocks")')
            + repl("raise SystemExit('a block after the answer must not run')"),
        ]
    )
    result = env.runner(lm).run("How long is the context?", context)
    assert (result.answer, result.reason, result.iterations, result.lm_calls) == ("100013", "answer", 2, 2)
    calls = lm.calls
    for call in calls:
        assert all("ZEBRA-MARKER" not in m["content"] for m in call.messages)
    first_user = calls[0].messages[1]["content"]
    assert "str with 100,013 total characters" in first_user and "[100013]" in first_user
    assert "Question: How long is the context?" in first_user
    feedback = calls[1].messages[-1]["content"]
    assert "length 100013" in feedback and "REPL variables:" in feedback and "'n'" in feedback
    cells = events(result.trajectory_path, CellEvent)
    assert [c.outcome for c in cells] == ["ok", "ok"] and cells[-1].final


@pytest.mark.parametrize("final", ['answer["content"] = "done"\nanswer["ready"] = True', "FINAL('done')"])
def test_the_answer_is_read_even_when_user_code_shadows_builtins(env: Env, final: str) -> None:
    shadow = "list = context.split()\nstr = int\ndict = None\nprint = len\nsorted = isinstance = 0\n"
    lm = ScriptedLM([repl(shadow + final)])
    result = env.runner(lm).run("q", "a b c")
    assert (result.answer, result.reason, result.iterations) == ("done", "answer", 1)


@pytest.mark.parametrize(
    "reply",
    [
        "I know it.\nFINAL(42)",
        repl("res = 6 * 7") + "\nFINAL_VAR(res)",
        repl("FINAL(6 * 7)"),
        repl("res = 42\nFINAL_VAR('res')"),
        repl('answer["content"] = 42\nanswer["ready"] = True'),
    ],
    ids=["text-FINAL", "text-FINAL_VAR", "code-FINAL", "code-FINAL_VAR", "answer-dict-non-str"],
)
def test_every_final_form_ends_the_run(env: Env, reply: str) -> None:
    result = env.runner(ScriptedLM([reply])).run("q", "ctx")
    assert (result.answer, result.reason, result.iterations) == ("42", "answer", 1)


def test_errors_no_code_and_long_output_are_fed_back(env: Env) -> None:
    lm = ScriptedLM(
        [
            repl("1 / 0"),
            "Let me think without code.",
            repl("print('x' * 100_000)"),
            repl("print(SHOW_VARS())"),
            ANSWER_42,
        ]
    )
    runner = env.runner(lm, budget=RLMBudget(max_wall_s=60, output_chars=1000))
    result = runner.run("q", "ctx")
    assert result.answer == "42" and result.iterations == 5
    msgs = [c.messages[-1]["content"] for c in lm.calls]
    assert "ZeroDivisionError" in msgs[1]
    assert "no ```repl block" in msgs[2]
    assert "characters truncated" in msgs[3] and len(msgs[3]) < 3000
    assert "Available variables" in msgs[4] and "'context'" in msgs[4]
    cells = events(result.trajectory_path, CellEvent)
    assert cells[0].outcome == "error" and cells[0].error is not None and cells[0].error.startswith("ZeroDivisionError")


def test_when_iterations_run_out_the_model_is_asked_for_a_final_answer(env: Env) -> None:
    lm = ScriptedLM([repl("print(1)"), repl("print(2)"), "Best guess:\nFINAL(probably 7)"])
    result = env.runner(lm, budget=RLMBudget(max_iterations=2, max_wall_s=60)).run("q", "ctx")
    assert (result.answer, result.reason, result.iterations, result.lm_calls) == ("probably 7", "max_iterations", 2, 3)
    assert "used all your iterations" in lm.calls[-1].messages[-1]["content"]
    kinds = [e.kind for e in events(result.trajectory_path, LMCallEvent)]
    assert kinds == ["root", "root", "final"]


def test_a_crashed_runtime_is_reported_and_the_repl_still_works(env: Env) -> None:
    lm = ScriptedLM([repl("x = 1\nimport os\nos._exit(3)"), repl("print('x' in globals())\nFINAL('done')")])
    result = env.runner(lm).run("q", "ctx")
    assert result.answer == "done"
    assert "crashed" in lm.calls[1].messages[-1]["content"]
    cells = events(result.trajectory_path, CellEvent)
    assert cells[0].outcome == "crashed" and cells[0].state_lost
    assert cells[1].stdout == "False\n"


# ---- sub-LM calls -----------------------------------------------------------------------------------


def test_llm_query_batched_is_concurrent_bounded_and_ordered(env: Env) -> None:
    lock = threading.Lock()
    active = peak = 0

    def slow(messages: Messages) -> str:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.2)
        with lock:
            active -= 1
        return messages[-1]["content"].upper()

    lm = ScriptedLM(
        [
            repl(
                "import time\nt = time.monotonic()\n"
                "out = llm_query_batched([f'p{i}' for i in range(8)])\n"
                "took = time.monotonic() - t\nprint(out, took)\n"
                "one = llm_query('single')\nFINAL(','.join(out) + '|' + one)"
            )
        ]
    )
    runner = env.runner(lm, ScriptedLM(slow), budget=RLMBudget(max_wall_s=60, max_concurrency=4))
    result = runner.run("q", "ctx")
    assert result.answer == "P0,P1,P2,P3,P4,P5,P6,P7|SINGLE"
    assert peak == 4  # concurrent, and bounded by max_concurrency
    took = float(events(result.trajectory_path, CellEvent)[0].stdout.split()[-1])
    assert 0.35 < took < 1.2  # 8 calls of 0.2 s, 4 at a time: about 0.4 s
    subs = [e for e in events(result.trajectory_path, LMCallEvent) if e.kind == "sub"]
    assert len(subs) == 9 and {e.batch for e in subs[:8]} <= {1, None}
    assert result.lm_calls == 10


def test_a_failing_sub_call_is_an_error_string_in_a_batch_and_raises_alone(env: Env) -> None:
    def sub(messages: Messages) -> str:
        if "bad" in messages[-1]["content"]:
            raise LMError("the server said no")
        return "fine"

    lm = ScriptedLM(
        [
            repl(
                "out = llm_query_batched(['ok', 'bad', 'ok'])\nprint(out)\n"
                "try:\n    llm_query('bad')\nexcept RuntimeError as e:\n    err = str(e)\n"
                "FINAL(repr(out) + ' / ' + err)"
            )
        ]
    )
    result = env.runner(lm, ScriptedLM(sub)).run("q", "ctx")
    assert result.answer is not None
    out, err = result.answer.split(" / ")
    assert out.startswith("['fine', 'Error: LMError: the server said no', 'fine']")
    assert "llm_query failed" in err and "the server said no" in err
    failed = [e for e in events(result.trajectory_path, LMCallEvent) if e.error]
    assert len(failed) == 2 and all("the server said no" in (e.error or "") for e in failed)


# ---- sub-agents -------------------------------------------------------------------------------------


def dispatch(root: Callable[[Messages, int], str], child: Callable[[Messages], str]) -> ScriptedLM:
    """A scripted model that plays the root (by turn number) and sub-agents."""

    def script(messages: Messages) -> str:
        if "You are a sub-agent" in messages[1]["content"]:
            return child(messages)
        return root(messages, sum(1 for m in messages if m["role"] == "assistant"))

    return ScriptedLM(script)


def test_rlm_query_runs_a_child_in_its_own_sandbox_with_the_prompt_as_context(env: Env) -> None:
    prompt = "count the words: alpha beta gamma"

    def root(messages: Messages, turn: int) -> str:
        return repl(
            f"secret_of_root = 1\nr = rlm_query({prompt!r})\n"
            "FINAL(r + ' ' + str('child_var' in globals()))"
        )

    def child(messages: Messages) -> str:
        return repl(
            "child_var = len(context.split(':')[1].split())\n"
            "print('secret_of_root' in globals())\nFINAL(str(child_var))"
        )

    lm = dispatch(root, child)
    result = env.runner(lm).run("q", "root context")
    assert result.answer == "3 False"
    assert result.sub_agents == 1 and result.sandboxes == 2
    starts = events(result.trajectory_path, AgentStartEvent)
    assert [(s.agent_id, s.parent_id, s.depth) for s in starts] == [("0", None, 0), ("0.1", "0", 1)]
    assert starts[0].sandbox_id != starts[1].sandbox_id
    assert starts[1].context.total_length == len(prompt) and starts[1].prompt == prompt
    child_cells = [c for c in events(result.trajectory_path, CellEvent) if c.agent_id == "0.1"]
    assert child_cells[0].stdout == "False\n" and child_cells[0].sandbox_id == starts[1].sandbox_id
    child_first = next(c for c in lm.calls if "You are a sub-agent" in c.messages[1]["content"])
    assert f"str with {len(prompt)} total characters" in child_first.messages[1]["content"]
    assert prompt not in child_first.messages[1]["content"]  # the child reads its context with code


def test_rlm_query_batched_runs_children_concurrently_in_distinct_sandboxes(env: Env) -> None:
    def root(messages: Messages, turn: int) -> str:
        return repl("out = rlm_query_batched(['a', 'b', 'c'])\nFINAL(','.join(out))")

    def child(messages: Messages) -> str:
        return repl("import time\ntime.sleep(0.4)\nFINAL(context.upper())")

    result = env.runner(dispatch(root, child)).run("q", "ctx")
    assert result.answer == "A,B,C" and result.sub_agents == 3
    starts = {e.agent_id: e for e in events(result.trajectory_path, AgentStartEvent)}
    ends = {e.agent_id: e for e in events(result.trajectory_path, AgentEndEvent)}
    assert len({s.sandbox_id for s in starts.values()}) == 4
    kids = [k for k in starts if k != "0"]
    latest_start = max(starts[k].t for k in kids)
    earliest_end = min(ends[k].t for k in kids)
    assert latest_start < earliest_end  # all three were running at once


def test_at_max_depth_rlm_query_is_a_plain_lm_call(env: Env) -> None:
    def root(messages: Messages, turn: int) -> str:
        return repl("FINAL(rlm_query('outer'))")

    def child(messages: Messages) -> str:
        assert "recursion is off" in messages[0]["content"]
        return repl("FINAL(rlm_query('inner: ' + context))")

    lm = dispatch(root, child)
    result = env.runner(lm, sub_echo()).run("q", "ctx")
    assert result.answer == "sub:inner: outer"
    assert "recursion is off" not in lm.calls[0].messages[0]["content"]
    fallback = [e for e in events(result.trajectory_path, LMCallEvent) if e.kind == "rlm_fallback"]
    assert [(e.agent_id, e.prompt) for e in fallback] == [("0.1", "inner: outer")]
    assert result.sub_agents == 1

    flat = env.runner(ScriptedLM([repl("FINAL(rlm_query('x'))")]), sub_echo(), budget=RLMBudget(max_depth=1))
    result = flat.run("q", "ctx")
    assert result.answer == "sub:x" and result.sub_agents == 0 and result.sandboxes == 1


# ---- budgets ----------------------------------------------------------------------------------------


def test_the_lm_call_budget_stops_sub_calls_and_the_run(env: Env) -> None:
    lm = ScriptedLM(
        [
            repl(
                "got = []\nfor i in range(5):\n    try:\n        got.append(llm_query(str(i)))\n"
                "    except RuntimeError as e:\n        got.append('stopped: ' + str(e))\nprint(got)"
            ),
            ANSWER_42,
        ]
    )
    result = env.runner(lm, sub_echo(), budget=RLMBudget(max_lm_calls=3, max_wall_s=60)).run("q", "ctx")
    assert (result.answer, result.reason, result.lm_calls) == (None, "max_lm_calls", 3)
    out = events(result.trajectory_path, CellEvent)[0].stdout
    assert out.startswith("['sub:0', 'sub:1', \"stopped: the run's LM call budget (3) is spent\"")


def test_the_sandbox_budget_bounds_sub_agents(env: Env) -> None:
    def root(messages: Messages, turn: int) -> str:
        return repl("out = rlm_query_batched(['a', 'b', 'c'])\nFINAL('|'.join(out))")

    def child(messages: Messages) -> str:
        return repl("FINAL(context)")

    runner = env.runner(dispatch(root, child), budget=RLMBudget(max_sandboxes=2, max_concurrent_subagents=1))
    result = runner.run("q", "ctx")
    spent = "Error: RuntimeError: the run's sandbox budget (2) is spent"
    assert result.answer == f"a|{spent}|{spent}"
    assert result.sub_agents == 1 and result.sandboxes == 2


def test_the_wall_time_interrupts_a_running_cell(env: Env) -> None:
    lm = ScriptedLM([repl("import time\nwhile True:\n    time.sleep(0.01)")])
    t = time.monotonic()
    result = env.runner(lm, budget=RLMBudget(max_wall_s=1.0)).run("q", "ctx")
    assert time.monotonic() - t < 3.5
    assert (result.answer, result.reason) == (None, "wall_time")
    cell = events(result.trajectory_path, CellEvent)[0]
    assert cell.outcome == "interrupted"


def test_the_wall_time_stops_a_sub_agent_inside_its_own_cell(env: Env) -> None:
    def root(messages: Messages, turn: int) -> str:
        return repl("FINAL(rlm_query('work'))")

    def child(messages: Messages) -> str:
        return repl("import time\ntime.sleep(60)")

    runner = env.runner(dispatch(root, child), budget=RLMBudget(max_wall_s=1.5))
    t = time.monotonic()
    result = runner.run("q", "ctx")
    assert time.monotonic() - t < 5
    assert result.reason == "wall_time" and result.answer is None
    ends = {e.agent_id: e for e in events(result.trajectory_path, AgentEndEvent)}
    assert set(ends) == {"0", "0.1"} and ends["0.1"].reason == "wall_time"
    child_cell = next(c for c in events(result.trajectory_path, CellEvent) if c.agent_id == "0.1")
    assert child_cell.outcome == "interrupted" and child_cell.duration_s < 3
    assert runner.pool.stats().leased == 0


def test_the_wall_time_bounds_a_slow_lm_call(env: Env) -> None:
    def slow(messages: Messages) -> str:
        time.sleep(3)
        return ANSWER_42

    t = time.monotonic()
    result = env.runner(ScriptedLM(slow), budget=RLMBudget(max_wall_s=0.5)).run("q", "ctx")
    assert time.monotonic() - t < 2
    assert result.reason == "wall_time"


def test_cancel_interrupts_the_run(env: Env) -> None:
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    t = time.monotonic()
    lm = ScriptedLM([repl("import time\ntime.sleep(30)")])
    result = env.runner(lm).run("q", "ctx", cancel=cancel)
    assert time.monotonic() - t < 3
    assert result.reason == "cancelled"
    assert events(result.trajectory_path, CellEvent)[0].outcome == "interrupted"

    already = threading.Event()
    already.set()
    lm = ScriptedLM([ANSWER_42])
    result = env.runner(lm).run("q", "ctx", cancel=already)
    assert (result.answer, result.reason, result.lm_calls, result.sandboxes) == (None, "cancelled", 0, 0)
    assert lm.calls == []
    end = read_trajectory(result.trajectory_path)[-1]
    assert isinstance(end, RunEndEvent) and end.reason == "cancelled"


# ---- errors, trajectory, reuse, backends ------------------------------------------------------------


def test_a_root_lm_error_is_raised_and_recorded(env: Env) -> None:
    runner = env.runner(ScriptedLM([LMError("no such model")]))
    with pytest.raises(LMError, match="no such model"):
        runner.run("q", "ctx")
    (path,) = list(env.runs.iterdir())
    end = read_trajectory(path)[-1]
    assert isinstance(end, RunEndEvent) and end.reason == "error" and "no such model" in (end.error or "")
    assert runner.pool.stats().leased == 0


def test_the_trajectory_reads_back_typed(env: Env, tmp_path: Path) -> None:
    seen: list[str] = []
    lm = ScriptedLM([repl("print(llm_query('hi'))"), ANSWER_42])
    result = env.runner(lm, sub_echo(), on_event=lambda e: seen.append(e.type)).run("the question", ["c1", "c2"])
    evs = read_trajectory(result.trajectory_path)
    assert [e.type for e in evs] == seen
    assert isinstance(evs[0], RunStartEvent) and evs[0].question == "the question"
    assert evs[0].context.chunk_lengths == [2, 2] and evs[0].budget["max_depth"] == 2
    assert isinstance(evs[-1], RunEndEvent) and evs[-1].answer == "42" and evs[-1].lm_calls == 3
    calls = [e for e in evs if isinstance(e, LMCallEvent)]
    assert [c.kind for c in calls] == ["root", "sub", "root"]
    assert calls[1].response == "sub:hi" and calls[1].end >= calls[1].start
    assert all(e.run_id == result.run_id for e in evs if not isinstance(e, UnknownEvent))

    # Forward compatible, robust to a cut-off last line, strict otherwise.
    copy = tmp_path / "copy.jsonl"
    copy.write_text(
        result.trajectory_path.read_text() + '{"type": "from_the_future", "x": 1}\n{"type": "cell", "run_'
    )
    more = read_trajectory(copy)
    assert len(more) == len(evs) + 1 and isinstance(more[-1], UnknownEvent)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "cell"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        read_trajectory(bad)


def test_a_runner_reuses_warm_sandboxes_with_nothing_left_from_the_last_run(env: Env) -> None:
    lm = ScriptedLM([repl("secret = 'from run 1'\nFINAL('one')"), repl("FINAL(str('secret' in globals()))")])
    runner = env.runner(lm)
    assert runner.run("q", "first").answer == "one"
    assert runner.pool.wait_idle(1, timeout_s=10)
    second = runner.run("q", "second")
    assert second.answer == "False"
    start = events(second.trajectory_path, AgentStartEvent)[0]
    assert start.warm


def test_a_dead_pre_started_sandbox_is_replaced_before_the_agent_starts(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = SandboxPool(max_size=4, min_idle=0)
    runner = env.runner(ScriptedLM([ANSWER_42]), pool=pool)
    try:
        functions = dict.fromkeys(HOST_FUNCTIONS, lambda *a: None)
        with pool.acquire("local", options={"root": str(env.boxes)}, limits=runner.limits, functions=functions) as sb:
            dead = sb.id
        assert pool.wait_idle(1, timeout_s=10)
        real = rs.RuntimeSandbox.load_context

        def load_context(self: rs.RuntimeSandbox, payload: Any, *, name: str = "context") -> str:
            if self.id == dead:
                raise rs.SandboxNotFound("the sandbox expired while idle")
            return real(self, payload, name=name)

        monkeypatch.setattr(rs.RuntimeSandbox, "load_context", load_context)
        result = runner.run("q", "ctx")
        assert result.answer == "42"
        (start,) = events(result.trajectory_path, AgentStartEvent)
        assert start.sandbox_id != dead and not start.warm
        assert pool.stats().replaced == 1
    finally:
        pool.close()


def test_sub_agents_can_run_on_another_backend_config(env: Env, tmp_path: Path) -> None:
    other = tmp_path / "other-boxes"
    other.mkdir()

    def root(messages: Messages, turn: int) -> str:
        return repl("import os\nhere = os.getcwd()\nFINAL(here + '|' + rlm_query('where'))")

    def child(messages: Messages) -> str:
        return repl("import os\nFINAL(os.getcwd())")

    runner = env.runner(
        dispatch(root, child), sub_backend=rs.LocalConfig(root=str(other)), sub_limits=rs.Limits(exec_timeout_s=10)
    )
    result = runner.run("q", "ctx")
    assert result.answer is not None
    root_dir, child_dir = result.answer.split("|")
    assert root_dir.startswith(str(env.boxes)) and child_dir.startswith(str(other))
    runner.close()
    assert list(other.iterdir()) == []


def test_an_unknown_backend_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(rs.BackendNotFound):
        RLMRunner("no-such-backend", lm=ScriptedLM([]), trajectory_dir=tmp_path)
