"""The rlms plug-in (rlm_sandbox.contrib.rlm), driven by rlm's own ``RLM(...).completion()`` loop.

The LM is scripted: ``rlm.core.rlm.get_client`` (the name rlm's RLM, its children and its
max-depth fallback use to build clients) returns :class:`ScriptedClient`, an rlm ``BaseLM`` over
rlm_sandbox's ``ScriptedLM``. Everything else is the real thing: rlm's loop, its LMHandler socket
server, ``_subcall`` children, our patched ``get_environment`` and real sandboxes. One test also
uses rlm's real OpenAI client over HTTP against the fake OpenAI server, with nothing patched.

The end-to-end tests run on the local backend and on Docker. Docker is skipped when the backend
is not installed or no engine answers, except when ``CI`` or ``RLM_SANDBOX_REQUIRE_DOCKER`` is set:
then they fail.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("rlm", reason="the rlm extra (rlms) is not installed")

import rlm.core.rlm as rlm_core
from rlm import RLM
from rlm.clients.base_lm import BaseLM
from rlm.core.types import ModelUsageSummary, UsageSummary
from rlm.environments import LocalREPL
from rlm.logger import RLMLogger

import rlm_sandbox as rs
import rlm_sandbox.contrib.rlm as plugin
from rlm_sandbox.backends.local import _descendants
from rlm_sandbox.contrib.rlm import SandboxREPL, sandboxed
from rlm_sandbox.lm import Messages, ScriptedLM
from tests.fakes.openai_fake import FakeOpenAIServer

# rlm's LMHandler.stop() shuts its server down but never closes the listening socket (rlms 0.1.3):
# ignore exactly that ResourceWarning, raised where stop() drops the server.
pytestmark = pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning:rlm.core.lm_handler")

REQUIRE_DOCKER = bool(os.environ.get("CI") or os.environ.get("RLM_SANDBOX_REQUIRE_DOCKER"))


# -- a scripted LM that rlm can use -----------------------------------------------------------------


class ScriptedClient(BaseLM):  # type: ignore[misc]
    """rlm's BaseLM over ScriptedLMs, chosen by role.

    A call whose messages start with a system prompt is an RLM turn of the RLM that owns this
    client: it goes to ``lms[model_name]`` (children get their own model name through
    ``rlm_query(prompt, model="child")``). Anything else is a plain sub-LM call (``llm_query``, the
    max-depth fallback): ``lms["sub"]``.
    """

    def __init__(self, lms: dict[str, ScriptedLM], model_name: str = "root", **kwargs: Any) -> None:
        super().__init__(model_name=model_name, **kwargs)
        self.lms = lms
        self._lock = threading.Lock()
        self._last = threading.local()  # rlm reads get_last_usage() in the same handler thread
        self._calls = self._in = self._out = 0

    def completion(self, prompt: str | list[dict[str, Any]]) -> str:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        role = self.model_name if messages[0]["role"] == "system" else "sub"
        text = self.lms[role].complete(messages, model=self.model_name).text
        usage = ModelUsageSummary(1, sum(len(str(m["content"])) for m in messages) // 4, len(text) // 4)
        self._last.usage = usage
        with self._lock:
            self._calls += 1
            self._in += usage.total_input_tokens
            self._out += usage.total_output_tokens
        return text

    async def acompletion(self, prompt: str | list[dict[str, Any]]) -> str:
        return await asyncio.to_thread(self.completion, prompt)

    def get_usage_summary(self) -> Any:
        with self._lock:
            return UsageSummary({self.model_name: ModelUsageSummary(self._calls, self._in, self._out)})

    def get_last_usage(self) -> Any:
        return getattr(self._last, "usage", ModelUsageSummary(0, 0, 0))


def repl(*lines: str) -> str:
    """A model reply with one ```repl``` block."""
    return "Let me run this.\n```repl\n" + "\n".join(lines) + "\n```"


def sub_lm(messages: Messages) -> str:
    """The plain sub-LM: answers a few known questions."""
    text = messages[-1]["content"]
    if "magic" in text:
        return "forty-two"
    if text.startswith("leaf:"):
        return "leaf-" + text.split(":", 1)[1].strip()
    return "?"


def cells(result: Any) -> list[dict[str, Any]]:
    """Every cell's REPLResult (as a dict) from an RLM run with ``logger=RLMLogger()``, in order."""
    return [block["result"] for it in result.metadata["iterations"] for block in it["code_blocks"]]


