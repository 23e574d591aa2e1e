"""The singleton quota actor: a thin Ray shell around `QuotaBook`.

One actor call per ingress batch (`submit`), one long poll per ingress for queued grants
(`next_grants`), one batched `settle` per caller flush: never one call per request.
State survives a restart through the compacted `<prefix>quota` topic: restored before the
first call is served, checkpointed every `quota.checkpoint_interval_ms`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from typing import Any

import msgspec
import structlog

from actors._compacted import read_compacted
from actors._kafka import make_producer
from actors._messages import Admitted, Ask, Decision, DeploymentState, Packed, Settlement
from actors._process import tune_process
from actors._quota_book import QuotaBook
from actors._ray import named_actor
from topics.config import Config
from topics.logs import configure_logging

__all__ = ["QUOTA_ACTOR_NAME", "GrantBatch", "QuotaService", "quota_actor"]

QUOTA_ACTOR_NAME = "quotaflow.quota"

log = structlog.get_logger("quotaflow.quota")

_CHECKPOINT = msgspec.json.Encoder()
_RESTORE = msgspec.json.Decoder(dict[str, Any])


class GrantBatch(msgspec.Struct, frozen=True):
    """What `next_grants` returns: decisions, and which incarnation of the actor made them.

    A new `epoch` tells the ingress that asks it had queued were lost with the previous
    incarnation, so it submits them again (the book ignores duplicates).
    """

    epoch: int
    decisions: list[Admitted]
    # The wait queue is at `quota.queue_max`: ingresses stop consuming until it drains.
    queue_full: bool = False


class QuotaService:
    """Async wrapper: restores, wakes queued asks, checkpoints, publishes budget events."""

    def __init__(self, config: Config) -> None:
        configure_logging(config.logging)
        tune_process(config)
        self._config = config
        self.book = QuotaBook(config)
        self.epoch = random.getrandbits(31)
        self._tick_s = config.quota.tick_ms / 1000.0
        self._checkpoint_s = config.quota.checkpoint_interval_ms / 1000.0
        self._topic = f"{config.topics.internal_prefix}quota"
        self._wake = asyncio.Event()
        self._ready: dict[str, asyncio.Event] = {}
        self._started: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._producer: Any = None

    async def _ensure_started(self) -> None:
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        self._producer = await make_producer(self._config, client_suffix="quota")
        restored = await self._read_checkpoints()
        self.book.restore(restored)
        log.info("quota_started", restored_records=len(restored), epoch=self.epoch)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._admission_loop()),
            loop.create_task(self._checkpoint_loop()),
        ]

    async def _read_checkpoints(self) -> dict[str, dict[str, Any]]:
        """The latest record per key of the checkpoint topic (empty if there is none)."""
        raw = await read_compacted(
            self._config, self._producer, self._topic, client_suffix="quota-restore"
        )
        latest: dict[str, dict[str, Any]] = {}
        for key, value in raw.items():
            try:
                latest[key] = _RESTORE.decode(value)
            except msgspec.DecodeError:
                log.warning("checkpoint_unreadable", key=key)
        return latest

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self._checkpoint_s)
            try:
                await self.checkpoint()
            except Exception as exc:  # noqa: BLE001 - Kafka may be down; keep serving, try again
                log.warning("checkpoint_failed", error=repr(exc))

    async def checkpoint(self, tenants: set[str] | None = None) -> int:
        """Write state now (all, or only `tenants`); returns how many records were written."""
        records = self.book.checkpoint(tenants)
        futures = [
            await self._producer.send(
                self._topic, key=key.encode(), value=_CHECKPOINT.encode(value)
            )
            for key, value in records.items()
        ]
        await asyncio.gather(*futures)
        return len(records)

    async def _admission_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.book.admit_waiting():
                for ev in self._ready.values():
                    ev.set()
            wake_at = self.book.next_wake()
            timeout = (
                None if wake_at is None else min(max(0.0, wake_at - loop.time()), self._tick_s)
            )
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def warm(self) -> int:
        await self._ensure_started()
        return self.epoch

    async def submit(self, asks: list[Ask]) -> list[Decision]:
        await self._ensure_started()
        out = self.book.submit(asks)
        if self.book.queue_depth:
            self._wake.set()
        return Packed("decision", out)

    async def next_grants(self, owner: str, timeout_s: float) -> GrantBatch:
        await self._ensure_started()
        ev = self._ready.setdefault(owner, asyncio.Event())
        got = Packed("admitted", self.book.take(owner))
        if not got:
            ev.clear()
            try:
                await asyncio.wait_for(ev.wait(), timeout_s)
            except TimeoutError:
                return GrantBatch(self.epoch, [], self.book.queue_full)
            got = Packed("admitted", self.book.take(owner))
        return GrantBatch(self.epoch, got, self.book.queue_full)

    async def settle(self, settlements: list[Settlement]) -> None:
        await self._ensure_started()
        touched = self.book.settle(settlements)
        if touched:
            # Budgets are money: written through before the settlement is acknowledged,
            # so a crash loses no settled use (Ray re-runs an interrupted settle).
            try:
                await self.checkpoint(touched)
            except Exception as exc:  # noqa: BLE001 - Kafka down: the periodic checkpoint retries
                log.warning("budget_write_through_failed", tenants=sorted(touched), error=repr(exc))
        events = self.book.drain_events()
        for event in events:
            log.warning(str(event.get("event")), **{k: v for k, v in event.items() if k != "event"})
        if events and self._producer is not None:
            await self._publish(events)
        self._wake.set()

    async def cancel(self, owner: str, tickets: list[int]) -> int:
        """A draining ingress withdraws asks it is answering itself; see `QuotaBook.cancel`."""
        await self._ensure_started()
        n = self.book.cancel(owner, tickets)
        self._wake.set()
        return n

    async def sent_late(self, reports: list[tuple[int, float]]) -> None:
        """Callers report when paced calls really left; see `QuotaBook.sent_late`."""
        await self._ensure_started()
        self.book.sent_late(reports)
        self._wake.set()  # a held second may be free now

    async def _publish(self, events: list[dict[str, Any]]) -> None:
        topic = self._config.topics.events
        for event in events:
            key = str(event.get("tenant") or event.get("deployment") or "quota").encode()
            await self._producer.send(topic, key=key, value=_CHECKPOINT.encode(event))

    async def headroom(self) -> dict[str, float]:
        return self.book.headroom()

    async def routing_state(self) -> dict[str, DeploymentState]:
        """Per deployment: headroom, breaker state, TTFT EWMA (for the selectors)."""
        return self.book.routing_state()

    async def snapshot(self) -> dict[str, Any]:
        await self._ensure_started()
        snap = self.book.snapshot()
        snap["epoch"] = self.epoch
        snap["pid"] = os.getpid()
        return snap


def quota_actor(config: Config, *, detached: bool = False) -> Any:
    """Get or create the named singleton quota actor.

    `retry_calls`: a call in flight when the actor died runs again on the restarted one,
    which is safe here: its state died with it, and the book ignores repeated asks.
    """
    # Every ingress holds a long poll open while others submit and settle.
    return named_actor(
        QuotaService,
        config,
        QUOTA_ACTOR_NAME,
        config,
        max_concurrency=1000,
        detached=detached,
        retry_calls=True,
    )
