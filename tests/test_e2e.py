"""The whole path on the real broker, real Ray and the simulator (issue 2, item 9)."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections import defaultdict
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.client import QuotaflowClient
from pipeline.simulator import completion_tokens_for, expected_text
from tests.conftest import SESSION_MAX_IN_FLIGHT, SIM_BAD_KEY_ENV, Stack
from topics.wire import CompletionReply, DoneReply, ErrorReply

pytestmark = pytest.mark.integration

ANSWER_TIMEOUT_S = 60.0
SIM_MODEL = "sim-small"


def _body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fast", "messages": [{"role": "user", "content": prompt}], **extra}


def _expected(stack: Stack, body: dict[str, Any]) -> str:
    sim = stack.config.simulator
    assert sim is not None
    n = completion_tokens_for(body.get("max_tokens"), sim)
    return expected_text(SIM_MODEL, body["messages"], n)


async def _read_topic(
    bootstrap: str, topic: str, *, until: Any, timeout_s: float = ANSWER_TIMEOUT_S
) -> list[Any]:
    """Every record of `topic` from the beginning until `until(records)` holds."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await _partitions(bootstrap, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        give_up = time.monotonic() + timeout_s
        while not until(records):
            assert time.monotonic() < give_up, f"{topic}: condition not met in {timeout_s}s"
            for recs in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(recs)
        return records
    finally:
        await consumer.stop()


