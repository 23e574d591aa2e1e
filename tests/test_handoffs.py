"""Hand-offs between actors that fail while Kafka or a peer is away: answered or retried.

Unit tests with fake actor handles (the real path is covered end to end elsewhere). The
ingress: a caller whose `submit` raises (it could not start its producer, the batch could
not be sent) must leave no request silent and no lease held; a caller that died is left
to the restart path, which re-runs what was dispatched to it. A caller: finished tickets
whose results the idempotency store could not write are held and stored again later.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import ray
from aiokafka.errors import KafkaTimeoutError
from aiokafka.structs import TopicPartition

from actors._idempotency import IdemRecord
from actors._messages import Finished, Grant, Job, Packed
from actors.caller import Caller
from pipeline.gateway import Actors, Gateway, _Pending
from tests.test_cache import BASE, FakeProducer, _req
from topics.config import parse_config
from topics.wire import ErrorReply


class _Remote:
    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def remote(self, *args: Any) -> Any:
        return asyncio.ensure_future(self._fn(*args))


class _Caller:
    def __init__(self, error: BaseException | None) -> None:
        self._error = error
        self.jobs: list[Job] = []
        self.submit = _Remote(self._submit)

    async def _submit(self, _owner: str, jobs: Packed[Job]) -> None:
        if self._error is not None:
            raise self._error
        self.jobs.extend(jobs)


class _Quota:
    def __init__(self) -> None:
        self.settled: list[Any] = []
        self.settle = _Remote(self._settle)

    async def _settle(self, settlements: Packed[Any]) -> None:
        self.settled.extend(settlements)


def _gateway(callers: list[_Caller]) -> tuple[Gateway, _Quota, FakeProducer]:
    config = parse_config({**BASE, "topics": {"responses": "replies"}})
    quota = _Quota()
    gw = Gateway(config, Actors(quota=quota, caches=[], selectors=[], callers=callers))
    producer = FakeProducer()
    gw._producer = producer
    return gw, quota, producer


def _jobs(gw: Gateway, n: int) -> list[Job]:
    jobs = []
    for t in range(1, n + 1):
        req = _req(rid=f"r{t}")
        gw._pending[t] = _Pending(TopicPartition("llm.requests", 0), t, req, "replies", 0.0)
        grant = Grant(ticket=t, deployment="a", lease=100 + t, reserved_tokens=9, queued_ms=0.0)
        jobs.append(Job(t, req, "replies", "fast", grant, 5, 0.0, None))
    return jobs


async def test_a_failed_hand_off_returns_the_leases_and_answers_every_request() -> None:
    callers = [_Caller(RuntimeError("producer could not start")), _Caller(None)]
    gw, quota, producer = _gateway(callers)
    jobs = _jobs(gw, 4)
    await gw._dispatch(jobs)
    taken = {j.ticket for j in callers[1].jobs}
    refused = {j.ticket for j in jobs} - taken
    assert taken
    assert refused
    # The refused ones: lease back unused, a retryable error each, and no longer in flight.
    assert sorted(s.lease for s in quota.settled) == sorted(100 + t for t in refused)
    assert {s.outcome for s in quota.settled} == {"unused"}
    for t in refused:
        (reply,) = producer.replies(f"r{t}")
        assert isinstance(reply, ErrorReply)
        assert reply.error.code == "internal"
        assert reply.error.retryable
        assert t not in gw._pending
    # The taken ones stay the caller's.
    assert all(gw._pending[t].caller == 1 for t in taken)
    assert gw._dispatched == taken
    assert gw.stats.dispatched == len(taken)


async def test_a_dead_caller_keeps_its_jobs_for_the_restart_path() -> None:
    dead = ray.exceptions.RayActorError()
    gw, quota, producer = _gateway([_Caller(dead)])
    jobs = _jobs(gw, 2)
    await gw._dispatch(jobs)
    # `_caller_lost` re-runs them once the caller is back: nothing answered meanwhile.
    assert gw._dispatched == {1, 2}
    assert quota.settled == []
    assert producer.sent == []


# -- a caller's flush while the idempotency store cannot write ---------------------------


class _Shard:
    """An idempotency shard whose first `failures` writes fail as Kafka being away does."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.stored: list[str] = []
        self.put_many = _Remote(self._put_many)
        self.end_many = _Remote(self._end_many)

    async def _put_many(self, records: Packed[Any]) -> None:
        if self.failures:
            self.failures -= 1
            raise ray.exceptions.RayTaskError("put_many", "", KafkaTimeoutError())  # type: ignore[no-untyped-call]
        self.stored.extend(r.request_id for r in records)

    async def _end_many(self, ids: list[str]) -> None:
        self.stored.extend(ids)


async def test_a_caller_holds_finished_tickets_until_their_results_are_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KA", "sk-test")
    config = parse_config({**BASE, "resilience": {"idempotency": {"shards": 1}}})
    caller = Caller(config, 0)
    shard = _Shard(failures=2)
    caller._quota, caller._caches, caller._idem = _Quota(), [], [shard]
    finished = Finished(7, "done", next_seq=3)
    caller._held.append(("ing", finished))
    caller._idem_puts.append(IdemRecord(request_id="r7", replies=[b"{}"], finished_ms=0.0))
    for _ in range(2):  # the store fails twice: nothing is released, nothing dropped
        await caller._flush()
        assert caller._finished.get("ing", []) == []
        assert shard.stored == []
    await caller._flush()
    assert shard.stored == ["r7"]
    assert caller._finished["ing"] == [finished]
    assert caller._held == []
    assert caller._idem_puts == []