def repl_outputs(lm: ScriptedLM) -> list[str]:
    """The REPL output messages rlm fed back to the model, in order (the last call sees them all)."""
    calls = lm.calls
    if not calls:
        return []
    return [m["content"] for m in calls[-1].messages if m["content"].startswith("REPL output")]


# -- backends ---------------------------------------------------------------------------------------


@functools.cache
def docker_unavailable() -> str | None:
    """Why the Docker backend cannot run here (not installed, no engine answers, no image), or None."""
    try:
        config_cls = rs.backend_config("docker")
    except rs.BackendNotFound as exc:
        return str(exc)
    try:
        return config_cls().check()  # pings the engine and looks for the image
    except Exception as exc:  # noqa: BLE001 - any failure means "unavailable here"
        return f"the docker backend's check failed: {type(exc).__name__}: {exc}"


def running_containers(ids: set[str]) -> set[str]:
    """Which of these container ids (12 hex digits) still run."""
    import docker

    client = docker.from_env(timeout=30)
    try:
        return {c.id[:12] for c in client.containers.list()} & ids
    finally:
        client.close()


@dataclass
class Backend:
    name: str
    options: dict[str, Any]
    boxes: Path | None = None  # local: where every sandbox's directory is created
    envs: list[SandboxREPL] = field(default_factory=list)

    def env(self, limits: rs.Limits | None = None, **extra: Any) -> dict[str, Any]:
        """RLM keyword arguments for this backend (the one-line story)."""
        return sandboxed(self.name, limits=limits or rs.Limits(exec_timeout_s=20), **self.options, **extra)


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def box(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    """A backend whose environments are recorded and checked for leaks after the test."""
    name = request.param
    if name == "docker":
        reason = docker_unavailable()
        if reason is not None:
            if REQUIRE_DOCKER:
                pytest.fail(f"Docker is required (CI / RLM_SANDBOX_REQUIRE_DOCKER set): {reason}")
            pytest.skip(reason)
        backend = Backend(name, {})
    else:
        boxes = tmp_path / "boxes"
        boxes.mkdir()
        backend = Backend(name, {"root": str(boxes)}, boxes=boxes)

    class RecordingREPL(SandboxREPL):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            backend.envs.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(plugin, "SandboxREPL", RecordingREPL)
    processes_before = set(_descendants(os.getpid()))
    yield backend
    assert plugin.live_environments() == []
    for env in backend.envs:
        assert env.closed
    if backend.boxes is not None:
        assert list(backend.boxes.iterdir()) == [], "a sandbox directory was left behind"
        assert set(_descendants(os.getpid())) <= processes_before, "a sandbox process was left behind"
    else:
        assert running_containers({env.sandbox_id for env in backend.envs}) == set(), "a container was left behind"


@pytest.fixture
def lms(monkeypatch: pytest.MonkeyPatch) -> dict[str, ScriptedLM]:
    """Scripted LMs by role; rlm builds every client from them."""
    table: dict[str, ScriptedLM] = {"sub": ScriptedLM(sub_lm)}
    monkeypatch.setattr(rlm_core, "get_client", lambda backend, kwargs: ScriptedClient(table, **(kwargs or {})))
    return table


@pytest.fixture(scope="module", autouse=True)
def _disable_at_end() -> Iterator[None]:
    yield
    plugin.disable()


# -- end to end, on every backend ---------------------------------------------------------------------


def test_recursive_rlm_query_runs_each_child_in_its_own_sandbox(box: Backend, lms: dict[str, ScriptedLM]) -> None:
    lms["root"] = ScriptedLM(
        [
            repl(
                "print(type(context).__name__, len(context))",
                "sub = llm_query('What is the magic number? ' + context[:20])",
                "both = llm_query_batched(['magic?', 'other?'])",
                "child = rlm_query('find the word: needle', model='child')",
                "print(sub, both, child)",
            ),
            repl("answer['content'] = f'{sub} | {both} | {child}'", "answer['ready'] = True"),
        ]
    )
    # depth 1 RLM (env depth 2): recurses once more; depth 2 RLM (env depth 3) is at max_depth - 1,
    # so its own rlm_query falls back to a plain LM call.
    lms["child"] = ScriptedLM(
        [
            repl(
                "word = context.split(':')[1].strip()",
                "inner = rlm_query('go deeper: ' + word, model='grandchild')",
                "answer['content'] = 'child(' + inner + ')'",
                "answer['ready'] = True",
            )
        ]
    )
    lms["grandchild"] = ScriptedLM(
        [
            repl(
                "leaf = rlm_query('leaf: ' + context.split(':')[1].strip(), model='leaf')",
                "answer.update(content=f'grandchild({leaf})', ready=True)",
            )
        ]
    )
    rlm = RLM(
        backend="openai",
        backend_kwargs={"model_name": "root"},
        max_depth=3,
        max_iterations=4,
        logger=RLMLogger(),
        **box.env(),
    )
    result = rlm.completion("The magic number is hidden in here.", root_prompt="What is the magic number?")

    assert result.response == "forty-two | ['forty-two', '?'] | child(grandchild(leaf-needle))"
    assert repl_outputs(lms["root"])[0].startswith("REPL output:\n\nstr 35\nforty-two ['forty-two', '?'] child(")

    # one sandbox per RLM, each at its own depth, each with its own context
    assert [env.depth for env in box.envs] == [1, 2, 3]
    assert len({env.sandbox_id for env in box.envs}) == 3
    assert [call.messages[-1]["content"] for call in lms["sub"].calls if call.model == "leaf"] == ["leaf: needle"]

    # rlm_calls: the completions of the sub-calls the cell made, in call order
    first_cell = result.metadata["iterations"][0]["code_blocks"][0]["result"]
    assert [c["response"] for c in first_cell["rlm_calls"]] == [
        "forty-two",
        "forty-two",
        "?",
        "child(grandchild(leaf-needle))",
    ]
    assert first_cell["final_answer"] is None
    assert "sub" in first_cell["locals"] and "context" in first_cell["locals"]
    last_cell = result.metadata["iterations"][1]["code_blocks"][0]["result"]
    assert last_cell["rlm_calls"] == []
    assert last_cell["final_answer"] == result.response


def test_persistent_conversation_keeps_state_across_completions(box: Backend, lms: dict[str, ScriptedLM]) -> None:
    lms["root"] = ScriptedLM(
        [
            # completion 1
            repl("notes = [context.upper()]", "answer['content'] = 'one'", "answer['ready'] = True"),
            # completion 2, turn 1: `answer` was reset, so this cell does not end the run
            repl(
                "print(answer, len(history), history[0]['role'], context == context_0)",
                "print(context_1, notes)",
            ),
            # completion 2, turn 2
            repl("answer.update(content=f'{notes[0]} + {context_1} + {len(history_0)}', ready=True)"),
        ]
    )
    with RLM(
        backend="openai", backend_kwargs={"model_name": "root"}, persistent=True, max_iterations=3, **box.env()
    ) as rlm:
        first = rlm.completion("alpha", root_prompt="q1")
        assert first.response == "one"
        second = rlm.completion("beta", root_prompt="q2")
        assert len(box.envs) == 1 and not box.envs[0].closed
        env = box.envs[0]
        assert (env.get_context_count(), env.get_history_count()) == (2, 2)  # each completion adds one

    assert len(box.envs) == 1 and box.envs[0].closed
    calls = lms["root"].calls
    history_len = len(calls[0].messages)  # the history stored is what the model was shown
    assert second.response == f"ALPHA + beta + {history_len}"
    turn1 = calls[1].messages[-1]["content"]
    assert "You have 2 contexts available" in turn1 and "1 prior conversation history" in turn1
    assert repl_outputs(lms["root"])[-1].startswith(
        f"REPL output:\n\n{{'content': '', 'ready': False}} {history_len} system True\nbeta ['ALPHA']\n"
    )


def test_timeouts_and_crashes_are_reported_and_survived(box: Backend, lms: dict[str, ScriptedLM]) -> None:
    lms["root"] = ScriptedLM(
        [
            repl("kept = 7", "import time", "while True:", "    time.sleep(0.01)"),
            repl("kept += 1", "print('kept', kept)"),
            repl(  # ignores the interrupt: killed after the grace period
                "lost = 1",
                "while True:",
                "    try:",
                "        while True:",
                "            pass",
                "    except KeyboardInterrupt:",
                "        pass",
            ),
            repl(
                "print('kept' in globals(), 'lost' in globals(), context[:3], SHOW_VARS(), flush=True)",
                "import os",
                "os._exit(3)",
            ),
            repl("print(llm_query('magic?'))", "FINAL_VAR('context')"),
        ]
    )
    limits = rs.Limits(exec_timeout_s=0.5, grace_s=0.5)
    rlm = RLM(
        backend="openai",
        backend_kwargs={"model_name": "root"},
        max_iterations=6,
        logger=RLMLogger(),
        **box.env(limits),
    )
    result = rlm.completion("the context", root_prompt="survive")

    assert result.response == "the context"
    timed_out, after_timeout, killed, crashed, last = cells(result)
    assert timed_out["stderr"] == (
        "TimeoutError: the cell ran longer than 0.5 s and was interrupted (variables are kept)\n"
    )
    assert (after_timeout["stdout"], after_timeout["stderr"]) == ("kept 8\n", "")
    assert killed["stderr"] == (
        "TimeoutError: the cell ran longer than 0.5 s, ignored the interrupt and was killed; "
        "the REPL was restarted: variables are lost (contexts, histories and files are kept)\n"
    )
    assert crashed["stdout"] == "False False the Available variables: {'context_0': 'str', 'context': 'str'}\n"
    assert crashed["stderr"].startswith("RuntimeError: the REPL process crashed (")
    assert "status 3" in crashed["stderr"]
    assert (last["stdout"], last["stderr"], last["final_answer"]) == ("forty-two\n", "", "the context")
    # rlm fed each of these back to the model
    assert [o.count("TimeoutError") + o.count("crashed") for o in repl_outputs(lms["root"])] == [1, 0, 1, 1]
    assert len(box.envs) == 1


def test_errors_are_stderr_and_reserved_names_are_restored(box: Backend, lms: dict[str, ScriptedLM]) -> None:
    lms["root"] = ScriptedLM(
        [
            "Two blocks.\n```repl\nx = [1, 2]\n1 / 0\n```\n```repl\n"
            "context = 'clobbered'\nllm_query = None\nSHOW_VARS = 3\nanswer = 'nope'\nhistory = 5\n"
            "str = int\ndict = None\n```",
            repl(
                "print(context[:4], llm_query('magic?'), x, SHOW_VARS())",
                "print(type(answer).__name__, answer)",
                "answer['content'] = 'early'",
                "answer['ready'] = True",
                "answer['content'] = 'late'",
            ),
        ]
    )
    rlm = RLM(
        backend="openai", backend_kwargs={"model_name": "root"}, max_iterations=3, logger=RLMLogger(), **box.env()
    )
    result = rlm.completion("real context", root_prompt="q")

    assert result.response == "late"  # content as it is at the end of the cell that set ready
    failed, clobbering, restored = cells(result)
    assert failed["stderr"].startswith("Traceback (most recent call last):\n")
    assert failed["stderr"].endswith("ZeroDivisionError: division by zero\n")
    assert sorted(failed["locals"]) == ["answer", "context", "context_0", "x"]  # x is kept despite the error
    assert failed["locals"]["x"] == "[1, 2]"
    assert clobbering["stderr"] == ""
    assert restored["stderr"] == ""
    first_line, second_line = restored["stdout"].splitlines()
    assert first_line.startswith("real forty-two [1, 2] Available variables: {")
    shown = eval(first_line.split("Available variables: ")[1])
    assert shown == {
        "context_0": "str",
        "context": "str",
        "x": "list",
        "history": "int",
        "str": "type",
        "dict": "NoneType",
    }
    assert second_line == "Answer {'content': '', 'ready': False}"
    assert repl_outputs(lms["root"])[0].count("ZeroDivisionError") == 1


def test_sub_calls_run_on_the_host_without_network_or_secrets_in_the_box(
    box: Backend, lms: dict[str, ScriptedLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-host-secret")
    lms["root"] = ScriptedLM(
        [
            repl(
                "import os, socket",
                "port = int(context)",
                "try:",
                "    socket.create_connection(('127.0.0.1', port), timeout=2).close()",
                "    reach = 'reached the LM handler'",
                "except OSError as exc:",
                "    reach = 'no route'",
                "answer['content'] = f\"{reach} | {os.environ.get('OPENAI_API_KEY')} | {llm_query('magic?')}\"",
                "answer['ready'] = True",
            )
        ]
    )
    kwargs = box.env()  # enables the plug-in before the spy wraps it
    ports: list[int] = []
    real_get_environment = plugin._get_environment

    def spy(environment: str, kwargs: dict[str, Any]) -> Any:
        kwargs = dict(kwargs)
        ports.append(kwargs["lm_handler_address"][1])
        kwargs["context_payload"] = str(kwargs["lm_handler_address"][1])  # tell the code the port
        return real_get_environment(environment, kwargs)

    monkeypatch.setattr(rlm_core, "get_environment", spy)
    rlm = RLM(backend="openai", backend_kwargs={"model_name": "root"}, max_iterations=2, **kwargs)
    result = rlm.completion("ignored", root_prompt="q")
    assert ports and result.response == "no route | None | forty-two"


# -- the environment on its own (local backend) ---------------------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> Iterator[dict[str, Any]]:
    boxes = tmp_path / "boxes"
    boxes.mkdir()
    yield {"backend": "local", "root": str(boxes), "limits": {"exec_timeout_s": 10}}
    assert list(boxes.iterdir()) == []


def test_answer_semantics_and_final_compat(local: dict[str, Any]) -> None:
    with SandboxREPL(context_payload="ctx", sandbox=local) as env:
        assert env.execute_code("answer['content'] = 'no'").final_answer is None
        assert env.execute_code("answer.update(content='via update', ready=True)").final_answer == "via update"
        assert env.execute_code("x = 1").final_answer is None  # ready stays set but is not re-reported
        env.update_handler_address(("127.0.0.1", 9))  # a new completion(): answer starts over
        assert env.execute_code("print(answer)").stdout == "{'content': '', 'ready': False}\n"
        assert env.execute_code("answer = {'content': 42, 'ready': True}").final_answer == "42"
        assert env.execute_code("print(type(answer).__name__)").stdout == "Answer\n"
        env.update_handler_address(("127.0.0.1", 9))
        assert env.execute_code("answer['ready'] = True\nanswer['ready'] = False").final_answer == ""
        assert env.execute_code("FINAL('done')").final_answer == "done"
        assert env.execute_code("y = [1, 2]\nFINAL_VAR('y')").final_answer == "[1, 2]"
        r = env.execute_code("FINAL_VAR('nope')")
        assert r.final_answer is None and "NameError: FINAL_VAR: no variable named 'nope'" in r.stderr
        r = env.execute_code("print(1)\n2 + 2")  # not a Jupyter cell: a bare expression is discarded
        assert (r.stdout, r.stderr) == ("1\n", "")


def test_execute_code_never_raises(local: dict[str, Any]) -> None:
    env = SandboxREPL(context_payload={"k": (1, 2)}, sandbox=local)
    r = env.execute_code("print(context, llm_query('hi'), rlm_query('hi'), llm_query_batched(['a']))")
    assert r.stdout == "{'k': [1, 2]} Error: No LM handler configured Error: No LM handler configured " + (
        "['Error: No LM handler configured']\n"
    )
    r = env.execute_code("llm_query(5)")
    assert "TypeError: llm_query() prompt must be a str" in r.stderr
    r = env.execute_code("def f(:")
    assert "SyntaxError" in r.stderr
    r = env.execute_code("big = 'x' * 1_000_000\ndel _rlm_after\nprint('ok')")  # scaffold reinstalled
    assert r.stdout == "ok\n" and r.stderr == ""
    assert len(r.locals["big"]) < 200 and r.locals["big"].startswith("'xxx")
    env.sandbox.close()  # the box dies under the environment
    r = env.execute_code("print(1)")
    assert r.stdout == "" and "SandboxClosed" in r.stderr and r.final_answer is None
    env.cleanup()
    env.cleanup()
    assert "SandboxClosed" in env.execute_code("print(1)").stderr


def test_contexts_histories_and_compaction(local: dict[str, Any]) -> None:
    with SandboxREPL(sandbox=local, compaction=True) as env:
        assert env.execute_code("print(history, SHOW_VARS())").stdout == "[] Available variables: {'history': 'list'}\n"
        assert env.add_context(["a", "b"]) == 0
        assert env.add_context("third", 2) == 2
        assert env.get_context_count() == 3
        env.append_compaction_entry({"type": "summary", "content": "s1"})
        env.append_compaction_entry([{"role": "user", "content": "m"}])
        r = env.execute_code("print(context, context_2, history)\nhistory = None\ncontext = 0")
        assert r.stdout == (
            "['a', 'b'] third [{'type': 'summary', 'content': 's1'}, [{'role': 'user', 'content': 'm'}]]\n"
        )
        assert env.execute_code("print(len(history), context)").stdout == "2 ['a', 'b']\n"
    with SandboxREPL(context_payload="c", sandbox=local) as env:
        messages = [{"role": "user", "content": "hi"}]
        assert env.add_history(messages) == 0
        messages.append({"role": "assistant", "content": "later"})  # stored as a copy
        assert env.add_history(messages) == 1
        assert env.execute_code("print(len(history), len(history_1), history is history_0)").stdout == "1 2 True\n"


def test_custom_tools_and_setup_code(box: Backend, lms: dict[str, ScriptedLM]) -> None:
    seen: list[tuple[str, int]] = []

    def lookup(key: str, times: int = 1) -> str:  # runs on the host
        seen.append((key, times))
        return key.upper() * times

    lms["root"] = ScriptedLM(
        [repl("answer['content'] = f'{lookup(PREFIX, times=2)} {TABLE[1]} {ready_made}'", "answer['ready'] = True")]
    )
    rlm = RLM(
        backend="openai",
        backend_kwargs={"model_name": "root"},
        custom_tools={"lookup": {"tool": lookup, "description": "upper-cases"}, "PREFIX": "ab", "TABLE": [1, 2]},
        max_iterations=2,
        **box.env(environment_kwargs={"setup_code": "ready_made = 'set up'"}),
    )
    assert rlm.completion("c", root_prompt="q").response == "ABAB 2 set up"
    assert seen == [("ab", 2)]
    assert "`lookup`: upper-cases" in lms["root"].calls[0].messages[0]["content"]


def test_sandboxes_can_come_from_a_pool(tmp_path: Path, lms: dict[str, ScriptedLM]) -> None:
    """``sandboxed(..., pool=...)``: the root and its children lease sandboxes and give them back."""

    class Pool:
        def __init__(self) -> None:
            self.leased: list[rs.Sandbox] = []

        def acquire(
            self, backend: rs.BackendConfig, *, limits: rs.Limits | None = None, functions: Any = None
        ) -> rs.Sandbox:
            sb = backend.open(limits=limits, functions=functions)
            self.leased.append(sb)
            return sb

    pool = Pool()
    lms["root"] = ScriptedLM(
        [
            repl(
                "got = rlm_query_batched(['first', 'second', 'third'], model='child')",
                "answer['content'] = ' & '.join(got)",
                "answer['ready'] = True",
            )
        ]
    )
    # the children run concurrently: a function, not a list of replies
    lms["child"] = ScriptedLM(lambda messages: repl("answer['content'] = 'child:' + context", "answer['ready'] = True"))
    kwargs = sandboxed("local", pool=pool, root=str(tmp_path))
    assert repr(kwargs["environment_kwargs"]["rlm_sandbox"]).endswith(", pooled)")
    rlm = RLM(
        backend="openai",
        backend_kwargs={"model_name": "root"},
        max_depth=2,
        max_iterations=2,
        max_concurrent_subcalls=3,
        logger=RLMLogger(),
        **kwargs,
    )
    result = rlm.completion("c", root_prompt="q")
    assert result.response == "child:first & child:second & child:third"
    assert [c["response"] for c in cells(result)[0]["rlm_calls"]] == ["child:first", "child:second", "child:third"]
    assert len(pool.leased) == 4 and all(sb.closed for sb in pool.leased)
    with pytest.raises(ValueError, match="reserved"):
        SandboxREPL(custom_tools={"_rlm_report": print}, sandbox={"root": str(tmp_path)})
    with pytest.raises(TypeError, match="acquire"):
        sandboxed("local", pool=object())


def test_real_openai_client_over_http(tmp_path: Path) -> None:
    """Nothing of rlm patched but the environment: rlm's OpenAI client against a fake server."""

    def reply(messages: list[dict[str, Any]]) -> str:
        if messages[0]["role"] != "system":
            return "forty-two"
        if not any(m["role"] == "assistant" for m in messages):
            return repl("found = llm_query('magic? ' + context)")
        return repl("answer['content'] = found", "answer['ready'] = True")

    with FakeOpenAIServer(reply) as srv:
        rlm = RLM(
            backend="vllm",
            backend_kwargs={"base_url": srv.base_url, "model_name": "fake", "api_key": "x"},
            max_iterations=3,
            **sandboxed("local", root=str(tmp_path)),
        )
        assert rlm.completion("The magic number is here.", root_prompt="q").response == "forty-two"
        assert len(srv.requests) == 3
    assert list(tmp_path.iterdir()) == []


# -- enabling -----------------------------------------------------------------------------------------


def test_enable_is_idempotent_reversible_and_delegates(local: dict[str, Any]) -> None:
    plugin.disable()
    original = rlm_core.get_environment
    assert not plugin.is_enabled() and original is not plugin._get_environment
    plugin.enable()
    plugin.enable()
    assert plugin.is_enabled() and rlm_core.get_environment is plugin._get_environment

    env = rlm_core.get_environment("local", {"context_payload": "x"})  # no key of ours: rlm's own
    try:
        assert type(env) is LocalREPL
    finally:
        env.cleanup()
    ours = rlm_core.get_environment("docker", {"rlm_sandbox": local, "context_payload": "x", "depth": 2})
    with ours:
        assert isinstance(ours, SandboxREPL) and ours.depth == 2
        assert ours.execute_code("print(context)").stdout == "x\n"

    plugin.disable()
    plugin.disable()
    assert rlm_core.get_environment is original and not plugin.is_enabled()
    with pytest.raises(RuntimeError, match="disabled"):
        plugin._get_environment("docker", {"rlm_sandbox": local})
    kwargs = sandboxed("local", limits={"exec_timeout_s": 3}, root=local["root"])
    assert plugin.is_enabled()
    old_rlms = plugin._RLMS_VERSION is not None and plugin._RLMS_VERSION < (0, 1, 3)  # gates know only "local"
    assert kwargs["environment"] == plugin.ENVIRONMENT == ("local" if old_rlms else "docker")
    spec = kwargs["environment_kwargs"]["rlm_sandbox"]
    assert repr(spec).startswith("SandboxSpec(backend='local', limits=Limits(exec_timeout_s=3.0")
    assert local["root"] not in repr(spec)  # backend options stay out of rlm's logs
    with pytest.raises(rs.ConfigError):
        sandboxed("local", no_such_option=1)
    with pytest.raises(rs.BackendNotFound):
        sandboxed("no-such-backend")
