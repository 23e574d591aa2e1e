"""QuotaBook and SlidingWindow: admission, queueing, refunds, refusals (no Ray, fake clocks)."""

from __future__ import annotations

from typing import Any

import pytest

from actors._messages import Ask, Grant, Queued, Refusal, Settlement
from actors._quota_book import QuotaBook
from actors._windows import SlidingWindow
from topics.config import Config, parse_config


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _config(limits: dict[str, int], *, margin_ms: int = 0, deployments: int = 1) -> Config:
    return parse_config(
        {
            "deployments": [
                {
                    "name": f"d{i}",
                    "base_url": "http://127.0.0.1:1/v1",
                    "api_key_env": "K",
                    "model": "m",
                    "limits": limits,
                }
                for i in range(deployments)
            ],
            "models": [{"name": "fast", "deployments": [f"d{i}" for i in range(deployments)]}],
            "quota": {"window_margin_ms": margin_ms},
        }
    )


def _ask(ticket: int, *, tokens: int = 10, prompt: int = 5, prio: int = 5, **kw: Any) -> Ask:
    return Ask(
        ticket=ticket,
        owner="o",
        tenant=kw.get("tenant", "t"),
        priority=prio,
        deadline_ms=kw.get("deadline_ms"),
        candidates=kw.get("candidates", ("d0",)),
        prompt_tokens=prompt,
        max_tokens=tokens - prompt,
    )


def test_window_expires_after_span_and_adjusts() -> None:
    w = SlidingWindow(limit=10, span_s=60.0)
    e = w.add(8, now=0.0)
    assert not w.fits(3, now=1.0)
    w.adjust(e, 2, now=1.0)  # real usage was lower: the difference is free again
    assert w.fits(8, now=1.0)
    w.add(8, now=5.0)
    assert w.free_at(1, now=6.0) == 60.0  # when the first (adjusted) entry expires
    assert w.free_at(3, now=6.0) == 65.0  # needs the second one gone too
    assert w.free_at(11, now=6.0) is None  # larger than the limit: never
    assert w.used(now=60.0) == 8
    assert w.used(now=65.0) == 0


def test_rpm_limit_grants_then_queues_and_admits_when_window_frees() -> None:
    clock = FakeClock()
    book = QuotaBook(_config({"rpm": 3}), clock=clock, wall_ms=lambda: 0.0)
    decisions = book.submit([_ask(i) for i in range(5)])
    assert [type(d) for d in decisions] == [Grant, Grant, Grant, Queued, Queued]
    clock.now += 59.0
    assert book.admit_waiting() == 0
    assert book.next_wake() == pytest.approx(1060.0)
    clock.now += 1.0
    assert book.admit_waiting() == 2
    assert sorted(g.ticket for g in book.take("o")) == [3, 4]


def test_tpm_reserves_max_tokens_and_settle_refunds_the_unused_part() -> None:
    clock = FakeClock()
    book = QuotaBook(_config({"tpm": 100}), clock=clock, wall_ms=lambda: 0.0)
    first = book.submit([_ask(1, tokens=80, prompt=10)])[0]
    assert isinstance(first, Grant)
    assert first.reserved_tokens == 80
    assert isinstance(book.submit([_ask(2, tokens=50)])[0], Queued)
    book.settle([Settlement(first.lease, used_tokens=30)])  # 10 prompt + 20 generated
    assert book.admit_waiting() == 1
    assert [g.ticket for g in book.take("o")] == [2]


def test_queue_order_is_priority_first() -> None:
    clock = FakeClock()
    book = QuotaBook(_config({"rpm": 1}), clock=clock, wall_ms=lambda: 0.0)
    book.submit([_ask(1)])
    book.submit([_ask(2, prio=9), _ask(3, prio=0)])
    clock.now += 61.0
    assert book.admit_waiting() == 1
    assert [g.ticket for g in book.take("o")] == [3]


def test_request_larger_than_every_tpm_is_refused_at_once() -> None:
    book = QuotaBook(_config({"tpm": 100}, deployments=2), wall_ms=lambda: 0.0)
    d = book.submit([_ask(1, tokens=101, candidates=("d0", "d1"))])[0]
    assert isinstance(d, Refusal)
    assert d.code == "request_too_large"
    assert "101" in d.message
    assert "100" in d.message


def test_passed_deadline_is_refused() -> None:
    book = QuotaBook(_config({"rpm": 5}), wall_ms=lambda: 10_000.0)
    d = book.submit([_ask(1, deadline_ms=9_999)])[0]
    assert isinstance(d, Refusal)
    assert d.code == "deadline_exceeded"


def test_pool_spreads_to_the_deployment_with_room() -> None:
    book = QuotaBook(_config({"rpm": 2}, deployments=2), wall_ms=lambda: 0.0)
    grants = book.submit([_ask(i, candidates=("d0", "d1")) for i in range(4)])
    assert [g.deployment for g in grants if isinstance(g, Grant)] == ["d0", "d0", "d1", "d1"]
    assert book.headroom() == {"d0": 0.0, "d1": 0.0}


def test_max_concurrency_is_freed_by_settle() -> None:
    book = QuotaBook(_config({"max_concurrency": 1}), wall_ms=lambda: 0.0)
    first, second = book.submit([_ask(1), _ask(2)])
    assert isinstance(first, Grant)
    assert isinstance(second, Queued)
    book.settle([Settlement(first.lease, 10)])
    assert book.admit_waiting() == 1


def test_margin_keeps_entries_past_sixty_seconds() -> None:
    clock = FakeClock()
    book = QuotaBook(_config({"rpm": 1}, margin_ms=500), clock=clock, wall_ms=lambda: 0.0)
    book.submit([_ask(1)])
    clock.now += 60.2
    assert isinstance(book.submit([_ask(2)])[0], Queued)
    clock.now += 0.3
    assert book.admit_waiting() == 1


def test_snapshot_reports_use_limit_and_queue() -> None:
    book = QuotaBook(_config({"rpm": 1, "tpm": 1000}), wall_ms=lambda: 0.0)
    book.submit([_ask(1), _ask(2, tenant="heavy")])
    snap = book.snapshot()
    dep = snap["deployments"]["d0"]  # type: ignore[index]
    assert dep["rpm"]["used"] == 1
    assert dep["rpm"]["limit"] == 1
    assert snap["queue_by_tenant"] == {"heavy": 1}
