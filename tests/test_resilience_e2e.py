"""Issue 4 on the real broker, real Ray and the simulator: faults, outages, crashes, shutdown.

Every test ends with the same check: each request got exactly one terminal reply through
the client library, with the simulator's (deterministic) text when it is `done`. What a
crash repeats — upstream calls, replies seen twice on the raw topic — is counted and
printed (`pytest -s` shows it), and bounded by what was in flight.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from pipeline.client import Answer, QuotaflowClient
from pipeline.kafka_local import LocalKafka
from pipeline.simulator import completion_tokens_for, expected_text
from tests.conftest import (
    BACKUP_LANE,
    DOWN_LANE,
    FLAKY_FAULTS,
    FLAKY_LANE,
    SESSION_BREAKER_OPEN_S,
    SLOW_STREAM_INTER_TOKEN_MS,
    SLOW_STREAM_LANE,
    QuotaLane,
    Stack,
)
from tests.test_e2e import _partitions, _read_topic
from topics.wire import ChunkReply, DoneReply, ErrorReply, ResetReply

pytestmark = [pytest.mark.integration]

SIM_MODEL = "sim-small"
TIMEOUT_S = 180.0


def _body(lane: QuotaLane, prompt: str, *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "model": lane.model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": stream,
        **extra,
    }


def _expected(stack: Stack, body: dict[str, Any]) -> str:
    sim = stack.config.simulator
    assert sim is not None
    return expected_text(
        SIM_MODEL, body["messages"], completion_tokens_for(body.get("max_tokens"), sim)
    )


def _one_terminal(answer: Answer) -> bool:
    return sum(isinstance(r, DoneReply | ErrorReply) for r in answer.replies) == 1


async def _wait_for(
    what: str, check: Callable[[], Awaitable[bool]], timeout_s: float = 60.0
) -> None:
    give_up = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < give_up, f"{what}: not within {timeout_s}s"
        await asyncio.sleep(0.2)


def _calls_by_id(stack: Stack, ids: set[str]) -> Counter[str]:
    return Counter(
        r["client_request_id"] for r in stack.sim_log_records() if r.get("client_request_id") in ids
    )


async def _raw_duplicates(stack: Stack, topic: str, ids: set[str]) -> tuple[int, int]:
    """(replies seen more than once by (id, seq), reset replies) on the raw reply topic."""

    def terminals(records: list[Any]) -> set[str]:
        return {
            v["id"]
            for v in (json.loads(r.value) for r in records)
            if v["type"] in ("done", "error")
        }

    records = await _read_topic(stack.bootstrap, topic, until=lambda recs: terminals(recs) >= ids)
    seen = Counter((v["id"], v["seq"]) for v in (json.loads(r.value) for r in records))
    resets = sum(json.loads(r.value)["type"] == "reset" for r in records)
    return sum(n - 1 for n in seen.values()), resets


# -- faults -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_with_20pct_5xx_and_5pct_cut_streams_every_request_completes_correctly(
    stack: Stack,
) -> None:
    n = 500
    topic = f"test.flaky.{uuid.uuid4().hex[:8]}"
    await _partitions(stack.bootstrap, topic)
    bodies = [_body(FLAKY_LANE, f"flaky {i}", stream=i % 2 == 0) for i in range(n)]
    async with QuotaflowClient(stack.bootstrap, reply_topic=topic) as c:
        answers = await asyncio.gather(*(c.ask(b, timeout_s=TIMEOUT_S) for b in bodies))
    assert [a.terminal for a in answers if not a.ok] == []
    assert all(_one_terminal(a) for a in answers)
    for a, b in zip(answers, bodies, strict=True):
        assert a.text == _expected(stack, b)
    ids = {a.id for a in answers}
    records = [r for r in stack.sim_log_records() if r.get("client_request_id") in ids]
    faults = Counter(r.get("fault") for r in records)
    # The faults really happened, at about the configured rates ...
    assert faults["error_500"] + faults["error_503"] > n * 0.1, faults
    assert faults["drop_mid_stream"] > 0, faults
    # ... and every attempt the gateway reports is exactly one upstream call (no hidden
    # SDK retries), every failure was retried.
    calls = Counter(r["client_request_id"] for r in records)
    for a in answers:
        assert isinstance(a.terminal, DoneReply)
        assert a.terminal.attempts == calls[a.id], (a.id, a.terminal.attempts, calls[a.id])
    retried = [a for a in answers if isinstance(a.terminal, DoneReply) and a.terminal.attempts > 1]
    assert retried
    # A stream cut after its first chunks was answered with a reset, then the new stream.
    cut = {r["client_request_id"] for r in records if r.get("fault") == "drop_mid_stream"}
    for a, b in zip(answers, bodies, strict=True):
        if a.id in cut and b["stream"]:
            assert any(isinstance(r, ResetReply) for r in a.replies), a.id
    dup, resets = await _raw_duplicates(stack, topic, ids)
    print(
        f"\nflaky: {sum(calls.values())} upstream calls for {n} requests, faults {dict(faults)}, "
        f"{len(retried)} retried, {resets} resets, {dup} duplicate replies on the raw topic"
    )


async def test_client_stream_hides_a_retry_that_repeats_the_answer(stack: Stack) -> None:
    n = 40
    # 30% of calls cut mid-stream (no 5xx): many requests are retried after chunks went
    # out, and the simulator's text is deterministic, so each retry repeats the answer.
    stack.sim_set_faults(FLAKY_LANE.key_env, {"drop_mid_stream_rate": 0.3, "seed": 5})
    try:
        topic = f"test.coherent.{uuid.uuid4().hex[:8]}"
        await _partitions(stack.bootstrap, topic)
        async with QuotaflowClient(stack.bootstrap, reply_topic=topic) as c:

            async def read(body: dict[str, Any]) -> tuple[str, list[Any]]:
                # A reader that knows nothing of resets: it just prints the content.
                seen = [r async for r in c.stream(body, timeout_s=TIMEOUT_S)]
                text = "".join(
                    (ch.get("delta") or {}).get("content") or ""
                    for r in seen
                    if isinstance(r, ChunkReply)
                    for ch in r.chunk.get("choices") or []
                )
                return text, seen

            bodies = [_body(FLAKY_LANE, f"coherent {i}") for i in range(n)]
            results = await asyncio.gather(*(read(b) for b in bodies))
    finally:
        stack.sim_set_faults(FLAKY_LANE.key_env, FLAKY_FAULTS)
    for (text, seen), b in zip(results, bodies, strict=True):
        assert isinstance(seen[-1], DoneReply), seen[-1]
        assert not any(isinstance(r, ResetReply) for r in seen)
        assert text == _expected(stack, b)
    # No 5xx here: a request with more than one attempt had its stream cut after chunks.
    retried = sum(isinstance(seen[-1], DoneReply) and seen[-1].attempts > 1 for _, seen in results)
    assert retried > 0
    print(f"\ncoherent: {retried} of {n} streams were retried mid-way, none showed a reset")


# -- breaker and fallback ---------------------------------------------------------------


def _breaker_state(stack: Stack, deployment: str) -> str:
    state: str = stack.status()["quota"]["deployments"][deployment]["breaker"]["state"]
    return state


async def test_a_hard_down_deployment_opens_its_breaker_traffic_falls_back_and_it_recovers(
    stack: Stack, client: QuotaflowClient
) -> None:
    consecutive = stack.config.resilience.breaker.consecutive_failures
    stack.sim_set_faults(DOWN_LANE.key_env, {"error_503_rate": 1.0})
    try:
        # Down: each request fails once on it, then goes to the fallback model.
        served: list[DoneReply] = []
        for i in range(consecutive + 3):
            a = await client.ask(_body(DOWN_LANE, f"down {i}"), timeout_s=TIMEOUT_S)
            assert isinstance(a.terminal, DoneReply), a.terminal
            assert a.text == _expected(stack, _body(DOWN_LANE, f"down {i}"))
            served.append(a.terminal)
        assert {d.deployment for d in served} == {BACKUP_LANE.deployment}
        assert {d.model for d in served} == {BACKUP_LANE.model}
        assert served[0].attempts == 2  # one failed call on the dead deployment first
        # The breaker opened after `consecutive` failures: later requests went straight to
        # the fallback (until open_s passes and a probe is let through).
        assert [d.attempts for d in served[consecutive:]] == [1] * 3
        dead_calls = [r for r in stack.sim_log_records() if r.get("key") == DOWN_LANE.key_env]
        assert len(dead_calls) == consecutive
        breaker = (await asyncio.to_thread(stack.status))["quota"]["deployments"][
            DOWN_LANE.deployment
        ]["breaker"]
        assert breaker["opened_total"] >= 1
    finally:
        stack.sim_set_faults(DOWN_LANE.key_env, None)

    # Recovered: after open_s probes are let through; `half_open_probes` successes in a
    # row close the breaker, and traffic is back on the primary deployment.
    probes = stack.config.resilience.breaker.half_open_probes
    streak = 0

    async def back_on_primary() -> bool:
        nonlocal streak
        body = _body(DOWN_LANE, f"recovered {uuid.uuid4().hex}")
        a = await client.ask(body, timeout_s=TIMEOUT_S)
        assert isinstance(a.terminal, DoneReply), a.terminal
        assert a.text == _expected(stack, body)
        streak = streak + 1 if a.terminal.deployment == DOWN_LANE.deployment else 0
        return streak >= probes

    await _wait_for(
        "traffic back on the primary", back_on_primary, 10 * SESSION_BREAKER_OPEN_S + 30
    )
    assert await asyncio.to_thread(_breaker_state, stack, DOWN_LANE.deployment) == "closed"


# -- crashes ------------------------------------------------------------------------------


async def _start_slow_streams(
    c: QuotaflowClient, stack: Stack, n: int, tag: str
) -> tuple[list[asyncio.Future[Answer]], list[dict[str, Any]], Callable[[], int]]:
    """n slow streamed requests; returns their futures, bodies and a count of those whose
    first content chunk the client has seen."""
    bodies = [_body(SLOW_STREAM_LANE, f"{tag} {i}") for i in range(n)]
    requests = [c.build(b) for b in bodies]
    started: set[str] = set()
    futures: list[asyncio.Future[Answer]] = []

    async def run(req: Any) -> Answer:
        replies = []
        await c.send(req)
        async for r in c.replies(req.id, timeout_s=TIMEOUT_S):
            if isinstance(r, ChunkReply) and any(
                (ch.get("delta") or {}).get("content") for ch in r.chunk.get("choices") or []
            ):
                started.add(req.id)
            replies.append(r)
        return _assemble(req.id, replies)

    futures = [asyncio.ensure_future(run(r)) for r in requests]
    return futures, bodies, lambda: len(started)


def _assemble(request_id: str, replies: list[Any]) -> Answer:
    parts: list[str] = []
    for r in replies:
        if isinstance(r, ResetReply):
            parts.clear()
        elif isinstance(r, ChunkReply):
            for ch in r.chunk.get("choices") or []:
                if content := (ch.get("delta") or {}).get("content"):
                    parts.append(content)
    return Answer(id=request_id, text="".join(parts), terminal=replies[-1], replies=replies)


async def test_killing_a_caller_actor_mid_stream_reruns_its_requests_once_each(
    stack: Stack,
) -> None:
    n = 16
    topic = f"test.callerkill.{uuid.uuid4().hex[:8]}"
    await _partitions(stack.bootstrap, topic)
    victim = (await asyncio.to_thread(stack.status))["callers"][0]
    async with QuotaflowClient(stack.bootstrap, reply_topic=topic) as c:
        futures, bodies, started = await _start_slow_streams(c, stack, n, "callerkill")
        await _wait_for("streams under way", lambda: _true_when(started() >= n // 2))
        unfinished = sum(not f.done() for f in futures)
        os.kill(victim["pid"], signal.SIGKILL)
        answers = await asyncio.gather(*futures)
    assert [a.terminal for a in answers if not isinstance(a.terminal, DoneReply)] == []
    assert all(_one_terminal(a) for a in answers)
    for a, b in zip(answers, bodies, strict=True):
        assert a.text == _expected(stack, b)
    ids = {a.id for a in answers}
    calls = _calls_by_id(stack, ids)
    repeated = sum(calls.values()) - n
    reruns = _logged_reruns(stack)
    assert repeated >= 1  # the killed caller's streams really ran again ...
    assert repeated <= unfinished  # ... and only those that were in flight
    assert reruns >= repeated
    dup, resets = await _raw_duplicates(stack, topic, ids)
    assert resets >= repeated  # each re-run started with a reset
    print(
        f"\ncaller kill: {repeated} upstream calls repeated (of {unfinished} in flight), "
        f"{resets} resets, {dup} duplicate replies on the raw topic"
    )


async def _true_when(value: bool) -> bool:
    return value


def _logged_reruns(stack: Stack) -> int:
    """Requests the gateway says it re-ran after a caller died (its `caller_restarted` lines)."""
    total = 0
    for line in stack.gateway_log.read_bytes().splitlines():
        if b'"caller_restarted"' in line:
            total += int(json.loads(line)["rerun"])
    return total


async def test_killing_the_whole_gateway_mid_load_and_restarting_it(stack: Stack) -> None:
    n = 20
    topic = f"test.gwkill.{uuid.uuid4().hex[:8]}"
    await _partitions(stack.bootstrap, topic)
    async with QuotaflowClient(stack.bootstrap, reply_topic=topic) as c:
        # A first wave finishes before the crash (its offsets may or may not be committed
        # yet), a second one is mid-stream when the whole process group is killed.
        first, _, _ = await _start_slow_streams(c, stack, n, "gwkill-a")
        done_first = await asyncio.gather(*first)
        futures, bodies, started = await _start_slow_streams(c, stack, n, "gwkill-b")
        await _wait_for("streams under way", lambda: _true_when(started() >= n // 4))
        unfinished = sum(not f.done() for f in futures)
        stack.gateway.kill()
        await stack.gateway.start()
        answers = await asyncio.gather(*futures)
        duplicates_dropped = c.duplicates
    assert unfinished > 0  # the crash interrupted work
    assert [a.terminal for a in answers if not isinstance(a.terminal, DoneReply)] == []
    assert all(_one_terminal(a) for a in answers)
    for a, b in zip(answers, bodies, strict=True):
        assert a.text == _expected(stack, b)
    first_calls = _calls_by_id(stack, {a.id for a in done_first})
    # Finished before the crash: never sent upstream again (replayed if re-delivered).
    assert sorted(first_calls.values()) == [1] * n
    ids = {a.id for a in answers}
    repeated = sum(_calls_by_id(stack, ids).values()) - n
    assert repeated <= unfinished
    dup, resets = await _raw_duplicates(stack, topic, ids | {a.id for a in done_first})
    print(
        f"\ngateway kill: {unfinished} of {n} unfinished at the kill, {repeated} upstream calls "
        f"repeated, {resets} resets, {dup} duplicate replies on the raw topic (replays), "
        f"{duplicates_dropped} dropped by the client library"
    )


async def test_a_broker_outage_of_10s_mid_load_loses_nothing(
    stack: Stack, kafka_local: LocalKafka
) -> None:
    n = 30
    topic = f"test.brokerdown.{uuid.uuid4().hex[:8]}"
    await _partitions(stack.bootstrap, topic)
    port = int(stack.bootstrap.rsplit(":", 1)[1])
    async with QuotaflowClient(stack.bootstrap, reply_topic=topic) as c:
        futures, bodies, started = await _start_slow_streams(c, stack, n, "brokerdown")
        await _wait_for("streams under way", lambda: _true_when(started() >= n // 3))
        await asyncio.to_thread(kafka_local.down)
        down_at = time.monotonic()
        await asyncio.sleep(10.0)  # the outage itself, not a wait for a result
        await asyncio.to_thread(kafka_local.up, port)
        print(f"\nbroker was down {time.monotonic() - down_at:.1f}s")
        answers = await asyncio.gather(*futures)
    assert stack.gateway.proc is not None
    assert stack.gateway.proc.poll() is None, "the gateway died with the broker"
    assert [a.terminal for a in answers if not isinstance(a.terminal, DoneReply)] == []
    assert all(_one_terminal(a) for a in answers)
    for a, b in zip(answers, bodies, strict=True):
        assert a.text == _expected(stack, b)
    ids = {a.id for a in answers}
    repeated = sum(_calls_by_id(stack, ids).values()) - n
    dup, resets = await _raw_duplicates(stack, topic, ids)
    print(
        f"broker outage: {repeated} upstream calls repeated, {resets} resets, "
        f"{dup} duplicate replies on the raw topic"
    )


# -- shutdown -----------------------------------------------------------------------------


async def test_sigterm_with_streams_in_flight_answers_every_one_and_exits_0(stack: Stack) -> None:
    n = 12
    topic = f"test.sigterm.{uuid.uuid4().hex[:8]}"
    await _partitions(stack.bootstrap, topic)
    stream_s = 16 * SLOW_STREAM_INTER_TOKEN_MS / 1000
    assert stack.config.gateway.drain_timeout_s < stream_s  # so some streams are cut
    try:
        async with QuotaflowClient(stack.bootstrap, reply_topic=topic) as c:
            futures, bodies, started = await _start_slow_streams(c, stack, n, "sigterm")
            await _wait_for("streams under way", lambda: _true_when(started() >= n // 2))
            code = await stack.gateway.stop()
            answers = await asyncio.gather(*futures)
    finally:
        proc = stack.gateway.proc
        if proc is None or proc.poll() is not None:
            await stack.gateway.start()  # for the tests after this one, whatever happened
    assert code == 0
    assert all(_one_terminal(a) for a in answers)
    for a, b in zip(answers, bodies, strict=True):
        if isinstance(a.terminal, DoneReply):
            assert a.text == _expected(stack, b)
        else:
            assert a.terminal.error.code == "upstream_unavailable"
            assert a.terminal.error.retryable
    print(
        f"\nsigterm: {sum(isinstance(a.terminal, DoneReply) for a in answers)} of {n} completed, "
        "the rest ended with a retryable error"
    )


# -- deadlines ----------------------------------------------------------------------------


async def test_a_deadline_passing_mid_stream_cancels_the_upstream_call(
    stack: Stack, client: QuotaflowClient
) -> None:
    stream_ms = 16 * SLOW_STREAM_INTER_TOKEN_MS
    deadline_ms = int(time.time() * 1000) + stream_ms // 2
    body = _body(SLOW_STREAM_LANE, f"deadline {uuid.uuid4().hex}")
    answer = await client.ask(body, deadline_ms=deadline_ms, timeout_s=TIMEOUT_S)
    assert isinstance(answer.terminal, ErrorReply)
    assert answer.terminal.error.code == "deadline_exceeded"
    assert str(deadline_ms) in answer.terminal.error.message
    # Chunks had arrived: the client was told to discard them before the error.
    kinds = [type(r).__name__ for r in answer.replies]
    assert "ChunkReply" in kinds
    assert kinds[-2:] == ["ResetReply", "ErrorReply"]
    assert answer.text == ""
    # The upstream call was cut short: the simulator saw the client go away before the end.
    await _wait_for(
        "the simulator logged the call", lambda: _true_when(bool(stack.sim_calls(answer.id)))
    )
    (call,) = stack.sim_calls(answer.id)
    assert call["completion_tokens"] < completion_tokens_for(None, stack.config.simulator)  # type: ignore[arg-type]
    assert call["fault"] == "client_disconnected"
