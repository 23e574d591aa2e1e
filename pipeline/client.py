"""The client library: publish requests, stream their replies back.

    async with QuotaflowClient("127.0.0.1:9092") as client:
        async for reply in client.stream({"model": "fast", "messages": [...]}):
            ...

One consumer reads the reply topic (all partitions, from the end at start, so nothing
sent after `start()` is missed) and fans replies out to per-request queues. Replies are
deduplicated by (`id`, `seq`) — after a gateway crash a reply may come twice — and a
`reset` reply discards the chunks seen so far, so `text()` is one coherent answer.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from actors._kafka import ProducerHandle, pace_metadata_retries
from pipeline._resume import ResetFilter
from topics.config import KafkaConfig
from topics.errors import QuotaflowError
from topics.specs import REPLY_DECODER, REQUEST_ENCODER
from topics.wire import (
    CacheMode,
    ChunkReply,
    CompletionReply,
    DoneReply,
    ErrorReply,
    Reply,
    Request,
    ResetReply,
    Tier,
)

__all__ = ["Answer", "QuotaflowClient"]

TERMINAL = (DoneReply, ErrorReply)
# The gateway's default (`kafka.metadata_retry_backoff_ms`): see `pace_metadata_retries`.
_METADATA_RETRY_BACKOFF_S = KafkaConfig().metadata_retry_backoff_ms / 1000.0


class Answer(msgspec.Struct, kw_only=True):
    """A finished request as the client saw it: text assembled, terminal reply kept."""

    id: str
    text: str
    terminal: DoneReply | ErrorReply
    replies: list[Reply]

    @property
    def ok(self) -> bool:
        return isinstance(self.terminal, DoneReply)


class QuotaflowClient:
    """Publishes to the requests topic and reads one reply topic."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        requests_topic: str = "llm.requests",
        reply_topic: str = "llm.responses",
        tenant: str = "default",
        api_key: str | None = None,
        client_id: str = "quotaflow-client",
        metadata_timeout_s: float = 15.0,
    ) -> None:
        self._metadata_timeout_s = metadata_timeout_s
        self.bootstrap_servers = bootstrap_servers
        self.requests_topic = requests_topic
        self.reply_topic = reply_topic
        self.tenant = tenant
        self._api_key = api_key
        self._client_id = client_id
        self._producer: ProducerHandle | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._queues: dict[str, asyncio.Queue[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None
        # Highest seq seen per registered id; dropped with its queue, so it stays bounded
        # and an id used again later (a resend) is read afresh.
        self._seen: dict[str, int] = {}
        self.duplicates = 0

    async def __aenter__(self) -> QuotaflowClient:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _new_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=self._client_id,
            enable_idempotence=True,
            linger_ms=0,
        )
        pace_metadata_retries(producer.client, _METADATA_RETRY_BACKOFF_S)
        return producer

    async def start(self) -> None:
        self._producer = ProducerHandle(self._new_producer, name=self._client_id)
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=self._client_id,
            group_id=None,
            enable_auto_commit=False,
        )
        pace_metadata_retries(self._consumer._client, _METADATA_RETRY_BACKOFF_S)
        await self._consumer.start()
        partitions = await self._wait_partitions(self.reply_topic)
        tps = [TopicPartition(self.reply_topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve positions now, so replies sent from here on are all seen
            await self._consumer.position(tp)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _wait_partitions(self, topic: str) -> set[int]:
        assert self._producer is not None
        try:
            # Waits for metadata; a topic the gateway has just created takes a moment to show.
            return set(
                await asyncio.wait_for(
                    self._producer.partitions_for(topic), self._metadata_timeout_s
                )
            )
        except TimeoutError:
            raise QuotaflowError(
                f"reply topic {topic!r} has no partitions after {self._metadata_timeout_s}s; "
                "start the gateway (it creates its topics) or create the topic"
            ) from None

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def _read(self) -> None:
        assert self._consumer is not None
        seen = self._seen
        while True:
            batches = await self._consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for rec in records:
                    try:
                        reply = REPLY_DECODER.decode(rec.value)
                    except msgspec.DecodeError:  # not ours to read; skip it
                        continue
                    q = self._queues.get(reply.id)
                    if q is None:
                        continue
                    # Dedup by (id, seq): seq strictly increases per request.
                    if reply.seq <= seen.get(reply.id, -1):
                        self.duplicates += 1
                        continue
                    seen[reply.id] = reply.seq
                    q.put_nowait(reply)

    def build(
        self,
        body: Mapping[str, Any],
        *,
        id: str | None = None,
        tenant: str | None = None,
        priority: int | None = None,
        deadline_ms: int | None = None,
        tier: Tier | None = None,
        task: str | None = None,
        cache: CacheMode | None = None,
        metadata: dict[str, Any] | None = None,
        max_cost_usd: float | None = None,
    ) -> Request:
        """A Request for `body` (an OpenAI Chat Completions body) replying to our topic."""
        fields: dict[str, Any] = {
            "id": id or uuid.uuid4().hex,
            "request": dict(body),
            "tenant": tenant or self.tenant,
            "reply_to": self.reply_topic,
        }
        optional = {
            "priority": priority,
            "deadline_ms": deadline_ms,
            "tier": tier,
            "task": task,
            "cache": cache,
            "metadata": metadata,
            "max_cost_usd": max_cost_usd,
        }
        fields.update({k: v for k, v in optional.items() if v is not None})
        return msgspec.convert(fields, Request)

    async def send(self, request: Request, *, api_key: str | None = None) -> None:
        """Publish `request` (register for its replies first); `api_key` overrides the
        client's tenant key for this request. If publishing fails, nothing waits for it."""
        assert self._producer is not None, "start() the client first"
        self._queues.setdefault(request.id, asyncio.Queue())
        headers = []
        key = api_key or self._api_key
        if key:
            headers.append(("authorization", f"Bearer {key}".encode()))
        try:
            await self._producer.send_and_wait(
                self.requests_topic,
                value=REQUEST_ENCODER.encode(request),
                key=request.id.encode(),
                headers=headers,
            )
        except BaseException:
            self._queues.pop(request.id, None)
            self._seen.pop(request.id, None)
            raise

    async def stream(
        self,
        body: Mapping[str, Any] | Request,
        *,
        timeout_s: float | None = None,
        coherent: bool = True,
        **fields: Any,
    ) -> AsyncIterator[Reply]:
        """Send a request and yield its replies until (and including) the terminal one.

        `coherent`: when a retry restarts a stream (`reset`) and repeats what was already
        yielded, the repeat is dropped and only the new text comes: one answer, as if
        nothing happened. A `ResetReply` is yielded only when the retry says something
        else (discard what was shown). `coherent=False` yields the replies as they are.
        """
        request = body if isinstance(body, Request) else self.build(body, **fields)
        await self.send(request)
        resets = ResetFilter() if coherent else None
        async for reply in self.replies(request.id, timeout_s=timeout_s):
            for out in resets.feed(reply) if resets is not None else (reply,):
                yield out

    def replies(self, request_id: str, *, timeout_s: float | None = None) -> AsyncIterator[Reply]:
        """The replies of `request_id` until the terminal one; registers for them at once.

        Call before the request is sent (or right after `send`, which registers too):
        replies that arrive before registration are not kept.
        """
        q = self._queues.setdefault(request_id, asyncio.Queue())
        return self._drain(request_id, q, timeout_s)

    async def _drain(
        self, request_id: str, q: asyncio.Queue[Reply], timeout_s: float | None
    ) -> AsyncIterator[Reply]:
        try:
            while True:
                reply = await asyncio.wait_for(q.get(), timeout_s)
                yield reply
                if isinstance(reply, TERMINAL):
                    return
        finally:
            self._queues.pop(request_id, None)
            self._seen.pop(request_id, None)

    async def ask(
        self, body: Mapping[str, Any] | Request, *, timeout_s: float | None = None, **fields: Any
    ) -> Answer:
        """Send a request and collect its whole answer."""
        request = body if isinstance(body, Request) else self.build(body, **fields)
        replies: list[Reply] = []
        parts: list[str] = []
        async for reply in self.stream(request, timeout_s=timeout_s, coherent=False):
            replies.append(reply)
            if isinstance(reply, ResetReply):
                parts.clear()
            elif isinstance(reply, ChunkReply):
                for choice in reply.chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        parts.append(content)
            elif isinstance(reply, CompletionReply):
                choices = reply.completion.get("choices") or []
                if choices:
                    parts = [str((choices[0].get("message") or {}).get("content") or "")]
        terminal = replies[-1]
        assert isinstance(terminal, TERMINAL)
        return Answer(id=request.id, text="".join(parts), terminal=terminal, replies=replies)
