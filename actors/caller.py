"""Upstream caller actors: run granted jobs concurrently and produce their replies to Kafka.

Tokens never cross Ray: each caller owns a Kafka producer. What crosses Ray is batched:
jobs in (`submit`, one call per ingress batch), finished tickets out (`finished`, a long
poll), and lease settlements and cache entries on a timer (`_flush_loop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import ray
import structlog

from actors._kafka import make_producer
from actors._messages import CacheEntry, Finished, Job, Settlement
from actors._ray import actor_by_name, named_actor
from actors._replies import ReplyStream
from actors._upstream import Outcome, Upstream
from actors.cache import cache_actor_name, shard_of
from actors.quota import QUOTA_ACTOR_NAME
from topics.config import Config
from topics.logs import configure_logging

__all__ = ["Caller", "caller_actors"]

log = structlog.get_logger("quotaflow.caller")


class Caller:
    """Actor body. Logic of a single call lives in `Upstream`; this schedules and batches."""

    def __init__(self, config: Config, index: int) -> None:
        configure_logging(config.logging)  # each actor is a process of its own
        self._config = config
        self.index = index
        # Resolved by name on first use, so a restarted caller needs no handles.
        self._quota: Any = None
        self._caches: list[Any] | None = None
        self._upstream = Upstream(config, on_send=self._request_sent)
        # Paced calls in flight, by request id: (lease, not_before_ms).
        self._paced: dict[str, tuple[int, float]] = {}
        self._producer: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._finished: dict[str, list[Finished]] = {}
        self._finished_ev: dict[str, asyncio.Event] = {}
        self._settle: list[Settlement] = []
        self._puts: list[CacheEntry] = []
        self._flush_task: asyncio.Task[None] | None = None
        self._flush_s = config.gateway.flush_ms / 1000.0
        self._late_ms = config.quota.late_report_ms
        self._late: list[tuple[int, float]] = []
        self._flush_now = asyncio.Event()
        self.calls = 0

    def _peers(self) -> tuple[Any, list[Any]]:
        if self._quota is None:
            self._quota = actor_by_name(self._config, QUOTA_ACTOR_NAME)
        if self._caches is None:
            cfg = self._config.cache
            n = cfg.shards if cfg.enabled else 0
            self._caches = [actor_by_name(self._config, cache_actor_name(i)) for i in range(n)]
        return self._quota, self._caches

    async def _start(self) -> None:
        if self._producer is None:
            self._producer = await make_producer(self._config, client_suffix=f"caller-{self.index}")
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_loop())

    async def warm(self) -> None:
        """Start the producer, flusher and SDK clients now: the first request pays no start-up
        (creating a client takes long enough to disturb the pacing of the first calls)."""
        await self._start()
        await self._upstream.warm(connect=self._config.gateway.warm_connections)

    async def submit(self, owner: str, jobs: list[Job]) -> None:
        """Start `jobs`; returns at once. Their tickets come back through `finished`."""
        await self._start()
        for job in jobs:
            task = asyncio.get_running_loop().create_task(self._run(owner, job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, owner: str, job: Job) -> None:
        req = job.request
        out = ReplyStream(
            self._producer,
            topic=job.reply_to,
            usage_topic=self._config.topics.usage,
            request_id=req.id,
            tenant=req.tenant,
        )
        bound = log.bind(request_id=req.id, tenant=req.tenant, deployment=job.grant.deployment)
        if job.grant.not_before_ms is not None:
            hold_s = (job.grant.not_before_ms - time.time() * 1000.0) / 1000.0
            if hold_s > 0:
                await asyncio.sleep(hold_s)  # paced by the quota actor, see quantized_pace_ms
            self._paced[req.id] = (job.grant.lease, job.grant.not_before_ms)
        self.calls += 1
        try:
            try:
                outcome = await self._upstream.run(job, out)
            finally:
                self._paced.pop(req.id, None)  # the send hook did not fire: nothing left
        except Exception as exc:  # noqa: BLE001 - any bug must still end the request with a reply
            bound.exception("caller_crashed")
            outcome = Outcome(status="internal", deployment=job.grant.deployment)
            try:
                await out.error("internal", f"gateway error: {type(exc).__name__}", retryable=True)
            except Exception:  # noqa: BLE001 - Kafka is down too; the offset stays uncommitted
                bound.exception("terminal_reply_failed")
                return
        # A failed call keeps its whole reservation: the provider may have charged it.
        used = (
            max(job.prompt_tokens, outcome.prompt_tokens) + outcome.completion_tokens
            if outcome.status == "done"
            else job.grant.reserved_tokens
        )
        self._settle.append(
            Settlement(
                job.grant.lease,
                used,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                observed=outcome.observed,
                deployment=job.grant.deployment,
                tenant=req.tenant,
            )
        )
        if outcome.status == "done" and job.cache_key is not None:
            self._puts.append(
                CacheEntry(
                    key=job.cache_key,
                    text=outcome.text,
                    finish_reason=outcome.finish_reason,
                    prompt_tokens=outcome.prompt_tokens,
                    completion_tokens=outcome.completion_tokens,
                    upstream_model=outcome.upstream_model,
                    model=job.model,
                    stored_at=time.time(),
                )
            )
        bound.info(
            "request_finished", status=outcome.status, completion_tokens=outcome.completion_tokens
        )
        self._finished.setdefault(owner, []).append(
            Finished(job.ticket, outcome.status, upstream_calls=outcome.upstream_calls)
        )
        ev = self._finished_ev.get(owner)
        if ev is not None:
            ev.set()

    def _request_sent(self, request_id: str) -> None:
        """The HTTP request of a paced call is leaving now: report it if it is late."""
        paced = self._paced.pop(request_id, None)
        if paced is None:
            return
        lease, not_before_ms = paced
        sent_ms = time.time() * 1000.0
        if sent_ms - not_before_ms > self._late_ms:
            # The next grant on this deployment must count from now: say so at once,
            # not with the next flush. (A first call in a process is typically ~100 ms
            # late inside the SDK, more under load.)
            self._late.append((lease, sent_ms))
            self._flush_now.set()

    async def finished(self, owner: str, timeout_s: float) -> list[Finished]:
        """Long poll: tickets whose terminal reply Kafka has acknowledged."""
        got = self._finished.pop(owner, [])
        if got:
            return got
        ev = self._finished_ev.setdefault(owner, asyncio.Event())
        ev.clear()
        try:
            await asyncio.wait_for(ev.wait(), timeout_s)
        except TimeoutError:
            return []
        return self._finished.pop(owner, [])

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_now.wait(), self._flush_s)
            self._flush_now.clear()
            await self._flush()

    async def _flush(self) -> None:
        settle, self._settle = self._settle, []
        puts, self._puts = self._puts, []
        late, self._late = self._late, []
        if not settle and not puts and not late:
            return
        try:
            quota, caches = self._peers()
            calls = []
            if late:
                calls.append(quota.sent_late.remote(late))
            if settle:
                calls.append(quota.settle.remote(settle))
            if puts and caches:
                by_shard: dict[int, list[CacheEntry]] = {}
                for e in puts:
                    by_shard.setdefault(shard_of(e.key, len(caches)), []).append(e)
                calls.extend(caches[i].put_many.remote(batch) for i, batch in by_shard.items())
            await asyncio.gather(*calls)
        except (ray.exceptions.RayActorError, ValueError):
            # The quota or a cache actor is restarting; a lost settlement only keeps a
            # reservation until its window entry expires: conservative, never over.
            log.warning("flush_failed", settlements=len(settle), cache_puts=len(puts))

    async def stats(self) -> dict[str, Any]:
        return {"caller": self.index, "in_flight": len(self._tasks), "calls": self.calls}

    async def drain(self, timeout_s: float) -> int:
        """Wait for running jobs (up to `timeout_s`), flush, and return how many still run."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        await self._flush()
        return len(self._tasks)

    async def close(self) -> None:
        await self._flush()
        await self._upstream.close()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


def caller_actors(config: Config) -> list[Any]:
    """Get or create the named upstream callers (each runs many streams at once)."""
    return [
        named_actor(
            Caller,
            config,
            f"quotaflow.caller.{i}",
            config,
            i,
            max_concurrency=10_000,
        )
        for i in range(config.gateway.caller_actors)
    ]
