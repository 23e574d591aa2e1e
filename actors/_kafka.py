"""The Kafka producer every actor that writes replies uses, configured in one place."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

from topics.config import Config, KafkaConfig

__all__ = ["make_producer", "send_retrying"]


async def send_retrying(
    producer: Any,
    config: KafkaConfig,
    topic: str,
    *,
    value: bytes | None,
    key: bytes | None,
    headers: Sequence[tuple[str, bytes]] | None = None,
) -> Awaitable[Any]:
    """`producer.send`, retried while the broker is away or a partition has no leader yet.

    The enqueue step needs the topic's metadata; right after a broker restart it fails
    with retriable errors (unknown topic, no leader) for a few seconds. Retrying here
    keeps the replies of a request in order (nothing later was enqueued meanwhile).
    Gives up after `kafka.send_retry_timeout_s`. Returns the delivery future.
    """
    give_up = time.monotonic() + config.send_retry_timeout_s
    pause = config.send_retry_backoff_ms / 1000.0
    while True:
        try:
            kwargs: dict[str, Any] = {"value": value, "key": key}
            if headers:
                kwargs["headers"] = list(headers)
            fut: Awaitable[Any] = await producer.send(topic, **kwargs)
            return fut
        except KafkaError as exc:
            retriable = exc.retriable or isinstance(exc, KafkaTimeoutError)
            if not retriable or time.monotonic() + pause > give_up:
                raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, config.send_retry_max_backoff_ms / 1000.0)


async def make_producer(config: Config, *, client_suffix: str) -> AIOKafkaProducer:
    """A started producer: idempotent (no duplicates or reordering on retry), acks=all."""
    k = config.kafka
    producer = AIOKafkaProducer(
        bootstrap_servers=k.bootstrap_servers,
        client_id=f"{k.client_id}-{client_suffix}-{os.getpid()}",
        linger_ms=k.producer_linger_ms,
        max_batch_size=k.producer_max_batch_bytes,
        request_timeout_ms=k.request_timeout_ms,
        enable_idempotence=True,
        acks="all",
    )
    await producer.start()
    return producer
