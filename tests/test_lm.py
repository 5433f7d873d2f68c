"""Tests of the LM clients (rlm_sandbox.lm) against the fake OpenAI-compatible server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from rlm_sandbox.lm import (
    LM,
    LMAuthError,
    LMError,
    LMResponse,
    LMResponseError,
    LMTransientError,
    OpenAICompatibleLM,
    ScriptedLM,
    parse_retry_after,
)
from tests.fakes.openai_fake import FakeOpenAIServer, Fault

USER = [{"role": "user", "content": "hello world"}]


class SleepRecorder:
    """Stands in for time.sleep: records requested waits without waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture(scope="module")
def shared_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def srv(shared_server: FakeOpenAIServer) -> FakeOpenAIServer:
    """The module's server, with records, faults and knobs reset for this test."""
    shared_server.reset()
    return shared_server


@pytest.fixture
def sleeps() -> SleepRecorder:
    return SleepRecorder()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "RLM_SANDBOX_MODEL"):
        monkeypatch.delenv(name, raising=False)


def make_lm(srv: FakeOpenAIServer, sleeps: SleepRecorder, **kwargs: Any) -> OpenAICompatibleLM:
    options: dict[str, Any] = {
        "model": "test-model",
        "api_key": "sk-test",
        "timeout_s": 5.0,
        "max_retries": 3,
        "sleep": sleeps,
    }
    options.update(kwargs)
    return OpenAICompatibleLM(srv.base_url, **options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------
# Happy path and request shape
# --------------------------------------------------------------------------------------------


def test_happy_path_reply_computed_from_messages(sleeps: SleepRecorder) -> None:
    def reply(messages: list[dict[str, Any]]) -> str:
        return f"{len(messages)} msgs, last={messages[-1]['content'].upper()}"

    with FakeOpenAIServer(reply) as srv, make_lm(srv, sleeps) as lm:
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        r = lm.complete(msgs)
    assert isinstance(r, LMResponse)
    assert r.text == "2 msgs, last=HI"
    assert r.model == "test-model"
    assert r.prompt_tokens == 3 and r.completion_tokens == 3
    assert r.duration_s >= 0
    [req] = srv.requests
    assert req.path == "/v1/chat/completions"
    assert req.model == "test-model"
    assert req.messages == msgs
    assert req.headers["authorization"] == "Bearer sk-test"
    assert sleeps.waits == []


def test_response_is_frozen(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    with make_lm(srv, sleeps) as lm:
        r = lm.complete(USER)
    with pytest.raises(AttributeError):
        r.text = "changed"  # type: ignore[misc]


def test_defaults_from_environment(srv: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url + "/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    monkeypatch.setenv("RLM_SANDBOX_MODEL", "env-model")
    with OpenAICompatibleLM() as lm:
        assert lm.base_url == srv.base_url
        assert lm.model == "env-model"
        r = lm.complete(USER)
    assert r.text == "echo: hello world"
    [req] = srv.requests
    assert req.model == "env-model"
    assert req.headers["authorization"] == "Bearer sk-from-env"


def test_default_base_url_is_openai() -> None:
    with OpenAICompatibleLM(model="m") as lm:
        assert lm.base_url == "https://api.openai.com/v1"


def test_no_key_means_no_authorization_header(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    with make_lm(srv, sleeps, api_key=None) as lm:
        lm.complete(USER)
    assert "authorization" not in srv.requests[0].headers


def test_per_call_model_and_extra_body(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    with make_lm(srv, sleeps, extra_body={"temperature": 0.0, "max_tokens": 7}) as lm:
        r = lm.complete(USER, model="other-model")
    assert r.model == "other-model"
    body = srv.requests[0].body
    assert body["model"] == "other-model"
    assert body["temperature"] == 0.0 and body["max_tokens"] == 7


def test_server_reported_model_wins(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    srv.model = "served/model-7b"
    with make_lm(srv, sleeps) as lm:
        assert lm.complete(USER).model == "served/model-7b"


def test_usage_is_optional(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    srv.include_usage = False
    with make_lm(srv, sleeps) as lm:
        r = lm.complete(USER)
    assert r.text == "echo: hello world"
    assert r.prompt_tokens is None and r.completion_tokens is None


def test_minimal_response_body_is_enough(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    srv.malformed_next(body='{"choices": [{"message": {"content": "bare"}}]}')
    with make_lm(srv, sleeps) as lm:
        r = lm.complete(USER)
    assert (r.text, r.model, r.prompt_tokens) == ("bare", "test-model", None)


def test_missing_model_fails_before_any_request(srv: FakeOpenAIServer) -> None:
    with OpenAICompatibleLM(srv.base_url) as lm, pytest.raises(LMError, match="RLM_SANDBOX_MODEL"):
        lm.complete(USER)
    assert srv.requests == []


def test_closed_client_raises(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    lm = make_lm(srv, sleeps)
    lm.close()
    lm.close()  # idempotent
    with pytest.raises(LMError, match="closed"):
        lm.complete(USER)


@pytest.mark.parametrize("kwargs", [{"max_concurrency": 0}, {"timeout_s": 0}, {"max_retries": -1}])
def test_invalid_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        OpenAICompatibleLM("http://127.0.0.1:9/v1", "m", **kwargs)


# --------------------------------------------------------------------------------------------
# Retries
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_transient_status_is_retried(srv: FakeOpenAIServer, sleeps: SleepRecorder, status: int) -> None:
    srv.fail_next(status)
    with make_lm(srv, sleeps) as lm:
        r = lm.complete(USER)
    assert r.text == "echo: hello world"
    assert srv.statuses == [status, 200]
    assert len(sleeps.waits) == 1


def test_503_once_then_success_uses_backoff(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    srv.fail_next(503)
    with make_lm(srv, sleeps, backoff_initial_s=0.5, backoff_max_s=4.0) as lm:
        lm.complete(USER)
    [wait] = sleeps.waits
    assert 0.5 <= wait <= 1.0  # initial backoff plus at most `initial` of jitter


def test_429_retry_after_is_honoured(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    srv.rate_limit_next(retry_after="7")
    with make_lm(srv, sleeps, backoff_max_s=1.0) as lm:
        r = lm.complete(USER)
    assert r.text == "echo: hello world"
    assert srv.statuses == [429, 200]
    assert sleeps.waits == [7.0]  # as asked, even though above backoff_max_s


def test_429_retry_after_ms_header(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    srv.add_fault(Fault(status=429, headers={"retry-after-ms": "250", "Retry-After": "9"}))
    with make_lm(srv, sleeps) as lm:
        lm.complete(USER)
    assert sleeps.waits == [0.25]


def test_429_retry_after_really_waits(srv: FakeOpenAIServer) -> None:
    srv.rate_limit_next(retry_after="1")
    with make_lm(srv, SleepRecorder(), sleep=time.sleep) as lm:
        start = time.monotonic()
        r = lm.complete(USER)
        elapsed = time.monotonic() - start
    assert r.text == "echo: hello world"
    first, second = srv.requests
    assert second.started - first.started >= 0.95
    assert 0.95 <= elapsed < 5
    assert r.duration_s >= 0.95


def test_gives_up_after_max_retries(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    srv.fail_next(503, times=10)
    with make_lm(srv, sleeps, max_retries=2) as lm, pytest.raises(LMTransientError) as info:
        lm.complete(USER)
    assert info.value.attempts == 3
    assert info.value.status_code == 503
    assert "gave up after 3 attempt(s)" in str(info.value)
    assert srv.statuses == [503, 503, 503]
    assert len(sleeps.waits) == 2


def test_zero_retries(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    srv.fail_next(502)
    with make_lm(srv, sleeps, max_retries=0) as lm, pytest.raises(LMTransientError):
        lm.complete(USER)
    assert srv.statuses == [502]
    assert sleeps.waits == []


def test_retry_after_beyond_time_budget_gives_up_at_once(
    srv: FakeOpenAIServer, sleeps: SleepRecorder
) -> None:
    srv.rate_limit_next(retry_after="120")
    with make_lm(srv, sleeps, max_retry_time_s=30) as lm, pytest.raises(LMTransientError) as info:
        lm.complete(USER)
    assert info.value.retry_after == 120
    assert info.value.attempts == 1
    assert sleeps.waits == []
    assert srv.statuses == [429]


def test_total_time_budget_bounds_retries(srv: FakeOpenAIServer) -> None:
    srv.fail_next(503, times=100)
    with (
        make_lm(
            srv,
            SleepRecorder(),
            sleep=time.sleep,
            max_retries=100,
            max_retry_time_s=0.5,
            backoff_initial_s=0.1,
            backoff_max_s=0.1,
        ) as lm,
        pytest.raises(LMTransientError) as info,
    ):
        start = time.monotonic()
        lm.complete(USER)
    assert time.monotonic() - start < 1.5
    assert 2 <= info.value.attempts < 100


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, LMResponseError), (403, LMAuthError), (404, LMResponseError), (422, LMResponseError)],
)
def test_client_errors_fail_at_once(
    srv: FakeOpenAIServer, sleeps: SleepRecorder, status: int, error: type[LMError]
) -> None:
    srv.fail_next(status, times=5)
    with make_lm(srv, sleeps) as lm, pytest.raises(error) as info:
        lm.complete(USER)
    assert type(info.value) is error
    assert info.value.status_code == status
    assert f"HTTP {status}" in str(info.value)
    assert "injected HTTP" in str(info.value)  # the server's error message is surfaced
    assert srv.statuses == [status]
    assert sleeps.waits == []


def test_401_fails_at_once_with_clear_error(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    srv.required_api_key = "sk-right"
    with (
        make_lm(srv, sleeps, api_key="sk-wrong-secret") as lm,
        pytest.raises(LMAuthError) as info,
    ):
        lm.complete(USER)
    message = str(info.value)
    assert info.value.status_code == 401
    assert "HTTP 401" in message and "Incorrect API key" in message and "OPENAI_API_KEY" in message
    assert "sk-wrong-secret" not in message
    assert srv.statuses == [401]
    assert sleeps.waits == []


def test_right_key_is_accepted(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    srv.required_api_key = "sk-right"
    with make_lm(srv, sleeps, api_key="sk-right") as lm:
        assert lm.complete(USER).text == "echo: hello world"


@pytest.mark.parametrize(
    "body",
    [
        "this is not json {",
        "",
        '{"id": "x"}',
        '{"choices": []}',
        '{"choices": [{"message": {"role": "assistant", "content": null}, "finish_reason": "length"}]}',
        "[1, 2]",
    ],
)
def test_malformed_body_is_not_retried(srv: FakeOpenAIServer, sleeps: SleepRecorder, body: str) -> None:
    srv.malformed_next(body=body, times=3)
    with make_lm(srv, sleeps) as lm, pytest.raises(LMResponseError):
        lm.complete(USER)
    assert len(srv.requests) == 1
    assert sleeps.waits == []


def test_null_content_error_mentions_finish_reason(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    srv.malformed_next(body='{"choices": [{"message": {"content": null}, "finish_reason": "length"}]}')
    with make_lm(srv, sleeps) as lm, pytest.raises(LMResponseError, match="length"):
        lm.complete(USER)


def test_connection_refused_is_retried_then_fails(sleeps: SleepRecorder) -> None:
    lm = OpenAICompatibleLM(
        f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=2, sleep=sleeps, timeout_s=2
    )
    with lm, pytest.raises(LMTransientError, match="ConnectError") as info:
        lm.complete(USER)
    assert info.value.attempts == 3
    assert info.value.status_code is None
    assert len(sleeps.waits) == 2


def test_non_transient_transport_error_is_not_retried(sleeps: SleepRecorder) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.UnsupportedProtocol("nope", request=request)

    lm = OpenAICompatibleLM("http://fake/v1", "m", sleep=sleeps, transport=httpx.MockTransport(handler))
    with lm, pytest.raises(LMError, match="UnsupportedProtocol") as info:
        lm.complete(USER)
    assert not isinstance(info.value, LMTransientError)
    assert calls == 1


# --------------------------------------------------------------------------------------------
# Timeouts
# --------------------------------------------------------------------------------------------


def test_read_timeout_is_retried_then_fails(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    srv.delay_s = 3.0
    with make_lm(srv, sleeps, timeout_s=0.2, max_retries=1) as lm:
        start = time.monotonic()
        with pytest.raises(LMTransientError, match="ReadTimeout") as info:
            lm.complete(USER)
        elapsed = time.monotonic() - start
    assert info.value.attempts == 2
    assert 0.35 <= elapsed < 1.5
    assert len(srv.requests) == 2


def test_slow_response_once_then_success(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    srv.slow_next(3.0)
    with make_lm(srv, sleeps, timeout_s=0.3) as lm:
        r = lm.complete(USER)
    assert r.text == "echo: hello world"
    assert len(srv.requests) == 2
    assert len(sleeps.waits) == 1


def test_slow_response_within_timeout_is_fine(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    srv.slow_next(0.3)
    with make_lm(srv, sleeps, timeout_s=2.0) as lm:
        r = lm.complete(USER)
    assert r.text == "echo: hello world"
    assert r.duration_s >= 0.25
    assert len(srv.requests) == 1


# --------------------------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------------------------


def test_concurrency_is_bounded(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    srv.delay_s = 0.05
    with (
        make_lm(srv, sleeps, max_concurrency=4) as lm,
        ThreadPoolExecutor(max_workers=32) as pool,
    ):
        prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(32)]
        results = list(pool.map(lm.complete, prompts))
    assert [r.text for r in results] == [f"echo: q{i}" for i in range(32)]
    assert len(srv.requests) == 32
    assert srv.max_in_flight == 4  # reached, never exceeded


def test_concurrency_bound_holds_across_retries(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    srv.delay_s = 0.02
    with (
        # Enough attempts that no single call can use up all 8 injected failures.
        make_lm(srv, sleeps, max_concurrency=3, max_retries=8) as lm,
        ThreadPoolExecutor(max_workers=16) as pool,
    ):
        srv.fail_next(503, times=8)
        results = list(pool.map(lm.complete, [USER] * 16))
    assert all(r.text == "echo: hello world" for r in results)
    assert len(srv.requests) == 24
    assert srv.max_in_flight <= 3


def test_unbounded_server_sees_full_parallelism(srv: FakeOpenAIServer, sleeps: SleepRecorder) -> None:
    """Control for the tests above: the fake server itself does not serialize requests."""
    srv.delay_s = 0.2
    with (
        make_lm(srv, sleeps, max_concurrency=16) as lm,
        ThreadPoolExecutor(max_workers=16) as pool,
    ):
        list(pool.map(lm.complete, [USER] * 16))
    assert srv.max_in_flight >= 12


# --------------------------------------------------------------------------------------------
# Retry-After parsing
# --------------------------------------------------------------------------------------------


def test_parse_retry_after_forms() -> None:
    now = time.time()
    when = datetime.fromtimestamp(now, tz=UTC) + timedelta(seconds=30)
    date_header = format_datetime(when, usegmt=True)
    assert parse_retry_after(httpx.Headers({"Retry-After": "3"})) == 3.0
    assert parse_retry_after(httpx.Headers({"Retry-After": " 1.5 "})) == 1.5
    assert parse_retry_after(httpx.Headers({"Retry-After": "-4"})) == 0.0
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "1500"})) == 1.5
    assert parse_retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert parse_retry_after(httpx.Headers({"Retry-After": "nan"})) is None
    assert parse_retry_after(httpx.Headers({})) is None
    parsed = parse_retry_after(httpx.Headers({"Retry-After": date_header}), now=now)
    assert parsed is not None and 28 <= parsed <= 31


# --------------------------------------------------------------------------------------------
# ScriptedLM
# --------------------------------------------------------------------------------------------


def test_scripted_list_replays_in_order_and_records() -> None:
    lm = ScriptedLM(["one", "two"], model="script-model")
    assert isinstance(lm, LM)
    msgs = [{"role": "user", "content": "a"}]
    r1 = lm.complete(msgs)
    msgs[0]["content"] = "mutated after the call"
    r2 = lm.complete([{"role": "user", "content": "b"}], model="override")
    assert (r1.text, r1.model, r2.text, r2.model) == ("one", "script-model", "two", "override")
    assert r1.prompt_tokens is None and r1.completion_tokens is None
    calls = lm.calls
    assert [c.index for c in calls] == [0, 1]
    assert calls[0].messages == [{"role": "user", "content": "a"}]  # deep-copied
    assert calls[1].model == "override"
    assert lm.remaining == 0
    with pytest.raises(LMError, match="ran out of replies"):
        lm.complete(USER)
    assert len(lm.calls) == 3


def test_scripted_list_can_raise() -> None:
    lm = ScriptedLM([LMTransientError("flaky"), "ok"])
    with pytest.raises(LMTransientError, match="flaky"):
        lm.complete(USER)
    assert lm.complete(USER).text == "ok"


def test_scripted_callable() -> None:
    with ScriptedLM(lambda messages: f"got {len(messages)}: {messages[-1]['content']}") as lm:
        assert lm.complete(USER).text == "got 1: hello world"
        assert lm.complete(USER * 2).text == "got 2: hello world"
        assert lm.remaining == 0
        assert len(lm.calls) == 2


def test_scripted_is_thread_safe() -> None:
    n = 400
    lm = ScriptedLM([f"r{i}" for i in range(n)])
    barrier = threading.Barrier(16)

    def worker(k: int) -> list[str]:
        barrier.wait()
        return [lm.complete([{"role": "user", "content": f"{k}"}]).text for _ in range(n // 16)]

    with ThreadPoolExecutor(max_workers=16) as pool:
        texts = [t for chunk in pool.map(worker, range(16)) for t in chunk]
    assert sorted(texts) == sorted(f"r{i}" for i in range(n))  # each reply used exactly once
    calls = lm.calls
    assert [c.index for c in calls] == list(range(n))
    assert lm.remaining == 0
