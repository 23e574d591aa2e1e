"""The ingress: Kafka requests in, batched through the actors, offsets committed behind answers.

Per `getmany` batch the ingress makes one call to a selector, one per cache shard, one to
the quota actor and one per caller that gets work. Grants for queued requests and
finished tickets come back through long polls. In-flight requests are bounded: at
`max_in_flight` every partition is paused (backpressure stays in Kafka) and resumed when
the count falls to `resume_ratio` of it. Offsets are committed only up to the oldest
request of each partition that has no acknowledged terminal reply yet.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import os
import time
import uuid
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from actors._exact_cache import cache_key, cacheable
from actors._kafka import make_producer
from actors._messages import Ask, CacheLookup, Grant, Job, Refusal, RouteAsk, Settlement
from actors._replies import ReplyStream
from actors.cache import cache_actors, shard_of
from actors.caller import caller_actors
from actors.quota import quota_actor
from actors.selector import selector_actors
from pipeline._admin import ensure_topics
from pipeline._offsets import OffsetTracker
from pipeline._validate import parse_request, salvage
from topics.config import Config, resolve_secret
from topics.errors import ErrorCode, InvalidRequest, RequestError, Unauthorized
from topics.tokens import PromptCounter
from topics.wire import Request

__all__ = ["Actors", "Gateway", "GatewayStats", "start_actors"]

log = structlog.get_logger("quotaflow.gateway")


@dataclass
class Actors:
    """Handles of every actor the gateway uses."""

    quota: Any
    caches: list[Any]
    selectors: list[Any]
    callers: list[Any]


def start_actors(config: Config) -> Actors:
    """Get or create the named actors (the quota actor is a singleton per namespace)."""
    return Actors(
        quota=quota_actor(config),
        caches=cache_actors(config) if config.cache.enabled else [],
        selectors=selector_actors(config),
        callers=caller_actors(config),
    )


@dataclass
class _Pending:
    tp: TopicPartition
    offset: int
    request: Request
    reply_to: str
    received_ms: float
    model: str | None = None
    cache_key: str | None = None
    prompt_tokens: int = 0
    candidates: tuple[str, ...] = ()
    attempt: int = 1


@dataclass
class GatewayStats:
    consumed: int = 0
    invalid: int = 0
    answered_by_ingress: int = 0
    cache_hits: int = 0
    dispatched: int = 0
    finished: int = 0
    paused: int = 0


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._gw._commit()
        for tp in revoked:
            self._gw._offsets.forget(tp)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        if self._gw._paused:
            self._gw._consumer.pause(*assigned)


class Gateway:
    """One ingress process. Several may run in one consumer group against the same actors."""

    def __init__(self, config: Config, actors: Actors | None = None) -> None:
        self.config = config
        self.owner = f"ingress-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._actors = actors
        self._tickets = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        # Tickets handed to a caller actor: from then on the caller owns their answer.
        self._dispatched: set[int] = set()
        self._quota_epoch: int | None = None
        # The quota actor's wait queue is full: consume nothing more until it says otherwise.
        self._quota_full = False
        self._offsets: OffsetTracker[TopicPartition] = OffsetTracker()
        self._paused = False
        self._consumer: Any = None
        self._producer: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._selector_rr = itertools.cycle(range(config.gateway.selector_actors))
        self._caller_rr = itertools.count()
        self._tenant_keys = {
            t.name: resolve_secret(t.api_key_env, what=f"tenants[{t.name}].api_key_env")
            for t in config.tenants
            if t.api_key_env
        }
        self._upstream_model = {d.name: d.model for d in config.deployments}
        self._prompt_counter = PromptCounter(self._upstream_model.values())
        self.stats = GatewayStats()
        self._stopping = asyncio.Event()
        self._drained = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        if cfg.topics.create_missing:
            created = await ensure_topics(cfg)
            if created:
                log.info("topics_created", topics=created)
        if self._actors is None:
            self._actors = start_actors(cfg)
        a = self.actors
        # Actors start their producers and loops now, not on the first request.
        self._quota_epoch, *_ = await asyncio.gather(
            *(h.warm.remote() for h in (a.quota, *a.caches, *a.selectors, *a.callers))
        )
        self._producer = await make_producer(cfg, client_suffix="ingress")
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=cfg.kafka.bootstrap_servers,
            group_id=cfg.kafka.group_id,
            client_id=f"{cfg.kafka.client_id}-ingress",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=cfg.gateway.fetch_max_records,
        )
        self._consumer.subscribe([cfg.topics.requests], listener=_Rebalance(self))
        await self._consumer.start()
        self._spawn(self._grant_loop())
        for caller in self.actors.callers:
            self._spawn(self._finished_loop(caller))
        self._spawn(self._commit_loop())
        log.info("gateway_started", owner=self.owner, requests_topic=cfg.topics.requests)

    @property
    def actors(self) -> Actors:
        assert self._actors is not None, "Gateway.start() first"
        return self._actors

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway_task_failed", error=repr(task.exception()))

    async def run(self) -> None:
        """Consume until `stop()`; then drain in-flight requests and commit."""
        cfg = self.config.gateway
        while not self._stopping.is_set():
            batches = await self._consumer.getmany(
                timeout_ms=cfg.fetch_timeout_ms, max_records=cfg.fetch_max_records
            )
            records = [r for recs in batches.values() for r in recs]
            if records:
                self._spawn(self._handle_batch(records))
        await self._drain()

    def stop(self) -> None:
        self._stopping.set()

    async def _drain(self) -> None:
        timeout = self.config.gateway.drain_timeout_s
        if self._pending:
            log.info("draining", in_flight=len(self._pending), timeout_s=timeout)
            try:
                await asyncio.wait_for(self._drained.wait(), timeout)
            except TimeoutError:
                log.warning("drain_timeout", unanswered=len(self._pending))
        await self._commit()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    # -- the batch path ---------------------------------------------------------------

    async def _handle_batch(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        now_ms = time.time() * 1000.0
        accepted: dict[int, _Pending] = {}
        answers: list[Awaitable[None]] = []
        for rec in records:
            self.stats.consumed += 1
            tp = TopicPartition(rec.topic, rec.partition)
            self._offsets.add(tp, rec.offset)
            try:
                req = parse_request(rec.value)
                self._authorize(req, rec.headers)
            except InvalidRequest as exc:
                answers.append(self._dead_letter(rec, exc))
                continue
            except Unauthorized as exc:
                answers.append(self._answer_record(rec, req, exc))
                continue
            ticket = next(self._tickets)
            p = _Pending(tp, rec.offset, req, req.reply_to or self.config.topics.responses, now_ms)
            self._pending[ticket] = p
            if req.deadline_ms is not None and req.deadline_ms <= now_ms:
                answers.append(
                    self._answer(
                        ticket,
                        "deadline_exceeded",
                        f"deadline_ms {req.deadline_ms} had passed on arrival",
                    )
                )
                continue
            accepted[ticket] = p
        self._backpressure()
        if answers:
            await asyncio.gather(*answers)
        if accepted:
            try:
                await self._route(accepted)
            except ray.exceptions.RayError as exc:
                await self._fail_stage(accepted, exc)

    async def _fail_stage(self, accepted: dict[int, _Pending], exc: BaseException) -> None:
        """An actor stage failed: answer every ticket of the batch not yet answered or granted.

        Tickets already handed to a caller are left to it; the rest get a retryable
        `internal` error, so no accepted request ends in silence.
        """
        log.error("stage_failed", error=repr(exc), batch=len(accepted))
        stuck = [t for t in accepted if t in self._pending and t not in self._dispatched]
        await asyncio.gather(
            *(
                self._answer(t, "internal", f"gateway stage failed: {type(exc).__name__}")
                for t in stuck
            ),
            return_exceptions=True,
        )

    def _authorize(self, req: Request, headers: Sequence[tuple[str, bytes]]) -> None:
        if not self._tenant_keys:
            return
        auth = next((v for k, v in headers if k.lower() == "authorization"), None)
        if auth is None:
            raise Unauthorized("missing Kafka header 'authorization: Bearer <key>'")
        token = auth.decode(errors="replace").removeprefix("Bearer ").strip()
        expected = self._tenant_keys.get(req.tenant)
        if expected is None or not hmac.compare_digest(token.encode(), expected.encode()):
            # Never echo the key; name only the tenant it was checked against.
            raise Unauthorized(f"the authorization key is not valid for tenant {req.tenant!r}")

    async def _route(self, accepted: dict[int, _Pending]) -> None:
        selector = self.actors.selectors[next(self._selector_rr)]
        routes = await selector.route.remote(
            [
                RouteAsk(
                    t, p.request.request["model"], p.request.tenant, p.request.tier, p.request.task
                )
                for t, p in accepted.items()
            ]
        )
        answers: list[Awaitable[None]] = []
        lookups: dict[int, list[CacheLookup]] = {}
        routed: list[int] = []
        for route in routes:
            p = accepted[route.ticket]
            if route.error is not None or route.model is None:
                answers.append(
                    self._answer(route.ticket, route.error or "internal", route.message or "")
                )
                continue
            p.model = route.model
            p.prompt_tokens = self._prompt_counter.count(
                p.request.request["messages"],
                [self._upstream_model[d] for d in route.candidates if d in self._upstream_model],
            )
            routed.append(route.ticket)
            p.candidates = route.candidates
            if self.actors.caches and cacheable(p.request, self.config.cache):
                p.cache_key = cache_key(p.request, route.model)
                shard = shard_of(p.cache_key, len(self.actors.caches))
                lookups.setdefault(shard, []).append(
                    CacheLookup(route.ticket, p.cache_key, p.request, p.reply_to, p.received_ms)
                )
        if answers:
            await asyncio.gather(*answers)
        hits: set[int] = set()
        if lookups:
            results = await asyncio.gather(
                *(self.actors.caches[s].lookup.remote(items) for s, items in lookups.items())
            )
            for tickets in results:
                hits.update(tickets)
            for t in hits:
                self.stats.cache_hits += 1
                self._finish(t)
        asks = [self._ask(t) for t in routed if t not in hits]
        if asks:
            decisions = await self.actors.quota.submit.remote(asks)
            await self._decided(decisions)

    def _ask(self, ticket: int) -> Ask:
        p = self._pending[ticket]
        body = p.request.request
        max_tokens = (
            body.get("max_completion_tokens")
            or body.get("max_tokens")
            or self.config.quota.default_max_tokens
        )
        return Ask(
            ticket=ticket,
            owner=self.owner,
            tenant=p.request.tenant,
            priority=p.request.priority,
            deadline_ms=p.request.deadline_ms,
            candidates=p.candidates,
            prompt_tokens=p.prompt_tokens,
            max_tokens=int(max_tokens),
        )

    async def _decided(self, decisions: Iterable[Any]) -> None:
        jobs: list[Job] = []
        answers: list[Awaitable[None]] = []
        returned: list[Settlement] = []
        for d in decisions:
            if isinstance(d, Grant):
                p = self._pending.get(d.ticket)
                if p is None or p.model is None or d.ticket in self._dispatched:
                    # A second grant for one ticket (asked again after a quota restart):
                    # give the reservation back unused.
                    returned.append(Settlement(d.lease, 0, deployment=d.deployment))
                    continue
                jobs.append(
                    Job(
                        d.ticket,
                        p.request,
                        p.reply_to,
                        p.model,
                        d,
                        p.prompt_tokens,
                        p.received_ms,
                        p.cache_key,
                        attempt=p.attempt,
                    )
                )
            elif isinstance(d, Refusal):
                answers.append(
                    self._answer(d.ticket, d.code, d.message, retry_after_ms=d.retry_after_ms)
                )
        if returned:
            await self.actors.quota.settle.remote(returned)
        if answers:
            await asyncio.gather(*answers)
        if jobs:
            await self._dispatch(jobs)

    async def _dispatch(self, jobs: list[Job]) -> None:
        callers = self.actors.callers
        by_caller: dict[int, list[Job]] = {}
        for job in jobs:
            by_caller.setdefault(next(self._caller_rr) % len(callers), []).append(job)
        self._dispatched.update(job.ticket for job in jobs)
        await asyncio.gather(
            *(callers[i].submit.remote(self.owner, batch) for i, batch in by_caller.items())
        )
        self.stats.dispatched += len(jobs)

    # -- long polls -------------------------------------------------------------------

    async def _grant_loop(self) -> None:
        timeout = self.config.quota.grant_poll_timeout_s
        while True:
            try:
                batch = await self.actors.quota.next_grants.remote(self.owner, timeout)
            except ray.exceptions.RayActorError:
                log.warning("quota_actor_unavailable")
                await asyncio.sleep(timeout)
                continue
            if batch.epoch != self._quota_epoch:
                log.warning("quota_actor_restarted", old=self._quota_epoch, new=batch.epoch)
                self._quota_epoch = batch.epoch
                await self._resubmit_waiting()
            if batch.queue_full != self._quota_full:
                self._quota_full = batch.queue_full
                log.warning("quota_queue_full" if batch.queue_full else "quota_queue_drained")
                self._backpressure()
            decisions = batch.decisions
            if decisions:
                try:
                    await self._decided(decisions)
                except ray.exceptions.RayError as exc:
                    tickets = {
                        d.ticket: self._pending[d.ticket]
                        for d in decisions
                        if d.ticket in self._pending
                    }
                    await self._fail_stage(tickets, exc)

    async def _finished_loop(self, caller: Any) -> None:
        timeout = self.config.quota.grant_poll_timeout_s
        while True:
            try:
                done = await caller.finished.remote(self.owner, timeout)
            except ray.exceptions.RayActorError:
                log.warning("caller_actor_unavailable")
                await asyncio.sleep(timeout)
                continue
            requeue = [f.ticket for f in done if f.status == "requeue"]
            for f in done:
                if f.status != "requeue":
                    self._finish(f.ticket)
            if requeue:
                await self._requeue(requeue)

    async def _resubmit_waiting(self) -> None:
        """Asks queued in a quota actor that died are lost with it: ask again."""
        waiting = [
            t for t, p in self._pending.items() if p.candidates and t not in self._dispatched
        ]
        if waiting:
            log.info("resubmitting_waiting", count=len(waiting))
            await self._decided(
                await self.actors.quota.submit.remote([self._ask(t) for t in waiting])
            )

    async def _requeue(self, tickets: list[int]) -> None:
        """Upstream answered 429 before any chunk: the request waits for quota again."""
        asks = []
        for t in tickets:
            p = self._pending.get(t)
            if p is None:
                continue
            self._dispatched.discard(t)
            p.attempt += 1
            asks.append(self._ask(t))
        if asks:
            try:
                await self._decided(await self.actors.quota.submit.remote(asks))
            except ray.exceptions.RayError as exc:
                await self._fail_stage({a.ticket: self._pending[a.ticket] for a in asks}, exc)

    async def _commit_loop(self) -> None:
        interval = self.config.gateway.commit_interval_ms / 1000.0
        while True:
            await asyncio.sleep(interval)
            await self._commit()

    async def _commit(self) -> None:
        offsets = self._offsets.committable()
        if not offsets or self._consumer is None:
            return
        assigned = self._consumer.assignment()
        offsets = {tp: o for tp, o in offsets.items() if tp in assigned}
        if not offsets:
            return
        await self._consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
        self._offsets.mark_committed(offsets)

    # -- answering ---------------------------------------------------------------------

    def _finish(self, ticket: int) -> None:
        p = self._pending.pop(ticket, None)
        self._dispatched.discard(ticket)
        if p is None:
            return
        self.stats.finished += 1
        self._offsets.done(p.tp, p.offset)
        self._backpressure()
        if not self._pending:
            self._drained.set()

    def _backpressure(self) -> None:
        cfg = self.config.gateway
        n = len(self._pending)
        if self._consumer is None:
            return
        full = n >= cfg.max_in_flight or self._quota_full
        if not self._paused and full:
            self._paused = True
            self.stats.paused += 1
            self._consumer.pause(*self._consumer.assignment())
            log.info("ingress_paused", in_flight=n)
        elif self._paused and not self._quota_full and n <= cfg.max_in_flight * cfg.resume_ratio:
            self._paused = False
            self._consumer.resume(*self._consumer.assignment())
            log.info("ingress_resumed", in_flight=n)
        if n:
            self._drained.clear()

    def _stream_for(self, request_id: str, reply_to: str, tenant: str) -> ReplyStream:
        return ReplyStream(
            self._producer,
            topic=reply_to,
            usage_topic=self.config.topics.usage,
            request_id=request_id,
            tenant=tenant,
        )

    async def _answer(
        self, ticket: int, code: ErrorCode, message: str, *, retry_after_ms: int | None = None
    ) -> None:
        """Terminal error for an accepted request, then it counts as finished."""
        p = self._pending[ticket]
        log.info(
            "request_refused",
            request_id=p.request.id,
            tenant=p.request.tenant,
            code=code,
            reason=message,
        )
        out = self._stream_for(p.request.id, p.reply_to, p.request.tenant)
        await out.error(
            code, message, retry_after_ms=retry_after_ms, metadata=p.request.metadata, model=p.model
        )
        self.stats.answered_by_ingress += 1
        self._finish(ticket)

    async def _answer_record(
        self, rec: ConsumerRecord[bytes, bytes], req: Request, exc: RequestError
    ) -> None:
        """Terminal error for a valid Request that is refused before it gets a ticket."""
        log.info(
            "request_refused",
            request_id=req.id,
            tenant=req.tenant,
            code=exc.code,
            reason=exc.message,
        )
        out = self._stream_for(req.id, req.reply_to or self.config.topics.responses, req.tenant)
        await out.error(exc.code, exc.message, metadata=req.metadata)
        self._offsets.done(TopicPartition(rec.topic, rec.partition), rec.offset)

    async def _dead_letter(self, rec: ConsumerRecord[bytes, bytes], exc: InvalidRequest) -> None:
        """Original bytes to the DLQ with the reason; an invalid_request reply where possible."""
        self.stats.invalid += 1
        topics = self.config.topics
        sent = [
            await self._producer.send(
                topics.dlq,
                value=rec.value,
                key=rec.key,
                headers=[
                    ("error", exc.message.encode()),
                    ("source", f"{rec.topic}/{rec.partition}/{rec.offset}".encode()),
                ],
            )
        ]
        found = salvage(rec.value)
        log.info(
            "request_dead_lettered", request_id=found.id if found else None, reason=exc.message
        )
        if found is not None:
            out = self._stream_for(found.id, found.reply_to or topics.responses, found.tenant)
            await out.error("invalid_request", exc.message, usage_record=False)
        await asyncio.gather(*sent)
        self._offsets.done(TopicPartition(rec.topic, rec.partition), rec.offset)
