"""Upstream caller actors: run granted jobs concurrently and produce their replies to Kafka.

Tokens never cross Ray: each caller owns a Kafka producer. What crosses Ray is batched:
jobs in (`submit`, one call per ingress batch), finished tickets out (`finished`, a long
poll), and lease settlements and cache entries on a timer (`_flush_loop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
import uuid
from typing import Any

import ray
import structlog

from actors._histogram import LatencySet, Tally
from actors._idempotency import IdemRecord
from actors._kafka import make_producer
from actors._messages import CacheEntry, Finished, Job, Packed, Settlement
from actors._process import tune_process
from actors._ray import actor_by_name, named_actor
from actors._replies import ReplyStream
from actors._upstream import Outcome, Upstream
from actors.cache import cache_actor_name, shard_of
from actors.idempotency import idempotency_actor_name, idempotency_shard_of
from actors.quota import QUOTA_ACTOR_NAME
from topics.config import Config
from topics.logs import configure_logging

__all__ = ["Caller", "caller_actors"]

log = structlog.get_logger("quotaflow.caller")


class Caller:
    """Actor body. Logic of a single call lives in `Upstream`; this schedules and batches."""

    def __init__(self, config: Config, index: int) -> None:
        configure_logging(config.logging)  # each actor is a process of its own
        tune_process(config)
        self._config = config
        self.index = index
        # A new value per incarnation: an ingress that sees it change knows that the jobs
        # it had handed to this caller died with the previous one.
        self.incarnation = uuid.uuid4().hex
        # Resolved by name on first use, so a restarted caller needs no handles.
        self._quota: Any = None
        self._caches: list[Any] | None = None
        self._idem: list[Any] | None = None
        self._idem_cfg = config.resilience.idempotency
        self._upstream = Upstream(config, on_send=self._request_sent)
        # Paced calls in flight, by request id: (lease, not_before_ms).
        self._paced: dict[str, tuple[int, float]] = {}
        self._producer: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Running jobs by owner and ticket, so that a draining ingress can abort its own.
        self._running: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._aborting: set[str] = set()
        self._finished: dict[str, list[Finished]] = {}
        # Finished tickets whose idempotency records are not yet stored: released by the
        # flush that stores them, so that a resend after the offset commit is replayed.
        self._held: list[tuple[str, Finished]] = []
        self._idem_puts: list[IdemRecord] = []
        self._idem_ends: list[str] = []
        self._finished_ev: dict[str, asyncio.Event] = {}
        self._settle: list[Settlement] = []
        self._puts: list[CacheEntry] = []
        self._flush_task: asyncio.Task[None] | None = None
        self._flush_s = config.gateway.flush_ms / 1000.0
        self._late_ms = config.quota.late_report_ms
        self._late: list[tuple[int, float]] = []
        self._flush_now = asyncio.Event()
        self.calls = 0
        # For /metrics (see `stats`): terminal outcomes by (status, model); per model of
        # the successes: cost, (model, kind) tokens and latency histograms.
        self._outcomes = Tally()
        self._cost_usd: dict[str, float] = {}
        self._tokens = Tally()
        self._latency: dict[str, LatencySet] = {}

    def _peers(self) -> tuple[Any, list[Any], list[Any]]:
        if self._quota is None:
            self._quota = actor_by_name(self._config, QUOTA_ACTOR_NAME)
        if self._caches is None:
            cfg = self._config.cache
            n = cfg.shards if cfg.enabled else 0
            self._caches = [actor_by_name(self._config, cache_actor_name(i)) for i in range(n)]
        if self._idem is None:
            n = self._idem_cfg.shards if self._idem_cfg.enabled else 0
            self._idem = [actor_by_name(self._config, idempotency_actor_name(i)) for i in range(n)]
        return self._quota, self._caches, self._idem

    async def _start(self) -> None:
        if self._producer is None:
            self._producer = await make_producer(self._config, client_suffix=f"caller-{self.index}")
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_loop())

    async def warm(self) -> str:
        """Start the producer, flusher and SDK clients now: the first request pays no start-up
        (creating a client takes long enough to disturb the pacing of the first calls).

        Returns this incarnation's id."""
        await self._start()
        await self._upstream.warm(connect=self._config.gateway.warm_connections)
        return self.incarnation

    async def whoami(self) -> str:
        """This incarnation's id (cheap: no start-up)."""
        return self.incarnation

    async def submit(self, owner: str, jobs: list[Job]) -> None:
        """Start `jobs`; returns at once. Their tickets come back through `finished`."""
        await self._start()
        for job in jobs:
            task = asyncio.get_running_loop().create_task(self._run(owner, job))
            key = (owner, job.ticket)
            self._tasks.add(task)
            self._running[key] = task
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(functools.partial(self._job_done, key))

    def _job_done(self, key: tuple[str, int], _task: asyncio.Task[None]) -> None:
        self._running.pop(key, None)

    async def _run(self, owner: str, job: Job) -> None:
        req = job.request
        out = ReplyStream(
            self._producer,
            topic=job.reply_to,
            usage_topic=self._config.topics.usage,
            request_id=req.id,
            tenant=req.tenant,
            start_seq=job.start_seq,
            record=self._idem_cfg.enabled,
            kafka=self._config.kafka,
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
                if job.reset_first:
                    await out.reset("the request runs again after a gateway restart")
                outcome = await self._upstream.run(job, out)
            finally:
                self._paced.pop(req.id, None)  # the send hook did not fire: nothing left
        except asyncio.CancelledError:
            if owner not in self._aborting:
                raise
            aborted = await self._aborted(job, out, bound)
            if aborted is None:
                self._release(owner, Finished(job.ticket, "reply_failed"))
                return
            outcome = aborted
        except Exception as exc:  # noqa: BLE001 - any bug must still end the request with a reply
            bound.exception("caller_crashed")
            outcome = Outcome(status="internal", deployment=job.grant.deployment, retryable=True)
            try:
                await out.error("internal", f"gateway error: {type(exc).__name__}", retryable=True)
            except Exception:  # noqa: BLE001 - Kafka is down too, past the send retries
                # Finished all the same (as the ingress does): a reply topic that cannot
                # exist would otherwise bring the request back after every restart.
                bound.exception("terminal_reply_failed")
                self._release(owner, Finished(job.ticket, "reply_failed"))
                return
        # A failed call keeps its whole reservation: the provider may have charged it.
        # One never made (its deadline had passed) gives it all back.
        if outcome.status == "done":
            used = max(job.prompt_tokens, outcome.prompt_tokens) + outcome.completion_tokens
        else:
            used = job.grant.reserved_tokens if outcome.upstream_calls else 0
        self._settle.append(
            Settlement(
                job.grant.lease,
                used,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                observed=outcome.observed,
                deployment=job.grant.deployment,
                tenant=req.tenant,
                outcome=outcome.breaker,
                ttft_ms=outcome.upstream_ttft_ms,
                cached_tokens=outcome.cached_tokens,
            )
        )
        # A failed call reports too: requests waiting for this answer then run themselves.
        if outcome.status != "retry" and job.cache_key is not None:
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
                    failed=outcome.status != "done",
                )
            )
        bound.info(
            "request_finished", status=outcome.status, completion_tokens=outcome.completion_tokens
        )
        self._record(job, outcome)
        finished = Finished(
            job.ticket,
            outcome.status,
            upstream_calls=outcome.upstream_calls,
            next_seq=out.seq,
            retry_after_ms=outcome.retry_after_ms,
            deployment=job.grant.deployment,
        )
        if outcome.status == "retry" or out.recorded is None:
            self._release(owner, finished)
            return
        if outcome.retryable:
            self._idem_ends.append(req.id)  # a resend may succeed: run it again, not replay
        else:
            self._idem_puts.append(
                IdemRecord(request_id=req.id, replies=out.recorded, finished_ms=time.time() * 1e3)
            )
        self._held.append((owner, finished))

    def _record(self, job: Job, o: Outcome) -> None:
        """Count a terminal outcome for the metrics endpoint (a retry is none yet)."""
        if o.status == "retry":
            return
        self._outcomes.add(o.status, job.model)
        if o.status != "done":
            return
        self._cost_usd[job.model] = self._cost_usd.get(job.model, 0.0) + o.cost_usd
        self._tokens.add(job.model, "prompt", n=o.prompt_tokens)
        self._tokens.add(job.model, "completion", n=o.completion_tokens)
        if o.timing is not None:
            self._latency.setdefault(job.model, LatencySet()).observe(
                queued_ms=o.timing.queued_ms,
                ttft_ms=o.timing.ttft_ms,
                total_ms=o.timing.total_ms,
                upstream_ttft_ms=o.upstream_ttft_ms,
            )

    def _release(self, owner: str, finished: Finished) -> None:
        self._finished.setdefault(owner, []).append(finished)
        ev = self._finished_ev.get(owner)
        if ev is not None:
            ev.set()

    async def _aborted(self, job: Job, out: ReplyStream, bound: Any) -> Outcome | None:
        """The ingress is shutting down past its drain timeout: end this job with an error."""
        bound.warning("request_aborted_at_shutdown")
        try:
            if out.sent_chunks:
                await out.reset("the gateway shut down mid-stream")
            await out.error(
                "upstream_unavailable",
                "the gateway shut down before the upstream call finished; send it again",
                retryable=True,
                metadata=job.request.metadata,
                model=job.model,
                deployment=job.grant.deployment,
            )
        except Exception:  # noqa: BLE001 - Kafka is down too, past the send retries
            bound.exception("terminal_reply_failed")
            return None
        return Outcome(
            status="upstream_unavailable",
            deployment=job.grant.deployment,
            breaker="unused",
            retryable=True,
        )

    async def abort(self, owner: str) -> int:
        """End `owner`'s running jobs now with an error reply (shutdown past its drain)."""
        self._aborting.add(owner)
        tasks = [t for (o, _), t in self._running.items() if o == owner]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self._flush()
        return len(tasks)

    def _request_sent(self, request_id: str) -> None:
        """The HTTP request of a paced call is leaving now: report it (the quota actor
        treats a grant as leaving "now" until its report arrives), at once if late."""
        paced = self._paced.pop(request_id, None)
        if paced is None:
            return
        lease, not_before_ms = paced
        sent_ms = time.time() * 1000.0
        self._late.append((lease, sent_ms))
        if sent_ms - not_before_ms > self._late_ms:
            # The next grant on this deployment must count from now: say so at once,
            # not with the next flush. (A first call in a process is typically ~100 ms
            # late inside the SDK, more under load.)
            self._flush_now.set()

    async def finished(self, owner: str, timeout_s: float) -> list[Finished]:
        """Long poll: tickets whose terminal reply Kafka has acknowledged."""
        got = self._finished.pop(owner, [])
        if got:
            return Packed("finished", got)
        ev = self._finished_ev.setdefault(owner, asyncio.Event())
        ev.clear()
        try:
            await asyncio.wait_for(ev.wait(), timeout_s)
        except TimeoutError:
            return []
        return Packed("finished", self._finished.pop(owner, []))

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_now.wait(), self._flush_s)
            self._flush_now.clear()
            try:
                await self._flush()
            except Exception:  # the loop must outlive any one flush (it is logged)
                log.exception("flush_loop_error")

    async def _flush(self) -> None:
        settle, self._settle = self._settle, []
        puts, self._puts = self._puts, []
        late, self._late = self._late, []
        held, self._held = self._held, []
        idem_puts, self._idem_puts = self._idem_puts, []
        idem_ends, self._idem_ends = self._idem_ends, []
        if held:
            if await self._store_results(idem_puts, idem_ends):
                for owner, finished in held:
                    self._release(owner, finished)
            else:
                # Kafka is away: the next flush tries again. The tickets are held until
                # then, so their offsets stay uncommitted and a resend finds the result.
                self._held[:0] = held
                self._idem_puts[:0] = idem_puts
                self._idem_ends[:0] = idem_ends
        if not settle and not puts and not late:
            return
        try:
            quota, caches, _ = self._peers()
            calls = []
            if late:
                calls.append(quota.sent_late.remote(late))
            if settle:
                calls.append(quota.settle.remote(Packed("settlement", settle)))
            if puts and caches:
                by_shard: dict[int, list[CacheEntry]] = {}
                for e in puts:
                    by_shard.setdefault(shard_of(e.key, len(caches)), []).append(e)
                calls.extend(
                    caches[i].put_many.remote(Packed("cache_entry", batch))
                    for i, batch in by_shard.items()
                )
            await asyncio.gather(*calls)
        except (ray.exceptions.RayActorError, ValueError):
            # The quota or a cache actor is restarting; a lost settlement only keeps a
            # reservation until its window entry expires: conservative, never over.
            log.warning("flush_failed", settlements=len(settle), cache_puts=len(puts))

    async def _store_results(self, puts: list[IdemRecord], ends: list[str]) -> bool:
        """Results to the idempotency store, durable before their tickets count as finished.
        False when the store could not write them (Kafka away): try again later."""
        try:
            _, _, shards = self._peers()
            if not shards:
                return True
            calls: list[Any] = []
            by_shard: dict[int, list[IdemRecord]] = {}
            for r in puts:
                by_shard.setdefault(idempotency_shard_of(r.request_id, len(shards)), []).append(r)
            calls.extend(
                shards[i].put_many.remote(Packed("idem_record", batch))
                for i, batch in by_shard.items()
            )
            ends_by: dict[int, list[str]] = {}
            for rid in ends:
                ends_by.setdefault(idempotency_shard_of(rid, len(shards)), []).append(rid)
            calls.extend(shards[i].end_many.remote(batch) for i, batch in ends_by.items())
            await asyncio.gather(*calls)
        except (ray.exceptions.RayActorError, ValueError):
            # The store is restarting: these results cannot be replayed to a resend, which
            # then runs again. Their answers are on the reply topic all the same.
            log.warning("idempotency_store_failed", results=len(puts), ended=len(ends))
        except ray.exceptions.RayTaskError as exc:
            log.warning(
                "idempotency_store_retry", results=len(puts), ended=len(ends), error=repr(exc)
            )
            return False
        return True

    async def stats(self) -> dict[str, Any]:
        """Counters since this incarnation started; `requests`: ((status, model), n) pairs,
        `tokens`: ((model, kind), n) pairs, `latency`: per model, `LatencySet.snapshot()`."""
        return {
            "caller": self.index,
            "in_flight": len(self._tasks),
            "calls": self.calls,
            "incarnation": self.incarnation,
            "pid": os.getpid(),
            "requests": self._outcomes.rows(),
            "cost_usd": dict(self._cost_usd),
            "tokens": self._tokens.rows(),
            "latency": {model: s.snapshot() for model, s in self._latency.items()},
        }

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
