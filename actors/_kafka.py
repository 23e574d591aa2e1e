"""The Kafka producer every actor that writes replies uses, configured in one place."""

from __future__ import annotations

import os

from aiokafka import AIOKafkaProducer

from topics.config import Config

__all__ = ["make_producer"]


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