async def _partitions(bootstrap: str, topic: str) -> set[int]:
    """Partitions of `topic`, waiting for metadata (creates it where the broker auto-creates)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        return set(await producer.partitions_for(topic))
    finally:
        await producer.stop()


async def test_streamed_request_yields_chunks_then_done(
    stack: Stack, client: QuotaflowClient
) -> None:
    body = _body("Where is my parcel?", stream=True, max_tokens=12)
    answer = await client.ask(body, timeout_s=ANSWER_TIMEOUT_S)
    kinds = [type(r).__name__ for r in answer.replies]
    assert kinds[-1] == "DoneReply", kinds
    assert set(kinds[:-1]) == {"ChunkReply"}
    assert [r.seq for r in answer.replies] == list(range(len(answer.replies)))
    assert answer.text == _expected(stack, body)
    done = answer.terminal
    assert isinstance(done, DoneReply)
    assert done.model == "fast"
    assert done.deployment in ("sim-a", "sim-b")
    assert done.usage.completion_tokens == 12
    assert done.finish_reason == "length"
    assert done.cost_usd > 0
    assert done.timing.ttft_ms is not None
    assert done.timing.ttft_ms <= done.timing.total_ms


async def test_non_streamed_request_yields_completion_then_done(
    stack: Stack, client: QuotaflowClient
) -> None:
    body = _body("Summarise our refund policy.")
    answer = await client.ask(body, timeout_s=ANSWER_TIMEOUT_S)
    assert [type(r) for r in answer.replies] == [CompletionReply, DoneReply]
    completion = answer.replies[0]
    assert isinstance(completion, CompletionReply)
    assert completion.completion["object"] == "chat.completion"
    assert answer.text == _expected(stack, body)


async def test_fifty_concurrent_requests_each_end_with_one_terminal_reply(
    stack: Stack,
) -> None:
    reply_topic = f"test.replies.{uuid.uuid4().hex[:8]}"
    count = 50
    assert count > SESSION_MAX_IN_FLIGHT  # so the ingress must pause and resume
    await _partitions(stack.bootstrap, reply_topic)  # a fresh reply topic, all ours to count
    async with QuotaflowClient(stack.bootstrap, reply_topic=reply_topic) as c:
        bodies = [_body(f"question {i}", stream=i % 2 == 0) for i in range(count)]
        answers = await asyncio.gather(
            *(
                c.ask(b, timeout_s=ANSWER_TIMEOUT_S, tenant=f"t{i % 3}")
                for i, b in enumerate(bodies)
            )
        )
    assert all(a.ok for a in answers), [a.terminal for a in answers if not a.ok]
    for a, b in zip(answers, bodies, strict=True):
        assert a.text == _expected(stack, b)
    ids = {a.id for a in answers}

    def terminals(records: list[Any]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for rec in records:
            out[json.loads(rec.value)["id"]].append(json.loads(rec.value))
        return out

    records = await _read_topic(
        stack.bootstrap,
        reply_topic,
        until=lambda recs: (
            {
                i
                for i, rs in terminals(recs).items()
                if any(r["type"] in ("done", "error") for r in rs)
            }
            >= ids
        ),
    )
    by_id = terminals(records)
    assert set(by_id) == ids
    for rid, replies in by_id.items():
        assert [r["seq"] for r in replies] == list(range(len(replies))), rid
        assert sum(r["type"] in ("done", "error") for r in replies) == 1, rid
        assert replies[-1]["type"] == "done", rid
    assert b'"event": "ingress_paused"' in stack.gateway_log.read_bytes()
    assert b'"event": "ingress_resumed"' in stack.gateway_log.read_bytes()


async def test_unknown_model_is_answered(client: QuotaflowClient) -> None:
    answer = await client.ask(
        {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
        timeout_s=ANSWER_TIMEOUT_S,
    )
    assert isinstance(answer.terminal, ErrorReply)
    assert answer.terminal.error.code == "unknown_model"
    assert "no-such-model" in answer.terminal.error.message


async def test_passed_deadline_is_answered_without_calling_upstream(
    stack: Stack, client: QuotaflowClient
) -> None:
    late = client.build(_body("too late"), deadline_ms=int(time.time() * 1000) - 1_000)
    answer = await client.ask(late, timeout_s=ANSWER_TIMEOUT_S)
    assert isinstance(answer.terminal, ErrorReply)
    assert answer.terminal.error.code == "deadline_exceeded"
    # A control request that does reach upstream proves the simulator log is being written.
    control = await client.ask(_body("in time"), timeout_s=ANSWER_TIMEOUT_S)
    assert control.ok
    assert len(stack.sim_calls(control.id)) == 1
    assert stack.sim_calls(late.id) == []


async def _produce_raw(stack: Stack, value: bytes, key: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait("llm.requests", value=value, key=key)
    finally:
        await producer.stop()


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (b'{"id": "bad-json-1", "request": {', "not valid UTF-8 JSON"),
        (b"\xff\xfe not utf-8", "not valid UTF-8 JSON"),
        (
            b'{"id": "schema-1", "request": {"model": "fast", "messages": []}}',
            "request.messages",
        ),
        (
            b'{"id": "schema-2", "priority": 42, "request": {"model": "fast", '
            b'"messages": [{"role": "user", "content": "x"}]}}',
            "priority",
        ),
        (
            b'{"id": "schema-3", "request": {"model": "fast", '
            b'"messages": [{"role": "robot", "content": "x"}]}}',
            "request.messages[0].role",
        ),
    ],
)
async def test_invalid_input_is_dead_lettered_and_answered(
    stack: Stack, client: QuotaflowClient, value: bytes, field: str
) -> None:
    key = uuid.uuid4().hex.encode()
    readable_id = value.startswith(b'{"id": "schema')
    rid = json.loads(value)["id"] + "-" + key.decode()[:6] if readable_id else None
    if rid is not None:
        value = value.replace(json.loads(value)["id"].encode(), rid.encode(), 1)
        replies = client.replies(rid, timeout_s=ANSWER_TIMEOUT_S)
    await _produce_raw(stack, value, key)

    dlq = await _read_topic(
        stack.bootstrap, "llm.requests.dlq", until=lambda recs: any(r.key == key for r in recs)
    )
    dead = next(r for r in dlq if r.key == key)
    assert dead.value == value  # the original bytes, untouched
    reason = dict(dead.headers)["error"].decode()
    assert field in reason
    if rid is not None:
        got = [r async for r in replies]
        assert len(got) == 1
        assert isinstance(got[0], ErrorReply)
        assert got[0].error.code == "invalid_request"
        assert field in got[0].error.message
    # The gateway is still alive and serving.
    assert stack.gateway.proc is not None
    assert stack.gateway.proc.poll() is None
    assert (await client.ask(_body("still there?"), timeout_s=ANSWER_TIMEOUT_S)).ok


async def test_contract_only_raw_client(stack: Stack) -> None:
    """A client that knows only CONTRACT.md: plain JSON over aiokafka, no quotaflow imports."""
    reply_topic = "llm.responses"
    rid = "raw-" + uuid.uuid4().hex
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.bootstrap, group_id=None)
    await consumer.start()
    usage_consumer = AIOKafkaConsumer(bootstrap_servers=stack.bootstrap, group_id=None)
    await usage_consumer.start()
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
    await producer.start()
    try:
        for c, topic in ((consumer, reply_topic), (usage_consumer, "llm.usage")):
            tps = [TopicPartition(topic, p) for p in await _partitions(stack.bootstrap, topic)]
            c.assign(tps)
            await c.seek_to_end(*tps)
            for tp in tps:
                await c.position(tp)
        request = {
            "id": rid,
            "tenant": "raw-team",
            "request": {
                "model": "small",  # an alias of "fast"
                "messages": [{"role": "user", "content": "Hello from a raw client"}],
                "stream": True,
                "max_tokens": 8,
            },
            "metadata": {"ticket": 1234},
        }
        await producer.send_and_wait(
            "llm.requests", value=json.dumps(request).encode(), key=rid.encode()
        )
        replies: list[dict[str, Any]] = []
        give_up = time.monotonic() + ANSWER_TIMEOUT_S
        while not replies or replies[-1]["type"] not in ("done", "error"):
            assert time.monotonic() < give_up
            for recs in (await consumer.getmany(timeout_ms=200)).values():
                for rec in recs:
                    assert rec.key == rid.encode() or json.loads(rec.value)["id"] != rid
                    msg = json.loads(rec.value)
                    if msg["id"] == rid:
                        replies.append(msg)
        usage: dict[str, Any] | None = None
        while usage is None:
            assert time.monotonic() < give_up
            for recs in (await usage_consumer.getmany(timeout_ms=200)).values():
                for rec in recs:
                    if json.loads(rec.value)["id"] == rid:
                        usage = json.loads(rec.value)
    finally:
        await producer.stop()
        await consumer.stop()
        await usage_consumer.stop()

    assert [r["seq"] for r in replies] == list(range(len(replies)))
    chunks = [r for r in replies if r["type"] == "chunk"]
    assert chunks
    assert all(r["chunk"]["object"] == "chat.completion.chunk" for r in chunks)
    text = "".join(
        c.get("delta", {}).get("content") or "" for r in chunks for c in r["chunk"]["choices"]
    )
    assert text == expected_text(SIM_MODEL, request["request"]["messages"], 8)  # type: ignore[index]
    done = replies[-1]
    assert done["type"] == "done"
    for field in (
        "finish_reason",
        "usage",
        "model",
        "deployment",
        "cache",
        "attempts",
        "cost_usd",
        "timing",
    ):
        assert field in done, field
    assert done["model"] == "fast"
    assert done["cache"] == "miss"
    assert done["metadata"] == {"ticket": 1234}
    assert set(done["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert set(done["timing"]) == {"queued_ms", "ttft_ms", "total_ms"}
    assert usage["tenant"] == "raw-team"
    assert usage["status"] == "done"
    assert usage["model"] == "fast"
    assert usage["completion_tokens"] == 8
    assert usage["cost_usd"] == done["cost_usd"]
    for field in ("deployment", "prompt_tokens", "cache", "ts_ms"):
        assert field in usage


async def test_secrets_never_reach_logs_or_topics(stack: Stack, client: QuotaflowClient) -> None:
    # A deployment whose key the upstream refuses: its error must name the variable only.
    answer = await client.ask(
        {"model": "broken", "messages": [{"role": "user", "content": "hi"}]},
        timeout_s=ANSWER_TIMEOUT_S,
    )
    assert isinstance(answer.terminal, ErrorReply)
    assert answer.terminal.error.code == "upstream_error"
    assert SIM_BAD_KEY_ENV in answer.terminal.error.message
    secrets_in_play = [
        os.environ[name] for name in ("QF_SIM_KEY_A", "QF_SIM_KEY_B", SIM_BAD_KEY_ENV)
    ]
    assert (await client.ask(_body("one more"), timeout_s=ANSWER_TIMEOUT_S)).ok
    logs = stack.gateway_log.read_bytes() + stack.sim_log.read_bytes()
    replies = b"".join(
        r.value
        for r in await _read_topic(stack.bootstrap, "llm.responses", until=lambda recs: True)
    )
    for secret in secrets_in_play:
        assert secret.encode() not in logs
        assert secret.encode() not in replies
    assert answer.id.encode() in logs  # the logs are the right ones and do carry request ids
