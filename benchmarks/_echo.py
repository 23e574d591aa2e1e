"""The Kafka floor of a cache hit: a bare responder with no gateway in it.

It reads the requests topic and, for every request, writes what a cache hit writes to
the reply and usage topics: the records of the gateway's own `actors._exact_cache.replay`
(streamed, the text in one chunk, the finish reason, `done`; not streamed, a completion
and `done`; then a usage record), collected rather than sent one ack at a time. It uses
the gateway's producer settings (idempotent, `acks=all`, the configured linger and batch
size) and its consumer's batch size. Per `getmany` batch it sends every record, waits for
the acks, then commits: the least work a Kafka request/reply service does per request.
The answer is looked up by the last message's text in a JSON object of question ->
answer (a question not in it gets ""). Run as its own process, so it shares the cores as
the gateway does:

    python -m benchmarks._echo CONFIG.yaml ANSWERS.json

It prints `echo ready` once its consumer has its partitions, and stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from actors._exact_cache import replay
from actors._messages import CacheEntry
from actors._replies import ReplyStream
from topics.config import Config, load_config
from topics.specs import REQUEST_DECODER
from topics.wire import Request

__all__ = ["main", "records"]

_POLL_MS = 100


class _Collect:
    """A producer that keeps what it is sent, delivered at once: a replay's records."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes]] = []

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None
    ) -> asyncio.Future[None]:
        assert value is not None
        self.records.append((topic, value))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def records(
    req: Request, text: str, *, reply_topic: str, usage_topic: str
) -> list[tuple[str, bytes]]:
    """The (topic, value) records an exact hit of `text` writes for `req`, in order: made
    by the gateway's own replay, so the floor writes the same bytes a hit does."""
    model = req.request["model"]
    entry = CacheEntry(
        key=req.id,
        text=text,
        finish_reason="stop",
        prompt_tokens=0,
        completion_tokens=0,
        upstream_model=model,
        model=model,
        stored_at=time.time(),
    )
    sink = _Collect()
    out = ReplyStream(
        sink, topic=reply_topic, usage_topic=usage_topic, request_id=req.id, tenant=req.tenant
    )
    await replay(entry, req, out, received_ms=time.time() * 1000.0)
    return sink.records


async def serve(config: Config, answers: dict[str, str], stop: asyncio.Event) -> None:
    k = config.kafka
    producer = AIOKafkaProducer(
        bootstrap_servers=k.bootstrap_servers,
        client_id="bench-echo",
        linger_ms=k.producer_linger_ms,
        max_batch_size=k.producer_max_batch_bytes,
        request_timeout_ms=k.request_timeout_ms,
        enable_idempotence=True,
        acks="all",
    )
    consumer = AIOKafkaConsumer(
        config.topics.requests,
        bootstrap_servers=k.bootstrap_servers,
        group_id=k.group_id,
        client_id="bench-echo",
        enable_auto_commit=False,
        auto_offset_reset="latest",
        max_poll_records=config.gateway.fetch_max_records,
    )
    await producer.start()
    await consumer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=_POLL_MS)
        print("echo ready", flush=True)
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=_POLL_MS)
            acks = []
            for partition in batch.values():
                for rec in partition:
                    req = REQUEST_DECODER.decode(rec.value)
                    key = req.id.encode()
                    text = answers.get(req.request["messages"][-1]["content"], "")
                    for topic, value in await records(
                        req,
                        text,
                        reply_topic=req.reply_to or config.topics.responses,
                        usage_topic=config.topics.usage,
                    ):
                        acks.append(await producer.send(topic, value=value, key=key))
            if acks:
                await asyncio.gather(*acks)
                await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    config = load_config(args[0])
    with open(args[1], encoding="utf-8") as f:
        answers: dict[str, str] = json.load(f)
    stop = asyncio.Event()

    async def go() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await serve(config, answers, stop)

    asyncio.run(go())


if __name__ == "__main__":
    main()
