"""The singleton quota actor: a thin Ray shell around `QuotaBook`.

One actor call per ingress batch (`submit`), one long poll per ingress for queued grants
(`next_grants`), one batched `settle` per caller flush: never one call per request.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from actors._messages import Admitted, Ask, Decision, Settlement
from actors._quota_book import QuotaBook
from actors._ray import named_actor
from topics.config import Config
from topics.logs import configure_logging

__all__ = ["QUOTA_ACTOR_NAME", "QuotaService", "quota_actor"]

QUOTA_ACTOR_NAME = "quotaflow.quota"

log = structlog.get_logger("quotaflow.quota")


class QuotaService:
    """Async wrapper that wakes queued asks when leases settle or windows expire."""

    def __init__(self, config: Config) -> None:
        configure_logging(config.logging)
        self.book = QuotaBook(config)
        self._tick_s = config.quota.tick_ms / 1000.0
        self._wake = asyncio.Event()
        self._ready: dict[str, asyncio.Event] = {}
        self._loop_task: asyncio.Task[None] | None = None

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._admission_loop())

    async def _admission_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.book.admit_waiting():
                for ev in self._ready.values():
                    ev.set()
            wake_at = self.book.next_wake()
            if wake_at is None:
                timeout = None
            else:
                # The book's clock is time.monotonic, like the loop's.
                timeout = min(max(0.0, wake_at - loop.time()), self._tick_s)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def warm(self) -> None:
        self._ensure_loop()

    async def submit(self, asks: list[Ask]) -> list[Decision]:
        self._ensure_loop()
        out = self.book.submit(asks)
        if self.book.queue_depth:
            self._wake.set()
        return out

    async def next_grants(self, owner: str, timeout_s: float) -> list[Admitted]:
        self._ensure_loop()
        ev = self._ready.setdefault(owner, asyncio.Event())
        got = self.book.take(owner)
        if got:
            return got
        ev.clear()
        try:
            await asyncio.wait_for(ev.wait(), timeout_s)
        except TimeoutError:
            return []
        return self.book.take(owner)

    async def settle(self, settlements: list[Settlement]) -> None:
        self.book.settle(settlements)
        for event in self.book.drain_events():
            log.warning(event.pop("event"), **event)
        self._wake.set()

    async def headroom(self) -> dict[str, float]:
        return self.book.headroom()

    async def snapshot(self) -> dict[str, Any]:
        return self.book.snapshot()


def quota_actor(config: Config, *, detached: bool = False) -> Any:
    """Get or create the named singleton quota actor."""
    # Every ingress holds a long poll open while others submit and settle.
    return named_actor(
        QuotaService, config, QUOTA_ACTOR_NAME, config, max_concurrency=1000, detached=detached
    )
