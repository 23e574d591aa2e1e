"""The provider simulator: limits, OpenAI shapes, faults, log and stats.

Window expiry is tested on the limiter with a fake clock (no 60 s waits); HTTP tests run
the simulator in-process on a free port with tiny ttft/inter-token delays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from openai import AsyncOpenAI

from pipeline.simulator import (
    Limiter,
    Rejection,
    Simulator,
    SlidingWindow,
    Ticket,
    completion_tokens_for,
    expected_text,
    finish_reason_for,
    format_go_duration,
)
from pipeline.simulator.durations import ceil_ms
from pipeline.simulator.faults import Faults
from pipeline.simulator.keys import KeyRing, bearer_token
from pipeline.simulator.openai_errors import mask_key
from pipeline.simulator.validate import BadRequest, validate_chat_body
from topics.config import SimFaults, SimKey, SimLimits, SimulatorConfig
from topics.errors import SimulatorError
from topics.tokens import estimate_prompt_tokens

KEY_A = "sk-sim-test-key-a-0123456789abcdef"
KEY_B = "sk-sim-test-key-b-fedcba9876543210"
KEY_X = "sk-sim-test-key-x-exhausted-000000"
MODEL = "gpt-4o"
MSGS: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say something about rate limits."},
]
SDK_MSGS: Any = MSGS  # the SDK wants its TypedDicts; the same list, untyped for it


class FakeClock:
    """A settable monotonic clock."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture(autouse=True)
def _keys_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_KEY_A", KEY_A)
    monkeypatch.setenv("SIM_KEY_B", KEY_B)
    monkeypatch.setenv("SIM_KEY_X", KEY_X)


def make_config(
    *,
    rpm: int | None = None,
    tpm: int | None = None,
    log_path: Path | None = None,
    faults: SimFaults | None = None,
    **kwargs: Any,
) -> SimulatorConfig:
    """Key A limited on MODEL, key B unlimited, key X exhausted; tiny delays."""
    settings: dict[str, Any] = {"ttft_ms": 1, "inter_token_ms": 0, "output_tokens": 8}
    settings.update(kwargs)
    return SimulatorConfig(
        keys=[
            SimKey(api_key_env="SIM_KEY_A", models={MODEL: SimLimits(rpm=rpm, tpm=tpm)}),
            SimKey(api_key_env="SIM_KEY_B"),
            SimKey(api_key_env="SIM_KEY_X", models={MODEL: SimLimits(rpm=5)}, exhausted=True),
        ],
        log_path=str(log_path) if log_path else None,
        faults=faults or SimFaults(seed=7),
        **settings,
    )


@contextlib.asynccontextmanager
async def running(config: SimulatorConfig) -> AsyncIterator[tuple[Simulator, str]]:
    sim = Simulator(config)
    url = await sim.start(0)
    try:
        yield sim, url
    finally:
        await sim.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def client(url: str, key: str = KEY_A) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=url, api_key=key, max_retries=0)


