"""``rlm-sandbox demo``: a real RLM run, offline: a needle search over a generated context.

Everything but the models is the real thing: :class:`~rlm_sandbox.driver.RLMRunner` on a real
backend (``local`` by default), the context loaded into a sandbox, the root model's code run there,
``llm_query_batched`` and ``rlm_query`` crossing back to the host, a sub-agent in its own sandbox,
a trajectory on disk. The two models are stand-ins that work without a network:

* :func:`needle_script` is the root model (use it with :class:`~rlm_sandbox.lm.ScriptedLM`). Its
  replies are the ```` ```repl ```` code a capable model writes for this task: split the context
  into overlapping chunks, ask the sub-LM about every chunk with ``llm_query_batched``, then hand a
  small window around the hit to a sub-agent with ``rlm_query`` and submit its answer. As a
  sub-agent it reads its prompt (its ``context``) with ``llm_query``.
* :class:`ChunkReaderLM` is the sub-LM: it really reads the text it is given and replies with the
  line that best matches the question's keywords, or ``NOT FOUND``. It records when each call
  started and ended, so tests can check that batched calls overlapped.
"""

from __future__ import annotations

import random
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ._limits import Limits
from .driver import RLMBudget, RLMResult, RLMRunner
from .lm import LM, LMResponse, Messages, ScriptedLM
from .trajectory import TrajectoryEvent

__all__ = [
    "DEFAULT_NEEDLE",
    "DEFAULT_QUESTION",
    "ChunkReaderLM",
    "DemoReport",
    "make_haystack",
    "needle_script",
    "offline_reply",
    "print_report",
    "run_demo",
]

DEFAULT_QUESTION = "What is the secret access code?"
DEFAULT_NEEDLE = "The secret access code is 7291-ALPHA-4410."

#: Words that never make a keyword.
_STOP = frozenset(
    re.findall(
        r"\w+",
        "what which where when who whom whose why how is are was were the a an of in on at to for from by with "
        "and or not this that these those does did do it its be been give tell me find please",
    )
)

_SUBJECTS = ["The harbour", "A caravan", "The archive", "Our orchard", "The observatory", "A lighthouse",
             "The mill", "The valley", "A ferry", "The library", "The bakery", "A glacier"]
_VERBS = ["recorded", "welcomed", "lost", "measured", "painted", "repaired", "counted", "sheltered",
          "watched", "shipped", "planted", "described"]
_OBJECTS = ["twelve barrels of cider", "a flock of starlings", "the northern tide", "forty lanterns",
            "an old brass telescope", "seven wool blankets", "the spring floods", "a crate of maps",
            "the evening bells", "three copper kettles", "a long winter", "the harvest moon"]


