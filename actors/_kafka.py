"""The Kafka producer every actor that writes replies uses, configured in one place."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Final

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)

from topics.config import Config, KafkaConfig

__all__ = [
    "PRODUCER_DEAD_ERRORS",
    "ProducerHandle",
    "make_producer",
    "pace_metadata_retries",
    "retriable",
    "retry_pauses",
    "send_retrying",
]

log = structlog.get_logger("quotaflow.kafka")

# What an idempotent aiokafka producer dies of: its sender task stops, every pending
# record fails with the error and every later send raises it (aiokafka#1017). A record
# that failed so was not written: sending it on a fresh producer (a new producer id) is safe.
PRODUCER_DEAD_ERRORS: Final = (
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
    InvalidProducerEpoch,
)
# How long a dead producer may take to stop once it has been replaced.
_DEAD_STOP_TIMEOUT_S: Final = 5.0


def pace_metadata_retries(client: Any, backoff_s: float) -> None:
    """Pause `backoff_s` after each failed metadata update of an `AIOKafkaClient`.

    aiokafka's metadata synchronizer retries at once: while a record waits for a
    partition leader and the broker is away, the producer's sender and the synchronizer
    wake each other forever, each turn a refused connection and two ERROR log lines. On
    2 cores that starved the broker's own restart (its JVM took 60-100 s to start)."""
    update = client._metadata_update  # the one method the synchronizer calls

    async def paced(cluster: Any, topics: Any) -> bool:
        ok: bool = await update(cluster, topics)
        if not ok:
            await asyncio.sleep(backoff_s)
        return ok

    client._metadata_update = paced


class ProducerHandle:
    """An `AIOKafkaProducer` that is replaced when it has died.

    A batch lost while the broker was away leaves the broker expecting sequence numbers
    the producer has moved past; the next batch gets `OutOfOrderSequenceNumber` and
    aiokafka stops the producer for good (the Java client bumps its epoch instead).
    The send that finds it dead starts a fresh one and goes through on it; records that
    failed on the old one are their senders' to send again (`ReplyStream` does)."""

    def __init__(self, factory: Callable[[], AIOKafkaProducer], *, name: str) -> None:
        self._factory = factory
        self.name = name
        self._current: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._stopping: set[asyncio.Task[None]] = set()
        # A replacement under way: sends wait for it rather than go to the dead producer.
        self._renewing: asyncio.Task[None] | None = None
        self.renewals = 0

    @property
    def current(self) -> AIOKafkaProducer:
        assert self._current is not None, "ProducerHandle.start() first"
        return self._current

    async def start(self) -> None:
        producer = self._factory()
        await producer.start()
        self._current = producer

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, **kw: Any
    ) -> Awaitable[Any]:
        """`AIOKafkaProducer.send` (returns the delivery future), on a fresh producer if
        the current one has died."""
        if self._renewing is not None:
            await asyncio.shield(self._renewing)
        producer = self.current
        try:
            fut: asyncio.Future[Any] = await producer.send(topic, value=value, key=key, **kw)
        except PRODUCER_DEAD_ERRORS as exc:
            await self._renew(producer, exc)
            producer = self.current
            fut = await producer.send(topic, value=value, key=key, **kw)
        fut.add_done_callback(functools.partial(self._delivered, producer))
        return fut

    def _delivered(self, producer: AIOKafkaProducer, fut: asyncio.Future[Any]) -> None:
        # The broker refused a batch out of order: the producer may go on sending, but
        # every later batch is refused the same way. Replace it now.
        if fut.cancelled() or producer is not self._current or self._renewing is not None:
            return
        exc = fut.exception()
        if isinstance(exc, PRODUCER_DEAD_ERRORS):
            self._renewing = asyncio.get_running_loop().create_task(self._renew(producer, exc))
            self._renewing.add_done_callback(self._renewed)

    def _renewed(self, task: asyncio.Task[None]) -> None:
        self._renewing = None
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("producer_renew_failed", producer=self.name, error=repr(exc))

    async def send_and_wait(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, **kw: Any
    ) -> Any:
        """Send and wait for the acknowledgement. A record refused because the producer
        died was not written: it is sent once more, on the fresh producer."""
        producer = self.current
        try:
            return await (await self.send(topic, value=value, key=key, **kw))
        except PRODUCER_DEAD_ERRORS as exc:
            await self._renew(producer, exc)
            return await (await self.send(topic, value=value, key=key, **kw))

    async def partitions_for(self, topic: str) -> set[int]:
        parts: set[int] = await self.current.partitions_for(topic)
        return parts

    async def stop(self) -> None:
        if self._current is not None:
            await self._current.stop()
        if self._stopping:
            await asyncio.wait(self._stopping)

    async def _renew(self, dead: AIOKafkaProducer, exc: BaseException) -> None:
        async with self._lock:
            if self._current is not dead:
                return  # another send replaced it meanwhile
            fresh = self._factory()
            await fresh.start()
            self._current = fresh
            self.renewals += 1
            log.warning("producer_renewed", producer=self.name, error=repr(exc))
        task = asyncio.get_running_loop().create_task(self._stop_dead(dead))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    @staticmethod
    async def _stop_dead(dead: AIOKafkaProducer) -> None:
        with contextlib.suppress(Exception, TimeoutError):
            await asyncio.wait_for(dead.stop(), _DEAD_STOP_TIMEOUT_S)


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
    pauses = retry_pauses(config)
    while True:
        try:
            kwargs: dict[str, Any] = {"value": value, "key": key}
            if headers:
                kwargs["headers"] = list(headers)
            fut: Awaitable[Any] = await producer.send(topic, **kwargs)
            return fut
        except KafkaError as exc:
            pause = next(pauses)
            if not retriable(exc) or time.monotonic() + pause > give_up:
                raise
            await asyncio.sleep(pause)


def retriable(exc: BaseException) -> bool:
    """A Kafka error that a later attempt may not meet (the broker away, no leader yet)."""
    return isinstance(exc, KafkaError) and (exc.retriable or isinstance(exc, KafkaTimeoutError))


def retry_pauses(config: KafkaConfig) -> Iterator[float]:
    """Seconds between send retries: `send_retry_backoff_ms`, doubling up to
    `send_retry_max_backoff_ms`."""
    pause = config.send_retry_backoff_ms / 1000.0
    while True:
        yield pause
        pause = min(pause * 2, config.send_retry_max_backoff_ms / 1000.0)


async def make_producer(config: Config, *, client_suffix: str) -> ProducerHandle:
    """A started producer: idempotent (no duplicates or reordering on retry), acks=all,
    replaced when it dies (see `ProducerHandle`)."""
    k = config.kafka
    client_id = f"{k.client_id}-{client_suffix}-{os.getpid()}"

    def factory() -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            bootstrap_servers=k.bootstrap_servers,
            client_id=client_id,
            linger_ms=k.producer_linger_ms,
            max_batch_size=k.producer_max_batch_bytes,
            request_timeout_ms=k.request_timeout_ms,
            enable_idempotence=True,
            acks="all",
        )
        pace_metadata_retries(producer.client, k.metadata_retry_backoff_ms / 1000.0)
        return producer

    handle = ProducerHandle(factory, name=client_id)
    await handle.start()
    return handle
