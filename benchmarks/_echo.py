"""The Kafka floor of a cache hit: a bare responder with no gateway in it.

It reads the requests topic and, for every request, writes what a cache hit writes to
the reply and usage topics (streamed: the text in one chunk, the finish reason, `done`;
not streamed: a completion and `done`; then a usage record), with the gateway's producer
settings (idempotent, `acks=all`, the configured linger and batch size) and its
consumer's batch size. Per `getmany` batch it sends every record, waits for the acks,
then commits: the least work a Kafka request/reply service does per request. The answer
is looked up by the last message's text in a JSON object of question -> answer (a
question not in it gets ""). Run as its own process, so it shares the cores as the
gateway does:

    python -m benchmarks._echo CONFIG.yaml ANSWERS.json

It prints `echo ready` once its consumer has its partitions, and stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from topics.config import Config, load_config
from topics.specs import REPLY_ENCODER, REQUEST_DECODER, USAGE_ENCODER
from topics.wire import ChunkReply, CompletionReply, DoneReply, Timing, TokenUsage, Usage

__all__ = ["main", "replies"]

_POLL_MS = 100


def replies(req_id: str, body: dict[str, Any], text: str) -> list[bytes]:
    """The reply values a cache hit sends for this request, in order."""
    usage = TokenUsage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    created = int(time.time())
    base = {"id": f"chatcmpl-echo-{req_id}", "created": created, "model": body["model"]}
    out: list[bytes] = []
    if body.get("stream"):
        chunk = {**base, "object": "chat.completion.chunk"}
        out.append(
            REPLY_ENCODER.encode(
                ChunkReply(
                    id=req_id,
                    seq=0,
                    chunk={
                        **chunk,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"role": "assistant", "content": text},
                                "finish_reason": None,
                            }
                        ],
                    },
                )
            )
        )
        out.append(
            REPLY_ENCODER.encode(
                ChunkReply(
                    id=req_id,
                    seq=1,
                    chunk={
                        **chunk,
                        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    },
                )
            )
        )
    else:
        message = {"role": "assistant", "content": text}
        completion = {
            **base,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }
        out.append(REPLY_ENCODER.encode(CompletionReply(id=req_id, seq=0, completion=completion)))
    timing = Timing(queued_ms=0.0, ttft_ms=0.0, total_ms=0.0)
    done = DoneReply(
        id=req_id,
        seq=len(out),
        finish_reason="stop",
        usage=usage,
        model=body["model"],
        deployment=None,
        cache="exact",
        timing=timing,
    )
    out.append(REPLY_ENCODER.encode(done))
    return out


def _usage(req_id: str, tenant: str, model: str) -> bytes:
    return USAGE_ENCODER.encode(
        Usage(
            id=req_id,
            tenant=tenant,
            model=model,
            deployment=None,
            prompt_tokens=0,
            completion_tokens=0,
            cost_usd=0.0,
            cache="exact",
            status="done",
            ts_ms=int(time.time() * 1000),
        )
    )


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
            for records in batch.values():
                for rec in records:
                    req = REQUEST_DECODER.decode(rec.value)
                    key = req.id.encode()
                    topic = req.reply_to or config.topics.responses
                    text = answers.get(req.request["messages"][-1]["content"], "")
                    for value in replies(req.id, req.request, text):
                        acks.append(await producer.send(topic, value=value, key=key))
                    usage = _usage(req.id, req.tenant, req.request["model"])
                    acks.append(await producer.send(config.topics.usage, value=usage, key=key))
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
