"""The quota actor against the simulator with the same limits (issue 3), on real Kafka and Ray.

Each lane is a deployment whose simulator key has exactly the gateway's limits, with the
simulator quantizing per second too: a single over-admission shows up as a 429 or as a
60 s window over the limit in the simulator's own stats.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from typing import Any

import pytest

from pipeline.client import Answer, QuotaflowClient
from tests.conftest import (
    CAPPED_DAILY_TOKENS,
    CAPPED_TENANT,
    FAIR_LANE,
    KILL_LANE,
    KILL_TENANT,
    RPM_LANE,
    SESSION_QUOTA_QUEUE_MAX,
    SLOW_LANE,
    TPM_LANE,
    QuotaLane,
    Stack,
)
from topics.tokens import estimate_prompt_tokens
from topics.wire import DoneReply, ErrorReply

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A burst of this many minutes' worth of a limit, submitted at once.
BURST_MINUTES = 3
# Long prompts make TPM bind: the refund after each call is only the unused max_tokens.
TPM_PROMPT_CHARS = 3_200
TPM_MAX_TOKENS = 100
# Generous: a burst of three minutes' worth takes a bit over two minutes.
BURST_TIMEOUT_S = 420.0


def _lane(stack: Stack, lane: QuotaLane) -> dict[str, Any]:
    lanes: dict[str, Any] = stack.sim_stats()["by_key_model"]
    return lanes[f"{lane.key_env}/sim-small"]


def _quota_start_lines(stack: Stack) -> list[bytes]:
    """The quota actor's start lines in the gateway log (one per incarnation)."""
    return [ln for ln in stack.gateway_log.read_bytes().splitlines() if b"quota_started" in ln]


def _body(lane: QuotaLane, prompt: str, max_tokens: int = 4) -> dict[str, Any]:
    return {
        "model": lane.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
    }


async def test_bursts_of_three_minutes_of_limit_finish_without_a_429(
    stack: Stack, client: QuotaflowClient
) -> None:
    """RPM-bound and TPM-bound bursts, concurrently, each BURST_MINUTES x the per-minute limit."""
    rpm_n = BURST_MINUTES * RPM_LANE.rpm
    long_prompt = "x" * TPM_PROMPT_CHARS
    reserved = estimate_prompt_tokens([{"role": "user", "content": long_prompt}]) + TPM_MAX_TOKENS
    per_minute = TPM_LANE.tpm // reserved
    assert per_minute >= 1
    tpm_n = BURST_MINUTES * per_minute

    rpm_calls = [
        client.ask(
            _body(RPM_LANE, f"burst {i}"), tenant=f"burst-{i % 4}", timeout_s=BURST_TIMEOUT_S
        )
        for i in range(rpm_n)
    ]
    tpm_calls = [
        client.ask(_body(TPM_LANE, f"{i} {long_prompt}", TPM_MAX_TOKENS), timeout_s=BURST_TIMEOUT_S)
        for i in range(tpm_n)
    ]
    answers: list[Answer] = await asyncio.gather(*rpm_calls, *tpm_calls)
    failed = [a.terminal for a in answers if not a.ok]
    assert failed == []
    waited = [a.terminal.timing.queued_ms for a in answers if isinstance(a.terminal, DoneReply)]
    assert max(waited) > 60_000  # the last minute's worth had to wait for the window

    for lane, n in ((RPM_LANE, rpm_n), (TPM_LANE, tpm_n)):
        stats = _lane(stack, lane)
        assert stats["rejected_429"] == 0, stats
        assert stats["admitted"] == n, stats
        assert stats["max_requests_in_any_60s"] <= lane.rpm, stats
        assert stats["max_tokens_in_any_60s"] <= lane.tpm, stats
    quota = stack.status()["quota"]
    assert quota["upstream_429s"] == 0
    # More asks than quota.queue_max waited: the ingress stopped consuming, then resumed.
    assert rpm_n + tpm_n > SESSION_QUOTA_QUEUE_MAX
    log = stack.gateway_log.read_bytes()
    assert b'"event": "quota_queue_full"' in log
    assert b'"event": "quota_queue_drained"' in log


