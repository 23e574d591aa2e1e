"""The cache-hit benchmark's Kafka floor writes what a real exact hit writes, and its
table names each exact series' share of that floor (pure logic, no broker)."""

from __future__ import annotations

from typing import Any

import pytest

from actors._exact_cache import replay
from actors._messages import CacheEntry
from actors._replies import ReplyStream
from benchmarks._echo import records
from benchmarks.cache_hit import _of_floor
from tests.test_cache import FakeProducer
from topics.specs import REPLY_DECODER, USAGE_DECODER
from topics.wire import ChunkReply, DoneReply, Request


def _shape(reply: Any) -> tuple[Any, ...]:
    """What a client reads from a reply: its kind, seq, text and finish reason."""
    if isinstance(reply, ChunkReply):
        choice = reply.chunk["choices"][0]
        return ("chunk", reply.seq, choice["delta"].get("content"), choice["finish_reason"])
    if isinstance(reply, DoneReply):
        return ("done", reply.seq, reply.cache, reply.finish_reason)
    choice = reply.completion["choices"][0]
    return ("completion", reply.seq, choice["message"]["content"], choice["finish_reason"])


@pytest.mark.parametrize("stream", [True, False])
async def test_echo_replies_are_the_replies_of_an_exact_hit(stream: bool) -> None:
    body = {"model": "fast", "messages": [{"role": "user", "content": "q"}], "stream": stream}
    request = Request(id="r1", request=body)
    entry = CacheEntry(
        key="k" * 32,
        text="the answer",
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=2,
        upstream_model="sim-fast",
        model="fast",
        stored_at=1.0,
    )
    producer = FakeProducer()
    out = ReplyStream(
        producer, topic="replies", usage_topic="llm.usage", request_id="r1", tenant="t"
    )
    await replay(entry, request, out, received_ms=0.0)

    echo = await records(request, "the answer", reply_topic="replies", usage_topic="llm.usage")
    assert [t for t, _ in echo] == ["replies"] * (len(echo) - 1) + ["llm.usage"]
    shapes = [_shape(REPLY_DECODER.decode(v)) for t, v in echo if t == "replies"]
    assert shapes == [_shape(r) for r in producer.replies("r1")]
    assert shapes[-1][0] == "done"
    assert shapes[-1][2] == "exact"
    assert [u.cache for u in producer.usage()] == [USAGE_DECODER.decode(echo[-1][1]).cache]


def test_only_exact_series_are_quoted_against_the_floor() -> None:
    exact = {"kind": "exact", "window": {"per_s": 450.0}}
    assert _of_floor(exact, 1000.0) == " (0.45 of floor)"
    assert _of_floor(exact, None) == ""
    assert _of_floor({"kind": "semantic", "window": {"per_s": 450.0}}, 1000.0) == ""
    assert _of_floor({"kind": "exact", "window": {"per_s": None}}, 1000.0) == ""
