"""End to end: an RLM finds a needle in a 1 MB and a 50 MB haystack, on the local backend and Docker.

The root model is scripted (:func:`rlm_sandbox.demo.needle_script`): its code chunks the context,
asks a fake sub-LM about every chunk with ``llm_query_batched`` and hands a window around the hit to
a sub-agent with ``rlm_query``. The fake sub-LM (:class:`rlm_sandbox.demo.ChunkReaderLM`) really
reads each chunk and records when each call started and ended.

The Docker variant skips when the ``docker`` backend is not installed or its engine is unreachable,
except when ``CI`` or ``RLM_SANDBOX_REQUIRE_DOCKER`` is set: then it fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import rlm_sandbox as rs
from rlm_sandbox.demo import DEFAULT_QUESTION, ChunkReaderLM, make_haystack, needle_script
from rlm_sandbox.driver import RLMBudget, RLMRunner
from rlm_sandbox.lm import ScriptedLM
from rlm_sandbox.trajectory import AgentEndEvent, AgentStartEvent, LMCallEvent, read_trajectory

CHUNK = 500_000
CODE = "5802-ALPHA-1377"
NEEDLE = f"The secret access code is {CODE}."


def _docker_required() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("RLM_SANDBOX_REQUIRE_DOCKER"))


def _docker_unusable() -> str | None:
    try:
        return rs.backend_config("docker")().check()
    except rs.BackendNotFound as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - a config that cannot even be built here means "not usable"
        return f"{type(exc).__name__}: {exc}"


@dataclass
class Backend:
    name: str
    options: dict[str, Any]
    boxes: Path | None


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "docker":
        reason = _docker_unusable()
        if reason is not None:
            if _docker_required():
                pytest.fail(f"the docker backend is required here (CI / RLM_SANDBOX_REQUIRE_DOCKER): {reason}")
            pytest.skip(f"the docker backend is not usable here: {reason}")
        yield Backend("docker", {}, None)
        return
    boxes = tmp_path / "boxes"
    boxes.mkdir()
    yield Backend("local", {"root": str(boxes)}, boxes)
    # No rlm-sandbox-* directory of this run is left behind.
    assert sorted(p.name for p in boxes.iterdir()) == []


@pytest.mark.parametrize("size_mb", [1, 50])
def test_needle_in_a_haystack(backend: Backend, size_mb: int, tmp_path: Path) -> None:
    context = make_haystack(size_mb * 1_000_000, needle=NEEDLE, seed=size_mb)
    root_lm = ScriptedLM(lambda m: needle_script(m, chunk_chars=CHUNK))
    sub_lm = ChunkReaderLM(delay_s=0.02)
    runner = RLMRunner(
        backend.name,
        backend.options,
        lm=root_lm,
        sub_lm=sub_lm,
        limits=rs.Limits(exec_timeout_s=120, memory_mb=4096),
        budget=RLMBudget(max_iterations=5, max_wall_s=300),
        trajectory_dir=tmp_path / "runs",
    )
    try:
        result = runner.run(DEFAULT_QUESTION, context)
    finally:
        runner.close()
    # Every sandbox of the pool is closed.
    stats = runner.pool.stats()
    assert stats.open == 0 and stats.leased == 0 and stats.created >= 2

    assert result.answer is not None and CODE in result.answer, result
    assert (result.reason, result.iterations, result.sub_agents, result.sandboxes) == ("answer", 2, 1, 2)

    # The root model got a description of the context, never the context: only what its code printed.
    first = root_lm.calls[0].messages
    assert all(CODE not in m["content"] for m in first)
    assert f"{len(context):,} total characters" in first[1]["content"]
    assert max(sum(len(m["content"]) for m in c.messages) for c in root_lm.calls) < 20_000

    events = read_trajectory(result.trajectory_path)
    starts = [e for e in events if isinstance(e, AgentStartEvent)]
    assert [(s.agent_id, s.parent_id, s.depth) for s in starts] == [("0", None, 0), ("0.1", "0", 1)]
    assert len({s.sandbox_id for s in starts}) == len(starts)  # each agent in its own sandbox
    assert all(s.backend == backend.name for s in starts)
    ends = [e for e in events if isinstance(e, AgentEndEvent)]
    assert {e.agent_id: e.reason for e in ends} == {"0": "answer", "0.1": "answer"}

    # One sub-LM call per chunk (batched), and one from the sub-agent.
    n_chunks = -(-len(context) // CHUNK)
    subs = [e for e in events if isinstance(e, LMCallEvent) and e.kind == "sub"]
    batched = [e for e in subs if e.batch is not None]
    assert len(batched) == n_chunks and len(subs) == n_chunks + 1
    assert [e.agent_id for e in subs if e.batch is None] == ["0.1"]
    assert len(sub_lm.calls) == n_chunks + 1

    # The batched calls overlapped in time.
    assert sub_lm.max_overlap() >= 2
    first, second = sorted(sub_lm.calls)[:2]
    assert second[0] < first[1]