async def test_light_tenant_waits_boundedly_behind_a_flooding_one(
    stack: Stack, client: QuotaflowClient
) -> None:
    """Weighted fair queuing: a trickle is served within two slots however deep the flood.

    At FAIR_LANE.rpm with per-second quantization one request is admitted per emission
    interval (60 s / rpm). A light request's virtual time is at most the current virtual
    clock, so it is the next one admitted: it waits for at most the slot in progress
    plus one. FIFO would make it wait behind the whole flood (flood x interval).
    """
    # One per second at this rpm, each second window lasting its margin longer.
    interval_ms = max(60_000 / FAIR_LANE.rpm, 1_000 + stack.config.quota.second_margin_ms)
    bound_ms = 2 * interval_ms
    flood_n, trickle_n = 30, 6
    flood = [
        asyncio.ensure_future(
            client.ask(_body(FAIR_LANE, f"flood {i}"), tenant="flood", timeout_s=BURST_TIMEOUT_S)
        )
        for i in range(flood_n)
    ]
    light: list[Answer] = []
    for i in range(trickle_n):
        # A trickle: one request every two intervals, while the flood is still queued.
        await asyncio.sleep(2 * interval_ms / 1000)
        light.append(await client.ask(_body(FAIR_LANE, f"light {i}"), tenant="light", timeout_s=60))
    flood_answers = await asyncio.gather(*flood)
    assert all(a.ok for a in flood_answers + light)
    queued = [a.terminal.timing.queued_ms for a in light if isinstance(a.terminal, DoneReply)]
    assert max(queued) <= bound_ms, (queued, bound_ms)
    flood_queued = [
        a.terminal.timing.queued_ms for a in flood_answers if isinstance(a.terminal, DoneReply)
    ]
    assert max(flood_queued) > trickle_n * bound_ms  # the flood really was queued meanwhile
    assert _lane(stack, FAIR_LANE)["rejected_429"] == 0


async def test_refusals_are_answered_without_calling_upstream(
    stack: Stack, client: QuotaflowClient
) -> None:
    too_large = await client.ask(_body(TPM_LANE, "huge", max_tokens=TPM_LANE.tpm + 1), timeout_s=60)
    assert isinstance(too_large.terminal, ErrorReply)
    assert too_large.terminal.error.code == "request_too_large"
    assert str(TPM_LANE.tpm) in too_large.terminal.error.message

    over_budget = await client.ask(
        _body(RPM_LANE, "big answer", max_tokens=CAPPED_DAILY_TOKENS + 1),
        tenant=CAPPED_TENANT,
        timeout_s=60,
    )
    assert isinstance(over_budget.terminal, ErrorReply)
    assert over_budget.terminal.error.code == "quota_exceeded"
    assert "daily token budget" in over_budget.terminal.error.message

    first = await client.ask(_body(SLOW_LANE, "takes the only slot of the minute"), timeout_s=60)
    assert first.ok
    hopeless = await client.ask(
        client.build(
            _body(SLOW_LANE, "in five seconds please"), deadline_ms=int(time.time() * 1000) + 5_000
        ),
        timeout_s=60,
    )
    assert isinstance(hopeless.terminal, ErrorReply)
    assert hopeless.terminal.error.code == "deadline_exceeded"
    for answer in (too_large, over_budget, hopeless):
        assert stack.sim_calls(answer.id) == []
    assert len(stack.sim_calls(first.id)) == 1


async def test_killing_the_quota_actor_mid_load_loses_nothing_and_causes_no_429(
    stack: Stack, client: QuotaflowClient
) -> None:
    n = KILL_LANE.rpm  # a minute's worth: the kill comes a quarter of the way through
    calls = [
        asyncio.ensure_future(
            client.ask(_body(KILL_LANE, f"kill {i}"), tenant=KILL_TENANT, timeout_s=BURST_TIMEOUT_S)
        )
        for i in range(n)
    ]
    # Wait until some requests are through, so counters are worth restoring.
    give_up = time.monotonic() + 120
    while sum(c.done() for c in calls) < n // 4:
        assert time.monotonic() < give_up, "no progress before the kill"
        await asyncio.sleep(0.2)
    before = await asyncio.to_thread(stack.status)
    used_before = before["quota"]["tenants"][KILL_TENANT]["day_used_tokens"]
    assert used_before > 0
    os.kill(before["quota"]["pid"], signal.SIGKILL)

    answers = await asyncio.gather(*calls)
    assert [a.terminal for a in answers if not a.ok] == []
    # Each request ended with exactly one terminal reply through the client library.
    assert all(sum(isinstance(r, DoneReply | ErrorReply) for r in a.replies) == 1 for a in answers)
    after = await asyncio.to_thread(stack.status)
    assert after["quota"]["epoch"] != before["quota"]["epoch"]  # it really restarted
    # Counters restored: the day's count covers every request, also those settled before
    # the kill (without the checkpoint only the ones after it would be counted).
    spent = sum(a.terminal.usage.total_tokens for a in answers if isinstance(a.terminal, DoneReply))
    assert after["quota"]["tenants"][KILL_TENANT]["day_used_tokens"] >= spent
    starts = _quota_start_lines(stack)
    assert len(starts) >= 2, starts  # the first start, and the restart after the kill
    restored = re.search(rb'"restored_records": (\d+)', starts[-1])
    assert restored is not None
    assert int(restored.group(1)) > 0
    stats = _lane(stack, KILL_LANE)
    assert stats["rejected_429"] == 0, stats
    assert stats["max_requests_in_any_60s"] <= KILL_LANE.rpm, stats
    assert stats["admitted"] == n
