"""Idempotency actors: one shard of `IdempotencyIndex` each, durable in a compacted topic.

The ingress sends each shard one `claim` per batch: finished ids are replayed from here
(the stored reply values, same key, no usage record: a replay is not a new request) and
come back `replayed`; the others come back `new` at once, with a token that `durable`
answers once their `running` records are stored (the ingress waits for it before a run
may reply, overlapped with routing and quota).
Callers report finished runs with `put_many` and retryable failures with `end_many`.
A restarted shard reads the whole `<prefix>idempotency` topic before serving a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import zlib
from collections.abc import Awaitable
from typing import Any, Final

import structlog

from actors._compacted import read_compacted
from actors._idempotency import (
    IdemClaim,
    IdemClaimed,
    IdempotencyIndex,
    IdemRecord,
    Replay,
    Write,
)
from actors._kafka import make_producer, send_retrying
from actors._messages import Packed
from actors._process import tune_process
from actors._ray import named_actor
from topics.config import Config
from topics.logs import configure_logging

__all__ = [
    "IdempotencyShard",
    "idempotency_actor_name",
    "idempotency_actors",
    "idempotency_shard_of",
    "idempotency_topic",
]

log = structlog.get_logger("quotaflow.idempotency")

# Expired ids are refused at claim time anyway; this only bounds how long memory and the
# topic keep them after their window.
_SWEEP_INTERVAL_S: Final = 5.0
# Tokens of `claim_early` kept before the ones whose records are stored are dropped.
_UNACKED_PRUNE_AT: Final = 1024


def idempotency_topic(config: Config) -> str:
    return f"{config.topics.internal_prefix}idempotency"


def idempotency_shard_of(request_id: str, shards: int) -> int:
    """Shard for a request id: crc32 of its UTF-8, stable across processes and restarts."""
    return zlib.crc32(request_id.encode()) % shards


class IdempotencyShard:
    """Actor body: an IdempotencyIndex, its durable records and a producer for replays.

    Index changes and the sends of their records happen under one lock, so records reach
    the topic in the order of the changes (a tombstone never overtakes a newer record).
    """

    def __init__(self, config: Config, shard: int) -> None:
        configure_logging(config.logging)
        tune_process(config)
        self._config = config
        self.shard = shard
        self._cfg = config.resilience.idempotency
        self.index = IdempotencyIndex(self._cfg)
        self._topic = idempotency_topic(config)
        self._producer: Any = None
        self._lock = asyncio.Lock()
        self._started: asyncio.Task[None] | None = None
        self._sweep: asyncio.Task[None] | None = None
        self.replayed_replies = 0
        # Delivery futures of claims not yet asked about (see `claim_early`), by token.
        self._unacked: dict[int, list[asyncio.Future[Any]]] = {}
        self._tokens = itertools.count(1)

    async def _ensure_started(self) -> None:
        started = self._started
        if started is None or (started.done() and (started.cancelled() or started.exception())):
            # First call, or the last start failed (Kafka down): try again.
            started = self._started = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(started)

    async def _start(self) -> None:
        if self._producer is None:
            self._producer = await make_producer(self._config, client_suffix=f"idem-{self.shard}")
        shards = self._cfg.shards
        records = await read_compacted(
            self._config,
            self._producer,
            self._topic,
            client_suffix=f"idem-{self.shard}-restore",
            keep=lambda key: idempotency_shard_of(key, shards) == self.shard,
        )
        async with self._lock:
            self.index.restore(records)
            pending = await self._tombstones()
        await asyncio.gather(*pending)
        log.info(
            "idempotency_started",
            shard=self.shard,
            restored_records=len(records),
            forgotten=len(pending),
            entries=len(self.index),
        )
        self._sweep = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def _send(self, write: Write) -> Awaitable[Any]:
        """Queue one record (call under the lock); returns its delivery future."""
        return await send_retrying(
            self._producer,
            self._config.kafka,
            self._topic,
            key=write.key.encode(),
            value=write.value,
        )

    async def _tombstones(self) -> list[Awaitable[Any]]:
        """Queue a tombstone for every id the index forgot (call under the lock)."""
        return [await self._send(Write(i, None)) for i in self.index.expire()]

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            try:
                async with self._lock:
                    pending = await self._tombstones()
                await asyncio.gather(*pending)
            except Exception as exc:  # noqa: BLE001 - Kafka may be down; a restore drops them
                log.warning("idempotency_sweep_failed", shard=self.shard, error=repr(exc))

    async def warm(self) -> None:
        """Start the producer and restore from the topic now, before the first claim."""
        await self._ensure_started()

    async def claim(self, items: list[IdemClaim]) -> list[IdemClaimed]:
        """`claim_early` and `durable` in one call: answers once the records are stored."""
        token, out = await self.claim_early(items)
        await self.durable(token)
        return out

    async def claim_early(self, items: list[IdemClaim]) -> tuple[int, list[IdemClaimed]]:
        """One answer per item, in order, as soon as the index has decided; the `running`
        records are queued, not yet stored: `durable(token)` waits for them.

        The ingress overlaps that wait with routing and quota, and waits for it only
        before a run may produce a reply. Ids must be distinct and not running at the
        caller: the ingress attaches live duplicates itself. Replays are sent before
        this returns. Raises if Kafka fails."""
        await self._ensure_started()
        out: list[IdemClaimed] = []
        replays: list[tuple[IdemClaim, list[bytes]]] = []
        async with self._lock:
            unacked: list[Awaitable[Any]] = []
            for item in items:
                got = self.index.claim(item.request_id)
                if isinstance(got, Replay):
                    replays.append((item, got.replies))
                    out.append(IdemClaimed(item.ticket, "replayed"))
                else:
                    unacked.append(await self._send(got.write))
                    out.append(IdemClaimed(item.ticket, "new", got.start_seq, got.reset_first))
            unacked.extend(await self._tombstones())
        pending: list[Awaitable[Any]] = []
        for item, replies in replays:
            key = item.request_id.encode()
            for value in replies:
                pending.append(
                    await send_retrying(
                        self._producer, self._config.kafka, item.reply_to, value=value, key=key
                    )
                )
            self.replayed_replies += len(replies)
            log.info(
                "idempotent_replay",
                request_id=item.request_id,
                tenant=item.tenant,
                replies=len(replies),
            )
        await asyncio.gather(*pending)
        return self._hold(unacked), Packed("idem_claimed", out)

    def _hold(self, unacked: list[Awaitable[Any]]) -> int:
        """Keep a claim's delivery futures under a new token until `durable` asks."""
        token = next(self._tokens)
        self._unacked[token] = [asyncio.ensure_future(f) for f in unacked]
        if len(self._unacked) > _UNACKED_PRUNE_AT:
            # A token nobody waits for (its ingress died): drop those stored without error,
            # which `durable` would have answered the same way.
            for t, futures in list(self._unacked.items()):
                if all(f.done() and not f.cancelled() and f.exception() is None for f in futures):
                    del self._unacked[t]
        return token

    async def durable(self, token: int) -> None:
        """Returns once the records queued by the claim that gave `token` are stored;
        raises if one could not be. A token already answered, or pruned, returns at once."""
        await asyncio.gather(*self._unacked.pop(token, ()))

    async def put_many(self, records: list[IdemRecord]) -> None:
        """Store finished runs; durable when this returns (safe to repeat)."""
        await self._ensure_started()
        async with self._lock:
            pending = [await self._send(self.index.finish(r)) for r in records]
            pending.extend(await self._tombstones())
        await asyncio.gather(*pending)

    async def end_many(self, request_ids: list[str]) -> None:
        """Mark runs ended with a retryable error (a resend runs again); durable on return."""
        await self._ensure_started()
        async with self._lock:
            pending = [
                await self._send(write)
                for write in map(self.index.end, request_ids)
                if write is not None
            ]
            pending.extend(await self._tombstones())
        await asyncio.gather(*pending)

    async def stats(self) -> dict[str, Any]:
        await self._ensure_started()
        out = self.index.stats()
        out["shard"] = self.shard
        out["pid"] = os.getpid()
        out["replayed_replies"] = self.replayed_replies
        return out

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweep
            self._sweep = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


def idempotency_actor_name(shard: int) -> str:
    return f"quotaflow.idempotency.{shard}"


def idempotency_actors(config: Config) -> list[Any]:
    """Get or create the named idempotency shards (none when idempotency is disabled).

    `retry_calls`: a call in flight when a shard died runs again on its next incarnation,
    which is safe: a repeated claim finds the `running` record and starts a rerun at
    higher seqs (or replays again: same values, same seqs), and puts and ends repeat.
    """
    cfg = config.resilience.idempotency
    if not cfg.enabled:
        return []
    return [
        named_actor(
            IdempotencyShard,
            config,
            idempotency_actor_name(i),
            config,
            i,
            max_concurrency=100,
            retry_calls=True,
        )
        for i in range(cfg.shards)
    ]
