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
import contextlib
import functools
import heapq
import hmac
import itertools
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from actors._cache_flight import Digest, FlightWatch
from actors._cache_keys import cache_key, cacheable, tenant_scope
from actors._histogram import Tally
from actors._idempotency import RERUN_SEQ_STRIDE, IdemClaim
from actors._kafka import make_producer, pace_metadata_retries, send_retrying
from actors._messages import (
    Ask,
    CacheLookup,
    Finished,
    Grant,
    Job,
    Packed,
    Refusal,
    Route,
    RouteAsk,
    Settlement,
)
from actors._replies import ReplyStream
from actors._routing import AUTO
from actors.cache import cache_actors, shard_of
from actors.caller import caller_actors
from actors.idempotency import idempotency_actors, idempotency_shard_of
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
    idempotency: list[Any] = field(default_factory=list)


def start_actors(config: Config) -> Actors:
    """Get or create the named actors (the quota actor is a singleton per namespace)."""
    return Actors(
        quota=quota_actor(config),
        caches=cache_actors(config) if config.cache.enabled else [],
        selectors=selector_actors(config),
        callers=caller_actors(config),
        idempotency=(idempotency_actors(config) if config.resilience.idempotency.enabled else []),
    )


def _unused(grant: Grant) -> Settlement:
    """The settlement that gives a grant back whole: no call was made on it."""
    return Settlement(grant.lease, 0, deployment=grant.deployment, outcome="unused")


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
    fallback: tuple[str, ...] = ()
    attempt: int = 1
    # The public model each candidate deployment serves (fallbacks included).
    served: dict[str, str] = field(default_factory=dict)
    # The next reply seq: a retry continues where the failed attempt stopped.
    seq: int = 0
    # The next attempt starts with a `reset` (an earlier one may have sent chunks unseen).
    reset_first: bool = False
    # Deployments that failed this request, ranked last when it is routed again.
    avoid: list[str] = field(default_factory=list)
    # Index of the caller actor running it (while dispatched).
    caller: int | None = None
    # Records of the same id that arrived while this one ran: handled again once it has
    # finished (its stored result is then replayed to them, with no upstream call).
    duplicates: list[ConsumerRecord[bytes, bytes]] = field(default_factory=list)
    # Its idempotency claim's `running` record being stored: awaited before it may reply
    # (a cache replay or a caller's first chunk), then cleared.
    stored: asyncio.Future[Any] | None = None


