"""An idempotency shard on real Kafka and the gateway's real Ray cluster, across a restart.

The shard lives in a namespace of its own with its own internal topics (a unique
`internal_prefix`), so the session gateway's shards are not disturbed.
"""

from __future__ import annotations

import asyncio
import importlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import msgspec
import pytest
import ray
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from actors._idempotency import RERUN_SEQ_STRIDE, IdemClaim, IdemClaimed, IdemRecord
from actors.idempotency import idempotency_actors
from pipeline._admin import ensure_topics
from pipeline._ray_env import prepare_ray_auth
from tests.conftest import Stack
from topics.config import Config, IdempotencyConfig
from topics.specs import REPLY_ENCODER, TopicSpec
from topics.wire import ChunkReply, DoneReply, Reply, Timing, TokenUsage

pytestmark = [pytest.mark.integration]

# Generous bound for any one step (a Ray actor start or restart, a Kafka read).
STEP_TIMEOUT_S = 120.0
_POLL_MS = 200

T = TypeVar("T")


async def _within(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, STEP_TIMEOUT_S)


def _join_ray(address: str, namespace: str) -> None:
    """Join the gateway's cluster as a driver (token auth as `quotaflow status` does)."""
    prepare_ray_auth()
    # Ray reads RAY_AUTH_MODE when it is imported, and test modules import it at
    # collection, before the gateway wrote its token: make it read the setting again
    # (what ray.init itself does when it finds a local token).
    importlib.import_module("ray._raylet").Config.initialize("")
    ray.init(
        address=address,
        namespace=namespace,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
    )


def _replies(rid: str) -> list[bytes]:
    chunks: list[Reply] = [
        ChunkReply(
            id=rid,
            seq=i,
            chunk={
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
            },
        )
        for i, text in enumerate(("Hello", ", world"))
    ]
    done = DoneReply(
        id=rid,
        seq=len(chunks),
        finish_reason="stop",
        usage=TokenUsage(prompt_tokens=2, completion_tokens=2, total_tokens=4),
        model="fast",
        deployment="sim-a",
        timing=Timing(),
    )
    return [REPLY_ENCODER.encode(r) for r in (*chunks, done)]


async def _read_topic(bootstrap: str, topic: str, count: int) -> list[tuple[bytes, bytes]]:
    """The first `count` (key, value) records of a one-partition topic."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        got: list[tuple[bytes, bytes]] = []
        give_up = time.monotonic() + STEP_TIMEOUT_S
        while len(got) < count:
            assert time.monotonic() < give_up, f"only {len(got)} of {count} records on {topic}"
            for records in (await consumer.getmany(timeout_ms=_POLL_MS)).values():
                got.extend((r.key, r.value) for r in records)
        return got
    finally:
        await consumer.stop()


async def _end_offsets(bootstrap: str, topic: str, partitions: int) -> list[int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        end = await consumer.end_offsets(tps)
        return [end[tp] for tp in tps]
    finally:
        await consumer.stop()


@pytest.fixture
async def idem_env(stack: Stack) -> AsyncIterator[tuple[Config, str, str]]:
    """A config of our own (namespace, internal topics, usage topic), its topics created,
    and this process joined to the gateway's Ray cluster; everything removed after."""
    tag = uuid.uuid4().hex[:12]
    base = stack.config
    config = msgspec.structs.replace(
        base,
        topics=msgspec.structs.replace(
            base.topics, internal_prefix=f"idemtest-{tag}.", usage=f"idemtest-{tag}.usage"
        ),
        gateway=msgspec.structs.replace(base.gateway, ray_namespace=f"idem-test-{tag}"),
        resilience=msgspec.structs.replace(
            base.resilience, idempotency=IdempotencyConfig(shards=1)
        ),
    )
    reply_topics = [f"idemtest-{tag}.replies-{n}" for n in ("before", "after")]
    created = await ensure_topics(
        config,
        extra=[
            TopicSpec(name=t, partitions=1, replication_factor=1, cleanup_policy="delete")
            for t in reply_topics
        ],
    )
    _join_ray(stack.ray_address(), config.gateway.ray_namespace)
    try:
        yield config, reply_topics[0], reply_topics[1]
    finally:
        ray.shutdown()
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([t for t in created if t.startswith(f"idemtest-{tag}.")])
        finally:
            await admin.close()


async def test_a_restarted_shard_replays_finished_ids_and_reruns_the_others(
    stack: Stack, idem_env: tuple[Config, str, str]
) -> None:
    config, before_topic, after_topic = idem_env
    (shard,) = idempotency_actors(config)
    try:
        await _within(shard.warm.remote())
        ids = ("done-id", "running-id", "ended-id")
        first: list[IdemClaimed] = await _within(
            shard.claim.remote([IdemClaim(i, rid, before_topic, "t") for i, rid in enumerate(ids)])
        )
        assert first == [IdemClaimed(i, "new", 0, False) for i in range(len(ids))]
        replies = _replies("done-id")
        await _within(shard.put_many.remote([IdemRecord("done-id", replies, time.time() * 1000)]))
        await _within(shard.end_many.remote(["ended-id"]))
        before: dict[str, Any] = await _within(shard.stats.remote())

        ray.kill(shard, no_restart=False)
        give_up = time.monotonic() + STEP_TIMEOUT_S
        while True:  # calls during the restart are retried by Ray on the new incarnation
            after: dict[str, Any] = await _within(shard.stats.remote())
            if after["pid"] != before["pid"]:
                break
            assert time.monotonic() < give_up, "the shard was not restarted"
        assert after["entries"] == len(ids)  # restored from the topic

        again: list[IdemClaimed] = await _within(
            shard.claim.remote(
                [IdemClaim(10 + i, rid, after_topic, "t") for i, rid in enumerate(ids)]
            )
        )
        assert again == [
            IdemClaimed(10, "replayed"),
            IdemClaimed(11, "new", RERUN_SEQ_STRIDE, True),
            IdemClaimed(12, "new", RERUN_SEQ_STRIDE, True),
        ]
        replayed = await _read_topic(stack.bootstrap, after_topic, len(replies))
        assert replayed == [(b"done-id", value) for value in replies]
        # The replay is not a new request: no usage record (acknowledged before `claim`
        # returned, so it would be there already).
        usage_ends = await _end_offsets(
            stack.bootstrap, config.topics.usage, config.topics.partitions
        )
        assert usage_ends == [0] * config.topics.partitions
        stats = await _within(shard.stats.remote())
        assert (stats["hits"], stats["running"], stats["finished"]) == (1, 2, 1)
    finally:
        ray.kill(shard)
