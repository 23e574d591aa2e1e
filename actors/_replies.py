"""Writing one request's replies to its reply topic: seq numbering and acknowledged terminals.

Chunks are handed to the producer without waiting (it batches them); the terminal reply
and the usage record are awaited together with every earlier send, so a request counts
as finished only once Kafka holds all of its replies. A reply whose delivery failed with
a retriable error (a broker restarting) is sent again, after a reset, with everything
after it: the client drops a `seq` at or below one it has seen, so a lost reply cannot
be resent alone once a later one may have arrived.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterator
from typing import Any, Protocol

import msgspec
import structlog

from actors._kafka import PRODUCER_DEAD_ERRORS, retriable, retry_pauses, send_retrying
from topics.config import KafkaConfig, Price
from topics.errors import ErrorCode
from topics.specs import REPLY_DECODER, REPLY_ENCODER, USAGE_ENCODER
from topics.wire import (
    ChunkReply,
    CompletionReply,
    DoneReply,
    ErrorBody,
    ErrorReply,
    ResetReply,
    Timing,
    TokenUsage,
    Usage,
)

__all__ = ["Producer", "ReplyStream", "cost_usd"]

log = structlog.get_logger("quotaflow.replies")

_RESEND_REASON = "replies were lost while the broker was away; they follow again"


class Producer(Protocol):
    """The part of `AIOKafkaProducer` the reply writer needs."""

    async def send(
        self, topic: str, value: bytes | None = ..., key: bytes | None = ...
    ) -> Awaitable[Any]: ...


def cost_usd(
    price: Price, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> float:
    """USD of one call; prompt tokens the provider served from its prompt cache
    (`usage.prompt_tokens_details.cached_tokens`) at `cached_input_per_mtok` where set."""
    cached = min(max(0, cached_tokens), prompt_tokens)
    cached_rate = (
        price.input_per_mtok if price.cached_input_per_mtok is None else price.cached_input_per_mtok
    )
    return (
        (prompt_tokens - cached) * price.input_per_mtok
        + cached * cached_rate
        + completion_tokens * price.output_per_mtok
    ) / 1e6


class ReplyStream:
    """The replies of one request, in order, with strictly increasing `seq`."""

    __slots__ = (
        "_kafka",
        "_key",
        "_pending",
        "_producer",
        "_seq",
        "_usage_topic",
        "_written",
        "recorded",
        "request_id",
        "sent_chunks",
        "tenant",
        "topic",
    )

    def __init__(
        self,
        producer: Producer,
        *,
        topic: str,
        usage_topic: str,
        request_id: str,
        tenant: str,
        start_seq: int = 0,
        record: bool = False,
        kafka: KafkaConfig | None = None,
    ) -> None:
        self._producer = producer
        self.topic = topic
        self._usage_topic = usage_topic
        self.request_id = request_id
        self.tenant = tenant
        self._key = request_id.encode()
        self._seq = start_seq
        # (topic, value, delivery future) of every send not yet acknowledged.
        self._pending: list[tuple[str, bytes, Awaitable[Any]]] = []
        self.sent_chunks = 0
        # Every reply value sent, in order: what a resend after a lost delivery starts
        # from and, with `record`, what an idempotent replay resends.
        self._written: list[bytes] = []
        self.recorded: list[bytes] | None = self._written if record else None
        # With the Kafka settings, sends are retried through a broker restart.
        self._kafka = kafka

    @property
    def seq(self) -> int:
        return self._seq

    def _next(self) -> int:
        s = self._seq
        self._seq += 1
        return s

    async def _send(self, value: bytes) -> None:
        self._written.append(value)
        self._pending.append((self.topic, value, await self._enqueue(self.topic, value)))

    async def _enqueue(self, topic: str, value: bytes) -> Awaitable[Any]:
        if self._kafka is None:
            return await self._producer.send(topic, value=value, key=self._key)
        return await send_retrying(self._producer, self._kafka, topic, value=value, key=self._key)

    async def chunk(self, chunk: dict[str, Any]) -> None:
        await self._send(
            REPLY_ENCODER.encode(ChunkReply(id=self.request_id, seq=self._next(), chunk=chunk))
        )
        self.sent_chunks += 1

    async def completion(self, completion: dict[str, Any]) -> None:
        await self._send(
            REPLY_ENCODER.encode(
                CompletionReply(id=self.request_id, seq=self._next(), completion=completion)
            )
        )

    async def reset(self, reason: str) -> None:
        await self._send(
            REPLY_ENCODER.encode(ResetReply(id=self.request_id, seq=self._next(), reason=reason))
        )
        self.sent_chunks = 0

    async def done(
        self,
        *,
        finish_reason: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        model: str,
        deployment: str | None,
        cache: str = "miss",
        attempts: int = 1,
        cost: float = 0.0,
        timing: Timing,
        metadata: dict[str, Any] | None,
    ) -> None:
        # Everything before the terminal is acknowledged first (a resend renumbers, so
        # before the terminal takes its seq): a client that saw the terminal stops
        # reading, and a reply lost before it could not be sent again.
        await self.flush()
        reply = DoneReply(
            id=self.request_id,
            seq=self._next(),
            finish_reason=finish_reason,
            usage=TokenUsage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
            model=model,
            deployment=deployment,
            cache=cache,  # type: ignore[arg-type]
            attempts=attempts,
            cost_usd=round(cost, 10),
            timing=timing,
            metadata=metadata,
        )
        await self._send(REPLY_ENCODER.encode(reply))
        await self._usage(
            model=model,
            deployment=deployment,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost=cost,
            cache=cache,
            status="done",
        )
        await self.flush()

    async def error(
        self,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool = False,
        retry_after_ms: int | None = None,
        metadata: dict[str, Any] | None = None,
        model: str | None = None,
        deployment: str | None = None,
        usage_record: bool = True,
    ) -> None:
        await self.flush()  # as in `done`
        reply = ErrorReply(
            id=self.request_id,
            seq=self._next(),
            error=ErrorBody(
                code=code, message=message, retryable=retryable, retry_after_ms=retry_after_ms
            ),
            metadata=metadata,
        )
        await self._send(REPLY_ENCODER.encode(reply))
        if usage_record:
            await self._usage(
                model=model,
                deployment=deployment,
                prompt_tokens=0,
                completion_tokens=0,
                cost=0.0,
                cache="miss",
                status=code,
            )
        await self.flush()

    async def _usage(
        self,
        *,
        model: str | None,
        deployment: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        cost: float,
        cache: str,
        status: str,
    ) -> None:
        record = Usage(
            id=self.request_id,
            tenant=self.tenant,
            model=model,
            deployment=deployment,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=round(cost, 10),
            cache=cache,  # type: ignore[arg-type]
            status=status,
            ts_ms=int(time.time() * 1000),
        )
        value = USAGE_ENCODER.encode(record)
        self._pending.append(
            (self._usage_topic, value, await self._enqueue(self._usage_topic, value))
        )

    async def flush(self) -> None:
        """Wait until Kafka acknowledged every reply sent so far.

        Deliveries that failed with a retriable error are sent again (see the module
        docstring) until `kafka.send_retry_timeout_s` has passed; raises past that, or at
        once on an error a resend cannot mend."""
        give_up = 0.0
        pauses: Iterator[float] | None = None
        while self._pending:
            pending, self._pending = self._pending, []
            results = await asyncio.gather(*(f for _, _, f in pending), return_exceptions=True)
            failed = [
                (p, r)
                for p, r in zip(pending, results, strict=True)
                if isinstance(r, BaseException)
            ]
            if not failed:
                return
            first = failed[0][1]
            if self._kafka is None or not all(_retriable(r) for _, r in failed):
                raise first
            if pauses is None:
                give_up = time.monotonic() + self._kafka.send_retry_timeout_s
                pauses = retry_pauses(self._kafka)
            if time.monotonic() >= give_up:
                raise first
            # The broker is away: give it a moment to come back.
            await asyncio.sleep(next(pauses))
            lost_reply = any(topic == self.topic for (topic, _, _), _ in failed)
            log.warning(
                "replies_resent",
                request_id=self.request_id,
                tenant=self.tenant,
                failed=len(failed),
                of=len(pending),
                error=repr(first),
            )
            if lost_reply:
                await self._resend_replies()
            for (topic, value, _), _ in failed:
                if topic != self.topic:  # the usage record stands alone: send it again
                    self._pending.append((topic, value, await self._enqueue(topic, value)))

    async def _resend_replies(self) -> None:
        """A reset, then every reply since the last reset again, renumbered after it."""
        replies = [REPLY_DECODER.decode(v) for v in self._written]
        last_reset = max(
            (i for i, r in enumerate(replies) if isinstance(r, ResetReply)), default=-1
        )
        again = replies[last_reset + 1 :]
        await self._send(
            REPLY_ENCODER.encode(
                ResetReply(id=self.request_id, seq=self._next(), reason=_RESEND_REASON)
            )
        )
        for r in again:
            await self._send(REPLY_ENCODER.encode(msgspec.structs.replace(r, seq=self._next())))
        self.sent_chunks = sum(isinstance(r, ChunkReply) for r in again)


def _retriable(exc: BaseException) -> bool:
    """A delivery failure that a later send may not meet: the broker was away, a leader
    moved, or the producer died of it (the next send goes out on a fresh one)."""
    return isinstance(exc, PRODUCER_DEAD_ERRORS) or retriable(exc)
