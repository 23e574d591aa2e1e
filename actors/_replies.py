"""Writing one request's replies to its reply topic: seq numbering and acknowledged terminals.

Chunks are handed to the producer without waiting (it batches them); the terminal reply
and the usage record are awaited together with every earlier send, so a request counts
as finished only once Kafka holds all of its replies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, Protocol

from actors._kafka import send_retrying
from topics.config import KafkaConfig, Price
from topics.errors import ErrorCode
from topics.specs import REPLY_ENCODER, USAGE_ENCODER
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
        self._pending: list[Awaitable[Any]] = []
        self.sent_chunks = 0
        # With `record`, every reply value sent, in order (what an idempotent replay resends).
        self.recorded: list[bytes] | None = [] if record else None
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
        if self.recorded is not None:
            self.recorded.append(value)
        self._pending.append(await self._enqueue(self.topic, value))

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
        self._pending.append(await self._enqueue(self._usage_topic, USAGE_ENCODER.encode(record)))

    async def flush(self) -> None:
        """Wait until Kafka acknowledged every reply sent so far (raises on failure)."""
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)