@dataclass
class GatewayStats:
    consumed: int = 0
    invalid: int = 0
    answered_by_ingress: int = 0
    cache_hits: int = 0
    dispatched: int = 0
    finished: int = 0
    paused: int = 0
    # Resent ids: attached to the running request / replayed from the idempotency store.
    attached: int = 0
    replayed: int = 0
    retries: int = 0
    # Requests run again because the caller running them died (upstream calls repeated).
    crash_reruns: int = 0
    aborted_at_shutdown: int = 0
    # Terminal answers by (source "ingress" | "cache", status, public model or ""), for
    # /metrics: what the ingress answered itself, and the cache hits.
    outcomes: Tally = field(default_factory=Tally)


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
        # Request id -> ticket of the running request: a resent id attaches to it.
        self._by_id: dict[str, int] = {}
        # Tickets handed to a caller actor: from then on the caller owns their answer.
        self._dispatched: set[int] = set()
        # Retries waiting for their backoff: (loop time due, ticket).
        self._retry_heap: list[tuple[float, int]] = []
        self._retry_wake = asyncio.Event()
        # Each caller's incarnation: a new one means its jobs died with the old one.
        self._caller_incarnation: dict[int, str] = {}
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
        # Single flight: this ingress's cache leaders and followers, per shard.
        self._flight_watch = FlightWatch()
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
            *(h.warm.remote() for h in (a.quota, *a.caches, *a.selectors, *a.idempotency))
        )
        incarnations = await asyncio.gather(*(c.warm.remote() for c in a.callers))
        self._caller_incarnation = dict(enumerate(incarnations))
        self._producer = await make_producer(cfg, client_suffix="ingress")
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=cfg.kafka.bootstrap_servers,
            group_id=cfg.kafka.group_id,
            client_id=f"{cfg.kafka.client_id}-ingress",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=cfg.gateway.fetch_max_records,
        )
        pace_metadata_retries(self._consumer._client, cfg.kafka.metadata_retry_backoff_ms / 1000.0)
        self._consumer.subscribe([cfg.topics.requests], listener=_Rebalance(self))
        await self._consumer.start()
        self._spawn(self._grant_loop())
        for i in range(len(self.actors.callers)):
            self._spawn(self._finished_loop(i))
        self._spawn(self._retry_loop())
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
        """Finish in-flight requests, or end them with an error past the drain timeout."""
        cfg = self.config.gateway
        if self._pending:
            log.info("draining", in_flight=len(self._pending), timeout_s=cfg.drain_timeout_s)
            try:
                await asyncio.wait_for(self._drained.wait(), cfg.drain_timeout_s)
            except TimeoutError:
                log.warning("drain_timeout", unanswered=len(self._pending))
                await self._abort_remaining(cfg.abort_timeout_s)
        await self._commit()

    async def _abort_remaining(self, timeout_s: float) -> None:
        """Answer every unfinished request with a retryable error, then wait for the acks."""
        # Single-flight followers are left to their cache shard, which may be replaying
        # the leader's answer to them right now: answering them here could make two.
        # Unanswered at exit, they are not committed and come back after the restart.
        followers = self._flight_watch.following()
        waiting = [t for t in self._pending if t not in self._dispatched and t not in followers]
        self.stats.aborted_at_shutdown += len(self._pending) - len(followers)
        if waiting:
            try:
                await self.actors.quota.cancel.remote(self.owner, waiting)
            except ray.exceptions.RayError as exc:
                log.warning("quota_cancel_failed", error=repr(exc))
            await asyncio.gather(
                *(
                    self._answer(
                        t,
                        "upstream_unavailable",
                        "the gateway shut down before this request was sent upstream; "
                        "send it again",
                        retryable=True,
                    )
                    for t in waiting
                    if t in self._pending and t not in self._dispatched
                ),
                return_exceptions=True,
            )
        if self._dispatched:
            # Callers answer their running jobs; the finished long polls collect them.
            await asyncio.gather(
                *(c.abort.remote(self.owner) for c in self.actors.callers),
                return_exceptions=True,
            )
        if self._pending:
            try:
                await asyncio.wait_for(self._drained.wait(), timeout_s)
            except TimeoutError:
                log.error("abort_timeout", unanswered=len(self._pending))

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
                self._check_reply_to(req)
                self._authorize(req, rec.headers)
            except InvalidRequest as exc:
                answers.append(self._dead_letter(rec, exc))
                continue
            except Unauthorized as exc:
                answers.append(self._answer_record(rec, req, exc))
                continue
            running = self._by_id.get(req.id)
            if running is not None:
                # The same id resent while it runs: it waits for the running one, whose
                # replies may already be gone past its sender; see `_finish`.
                self._pending[running].duplicates.append(rec)
                self.stats.attached += 1
                log.info("request_attached", request_id=req.id, tenant=req.tenant)
                continue
            ticket = next(self._tickets)
            p = _Pending(tp, rec.offset, req, req.reply_to or self.config.topics.responses, now_ms)
            self._pending[ticket] = p
            self._by_id[req.id] = ticket
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
            for result in await asyncio.gather(*answers, return_exceptions=True):
                if isinstance(result, Exception):
                    log.error("answer_failed", error=repr(result))
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
                self._answer(
                    t, "internal", f"gateway stage failed: {type(exc).__name__}", retryable=True
                )
                for t in stuck
            ),
            return_exceptions=True,
        )

    def _check_reply_to(self, req: Request) -> None:
        """Replies never go to the gateway's own topics (requests, DLQ, usage, state)."""
        t = self.config.topics
        topic = req.reply_to
        if topic is None:
            return
        if topic in (t.requests, t.dlq, t.usage, t.events) or topic.startswith(t.internal_prefix):
            raise InvalidRequest(
                f"reply_to: {topic!r} is one of the gateway's own topics, not a reply topic"
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

    def _route_ask(self, ticket: int, p: _Pending) -> RouteAsk:
        req = p.request
        body = req.request
        # The prompt crosses Ray only when the selector needs it: to score it (auto) or to
        # price it against a cost bound.
        needs_prompt = body["model"] == AUTO or req.max_cost_usd is not None
        return RouteAsk(
            ticket,
            body["model"],
            req.tenant,
            req.tier,
            req.task,
            avoid=tuple(p.avoid),
            messages=body["messages"] if needs_prompt else None,
            max_tokens=self._max_tokens(body),
            max_cost_usd=req.max_cost_usd,
        )

    async def _claim(self, accepted: dict[int, _Pending]) -> set[int]:
        """Ask the idempotency store about each id: returns the tickets it replayed.

        New ids get the seq to start at: past an earlier run's when the id ran before
        (a crash or a resend), with a `reset` first. Their `running` records are stored
        meanwhile (`_Pending.stored`): the wait overlaps routing and quota.
        """
        shards = self.actors.idempotency
        if not shards:
            return set()
        by_shard: dict[int, list[IdemClaim]] = {}
        for t, p in accepted.items():
            by_shard.setdefault(idempotency_shard_of(p.request.id, len(shards)), []).append(
                IdemClaim(
                    ticket=t, request_id=p.request.id, reply_to=p.reply_to, tenant=p.request.tenant
                )
            )
        order = list(by_shard)
        results = await asyncio.gather(
            *(shards[i].claim_early.remote(Packed("idem_claim", by_shard[i])) for i in order)
        )
        stored: asyncio.Future[Any] = asyncio.gather(
            *(shards[i].durable.remote(token) for i, (token, _) in zip(order, results, strict=True))
        )
        # Read even when no run waits for it (all replayed), so a failure is not unraised.
        stored.add_done_callback(lambda f: f.cancelled() or f.exception())
        replayed: set[int] = set()
        for _token, claims in results:
            for c in claims:
                if c.kind == "replayed":
                    replayed.add(c.ticket)
                elif (claimed := accepted.get(c.ticket)) is not None:
                    claimed.seq = c.start_seq
                    claimed.reset_first = c.reset_first
                    claimed.stored = stored
        return replayed

    async def _unstored(self, tickets: Iterable[int]) -> set[int]:
        """Wait until the claims of `tickets` are stored; returns those whose store failed
        (answered here with a retryable `internal` error: they must not reply unrecorded)."""
        waits: dict[int, asyncio.Future[Any]] = {}
        for t in tickets:
            p = self._pending.get(t)
            if p is not None and p.stored is not None:
                waits[t] = p.stored
        if not waits:
            return set()
        await asyncio.wait(set(waits.values()))
        failed: dict[int, BaseException] = {}
        for t, fut in waits.items():
            if fut.cancelled():
                failed[t] = asyncio.CancelledError()
            elif (exc := fut.exception()) is not None:
                failed[t] = exc
            elif (p := self._pending.get(t)) is not None:
                p.stored = None
        if failed:
            log.error("idempotency_store_failed", error=repr(next(iter(failed.values()))))
            await asyncio.gather(
                *(
                    self._answer(
                        t,
                        "internal",
                        "gateway stage failed: idempotency record not stored",
                        retryable=True,
                    )
                    for t in failed
                ),
                return_exceptions=True,
            )
        return set(failed)

    def _apply_route(self, p: _Pending, route: Route) -> None:
        assert route.model is not None
        p.model = route.model
        p.candidates = route.candidates
        p.fallback = route.fallback
        every = (*route.candidates, *route.fallback)
        p.served = dict(zip(every, route.served, strict=False))
        p.prompt_tokens = self._prompt_counter.count(
            p.request.request["messages"],
            [self._upstream_model[d] for d in every if d in self._upstream_model],
        )

    async def _route(self, accepted: dict[int, _Pending]) -> None:
        selector = self.actors.selectors[next(self._selector_rr)]
        routes, replayed = await asyncio.gather(
            selector.route.remote(
                Packed("route_ask", [self._route_ask(t, p) for t, p in accepted.items()])
            ),
            self._claim(accepted),
        )
        for t in replayed:
            self.stats.replayed += 1
            log.info("request_replayed", request_id=accepted[t].request.id)
            self._finish(t)
        answers: list[Awaitable[None]] = []
        lookups: dict[int, list[CacheLookup]] = {}
        routed: list[int] = []
        for route in routes:
            if route.ticket in replayed:
                continue
            p = accepted[route.ticket]
            if route.error is not None or route.model is None:
                answers.append(
                    self._answer(route.ticket, route.error or "internal", route.message or "")
                )
                continue
            self._apply_route(p, route)
            routed.append(route.ticket)
            # A re-run is looked up too (its replay continues at its seq, after a reset):
            # a resent id whose first answer came from the cache is answered from it
            # again, not run upstream.
            if self.actors.caches and cacheable(p.request, self.config.cache):
                scope = tenant_scope(p.request.tenant, self.config.cache)
                p.cache_key = cache_key(
                    p.request, route.model, scope=scope, semantic=self.config.cache.semantic.enabled
                )
                shard = shard_of(p.cache_key, len(self.actors.caches))
                lookups.setdefault(shard, []).append(
                    CacheLookup(
                        route.ticket,
                        p.cache_key,
                        p.request,
                        p.reply_to,
                        p.received_ms,
                        model=route.model,
                        seq=p.seq,
                        reset_first=p.reset_first,
                    )
                )
        if answers:
            await asyncio.gather(*answers)
        if lookups:
            # A hit replies at once, so its claim must be stored first.
            lost = await self._unstored(c.ticket for items in lookups.values() for c in items)
            if lost:
                lookups = {
                    s: kept
                    for s, items in lookups.items()
                    if (kept := [c for c in items if c.ticket not in lost])
                }
                routed = [t for t in routed if t not in lost]
        # Answered from cache, or waiting for an identical request in flight.
        hits: set[int] = await self._cache_lookup(lookups) if lookups else set()
        asks = [self._ask(t) for t in routed if t not in hits]
        if asks:
            decisions = await self.actors.quota.submit.remote(Packed("ask", asks))
            await self._decided(decisions)

    # -- cache: hits and single flight (actors/_cache_flight.py) ------------------------

    def _cache_hit(self, ticket: int) -> None:
        p = self._pending.get(ticket)
        if p is None:
            return
        self.stats.cache_hits += 1
        self.stats.outcomes.add("cache", "done", p.model or "")
        self._finish(ticket)

    def _cache_news(self, news: Digest) -> list[int]:
        """Finish the answered followers; returns those that must run upstream (a failed
        replay continues past its seqs, after a reset)."""
        for t in news.answered:
            self._cache_hit(t)
        for r in news.rerun:
            p = self._pending.get(r.ticket)
            if p is not None:
                p.seq = r.next_seq
                p.reset_first = True
        return [*news.run, *(r.ticket for r in news.rerun)]

    async def _cache_lookup(self, lookups: dict[int, list[CacheLookup]]) -> set[int]:
        """One `lookup` per shard; returns the tickets that go no further now (answered
        from cache, or followers waiting for a leader). A shard that fails leaves its
        items to run upstream as misses."""
        shards = self.actors.caches
        watch = self._flight_watch
        if not watch.started:
            watch.started = True
            for i in range(len(shards)):
                self._spawn(
                    self._keep_going(
                        f"cache-flights-{i}", functools.partial(self._cache_flight_step, i)
                    )
                )
        results = await asyncio.gather(
            *(
                shards[s].lookup.remote(self.owner, Packed("cache_lookup", items))
                for s, items in lookups.items()
            ),
            return_exceptions=True,
        )
        held: set[int] = set()
        for (s, items), res in zip(lookups.items(), results, strict=True):
            if isinstance(res, BaseException):
                if not isinstance(res, ray.exceptions.RayError):
                    raise res
                log.warning("cache_lookup_failed", shard=s, error=repr(res))
                continue
            # Hits, then followers whose news came before this reply: those to run go
            # on to quota with the leaders (not held).
            early = watch.follow(s, res.incarnation, res.followers)
            run = self._cache_news(Digest(res.answered, early.run, [*res.rerun, *early.rerun]))
            self._cache_news(Digest(early.answered))
            decided = {*res.answered, *res.followers, *(r.ticket for r in res.rerun)}
            held.update(decided.difference(run))
            for item in items:
                p = self._pending.get(item.ticket)
                if item.ticket not in decided and p is not None:
                    watch.lead(s, item.ticket, item.key, p)
        return held

    async def _cache_flight_step(self, shard: int) -> None:
        """Long poll one shard for this ingress's followers: finish the answered ones,
        send upstream those whose leader gave no answer to replay."""
        timeout = self.config.quota.grant_poll_timeout_s
        watch = self._flight_watch
        gone, dropped = watch.report(shard, self._pending)
        try:
            news = await self.actors.caches[shard].flight_news.remote(
                self.owner, timeout, gone, dropped
            )
        except ray.exceptions.RayActorError:
            log.warning("cache_actor_unavailable", shard=shard, followers=watch.followers(shard))
            await self._run_followers(watch.lost(shard, None))
            await asyncio.sleep(timeout)
            return
        await self._run_followers(self._cache_news(watch.digest(shard, news, self._pending)))

    async def _run_followers(self, tickets: list[int]) -> None:
        """Followers with no answer to replay go upstream themselves (through quota)."""
        todo = [t for t in tickets if t in self._pending and t not in self._dispatched]
        if not todo:
            return
        log.info("cache_followers_run", count=len(todo))
        try:
            await self._decided(
                await self.actors.quota.submit.remote(Packed("ask", [self._ask(t) for t in todo]))
            )
        except ray.exceptions.RayError as exc:
            await self._fail_stage({t: self._pending[t] for t in todo if t in self._pending}, exc)

    def _max_tokens(self, body: dict[str, Any]) -> int:
        return int(
            body.get("max_completion_tokens")
            or body.get("max_tokens")
            or self.config.quota.default_max_tokens
        )

    def _ask(self, ticket: int) -> Ask:
        p = self._pending[ticket]
        return Ask(
            ticket=ticket,
            owner=self.owner,
            tenant=p.request.tenant,
            priority=p.request.priority,
            deadline_ms=p.request.deadline_ms,
            candidates=p.candidates,
            prompt_tokens=p.prompt_tokens,
            max_tokens=self._max_tokens(p.request.request),
            fallback=p.fallback,
        )

    async def _decided(self, decisions: Iterable[Any]) -> None:
        jobs: list[Job] = []
        answers: list[Awaitable[None]] = []
        returned: list[Settlement] = []
        for d in decisions:
            if isinstance(d, Grant):
                p = self._pending.get(d.ticket)
                if p is None or p.model is None or d.ticket in self._dispatched:
                    # A second grant for one ticket (asked again after a quota restart),
                    # or one for a request answered meanwhile: give it back unused.
                    returned.append(_unused(d))
                    continue
                jobs.append(
                    Job(
                        d.ticket,
                        p.request,
                        p.reply_to,
                        p.served.get(d.deployment, p.model),
                        d,
                        p.prompt_tokens,
                        p.received_ms,
                        p.cache_key,
                        attempt=p.attempt,
                        start_seq=p.seq,
                        reset_first=p.reset_first,
                    )
                )
            elif isinstance(d, Refusal):
                answers.append(
                    self._answer(d.ticket, d.code, d.message, retry_after_ms=d.retry_after_ms)
                )
        if jobs:
            # Usually stored long ago: the claim's write overlapped routing and quota.
            lost = await self._unstored(j.ticket for j in jobs)
            if lost:
                returned.extend(_unused(j.grant) for j in jobs if j.ticket in lost)
                jobs = [j for j in jobs if j.ticket not in lost]
        if returned:
            await self.actors.quota.settle.remote(Packed("settlement", returned))
        if answers:
            await asyncio.gather(*answers)
        if jobs:
            await self._dispatch(jobs)

    async def _dispatch(self, jobs: list[Job]) -> None:
        callers = self.actors.callers
        by_caller: dict[int, list[Job]] = {}
        for job in jobs:
            i = next(self._caller_rr) % len(callers)
            by_caller.setdefault(i, []).append(job)
            self._pending[job.ticket].caller = i
        self._dispatched.update(job.ticket for job in jobs)
        results = await asyncio.gather(
            *(
                callers[i].submit.remote(self.owner, Packed("job", batch))
                for i, batch in by_caller.items()
            ),
            return_exceptions=True,
        )
        failed: list[Job] = []
        for (i, batch), result in zip(by_caller.items(), results, strict=True):
            # A caller that died is `_caller_lost`'s: it re-runs what was dispatched to it.
            if isinstance(result, BaseException) and not isinstance(
                result, ray.exceptions.RayActorError
            ):
                log.error("dispatch_failed", caller=i, jobs=len(batch), error=repr(result))
                failed.extend(batch)
        self.stats.dispatched += len(jobs) - len(failed)
        if failed:
            await self._undispatched(failed)

    async def _undispatched(self, jobs: list[Job]) -> None:
        """Jobs no caller took (it could not start, or the batch could not reach it): their
        leases go back unused and each request gets a retryable `internal` error."""
        for job in jobs:
            self._dispatched.discard(job.ticket)
            self._pending[job.ticket].caller = None
        try:
            await self.actors.quota.settle.remote(
                Packed("settlement", [_unused(j.grant) for j in jobs])
            )
        except ray.exceptions.RayError as exc:  # the quota actor is away: its restart forgets them
            log.warning("settle_failed", leases=len(jobs), error=repr(exc))
        await asyncio.gather(
            *(
                self._answer(
                    j.ticket,
                    "internal",
                    "the gateway could not hand the request to an upstream caller; send it again",
                    retryable=True,
                )
                for j in jobs
            )
        )

    # -- long polls -------------------------------------------------------------------

    async def _keep_going(self, name: str, step: Callable[[], Awaitable[None]]) -> None:
        """Run one loop step forever: an unexpected error (Kafka down while answering, a
        bug) is logged and the loop goes on, so no request is left without its loop."""
        pause = self.config.gateway.error_backoff_ms / 1000.0
        while True:
            try:
                await step()
            except Exception as exc:
                log.exception("gateway_loop_error", loop=name, error=repr(exc))
                await asyncio.sleep(pause)

    async def _grant_loop(self) -> None:
        await self._keep_going("grants", self._grant_step)

    async def _grant_step(self) -> None:
        timeout = self.config.quota.grant_poll_timeout_s
        try:
            batch = await self.actors.quota.next_grants.remote(self.owner, timeout)
        except ray.exceptions.RayActorError:
            log.warning("quota_actor_unavailable")
            await asyncio.sleep(timeout)
            return
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

    async def _finished_loop(self, index: int) -> None:
        await self._keep_going(f"finished-{index}", functools.partial(self._finished_step, index))

    async def _finished_step(self, index: int) -> None:
        timeout = self.config.quota.grant_poll_timeout_s
        caller = self.actors.callers[index]
        try:
            done = await caller.finished.remote(self.owner, timeout)
        except ray.exceptions.RayActorError:
            log.warning("caller_actor_unavailable", caller=index)
            await self._caller_lost(index, timeout)
            return
        retry = [f for f in done if f.status == "retry"]
        for f in done:
            if f.status != "retry":
                self._finish(f.ticket)
        if retry:
            self._schedule_retries(retry)

    async def _caller_lost(self, index: int, poll_s: float) -> None:
        """Wait for Ray to bring the caller back; if it is a new incarnation, the jobs it
        ran died with the old one: run them again (their upstream calls repeat)."""
        caller = self.actors.callers[index]
        while True:
            try:
                incarnation = await caller.whoami.remote()
                break
            except ray.exceptions.RayActorError:
                await asyncio.sleep(poll_s)
        if incarnation == self._caller_incarnation.get(index):
            return
        self._caller_incarnation[index] = incarnation
        lost = [t for t in self._dispatched if self._pending[t].caller == index]
        log.warning("caller_restarted", caller=index, rerun=len(lost))
        now = asyncio.get_running_loop().time()
        for t in lost:
            p = self._pending[t]
            self._dispatched.discard(t)
            p.caller = None
            p.attempt += 1
            # How far the dead attempt got is unknown: continue past any seq it could
            # have used, after a reset.
            p.seq = (p.seq // RERUN_SEQ_STRIDE + 1) * RERUN_SEQ_STRIDE
            p.reset_first = True
            self.stats.crash_reruns += 1
            heapq.heappush(self._retry_heap, (now, t))
        self._retry_wake.set()

    def _schedule_retries(self, finished: list[Finished]) -> None:
        """Failed attempts the caller wants retried: route them again after their backoff."""
        now = asyncio.get_running_loop().time()
        for f in finished:
            p = self._pending.get(f.ticket)
            if p is None:
                continue
            self._dispatched.discard(f.ticket)
            p.caller = None
            p.attempt += 1
            p.seq = f.next_seq
            p.reset_first = False  # the failed attempt sent its own reset
            if f.deployment:
                p.avoid.append(f.deployment)
            self.stats.retries += 1
            heapq.heappush(self._retry_heap, (now + f.retry_after_ms / 1000.0, f.ticket))
        self._retry_wake.set()

    async def _retry_loop(self) -> None:
        """Retries whose backoff is over go back through routing and quota, in batches."""
        await self._keep_going("retries", self._retry_step)

    async def _retry_step(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        due: list[int] = []
        while self._retry_heap and self._retry_heap[0][0] <= now:
            due.append(heapq.heappop(self._retry_heap)[1])
        due = [t for t in due if t in self._pending and t not in self._dispatched]
        if due:
            try:
                await self._reroute(due)
            except ray.exceptions.RayError as exc:
                await self._fail_stage({t: self._pending[t] for t in due}, exc)
            return
        timeout = self._retry_heap[0][0] - now if self._retry_heap else None
        self._retry_wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._retry_wake.wait(), timeout)

    async def _reroute(self, tickets: list[int]) -> None:
        """Route again (breakers and failures may have changed the candidates), ask quota."""
        pending = {t: self._pending[t] for t in tickets}
        selector = self.actors.selectors[next(self._selector_rr)]
        routes = await selector.route.remote(
            Packed("route_ask", [self._route_ask(t, p) for t, p in pending.items()])
        )
        answers: list[Awaitable[None]] = []
        asks: list[Ask] = []
        for route in routes:
            if route.error is not None or route.model is None:
                answers.append(
                    self._answer(route.ticket, route.error or "internal", route.message or "")
                )
                continue
            self._apply_route(pending[route.ticket], route)
            asks.append(self._ask(route.ticket))
        if answers:
            await asyncio.gather(*answers)
        if asks:
            await self._decided(await self.actors.quota.submit.remote(Packed("ask", asks)))

    async def _resubmit_waiting(self) -> None:
        """Asks queued in a quota actor that died are lost with it: ask again."""
        queued = {t for _, t in self._retry_heap}
        waiting = [
            t
            for t, p in self._pending.items()
            if p.candidates and t not in self._dispatched and t not in queued
        ]
        if waiting:
            log.info("resubmitting_waiting", count=len(waiting))
            await self._decided(
                await self.actors.quota.submit.remote(
                    Packed("ask", [self._ask(t) for t in waiting])
                )
            )

    async def _commit_loop(self) -> None:
        interval = self.config.gateway.commit_interval_ms / 1000.0
        while True:
            await asyncio.sleep(interval)
            await self._commit()

    async def _commit(self) -> None:
        try:
            await self._commit_now()
        except KafkaError as exc:
            # Broker away or a rebalance under way: the next commit covers these offsets.
            log.warning("commit_failed", error=repr(exc))

    async def _commit_now(self) -> None:
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
        if self._by_id.get(p.request.id) == ticket:
            del self._by_id[p.request.id]
        self._offsets.done(p.tp, p.offset)
        if p.duplicates:
            # The result is stored by now (callers report a ticket finished only after
            # that): handled again, the resent records get it replayed.
            self._spawn(self._handle_batch(p.duplicates))
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

    def _stream_for(
        self, request_id: str, reply_to: str, tenant: str, *, start_seq: int = 0
    ) -> ReplyStream:
        return ReplyStream(
            self._producer,
            topic=reply_to,
            usage_topic=self.config.topics.usage,
            request_id=request_id,
            tenant=tenant,
            start_seq=start_seq,
            kafka=self.config.kafka,
        )

    async def _answer(
        self,
        ticket: int,
        code: ErrorCode,
        message: str,
        *,
        retry_after_ms: int | None = None,
        retryable: bool = False,
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
        out = self._stream_for(p.request.id, p.reply_to, p.request.tenant, start_seq=p.seq)
        try:
            await out.error(
                code,
                message,
                retryable=retryable,
                retry_after_ms=retry_after_ms,
                metadata=p.request.metadata,
                model=p.model,
            )
        except KafkaError as err:
            # Past the send retries (a reply topic that cannot exist, or Kafka away for
            # minutes): finished all the same, or the record would come back forever.
            log.error(
                "terminal_reply_failed", request_id=p.request.id, topic=p.reply_to, error=repr(err)
            )
        self.stats.answered_by_ingress += 1
        self.stats.outcomes.add("ingress", code, p.model or "")
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
        self.stats.outcomes.add("ingress", exc.code, "")
        self._offsets.done(TopicPartition(rec.topic, rec.partition), rec.offset)

    async def _dead_letter(self, rec: ConsumerRecord[bytes, bytes], exc: InvalidRequest) -> None:
        """Original bytes to the DLQ with the reason; an invalid_request reply where possible.

        A failure here is logged and the record still counts as handled: a value that can
        be neither dead-lettered nor answered must not come back after every restart.
        """
        self.stats.invalid += 1
        self.stats.outcomes.add("ingress", "invalid_request", "")
        topics = self.config.topics
        source = f"{rec.topic}/{rec.partition}/{rec.offset}"
        try:
            await (
                await self._dlq_send(
                    rec, [("error", exc.message.encode()), ("source", source.encode())]
                )
            )
        except KafkaError as err:
            log.error("dead_letter_failed", source=source, error=repr(err))
        found = salvage(rec.value)
        log.info(
            "request_dead_lettered", request_id=found.id if found else None, reason=exc.message
        )
        if found is not None:
            out = self._stream_for(found.id, found.reply_to or topics.responses, found.tenant)
            try:
                await out.error("invalid_request", exc.message, usage_record=False)
            except KafkaError as err:
                log.warning(
                    "invalid_reply_undeliverable",
                    request_id=found.id,
                    topic=out.topic,
                    error=repr(err),
                )
        self._offsets.done(TopicPartition(rec.topic, rec.partition), rec.offset)

    async def _dlq_send(
        self, rec: ConsumerRecord[bytes, bytes], headers: list[tuple[str, bytes]]
    ) -> Awaitable[Any]:
        """Send the DLQ copy; one too large with our headers keeps its head, and says so."""
        kafka = self.config.kafka
        dlq = self.config.topics.dlq
        try:
            return await send_retrying(
                self._producer, kafka, dlq, value=rec.value, key=rec.key, headers=headers
            )
        except MessageSizeTooLargeError:
            size = len(rec.value or b"")
            return await send_retrying(
                self._producer,
                kafka,
                dlq,
                value=(rec.value or b"")[: kafka.dlq_max_value_bytes],
                key=rec.key,
                headers=[*headers, ("truncated_from_bytes", str(size).encode())],
            )