async def post(
    http: aiohttp.ClientSession,
    url: str,
    body: Any,
    *,
    key: str | None = KEY_A,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST a chat request; returns (status, JSON body, headers)."""
    hdrs = dict(headers or {})
    if key is not None:
        hdrs["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    hdrs["Content-Type"] = "application/json"
    async with http.post(f"{url}/chat/completions", data=data, headers=hdrs) as resp:
        headers = {k.lower(): v for k, v in resp.headers.items()}
        if resp.content_type != "application/json":
            return resp.status, {"raw": await resp.text()}, headers
        return resp.status, await resp.json(), headers


def chat(max_tokens: int | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": MSGS, **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


# -- pure units ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0s"),
        (1, "1ms"),
        (12, "12ms"),
        (120, "120ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (9816, "9.816s"),
        (20_050, "20.05s"),
        (60_000, "1m0s"),
        (360_000, "6m0s"),
        (61_001, "1m1.001s"),
        (3_600_000, "1h0m0s"),
        (3_723_400, "1h2m3.4s"),
    ],
)
def test_format_go_duration(ms: int, text: str) -> None:
    assert format_go_duration(ms) == text


def test_ceil_ms_rounds_up_but_not_float_noise() -> None:
    assert ceil_ms(0.644) == 644
    assert ceil_ms(0.6441) == 645
    assert ceil_ms(0.0) == 0
    assert ceil_ms(-1.0) == 0
    with pytest.raises(ValueError, match="non-negative"):
        format_go_duration(-1)


def test_expected_text_is_deterministic_and_sized() -> None:
    a = expected_text(MODEL, MSGS, 10)
    assert a == expected_text(MODEL, [dict(m) for m in MSGS], 10)
    assert len(a.split(" ")) == 10
    assert expected_text(MODEL, MSGS, 4) == " ".join(a.split(" ")[:4])
    assert a != expected_text("other-model", MSGS, 10)
    assert a != expected_text(MODEL, [{"role": "user", "content": "x"}], 10)
    assert expected_text(MODEL, MSGS, 0) == ""
    # key order inside a message does not matter (JSON object semantics)
    reordered = [{"content": m["content"], "role": m["role"]} for m in MSGS]
    assert expected_text(MODEL, reordered, 10) == a


def test_completion_tokens_and_finish_reason() -> None:
    cfg = SimulatorConfig(output_tokens=16)
    assert completion_tokens_for(None, cfg) == 16
    assert completion_tokens_for(5, cfg) == 5
    assert completion_tokens_for(100, cfg) == 16
    assert finish_reason_for(5, cfg) == "length"
    assert finish_reason_for(16, cfg) == "length"
    assert finish_reason_for(17, cfg) == "stop"
    assert finish_reason_for(None, cfg) == "stop"


def test_sliding_window_expires_exactly_at_horizon() -> None:
    clock = FakeClock()
    w = SlidingWindow(60.0, clock)
    w.add(10, w.expire())
    clock.advance(30)
    w.add(20, w.expire())
    assert (w.requests, w.tokens) == (2, 30)
    clock.advance(29.999)
    w.expire()
    assert (w.requests, w.tokens) == (2, 30)
    clock.advance(0.001)  # first entry is exactly 60 s old: gone
    w.expire()
    assert (w.requests, w.tokens) == (1, 20)
    clock.advance(30)
    w.expire()
    assert (w.requests, w.tokens) == (0, 0)


def test_limiter_rpm_window_and_exact_retry_after() -> None:
    clock = FakeClock()
    lim = Limiter(rpm=3, clock=clock)
    for _ in range(3):
        assert isinstance(lim.try_admit(10), Ticket)
        clock.advance(10)
    rej = lim.try_admit(10)
    assert isinstance(rej, Rejection)
    assert (rej.kind, rej.limit, rej.used, rej.requested) == ("requests", 3, 3, 1)
    assert rej.retry_after_ms == 30_000  # first entry (t=0) leaves at 60, now is 30
    # refusals do not enter the window: refusing again changes nothing
    assert isinstance(lim.try_admit(10), Rejection)
    assert lim.occupancy() == (3, 30)
    clock.advance(29.999)
    rej2 = lim.try_admit(10)
    assert isinstance(rej2, Rejection)
    assert rej2.retry_after_ms == 1
    clock.advance(0.001)
    assert isinstance(lim.try_admit(10), Ticket)
    assert lim.max_requests_in_any_60s == 3


def test_limiter_tpm_wait_frees_enough_tokens() -> None:
    clock = FakeClock()
    lim = Limiter(tpm=1000, adjust_on_completion=False, clock=clock)
    assert isinstance(lim.try_admit(400), Ticket)
    clock.advance(5)
    assert isinstance(lim.try_admit(400), Ticket)
    clock.advance(5)
    rej = lim.try_admit(700)  # needs 500 freed: both entries must go, the last at t=65
    assert isinstance(rej, Rejection)
    assert (rej.kind, rej.limit, rej.used, rej.requested) == ("tokens", 1000, 800, 700)
    assert rej.retry_after_ms == 55_000
    rej = lim.try_admit(300)  # needs 100 freed: the first entry, at t=60
    assert isinstance(rej, Rejection)
    assert rej.retry_after_ms == 50_000
    too_big = lim.try_admit(1001)
    assert isinstance(too_big, Rejection)
    assert too_big.too_large
    assert too_big.retry_after_ms is None
    assert lim.max_tokens_in_any_60s == 800


def test_limiter_reports_the_longer_wait() -> None:
    clock = FakeClock()
    lim = Limiter(rpm=2, tpm=100, clock=clock)
    assert isinstance(lim.try_admit(90), Ticket)
    clock.advance(20)
    assert isinstance(lim.try_admit(5), Ticket)
    rej = lim.try_admit(50)  # requests free at t=60 (wait 40); tokens also at t=60
    assert isinstance(rej, Rejection)
    assert rej.kind == "requests"
    assert rej.retry_after_ms == 40_000
    lim2 = Limiter(rpm=10, tpm=100, clock=clock)
    assert isinstance(lim2.try_admit(90), Ticket)
    rej2 = lim2.try_admit(50)
    assert isinstance(rej2, Rejection)
    assert rej2.kind == "tokens"


def test_limiter_quantized_per_second() -> None:
    clock = FakeClock()
    lim = Limiter(rpm=60, tpm=600, quantize_per_second=True, clock=clock)  # 1 req, 10 tok/s
    assert isinstance(lim.try_admit(5), Ticket)
    rej = lim.try_admit(1)
    assert isinstance(rej, Rejection)
    assert rej.kind == "requests"
    assert rej.retry_after_ms == 1000
    clock.advance(1.0)
    # bigger than a second's 10 tokens: admitted, but only into an empty 1 s window
    assert isinstance(lim.try_admit(50), Ticket)
    clock.advance(1.0)
    assert isinstance(lim.try_admit(50), Ticket)
    assert lim.occupancy() == (3, 105)
    # per-minute limits still apply on top
    lim2 = Limiter(rpm=120, tpm=120, quantize_per_second=True, clock=clock)  # 2 req, 2 tok/s
    assert isinstance(lim2.try_admit(1), Ticket)
    assert isinstance(lim2.try_admit(1), Ticket)
    rej = lim2.try_admit(1)
    assert isinstance(rej, Rejection)
    assert rej.retry_after_ms == 1000


def test_limiter_adjusts_on_completion() -> None:
    clock = FakeClock()
    lim = Limiter(tpm=1000, clock=clock)
    t = lim.try_admit(600)
    assert isinstance(t, Ticket)
    assert lim.finish(t, 100) == 500
    assert lim.occupancy() == (1, 100)
    assert lim.finish(t, 50) == 0  # finishing twice changes nothing
    assert isinstance(lim.try_admit(900), Ticket)
    assert lim.max_tokens_in_any_60s == 1000
    t_late = lim.try_admit(0)
    assert isinstance(t_late, Ticket)
    clock.advance(61)  # entries expired before the call finished: no effect on the window
    lim.finish(t_late, 5)
    assert lim.occupancy() == (0, 0)
    fixed = Limiter(tpm=1000, adjust_on_completion=False, clock=clock)
    t2 = fixed.try_admit(600)
    assert isinstance(t2, Ticket)
    assert fixed.finish(t2, 100) == 0
    assert fixed.occupancy() == (1, 600)


def test_limiter_headers() -> None:
    clock = FakeClock()
    assert Limiter(clock=clock).headers() == {}
    lim = Limiter(rpm=10, tpm=1000, clock=clock)
    h = lim.headers()
    assert h["x-ratelimit-remaining-requests"] == "10"
    assert h["x-ratelimit-reset-requests"] == "0s"
    lim.try_admit(100)
    clock.advance(50.184)
    h = lim.headers()
    assert h == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "9.816s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "9.816s",
    }
    only_rpm = Limiter(rpm=5, clock=clock).headers()
    assert set(only_rpm) == {
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    }


def test_faults_at_rate_zero_and_one() -> None:
    none = Faults(SimFaults(seed=1))
    assert all(none.draw().name is None for _ in range(50))
    for field, name in [
        ("error_500_rate", "error_500"),
        ("error_503_rate", "error_503"),
        ("drop_mid_stream_rate", "drop_mid_stream"),
    ]:
        plan = Faults(msgspec.structs.replace(SimFaults(seed=1), **{field: 1.0})).draw()
        assert plan.failure == name
    slow = Faults(SimFaults(slow_rate=1.0, slow_extra_ms=30, seed=1)).draw()
    assert (slow.failure, slow.slow_extra_ms, slow.name) == (None, 30, "slow")
    half = SimFaults(error_500_rate=0.5, seed=42)
    fa, fb = Faults(half), Faults(half)  # same seed, same sequence
    plans = [fa.draw() for _ in range(40)]
    assert plans == [fb.draw() for _ in range(40)]
    assert 0 < sum(p.failure == "error_500" for p in plans) < 40


def test_keyring_needs_env_and_never_keeps_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIM_KEY_B")
    with pytest.raises(SimulatorError, match="SIM_KEY_B"):
        Simulator(make_config())
    ring = KeyRing([SimKey(api_key_env="SIM_KEY_A")])
    found = ring.lookup(KEY_A)
    assert found is not None
    assert found.api_key_env == "SIM_KEY_A"
    assert ring.lookup(KEY_B) is None
    assert KEY_A not in repr(vars(ring))
    with pytest.raises(SimulatorError, match="same key value"):
        KeyRing([SimKey(api_key_env="A"), SimKey(api_key_env="B")], environ={"A": "x", "B": "x"})
    with pytest.raises(SimulatorError, match="listed twice"):
        KeyRing([SimKey(api_key_env="A"), SimKey(api_key_env="A")], environ={"A": "x"})
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token(None) is None


def test_mask_key_shows_last_four_only() -> None:
    assert mask_key("sk-proj-abcdefghijklmnop1234") == "sk-...1234"
    assert mask_key("no-prefix-but-long-wxyz") == "...wxyz"
    assert mask_key("sk-short") == "sk-..."


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ([1, 2], None, "JSON object"),
        ({"messages": MSGS}, "model", "model"),
        ({"model": "", "messages": MSGS}, "model", "''"),
        ({"model": 3, "messages": MSGS}, "model", "3"),
        ({"model": MODEL}, "messages", "messages"),
        ({"model": MODEL, "messages": []}, "messages", "empty array"),
        ({"model": MODEL, "messages": ["hi"]}, "messages[0]", "'hi'"),
        ({"model": MODEL, "messages": [{"content": "x"}]}, "messages[0].role", "role"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
            "value 5",
        ),
        ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content", "content"),
        ({"model": MODEL, "messages": MSGS, "max_tokens": 0}, "max_tokens", "got 0"),
        ({"model": MODEL, "messages": MSGS, "max_tokens": "9"}, "max_tokens", "'9'"),
        (
            {"model": MODEL, "messages": MSGS, "max_completion_tokens": -2},
            "max_completion_tokens",
            "-2",
        ),
        ({"model": MODEL, "messages": MSGS, "stream": "yes"}, "stream", "'yes'"),
        (
            {
                "model": MODEL,
                "messages": MSGS,
                "stream": True,
                "stream_options": {"include_usage": 1},
            },
            "stream_options.include_usage",
            "value 1",
        ),
        (
            {"model": MODEL, "messages": MSGS, "stream_options": {"include_usage": True}},
            "stream_options",
            "stream",
        ),
    ],
)
def test_validation_names_field_and_value(body: Any, param: str | None, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        validate_chat_body(body)
    assert info.value.param == param
    assert fragment in info.value.message
    if param:
        assert param in info.value.message


def test_validation_accepts_parts_and_prefers_max_completion_tokens() -> None:
    req = validate_chat_body(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 50,
            "max_completion_tokens": 20,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert (req.max_tokens, req.stream, req.include_usage) == (20, True, True)


# -- over HTTP ----------------------------------------------------------------------------


async def test_sdk_non_stream_and_stream_reassemble_expected_text(tmp_path: Path) -> None:
    async with running(make_config(rpm=100, tpm=100_000)) as (_sim, url):
        c = client(url)
        prompt = estimate_prompt_tokens(MSGS)
        r = await c.chat.completions.create(model=MODEL, messages=SDK_MSGS)
        assert r.id.startswith("chatcmpl-sim-")
        assert r.object == "chat.completion"
        assert r.model == MODEL
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == expected_text(MODEL, MSGS, 8)
        assert r.choices[0].finish_reason == "stop"
        assert r.usage is not None
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt, 8)
        assert r.usage.total_tokens == prompt + 8

        r2 = await c.chat.completions.create(model=MODEL, messages=SDK_MSGS, max_tokens=3)
        assert r2.choices[0].message.content == expected_text(MODEL, MSGS, 3)
        assert r2.choices[0].finish_reason == "length"

        stream = await c.chat.completions.create(
            model=MODEL,
            messages=SDK_MSGS,
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=5,
        )
        ids, pieces, finishes, usage = set(), [], [], None
        first_delta_role = None
        async for chunk in stream:
            ids.add(chunk.id)
            assert chunk.object == "chat.completion.chunk"
            if not chunk.choices:
                usage = chunk.usage
                continue
            if first_delta_role is None:
                first_delta_role = chunk.choices[0].delta.role
            pieces.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].finish_reason:
                finishes.append(chunk.choices[0].finish_reason)
        assert len(ids) == 1
        assert first_delta_role == "assistant"
        assert "".join(pieces) == expected_text(MODEL, MSGS, 5)
        assert pieces[1:6] == [
            w if i == 0 else " " + w for i, w in enumerate(expected_text(MODEL, MSGS, 5).split())
        ]
        assert finishes == ["length"]
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, 5)

        # without include_usage: no usage chunk; unknown model served without limits
        stream2 = await c.chat.completions.create(
            model="some-unknown-model",
            messages=SDK_MSGS,
            stream=True,
        )
        texts = [ch.choices[0].delta.content or "" async for ch in stream2 if ch.choices]
        assert "".join(texts) == expected_text("some-unknown-model", MSGS, 8)


async def test_raw_stream_ends_with_done(http: aiohttp.ClientSession) -> None:
    async with running(make_config()) as (_sim, url):
        async with http.post(
            f"{url}/chat/completions",
            json=chat(stream=True),
            headers={"Authorization": f"Bearer {KEY_B}"},
        ) as resp:
            assert resp.status == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            raw = (await resp.read()).decode()
        events = [e for e in raw.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events)
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-1]["choices"][0]["delta"] == {}
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert len({c["id"] for c in chunks}) == 1
        assert len({c["created"] for c in chunks}) == 1
        assert all("usage" not in c for c in chunks)


async def test_401_unknown_and_missing_key(http: aiohttp.ClientSession) -> None:
    async with running(make_config(rpm=5)) as (_sim, url):
        wrong = "sk-wrong-key-but-long-enough-abcd"
        status, body, headers = await post(http, url, chat(), key=wrong)
        assert status == 401
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["code"] == "invalid_api_key"
        assert body["error"]["param"] is None
        assert body["error"]["message"].startswith("Incorrect API key provided: sk-...abcd.")
        assert "wrong-key" not in body["error"]["message"]
        assert "x-request-id" in headers
        assert "x-ratelimit-limit-requests" not in headers
        status, body, _ = await post(http, url, chat(), key=None)
        assert status == 401
        assert body["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await client(url, wrong).chat.completions.create(model=MODEL, messages=SDK_MSGS)


async def test_400_names_field_and_value(http: aiohttp.ClientSession) -> None:
    async with running(make_config(rpm=5)) as (_sim, url):
        status, body, headers = await post(http, url, chat(max_tokens=-3))
        assert status == 400
        err = body["error"]
        assert (err["type"], err["param"]) == ("invalid_request_error", "max_tokens")
        assert "max_tokens" in err["message"]
        assert "-3" in err["message"]
        assert headers["x-ratelimit-limit-requests"] == "5"  # known key + model: headers
        status, body, _ = await post(http, url, b"{not json")
        assert status == 400
        assert "JSON" in body["error"]["message"]
        bad = {"model": MODEL, "messages": [{"role": "user", "content": 12}]}
        status, body, _ = await post(http, url, bad)
        assert (status, body["error"]["param"]) == (400, "messages[0].content")
        with pytest.raises(openai.BadRequestError):
            await client(url).chat.completions.create(model=MODEL, messages=[])


async def test_rpm_limit_429_shape_and_headers(http: aiohttp.ClientSession) -> None:
    async with running(make_config(rpm=3, tpm=10_000)) as (sim, url):
        remaining = []
        for _ in range(3):
            status, _, headers = await post(http, url, chat())
            assert status == 200
            remaining.append(int(headers["x-ratelimit-remaining-requests"]))
            assert headers["x-ratelimit-limit-requests"] == "3"
            assert headers["x-ratelimit-limit-tokens"] == "10000"
            assert headers["x-ratelimit-reset-requests"].endswith("s")
            assert "x-request-id" in headers
        assert remaining == [2, 1, 0]
        status, body, headers = await post(http, url, chat())
        assert status == 429
        assert set(body) == {"error"}
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert (err["type"], err["code"], err["param"]) == (
            "requests",
            "rate_limit_exceeded",
            None,
        )
        assert err["message"].startswith(
            f"Rate limit reached for {MODEL} in organization org-sim on requests per min "
            "(RPM): Limit 3, Used 3, Requested 1. Please try again in "
        )
        retry_ms = int(headers["retry-after-ms"])
        assert 59_000 < retry_ms <= 60_000
        assert int(headers["retry-after"]) == -(-retry_ms // 1000)
        assert err["message"].endswith(f"Please try again in {format_go_duration(retry_ms)}.")
        assert headers["x-ratelimit-remaining-requests"] == "0"
        for name in ("limit", "remaining", "reset"):
            assert f"x-ratelimit-{name}-tokens" in headers
        # the SDK sees a RateLimitError with the same body
        with pytest.raises(openai.RateLimitError) as info:
            await client(url).chat.completions.create(model=MODEL, messages=SDK_MSGS)
        assert info.value.code == "rate_limit_exceeded"
        lane = sim.stats()["by_key_model"][f"SIM_KEY_A/{MODEL}"]
        assert (lane["admitted"], lane["rejected_429"], lane["requests"]) == (3, 2, 3)
        # another key's lane is independent
        status, _, _ = await post(http, url, chat(), key=KEY_B)
        assert status == 200


async def test_tpm_binds_with_large_max_tokens(http: aiohttp.ClientSession) -> None:
    cfg = make_config(rpm=100, tpm=1000, tpm_adjust_on_completion=False)
    async with running(cfg) as (_sim, url):
        prompt = estimate_prompt_tokens(MSGS)
        status, _, headers = await post(http, url, chat(max_tokens=600))
        assert status == 200
        assert headers["x-ratelimit-remaining-tokens"] == str(1000 - prompt - 600)
        status, body, headers = await post(http, url, chat(max_tokens=600))
        assert status == 429
        assert body["error"]["type"] == "tokens"
        assert body["error"]["message"].startswith(
            f"Rate limit reached for {MODEL} in organization org-sim on tokens per min (TPM): "
            f"Limit 1000, Used {prompt + 600}, Requested {prompt + 600}."
        )
        assert int(headers["retry-after-ms"]) > 59_000
        status, _, _ = await post(http, url, chat(max_tokens=100))  # still fits
        assert status == 200


async def test_request_too_large(http: aiohttp.ClientSession) -> None:
    async with running(make_config(tpm=1000)) as (sim, url):
        prompt = estimate_prompt_tokens(MSGS)
        status, body, headers = await post(http, url, chat(max_tokens=1000))
        assert status == 429
        err = body["error"]
        assert (err["type"], err["code"]) == ("tokens", "rate_limit_exceeded")
        assert err["message"].startswith(
            f"Request too large for {MODEL} in organization org-sim on tokens per min (TPM): "
            f"Limit 1000, Requested {prompt + 1000}."
        )
        assert "retry-after" not in headers
        assert "retry-after-ms" not in headers
        stats = sim.stats()
        assert stats["too_large_429"] == 1
        assert stats["rate_limited_429"] == 1


async def test_insufficient_quota(http: aiohttp.ClientSession) -> None:
    async with running(make_config()) as (sim, url):
        status, body, headers = await post(http, url, chat(), key=KEY_X)
        assert status == 429
        assert body == {
            "error": {
                "message": "You exceeded your current quota, please check your plan and "
                "billing details.",
                "type": "insufficient_quota",
                "param": None,
                "code": "insufficient_quota",
            }
        }
        assert "retry-after" not in headers
        assert "retry-after-ms" not in headers
        assert headers["x-ratelimit-limit-requests"] == "5"
        with pytest.raises(openai.RateLimitError) as info:
            await client(url, KEY_X).chat.completions.create(model=MODEL, messages=SDK_MSGS)
        assert info.value.code == "insufficient_quota"
        assert sim.stats()["insufficient_quota_429"] == 2
        assert sim.stats()["by_key_model"][f"SIM_KEY_X/{MODEL}"]["admitted"] == 0


async def test_quantize_per_second_over_http(http: aiohttp.ClientSession) -> None:
    async with running(make_config(rpm=60, quantize_per_second=True)) as (_sim, url):
        s1, _, _ = await post(http, url, chat())
        s2, body, headers = await post(http, url, chat())
        assert (s1, s2) == (200, 429)
        assert body["error"]["type"] == "requests"
        assert 0 < int(headers["retry-after-ms"]) <= 1000
        assert headers["retry-after"] == "1"


async def test_tpm_adjust_on_completion_refunds(http: aiohttp.ClientSession) -> None:
    prompt = estimate_prompt_tokens(MSGS)
    async with running(make_config(tpm=10_000)) as (sim, url):
        status, _, _ = await post(http, url, chat(max_tokens=500))
        assert status == 200
        lane = sim.stats()["by_key_model"][f"SIM_KEY_A/{MODEL}"]
        assert lane["tokens_charged"] == prompt + 500
        assert lane["tokens"] == prompt + 8  # corrected to the 8 tokens produced
        assert lane["tokens_refunded"] == 492
        assert lane["max_tokens_in_any_60s"] == prompt + 500
    async with running(make_config(tpm=10_000, tpm_adjust_on_completion=False)) as (sim, url):
        await post(http, url, chat(max_tokens=500))
        lane = sim.stats()["by_key_model"][f"SIM_KEY_A/{MODEL}"]
        assert lane["tokens"] == prompt + 500
        assert lane["tokens_refunded"] == 0


async def test_fault_500_and_503(http: aiohttp.ClientSession) -> None:
    for rate_field, status, message in [
        ("error_500_rate", 500, "The server had an error while processing your request."),
        ("error_503_rate", 503, "The engine is currently overloaded"),
    ]:
        faults = msgspec.structs.replace(SimFaults(seed=3), **{rate_field: 1.0})
        async with running(make_config(rpm=10, tpm=10_000, faults=faults)) as (sim, url):
            got, body, headers = await post(http, url, chat())
            assert got == status
            assert body["error"]["type"] == "server_error"
            assert body["error"]["message"].startswith(message)
            assert headers["x-ratelimit-remaining-requests"] == "9"  # it counted
            got, _, _ = await post(http, url, chat(stream=True))  # streams fail before SSE
            assert got == status
            lane = sim.stats()["by_key_model"][f"SIM_KEY_A/{MODEL}"]
            assert (lane["admitted"], lane["requests"]) == (2, 2)
            # a failed call produced nothing: its entry is corrected to the prompt only
            assert lane["tokens"] == 2 * estimate_prompt_tokens(MSGS)
    faults = SimFaults(error_500_rate=1.0, seed=3)
    async with running(make_config(faults=faults)) as (_sim, url):
        with pytest.raises(openai.InternalServerError):
            await client(url).chat.completions.create(model=MODEL, messages=SDK_MSGS)


async def read_stream(http: aiohttp.ClientSession, url: str, into: bytearray) -> None:
    """Read a streamed chat answer into `into` (kept even when the read fails)."""
    async with http.post(
        f"{url}/chat/completions",
        json=chat(stream=True),
        headers={"Authorization": f"Bearer {KEY_A}"},
    ) as resp:
        assert resp.status == 200
        async for line in resp.content:
            into += line


async def test_fault_drop_mid_stream(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    log = tmp_path / "sim.jsonl"
    faults = SimFaults(drop_mid_stream_rate=1.0, seed=3)
    async with running(make_config(rpm=10, log_path=log, faults=faults)) as (sim, url):
        received = bytearray()
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_stream(http, url, received)
        assert b"[DONE]" not in received
        deltas = [
            json.loads(e[6:])["choices"][0]["delta"].get("content", "")
            for e in received.decode().split("\n\n")
            if e.startswith("data: ")
        ]
        assert "".join(deltas) == expected_text(MODEL, MSGS, 4)  # half of 8, then cut
        # non-stream: the connection closes before any answer
        with pytest.raises(openai.APIConnectionError):
            await client(url).chat.completions.create(model=MODEL, messages=SDK_MSGS)
        stats = sim.stats()
        assert stats["dropped"] == 2
        assert stats["faults"] == {"drop_mid_stream": 2}
        assert stats["by_key_model"][f"SIM_KEY_A/{MODEL}"]["requests"] == 2
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["status"], x["fault"], x["completion_tokens"]) for x in lines] == [
        (200, "drop_mid_stream", 4),
        (None, "drop_mid_stream", 4),
    ]


async def test_fault_slow_adds_delay(http: aiohttp.ClientSession) -> None:
    faults = SimFaults(slow_rate=1.0, slow_extra_ms=150, seed=3)
    async with running(make_config(faults=faults)) as (_sim, url):
        t0 = time.monotonic()
        r = await client(url).chat.completions.create(model=MODEL, messages=SDK_MSGS)
        assert time.monotonic() - t0 >= 0.15
        assert r.choices[0].message.content == expected_text(MODEL, MSGS, 8)


async def test_jsonl_log_lines(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    log = tmp_path / "logs" / "sim.jsonl"
    async with running(make_config(rpm=1, log_path=log)) as (_sim, url):
        await post(http, url, chat(max_tokens=4), headers={"X-Client-Request-Id": "cr-1"})
        # readable while the simulator still runs: each line is flushed
        first = json.loads(log.read_text().splitlines()[0])
        await post(http, url, chat(), headers={"X-Client-Request-Id": "cr-2"})
        await post(http, url, chat(), key="sk-not-a-known-key-zzzz")
        await post(http, url, chat(stream=True), key=KEY_B)
    text = log.read_text()
    for secret in (KEY_A, KEY_B, KEY_X, "sk-not-a-known-key-zzzz"):
        assert secret not in text
    lines = [json.loads(x) for x in text.splitlines()]
    assert first == lines[0]
    assert set(lines[0]) == {
        "ts_ms",
        "key",
        "model",
        "status",
        "stream",
        "prompt_tokens",
        "max_tokens",
        "charged_tokens",
        "completion_tokens",
        "fault",
        "client_request_id",
        "duration_ms",
    }
    prompt = estimate_prompt_tokens(MSGS)
    assert lines[0] | {"ts_ms": 0, "duration_ms": 0} == {
        "ts_ms": 0,
        "key": "SIM_KEY_A",
        "model": MODEL,
        "status": 200,
        "stream": False,
        "prompt_tokens": prompt,
        "max_tokens": 4,
        "charged_tokens": prompt + 4,
        "completion_tokens": 4,
        "fault": None,
        "client_request_id": "cr-1",
        "duration_ms": 0,
    }
    assert (lines[1]["status"], lines[1]["client_request_id"]) == (429, "cr-2")
    assert lines[1]["charged_tokens"] is None
    assert (lines[2]["status"], lines[2]["key"], lines[2]["client_request_id"]) == (
        401,
        None,
        None,
    )
    assert (lines[3]["key"], lines[3]["stream"], lines[3]["completion_tokens"]) == (
        "SIM_KEY_B",
        True,
        8,
    )


async def test_stats_counters_window_max_and_reset(http: aiohttp.ClientSession) -> None:
    async with running(make_config(rpm=5, tpm=100_000, ttft_ms=5)) as (sim, url):
        results = await asyncio.gather(*(post(http, url, chat()) for _ in range(12)))
        statuses = sorted(r[0] for r in results)
        assert statuses == [200] * 5 + [429] * 7
        async with http.get(url.removesuffix("/v1") + "/stats") as resp:
            stats = await resp.json()
        assert stats == sim.stats()
        assert stats["requests"] == 12
        assert stats["by_status"] == {"200": 5, "429": 7}
        assert stats["rate_limited_429"] == 7
        lane = stats["by_key_model"][f"SIM_KEY_A/{MODEL}"]
        prompt = estimate_prompt_tokens(MSGS)
        assert lane["admitted"] == 5
        assert lane["rejected_429"] == 7
        assert lane["tokens_charged"] == 5 * (prompt + 8)
        assert (lane["requests"], lane["tokens"]) == (5, 5 * (prompt + 8))
        assert lane["max_requests_in_any_60s"] == 5
        assert lane["max_tokens_in_any_60s"] == 5 * (prompt + 8)
        assert lane["in_flight"] == 0
        async with http.post(url.removesuffix("/v1") + "/stats/reset") as resp:
            assert resp.status == 200
        after = sim.stats()
        assert after["requests"] == 0
        assert after["by_status"] == {}
        lane = after["by_key_model"][f"SIM_KEY_A/{MODEL}"]
        assert (lane["admitted"], lane["max_requests_in_any_60s"]) == (0, 0)
        assert lane["requests"] == 5  # the window is kept
        status, _, _ = await post(http, url, chat())
        assert status == 429


async def test_healthz_and_models(http: aiohttp.ClientSession) -> None:
    async with running(make_config(rpm=5)) as (_sim, url):
        async with http.get(url.removesuffix("/v1") + "/healthz") as resp:
            assert resp.status == 200
        models = await client(url).models.list()
        assert [m.id async for m in models] == [MODEL]
        async with http.get(f"{url}/models") as resp:
            assert resp.status == 401


@pytest.fixture
def sim_process(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    code = (
        "from topics.config import SimulatorConfig, SimKey\n"
        "from pipeline.simulator import run_simulator\n"
        "run_simulator(SimulatorConfig(keys=[SimKey(api_key_env='SIM_KEY_A')]), port=0)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "SIM_KEY_A": KEY_A},
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_simulator_prints_url_and_exits_0_on_sigint(
    sim_process: subprocess.Popen[str],
) -> None:
    assert sim_process.stdout is not None
    line = sim_process.stdout.readline()
    assert line.startswith("simulator listening on http://127.0.0.1:")
    assert line.rstrip().endswith("/v1")
    sim_process.send_signal(signal.SIGINT)
    assert sim_process.wait(timeout=10) == 0
