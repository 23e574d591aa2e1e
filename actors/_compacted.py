"""Reading a compacted state topic back at start-up: the latest value of every key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, TopicPartition

from topics.config import Config

__all__ = ["read_compacted"]

# How long one fetch waits for records while the end offsets are not reached yet.
_POLL_MS: Final = 200


async def read_compacted(
    config: Config,
    producer: Any,
    topic: str,
    *,
    client_suffix: str,
    keep: Callable[[str], bool] = lambda _key: True,
) -> dict[str, bytes]:
    """The latest value per key of `topic`, from its beginning to the end offsets seen at
    the start; keys whose latest record is a tombstone are left out, as are keys `keep`
    refuses (so a shard holds only its own).

    The partitions come from the started `producer`: its `partitions_for` waits for fresh
    metadata, where a new consumer's view may still be empty (see actors/quota.py).
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=config.kafka.bootstrap_servers,
        client_id=f"{config.kafka.client_id}-{client_suffix}",
        group_id=None,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        partitions = await producer.partitions_for(topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions or ())]
        if not tps:
            return {}
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        latest: dict[str, bytes] = {}
        while True:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= end[tp] for pos, tp in zip(positions, tps, strict=True)):
                return latest
            for records in (await consumer.getmany(timeout_ms=_POLL_MS)).values():
                for rec in records:
                    if rec.key is None:
                        continue
                    key = rec.key.decode(errors="replace")
                    if not keep(key):
                        continue
                    if rec.value is None:
                        latest.pop(key, None)
                    else:
                        latest[key] = rec.value
    finally:
        await consumer.stop()
