"""Packed batches (actors/_messages.py): one msgpack blob across Ray, the same list after."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import ray.cloudpickle

from actors._idempotency import IdemClaim, IdemClaimed
from actors._messages import (
    Ask,
    Finished,
    Grant,
    Job,
    Packed,
    Queued,
    Refusal,
    Route,
    RouteAsk,
    Settlement,
)
from topics.wire import Request

GRANT = Grant(ticket=3, deployment="d1", lease=9, reserved_tokens=40, queued_ms=1.5)
REQUEST = Request(
    id="r-1", request={"model": "fast", "messages": [{"role": "user", "content": "hi"}]}
)

BATCHES: list[tuple[str, list[Any]]] = [
    ("ask", [Ask(1, "ingress-a", "t", 5, None, ("d1", "d2"), 20, 16, fallback=("d3",))]),
    ("decision", [GRANT, Refusal(4, "request_too_large", "too big"), Queued(5)]),
    ("settlement", [Settlement(9, 30, 10, 20, deployment="d1")]),
    ("route_ask", [RouteAsk(1, "auto", "t", messages=[{"role": "user", "content": "x"}])]),
    ("route", [Route(1, "fast", ("d1",), served=("fast",)), Route(2, None, error="internal")]),
    ("job", [Job(3, REQUEST, "replies", "fast", GRANT, 12, 1.0e12, None, served={"d1": "fast"})]),
    ("finished", [Finished(3, "retry", 1, next_seq=4, retry_after_ms=100, deployment="d1")]),
    ("idem_claim", [IdemClaim(1, "r-1", "replies", "t")]),
    ("idem_claimed", [IdemClaimed(1, "new", 1_000_000, True)]),
]


@pytest.mark.parametrize(("kind", "items"), BATCHES, ids=[k for k, _ in BATCHES])
def test_a_batch_comes_back_equal_through_rays_pickler(kind: str, items: list[Any]) -> None:
    back = pickle.loads(ray.cloudpickle.dumps(Packed(kind, items)))  # type: ignore[no-untyped-call]
    assert isinstance(back, Packed)
    assert back.kind == kind
    assert list(back) == items
    assert [type(x) for x in back] == [type(x) for x in items]


def test_a_batch_pickles_as_one_blob_not_per_struct() -> None:
    items = [Ask(i, "ingress-a", "t", 5, None, ("d1",), 20, 16) for i in range(100)]
    _reducer, (kind, blob) = Packed("ask", items).__reduce__()
    assert kind == "ask"
    assert isinstance(blob, bytes)


def test_a_body_msgpack_cannot_hold_still_crosses() -> None:
    # JSON allows integers past 64 bits; a request body is the user's.
    body = {"model": "fast", "messages": [], "seed": 2**70, "metadata": {"n": -(2**65)}}
    job = Job(3, Request(id="r-big", request=body), "replies", "fast", GRANT, 12, 1.0, None)
    back = pickle.loads(ray.cloudpickle.dumps(Packed("job", [job])))  # type: ignore[no-untyped-call]
    assert isinstance(back, Packed)
    assert back.kind == "job"
    assert list(back) == [job]


def test_an_unknown_kind_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'nope'"):
        Packed("nope", [])