def make_haystack(size_bytes: int, *, needle: str = DEFAULT_NEEDLE, seed: int = 7, position: float = 0.61) -> str:
    """An ASCII text of about ``size_bytes`` made of plain filler sentences, with ``needle`` as one
    line at ``position`` (0..1) of the text. Fast: 50 MB in well under a second."""
    rng = random.Random(seed)
    lines = []
    for i in range(4096):
        lines.append(
            f"Entry {i:05d}: {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
            f"on day {rng.randint(1, 365)} of year {rng.randint(1700, 1999)}.\n"
        )
    block = "".join(lines)
    reps = max(1, -(-size_bytes // len(block)))
    text = block * reps
    text = text[:size_bytes]
    cut = text.rfind("\n", 0, int(len(text) * position)) + 1
    return text[:cut] + needle + "\n" + text[cut:]


def _keywords(question: str) -> list[str]:
    words = re.findall(r"[a-z0-9]+", question.lower())
    return sorted({w for w in words if len(w) >= 3 and w not in _STOP})


def _best_line(text: str, keywords: list[str]) -> str | None:
    """The line of ``text`` holding the most distinct keywords (at least half of them)."""
    if not keywords:
        return None
    low = text.lower()
    scores: dict[int, int] = {}
    for kw in keywords:
        seen: set[int] = set()
        pos = low.find(kw)
        hits = 0
        while pos != -1 and hits < 10_000:
            start = low.rfind("\n", 0, pos) + 1
            if start not in seen:
                seen.add(start)
                scores[start] = scores.get(start, 0) + 1
            hits += 1
            pos = low.find(kw, pos + len(kw))
    if not scores:
        return None
    start, score = max(scores.items(), key=lambda kv: (kv[1], -kv[0]))
    if score * 2 < len(keywords):
        return None
    end = text.find("\n", start)
    return text[start : end if end != -1 else len(text)].strip()


def _split_prompt(prompt: str) -> tuple[str, str]:
    """(question, text) of a prompt written as ``Question: ...`` ... ``Text:\\n...``."""
    m = re.search(r"^Question:\s*(.*)$", prompt, re.MULTILINE)
    question = m.group(1) if m else prompt.split("\n", 1)[0]
    marker = prompt.find("\nText:\n")
    text = prompt[marker + len("\nText:\n") :] if marker != -1 else prompt
    return question, text


class ChunkReaderLM(LM):
    """A fake sub-LM that reads the text it is given (see the module docstring). Thread-safe.

    Args:
        delay_s: extra time each call takes, as a network round trip would.
    """

    def __init__(self, *, delay_s: float = 0.0, model: str = "chunk-reader") -> None:
        self.delay_s = delay_s
        self.model = model
        self._lock = threading.Lock()
        self.calls: list[tuple[float, float, int]] = []
        """``(start, end, prompt_chars)`` per call, ``time.monotonic()`` seconds, in end order."""

    def answer(self, prompt: str) -> str:
        """The reply to one prompt (no delay, not recorded)."""
        question, text = _split_prompt(prompt)
        line = _best_line(text, _keywords(question))
        return line if line is not None else "NOT FOUND"

    def complete(self, messages: Messages, *, model: str | None = None) -> LMResponse:
        """Answer the last message."""
        start = time.monotonic()
        reply = self.answer(messages[-1]["content"] if messages else "")
        if self.delay_s:
            time.sleep(self.delay_s)
        end = time.monotonic()
        with self._lock:
            self.calls.append((start, end, len(messages[-1]["content"]) if messages else 0))
        return LMResponse(text=reply, model=model or self.model, prompt_tokens=None, completion_tokens=None,
                          duration_s=end - start)

    def max_overlap(self) -> int:
        """The most calls that were in progress at the same moment."""
        with self._lock:
            edges = sorted([(s, 1) for s, _, _ in self.calls] + [(e, -1) for _, e, _ in self.calls])
        peak = cur = 0
        for _, step in edges:
            cur += step
            peak = max(peak, cur)
        return peak


_ROOT_TURN_1 = '''\
Let me look at the context and ask the sub-LLM about every chunk at once.
```repl
text = context if isinstance(context, str) else "\\n".join(map(str, context))
print(type(context).__name__, len(text))
question = {question!r}
size, overlap = {chunk_chars}, 1000
chunks = [text[i:i + size + overlap] for i in range(0, len(text), size)]
prompts = [f"Question: {{question}}\\nReply with the line that answers it, or NOT FOUND.\\n\\nText:\\n{{c}}"
           for c in chunks]
replies = []
for i in range(0, len(prompts), 16):
    replies.extend(llm_query_batched(prompts[i:i + 16]))
hits = [i for i, r in enumerate(replies) if "NOT FOUND" not in r and not r.startswith("Error")]
print(len(chunks), "chunks; hits in", hits)
for i in hits[:5]:
    print(i, replies[i][:200])
```'''

_ROOT_TURN_2 = '''\
Now a sub-agent double-checks a small window around the hit.
```repl
if hits:
    i = hits[0]
    pos = max(chunks[i].find(replies[i].strip()), 0)
    window = chunks[i][max(0, pos - 2000):pos + len(replies[i]) + 2000]
    task = f"Question: {question}\\nReply with the line that answers it, or NOT FOUND.\\n\\nText:\\n{window}"
    checked = rlm_query(task)
    print("sub-agent:", checked)
    answer["content"] = checked.strip()
else:
    answer["content"] = "NOT FOUND"
answer["ready"] = True
```'''

_CHILD_TURN = '''\
My task is in `context`; let me read it and ask the sub-LLM.
```repl
print(len(context), context[:120])
reply = llm_query(context)
print(reply)
answer["content"] = reply.strip()
answer["ready"] = True
```'''


def needle_script(messages: Messages, *, chunk_chars: int = 500_000) -> str:
    """The scripted root model (for :class:`~rlm_sandbox.lm.ScriptedLM`): see the module docstring."""
    first_user = next((m["content"] for m in messages if m["role"] == "user"), "")
    turns = sum(1 for m in messages if m["role"] == "assistant")
    if "You have used all your iterations" in messages[-1]["content"]:
        return "FINAL(NOT FOUND)"
    if "You are a sub-agent" in first_user:
        return _CHILD_TURN
    m = re.search(r"^Question: (.*)$", first_user, re.MULTILINE)
    question = m.group(1).strip() if m else DEFAULT_QUESTION
    if turns == 0:
        return _ROOT_TURN_1.format(question=question, chunk_chars=chunk_chars)
    return _ROOT_TURN_2


def offline_reply(messages: list[dict[str, Any]], *, chunk_chars: int = 500_000) -> str:
    """One function for both roles, for a single fake server: agent turns (they start with a system
    message) get :func:`needle_script`, sub-LM calls get :meth:`ChunkReaderLM.answer`."""
    msgs: Messages = [{"role": str(m.get("role", "")), "content": str(m.get("content", ""))} for m in messages]
    if msgs and msgs[0]["role"] == "system":
        return needle_script(msgs, chunk_chars=chunk_chars)
    return ChunkReaderLM().answer(msgs[-1]["content"] if msgs else "")


@dataclass(frozen=True)
class DemoReport:
    """What :func:`run_demo` did."""

    result: RLMResult
    expected: str
    context_bytes: int
    sub_lm_calls: int
    sub_lm_max_overlap: int

    @property
    def found(self) -> bool:
        """Whether the answer contains the needle's code."""
        return self.result.answer is not None and self.expected in self.result.answer


def run_demo(
    *,
    size_mb: float = 8.0,
    backend: str = "local",
    backend_options: dict[str, Any] | None = None,
    trajectory_dir: str | Path | None = None,
    seed: int = 7,
    sub_delay_s: float = 0.02,
    on_event: Callable[[TrajectoryEvent], None] | None = None,
) -> DemoReport:
    """Generate a context with a needle and run the RLM over it (see the module docstring)."""
    code = f"{random.Random(seed).randint(1000, 9999)}-ALPHA-{random.Random(seed + 1).randint(1000, 9999)}"
    needle = f"The secret access code is {code}."
    context = make_haystack(int(size_mb * 1_000_000), needle=needle, seed=seed)
    sub = ChunkReaderLM(delay_s=sub_delay_s)
    root = ScriptedLM(needle_script, model="scripted-root")
    with RLMRunner(
        backend,
        backend_options,
        lm=root,
        sub_lm=sub,
        limits=Limits(exec_timeout_s=60, memory_mb=4096),
        budget=RLMBudget(max_iterations=6, max_wall_s=120),
        trajectory_dir=trajectory_dir,
        on_event=on_event,
    ) as runner:
        result = runner.run(DEFAULT_QUESTION, context)
    return DemoReport(
        result=result,
        expected=code,
        context_bytes=len(context),
        sub_lm_calls=len(sub.calls),
        sub_lm_max_overlap=sub.max_overlap(),
    )


def print_report(report: DemoReport, out: TextIO = sys.stdout) -> None:
    """The demo's summary, as ``rlm-sandbox demo`` prints it."""
    r = report.result
    print(f"answer:      {r.answer}", file=out)
    print(f"expected:    {report.expected} ({'found' if report.found else 'NOT found'})", file=out)
    print(f"context:     {report.context_bytes / 1e6:.1f} MB (never sent to the root model)", file=out)
    print(f"iterations:  {r.iterations}", file=out)
    print(f"LM calls:    {r.lm_calls} ({report.sub_lm_calls} sub-LM calls, up to "
          f"{report.sub_lm_max_overlap} at once)", file=out)
    print(f"sub-agents:  {r.sub_agents} (sandboxes used: {r.sandboxes})", file=out)
    print(f"elapsed:     {r.elapsed_s:.2f} s", file=out)
    print(f"trajectory:  {r.trajectory_path}", file=out)
