"""Replies when deliveries fail after the enqueue (a broker restarting mid-stream).

A fake producer decides which delivery futures fail; a reader that behaves like the client
library (drops a seq at or below one it saw, clears on a reset) checks what arrives. Then
`ProducerHandle` with a producer that dies as aiokafka's does after a lost batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ClassVar

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import (
    LeaderNotAvailableError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
)

from actors._kafka import ProducerHandle, pace_metadata_retries
from actors._replies import ReplyStream
from topics.config import KafkaConfig
from topics.specs import REPLY_DECODER, USAGE_DECODER
from topics.wire import ChunkReply, DoneReply, ErrorReply, ResetReply, Timing

KAFKA = KafkaConfig()


class _Producer:
    """Every send is written (in order) unless `fails(n, topic)` says its delivery fails."""

    def __init__(self, fails: Callable[[int, str], BaseException | None]) -> None:
        self._fails = fails
        self.sends = 0
        self.written: list[tuple[str, bytes]] = []

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, **_: Any
    ) -> asyncio.Future[Any]:
        assert value is not None
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        error = self._fails(self.sends, topic)
        self.sends += 1
        if error is None:
            self.written.append((topic, value))
            fut.set_result(None)
        else:
            fut.set_exception(error)
        return fut

    def read(self) -> tuple[str, list[Any]]:
        """What the client library would show: text after the last reset, and the replies kept."""
        seen = -1
        kept: list[Any] = []
        parts: list[str] = []
        for topic, value in self.written:
            if topic != "replies":
                continue
            r = REPLY_DECODER.decode(value)
            if r.seq <= seen:
                continue
            seen = r.seq
            kept.append(r)
            if isinstance(r, ResetReply):
                parts.clear()
            elif isinstance(r, ChunkReply):
                parts.append(r.chunk["text"])
        return "".join(parts), kept

    def usage(self) -> list[Any]:
        return [USAGE_DECODER.decode(v) for t, v in self.written if t == "usage"]


def _stream(producer: _Producer, kafka: KafkaConfig | None = KAFKA) -> ReplyStream:
    return ReplyStream(
        producer,
        topic="replies",
        usage_topic="usage",
        request_id="r1",
        tenant="t",
        record=True,
        kafka=kafka,
    )


async def _answer(out: ReplyStream, words: list[str]) -> None:
    for w in words:
        await out.chunk({"text": w})
    await out.done(
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=len(words),
        model="m",
        deployment="d",
        timing=Timing(),
        metadata=None,
    )


WORDS = ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("lost", [[0], [2], [4], [2, 3], [1, 3], [5]])
async def test_lost_reply_deliveries_are_resent_and_the_client_sees_the_whole_answer(
    lost: list[int],
) -> None:
    # Send numbers in `lost` fail once (5 is the done reply); later sends go through.
    producer = _Producer(lambda n, _t: LeaderNotAvailableError() if n in lost else None)
    out = _stream(producer)
    await _answer(out, WORDS)
    text, kept = producer.read()
    assert text == "".join(WORDS)
    assert sum(isinstance(r, DoneReply | ErrorReply) for r in kept) == 1
    assert isinstance(kept[-1], DoneReply)
    assert isinstance(kept[-2 - len(WORDS)], ResetReply)  # the resend starts with a reset
    seqs = [r.seq for r in kept]
    assert seqs == sorted(set(seqs))
    assert out.seq == seqs[-1] + 1  # what a re-run after this one continues from
    assert len(producer.usage()) == 1  # the usage record went through the first time
    assert out.recorded is not None
    last_reply = [v for t, v in producer.written if t == "replies"][-1]
    assert out.recorded[-1] == last_reply  # a replay ends with the done reply


async def test_a_lost_usage_record_is_resent_alone() -> None:
    producer = _Producer(
        lambda _n, t: LeaderNotAvailableError() if t == "usage" and _n < 8 else None
    )
    out = _stream(producer)
    await _answer(out, WORDS)
    text, kept = producer.read()
    assert text == "".join(WORDS)
    assert not any(isinstance(r, ResetReply) for r in kept)
    assert len(kept) == len(WORDS) + 1
    assert [u.status for u in producer.usage()] == ["done"]


async def test_an_error_a_resend_cannot_mend_is_raised_at_once() -> None:
    too_large = MessageSizeTooLargeError()
    producer = _Producer(lambda n, _t: too_large if n == 2 else None)
    out = _stream(producer)
    with pytest.raises(MessageSizeTooLargeError):
        await _answer(out, WORDS)
    assert producer.sends == len(WORDS)  # no resend was tried, and no terminal after the loss


async def test_resends_give_up_after_the_send_retry_timeout() -> None:
    kafka = msgspec.structs.replace(KAFKA, send_retry_timeout_s=0.05)
    producer = _Producer(lambda _n, t: LeaderNotAvailableError() if t == "replies" else None)
    out = _stream(producer, kafka)
    await out.chunk({"text": "a"})
    with pytest.raises(LeaderNotAvailableError):
        await out.flush()
    assert producer.sends > 2  # it did try again before giving up


async def test_without_kafka_settings_a_failed_delivery_is_raised() -> None:
    producer = _Producer(lambda n, _t: LeaderNotAvailableError() if n == 0 else None)
    out = _stream(producer, kafka=None)
    await out.chunk({"text": "a"})
    with pytest.raises(LeaderNotAvailableError):
        await out.flush()


# -- a producer that died of a lost batch -------------------------------------------------


class _Mortal:
    """Stands in for an AIOKafkaProducer. `lose_at`: from that record on, the first
    producer's deliveries fail with OutOfOrderSequenceNumber (the broker refuses each
    batch after a lost one, aiokafka#1017); with `dies`, its sends raise it too (its
    sender task stopped)."""

    made: ClassVar[list[_Mortal]] = []
    lose_at: ClassVar[int | None] = None
    dies: ClassVar[bool] = True

    def __init__(self) -> None:
        self.dead = False
        self.stopped = False
        self.written: list[tuple[str, bytes]] = []
        _Mortal.made.append(self)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.stopped = True

    async def send(self, topic: str, value: bytes | None = None, **_: Any) -> asyncio.Future[Any]:
        if self.dead:
            raise OutOfOrderSequenceNumber()
        assert value is not None
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        lose_at = _Mortal.lose_at
        if self is _Mortal.made[0] and lose_at is not None and len(self.written) >= lose_at:
            self.dead = _Mortal.dies
            fut.set_exception(OutOfOrderSequenceNumber())
        else:
            self.written.append((topic, value))
            fut.set_result(None)
        return fut


def _mortal(lose_at: int | None, *, dies: bool = True) -> ProducerHandle:
    _Mortal.made.clear()
    _Mortal.lose_at = lose_at
    _Mortal.dies = dies
    return ProducerHandle(_Mortal, name="test")


async def test_a_dead_producer_is_replaced_once_and_the_send_goes_out_on_the_new_one() -> None:
    handle = _mortal(lose_at=None)
    await handle.start()
    await (await handle.send("t", value=b"1"))
    _Mortal.made[0].dead = True
    # Two senders find it dead at once: one replacement, both records on the new producer.
    futs = await asyncio.gather(handle.send("t", value=b"2"), handle.send("t", value=b"3"))
    await asyncio.gather(*futs)
    assert len(_Mortal.made) == 2
    assert handle.renewals == 1
    assert _Mortal.made[1].written == [("t", b"2"), ("t", b"3")]
    await handle.stop()
    assert _Mortal.made[0].stopped
    assert _Mortal.made[1].stopped


async def test_send_and_wait_sends_a_record_the_dying_producer_refused_again() -> None:
    handle = _mortal(lose_at=1)
    await handle.start()
    await handle.send_and_wait("t", value=b"1")
    await handle.send_and_wait("t", value=b"2")  # refused: the producer died of it
    assert handle.renewals == 1
    assert [v for p in _Mortal.made for _, v in p.written] == [b"1", b"2"]


@pytest.mark.parametrize("dies", [True, False])
async def test_a_reply_stream_mends_what_a_dying_producer_lost(dies: bool) -> None:
    # The third chunk is refused out of order: the old producer is replaced, the rest of
    # the stream goes out on a new one, and the flush before `done` resends after a reset.
    handle = _mortal(lose_at=2, dies=dies)
    await handle.start()
    out = ReplyStream(
        handle, topic="replies", usage_topic="usage", request_id="r1", tenant="t", kafka=KAFKA
    )
    await _answer(out, WORDS)
    assert handle.renewals == 1
    reader = _Producer(lambda _n, _t: None)
    reader.written = [w for p in _Mortal.made for w in p.written]
    text, kept = reader.read()
    assert text == "".join(WORDS)
    assert isinstance(kept[-1], DoneReply)
    assert any(isinstance(r, ResetReply) for r in kept)
    assert len(reader.usage()) == 1


# -- metadata retries while the broker is away --------------------------------------------


async def test_failed_metadata_updates_are_paced(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []

    async def record_sleep(s: float) -> None:
        pauses.append(s)

    class _Client:
        def __init__(self) -> None:
            self.results = [False, False, True]

        async def _metadata_update(self, _cluster: Any, _topics: Any) -> bool:
            return self.results.pop(0)

    client = _Client()
    pace_metadata_retries(client, 0.2)
    monkeypatch.setattr(asyncio, "sleep", record_sleep)
    assert [await client._metadata_update(None, None) for _ in range(3)] == [False, False, True]
    assert pauses == [0.2, 0.2]  # after each failure, none after the success


async def test_the_aiokafka_clients_have_the_method_that_is_paced() -> None:
    # Private API: if aiokafka renames it, this fails rather than the pacing going silent.
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9")
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9")
    for client in (producer.client, consumer._client):
        before = client._metadata_update
        pace_metadata_retries(client, 0.2)
        assert client._metadata_update is not before
