"""QuotaBook and SlidingWindow: admission, queueing, refunds, refusals (no Ray, fake clocks)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors._messages import Ask, Grant, Observation, Queued, Refusal, Settlement
from actors._quota_book import QuotaBook
from actors._windows import SlidingWindow
from topics.config import Config, parse_config


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _config(
    limits: dict[str, Any],
    *,
    margin_ms: int = 0,
    deployments: int = 1,
    tenants: list[dict[str, Any]] | None = None,
    price: dict[str, float] | None = None,
    pace_ms: int = 0,
) -> Config:
    limits = {"quantize_per_second": False, **limits}
    return parse_config(
        {
            "tenants": tenants or [],
            "deployments": [
                {
                    "name": f"d{i}",
                    "base_url": "http://127.0.0.1:1/v1",
                    "api_key_env": "K",
                    "model": "m",
                    "limits": limits,
                    "price": price or {},
                }
                for i in range(deployments)
            ],
            "models": [{"name": "fast", "deployments": [f"d{i}" for i in range(deployments)]}],
            "quota": {
                "window_margin_ms": margin_ms,
                "second_margin_ms": 0,
                "quantized_pace_ms": pace_ms,
            },
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
    w.adjust(e, -6, now=1.0)  # real usage was 2, not 8: the difference is free again
    assert w.fits(8, now=1.0)
    w.add(8, now=5.0)
    assert w.free_at(1, now=6.0) == 60.0  # when the first (adjusted) entry expires
    assert w.free_at(3, now=6.0) == 65.0  # needs the second one gone too
    assert w.free_at(11, now=6.0) is None  # larger than the limit: never
    assert w.used(now=60.0) == 8
    assert w.used(now=65.0) == 0


def _dump_from_scratch(w: SlidingWindow, now: float) -> list[tuple[float, float]]:
    """(expiry, amount) of every live entry, summed by nothing: what `dump` must cover."""
    return [(e.expires_at, e.amount) for e in w._entries if e.amount]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "hold", "adjust", "postpone", "expire_at", "wait"]),
            st.integers(min_value=0, max_value=50),
            st.sampled_from([0.0, 0.0, 0.7, 1.3, 3.0]),
        ),
        max_size=60,
    ),
    st.sampled_from([(0.0, False), (0.5, False), (0.0, True)]),
)
def test_dump_sums_stay_right_through_every_change(
    ops: list[tuple[str, int, float]], shape: tuple[float, bool]
) -> None:
    """The per-step sums kept as entries change give what summing the entries would: each
    entry's amount at or after its own expiry, within one step, nothing lost or doubled.
    Steps of 0 add at one instant, which merging windows share in one entry."""
    bucket_s, merge = shape
    w = SlidingWindow(limit=10_000, span_s=2.0, bucket_s=bucket_s, merge=merge)
    now = 0.0
    entries = []
    for op, n, dt in ops:
        now += dt / 4
        if op == "add":
            entries.append(w.add(n, now))
        elif op == "hold":
            entries.append(w.add(n, now, hold_s=dt))
        elif entries and op == "adjust":
            w.adjust(entries[n % len(entries)], n - 25, now)
        elif entries and op == "postpone":
            w.postpone(entries[n % len(entries)], dt, now)
        elif entries and op == "expire_at":
            w.expire_at(entries[n % len(entries)], now + dt - 1.0, now)
        dumped = w.dump(now)
        live = _dump_from_scratch(w, now)
        assert sum(a for _, a in dumped) == sum(a for _, a in live) == w.used(now)
        # Every entry's amount is dumped at a ttl no earlier than its own, within a step.
        for expires_at, amount in live:
            ttl = expires_at - now
            assert any(ttl - 1e-9 <= t <= ttl + 0.1 + 1e-9 and a >= amount for t, a in dumped)


def test_admissions_of_one_instant_share_an_entry_that_never_expires_early() -> None:
    """A merging window keeps one entry per instant; a restored entry that expires sooner
    is not shared, or the new admissions would leave the window with it."""
    w = SlidingWindow(limit=100, span_s=60.0, merge=True)
    w.restore([(5.0, 10)], now=0.0)  # from a checkpoint: expires at 5 s
    a = w.add(3, now=0.0)
    b = w.add(4, now=0.0)
    later = w.add(1, now=0.5)
    assert a is b
    assert later is not a
    assert w.used(now=5.0) == 8  # the restored 10 are gone, the new 3 + 4 + 1 are not
    assert w.used(now=59.9) == 8
    assert w.used(now=60.0) == 1
    assert w.used(now=60.5) == 0


def test_a_shared_entry_is_postponed_by_its_latest_delay_not_by_their_sum() -> None:
    w = SlidingWindow(limit=100, span_s=60.0, merge=True)
    a = w.add(3, now=0.0)
    w.add(4, now=0.0)
    w.postpone(a, 2.0, now=1.0)  # one admission of the instant left 2 s late ...
    w.postpone(a, 3.0, now=1.0)  # ... another 3 s late
    w.postpone(a, 1.0, now=1.0)  # ... a third 1 s late: moves nothing
    assert w.used(now=62.9) == 7
    assert w.used(now=63.0) == 0


def test_held_entries_are_never_shared() -> None:
    """Entries added with a hold (the quantized 1 s windows) are later moved one by one:
    releasing one must not release another granted at the same instant."""
    w = SlidingWindow(limit=10, span_s=1.0, merge=True)
    a = w.add(1, now=0.0, hold_s=0.5)
    b = w.add(1, now=0.0, hold_s=0.5)
    assert a is not b
    assert w.used(now=1.4) == 2  # held: span 1 s + hold 0.5 s
    w.expire_at(a, 0.2, now=0.1)
    assert w.used(now=0.3) == 1
    assert w.used(now=1.5) == 0


def test_a_lone_tenant_is_granted_a_whole_batch_in_order() -> None:
    """Alone at its priority a tenant keeps the turn; the batch is granted in its order and
    what does not fit waits, as with many tenants."""
    clock = FakeClock()
    book = QuotaBook(
        _config({"rpm": 4, "quantize_per_second": False}), clock=clock, wall_ms=lambda: 0.0
    )
    decisions = book.submit([_ask(i) for i in range(6)])
    assert [type(d) for d in decisions] == [Grant] * 4 + [Queued] * 2
    assert [d.ticket for d in decisions if isinstance(d, Grant)] == [0, 1, 2, 3]


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


def _granted(decisions: list[Any]) -> list[int]:
    return [d.ticket for d in decisions if isinstance(d, Grant)]


def test_weighted_fair_queuing_between_tenants() -> None:
    """A flooding tenant cannot starve a light one: grants alternate by virtual time."""
    clock = FakeClock()
    book = QuotaBook(_config({"rpm": 1}), clock=clock, wall_ms=lambda: 0.0)
    book.submit([_ask(0, tenant="heavy")])  # takes the only slot of this minute
    book.submit([_ask(i, tenant="heavy") for i in range(1, 21)])
    book.submit([_ask(100, tenant="light"), _ask(101, tenant="light")])
    order = []
    for _ in range(4):
        clock.now += 61.0
        book.admit_waiting()
        order.extend(g.ticket for g in book.take("o"))
    # Equal weights and equal sizes: the light tenant gets every other slot.
    assert order == [100, 1, 101, 2] or order == [1, 100, 2, 101]


def test_weights_share_capacity_proportionally() -> None:
    clock = FakeClock()
    tenants = [{"name": "gold", "weight": 3.0}, {"name": "free", "weight": 1.0}]
    book = QuotaBook(_config({"rpm": 1}, tenants=tenants), clock=clock, wall_ms=lambda: 0.0)
    book.submit([_ask(0, tenant="free")])
    book.submit([_ask(i, tenant="gold") for i in range(1, 40)])
    book.submit([_ask(i, tenant="free") for i in range(100, 140)])
    got = {"gold": 0, "free": 0}
    for _ in range(24):
        clock.now += 61.0
        book.admit_waiting()
        for g in book.take("o"):
            got["gold" if g.ticket < 100 else "free"] += 1
    assert got["gold"] == 3 * got["free"]


def test_large_head_is_not_starved_by_small_asks() -> None:
    clock = FakeClock()
    book = QuotaBook(_config({"tpm": 100}), clock=clock, wall_ms=lambda: 0.0)
    first = book.submit([_ask(1, tokens=60)])[0]
    assert isinstance(first, Grant)
    big = book.submit([_ask(2, tokens=90, tenant="big")])[0]
    assert isinstance(big, Queued)
    # Small asks from another tenant would fit the 40 left, but the head reserves its room.
    assert _granted(book.submit([_ask(3, tokens=30, tenant="small")])) == []
    clock.now += 61.0
    book.admit_waiting()
    assert next(g.ticket for g in book.take("o")) == 2


def test_per_second_quantization_spreads_a_burst() -> None:
    clock = FakeClock()
    book = QuotaBook(
        _config({"rpm": 120, "quantize_per_second": True}), clock=clock, wall_ms=lambda: 0.0
    )
    grants = [d for d in book.submit([_ask(i) for i in range(10)]) if isinstance(d, Grant)]
    assert len(grants) == 2  # ceil(120/60) per s
    clock.now += 1.0
    # Their second holds until the caller says when they left ...
    assert book.admit_waiting() == 0
    # ... on time: the next second is free.
    book.sent_late([(g.lease, g.not_before_ms or 0.0) for g in grants])
    assert book.admit_waiting() == 2


def test_tenant_daily_budget_refuses_what_can_never_fit_and_waits_for_refunds() -> None:
    tenants = [{"name": "t", "daily_tokens": 100}]
    book = QuotaBook(_config({}, tenants=tenants), wall_ms=lambda: 0.0)
    g = book.submit([_ask(1, tokens=80)])[0]
    assert isinstance(g, Grant)
    assert isinstance(book.submit([_ask(2, tokens=30)])[0], Queued)  # 80 reserved in flight
    book.settle([Settlement(g.lease, used_tokens=20)])
    assert book.admit_waiting() == 1
    assert _granted(book.take("o")) == [2]
    # used 20 + 30 in flight + 60 > 100: waits for the in-flight one to settle.
    assert isinstance(book.submit([_ask(3, tokens=60)])[0], Queued)
    too_much = book.submit([_ask(4, tokens=81)])[0]
    assert isinstance(too_much, Refusal)
    assert too_much.code == "quota_exceeded"
    assert "daily token budget" in too_much.message


def test_only_tenants_with_a_budget_are_written_through_on_settlement() -> None:
    tenants = [{"name": "budgeted", "daily_tokens": 1000}, {"name": "free"}]
    book = QuotaBook(_config({}, tenants=tenants), wall_ms=lambda: 0.0)
    grants = book.submit([_ask(1, tenant="budgeted"), _ask(2, tenant="free")])
    leases = [g.lease for g in grants if isinstance(g, Grant)]
    assert len(leases) == 2
    touched = book.settle([Settlement(lease, used_tokens=10) for lease in leases])
    assert touched == {"budgeted"}


def test_monthly_spend_budget_and_alerts() -> None:
    tenants = [{"name": "t", "monthly_budget_usd": 1.0}]
    price = {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}  # $0.001 a token
    book = QuotaBook(_config({}, tenants=tenants, price=price), wall_ms=lambda: 0.0)
    g = book.submit([_ask(1, tokens=900, prompt=100)])[0]
    assert isinstance(g, Grant)
    book.settle([Settlement(g.lease, 850, prompt_tokens=100, completion_tokens=750)])
    events = book.drain_events()
    assert [(e["budget"], e["ratio"]) for e in events] == [("monthly_usd", 0.8)]
    refused = book.submit([_ask(2, tokens=200, prompt=10)])[0]
    assert isinstance(refused, Refusal)
    assert refused.code == "quota_exceeded"
    assert "monthly budget" in refused.message


def test_daily_spend_budget_refuses_and_resets_with_the_utc_day() -> None:
    tenants = [{"name": "t", "daily_budget_usd": 0.5}]
    price = {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}  # $0.001 a token
    wall = [0.0]
    book = QuotaBook(_config({}, tenants=tenants, price=price), wall_ms=lambda: wall[0])
    g = book.submit([_ask(1, tokens=400, prompt=100)])[0]
    assert isinstance(g, Grant)
    book.settle([Settlement(g.lease, 400, prompt_tokens=100, completion_tokens=300)])
    refused = book.submit([_ask(2, tokens=200, prompt=10)])[0]  # $0.4 + up to $0.2 > $0.5
    assert isinstance(refused, Refusal)
    assert refused.code == "quota_exceeded"
    assert "daily budget" in refused.message
    assert "$0.4000" in refused.message
    assert book.snapshot()["tenants"]["t"]["day_used_usd"] == 0.4
    wall[0] = 86_400_000.0  # the next UTC day
    assert isinstance(book.submit([_ask(3, tokens=200, prompt=10)])[0], Grant)


def test_prompt_cache_hits_are_priced_at_the_cached_input_rate() -> None:
    from actors._replies import cost_usd
    from topics.config import Price

    price = Price(input_per_mtok=2.0, output_per_mtok=8.0, cached_input_per_mtok=0.5)
    full = cost_usd(price, 1000, 100)
    cached = cost_usd(price, 1000, 100, cached_tokens=600)
    assert full == (1000 * 2.0 + 100 * 8.0) / 1e6
    assert cached == (400 * 2.0 + 600 * 0.5 + 100 * 8.0) / 1e6
    # Without a cached price, cached tokens cost the full input price.
    assert cost_usd(Price(input_per_mtok=2.0), 1000, 0, cached_tokens=600) == 1000 * 2.0 / 1e6


def test_deadline_that_the_limits_cannot_meet_is_refused_at_once() -> None:
    clock = FakeClock()
    book = QuotaBook(_config({"rpm": 1}), clock=clock, wall_ms=lambda: 1_000_000.0)
    book.submit([_ask(1)])
    late = book.submit([_ask(2, deadline_ms=1_000_000 + 5_000)])[0]
    assert isinstance(late, Refusal)
    assert late.code == "deadline_exceeded"
    assert "earliest" in late.message
    ok = book.submit([_ask(3, deadline_ms=1_000_000 + 120_000)])[0]
    assert isinstance(ok, Queued)


def test_queued_ask_whose_deadline_passes_is_answered() -> None:
    wall = [0.0]
    clock = FakeClock()
    book = QuotaBook(_config({"rpm": 1}), clock=clock, wall_ms=lambda: wall[0])
    book.submit([_ask(1)])
    assert isinstance(book.submit([_ask(2, deadline_ms=70_000)])[0], Queued)
    book.submit([_ask(3)])
    wall[0] = 70_001.0
    book.admit_waiting()
    decided = book.take("o")
    assert any(isinstance(d, Refusal) and d.ticket == 2 for d in decided)


def test_many_deadlines_passing_at_once_leave_the_rest_queued_in_order() -> None:
    wall = [0.0]
    clock = FakeClock()
    book = QuotaBook(
        _config({"rpm": 1, "quantize_per_second": False}), clock=clock, wall_ms=lambda: wall[0]
    )
    assert isinstance(book.submit([_ask(0)])[0], Grant)
    asks = [_ask(i, deadline_ms=70_000 if i % 2 == 0 else None) for i in range(1, 11)]
    assert all(isinstance(d, Queued) for d in book.submit(asks))
    wall[0] = 70_001.0
    book.admit_waiting()
    refused = sorted(d.ticket for d in book.take("o") if isinstance(d, Refusal))
    assert refused == [2, 4, 6, 8, 10]
    assert book.queue_depth == 5
    assert book.snapshot()["queue_by_tenant"] == {"t": 5}
    granted = []
    for _ in range(5):
        clock.now += 61.0
        book.admit_waiting()
        granted += [d.ticket for d in book.take("o") if isinstance(d, Grant)]
    assert granted == [1, 3, 5, 7, 9]
    assert book.queue_depth == 0


def test_429_freezes_the_deployment_and_headers_only_tighten() -> None:
    clock = FakeClock()
    book = QuotaBook(_config({"rpm": 10}, deployments=2), clock=clock, wall_ms=lambda: 0.0)
    g = book.submit([_ask(1, candidates=("d0", "d1"))])[0]
    assert isinstance(g, Grant)
    assert g.deployment == "d0"
    book.settle(
        [
            Settlement(
                g.lease, 10, observed=Observation(refused="rate_limited", retry_after_ms=2_000)
            )
        ]
    )
    assert book.upstream_429s == 1
    assert [
        d.deployment
        for d in book.submit([_ask(2, candidates=("d0", "d1"))])
        if isinstance(d, Grant)
    ] == ["d1"]
    clock.now += 2.0
    # The provider says the key has 2 requests left: someone else uses 6 of our 10.
    g3 = book.submit([_ask(3)])[0]
    assert isinstance(g3, Grant)
    book.settle(
        [
            Settlement(
                g3.lease,
                10,
                observed=Observation(
                    limit_requests=50, remaining_requests=2, reset_requests_s=30.0
                ),
            )
        ]
    )
    dep = book.deployments["d0"]
    assert dep.rpm is not None
    assert dep.rpm.limit == 10  # a higher provider limit never loosens the configured one
    assert dep.rpm.remaining(clock.now) == 2  # as the provider says: 2 ours + 6 foreign
    clock.now += 31.0
    assert dep.rpm.remaining(clock.now) == 8


def test_insufficient_quota_marks_the_deployment_exhausted() -> None:
    book = QuotaBook(_config({"rpm": 10}), wall_ms=lambda: 0.0)
    g = book.submit([_ask(1)])[0]
    assert isinstance(g, Grant)
    book.settle([Settlement(g.lease, 10, observed=Observation(refused="exhausted"))])
    d = book.submit([_ask(2)])[0]
    assert isinstance(d, Refusal)
    assert d.code == "upstream_unavailable"
    assert "insufficient_quota" in d.message


def test_settlements_of_unknown_leases_are_ignored() -> None:
    book = QuotaBook(_config({"rpm": 10}), wall_ms=lambda: 0.0)
    book.settle([Settlement(12345, 10)])
    assert book.snapshot()["leases"] == 0


def test_restart_from_checkpoint_never_starts_fuller_than_it_was() -> None:
    clock = FakeClock()
    wall = [1_000_000.0]
    cfg = _config(
        {"rpm": 60, "quantize_per_second": True}, tenants=[{"name": "t", "daily_tokens": 1000}]
    )
    book = QuotaBook(cfg, clock=clock, wall_ms=lambda: wall[0])
    grants = []
    for _ in range(5):  # one per second, as the quantized window allows
        grants += [g for g in book.submit([_ask(len(grants) + 1)]) if isinstance(g, Grant)]
        book.sent_late([(grants[-1].lease, wall[0])])  # the caller: it left on time
        clock.now += 1.0
    book.settle([Settlement(grants[0].lease, 8, prompt_tokens=5, completion_tokens=3)])
    saved = json.loads(json.dumps(book.checkpoint()))  # what the topic would hold

    wall[0] += 3_000.0  # restarted three seconds later, on a different monotonic clock
    fresh_clock = FakeClock()
    fresh_clock.now = 50.0
    revived = QuotaBook(cfg, clock=fresh_clock, wall_ms=lambda: wall[0])
    revived.restore(saved)
    dep = revived.deployments["d0"]
    assert dep.rpm is not None
    # 5 known grants, plus what 3 s (+1 s window) could have hidden at 1/s.
    assert dep.rpm.used(fresh_clock.now) == 5 + 4
    assert dep.in_flight == 4  # the four unsettled calls may still be running
    tenant = revived.tenant("t")
    assert tenant.day_used == 8 + 4 * 10  # settled use + in-flight reservations as spent
    # Settling a lease of the old incarnation frees its concurrency slot only.
    revived.settle([Settlement(grants[1].lease, 10, deployment="d0")])
    assert dep.in_flight == 3
    assert tenant.day_used == 48


def test_checkpoint_with_changed_limits_holds_the_whole_window() -> None:
    clock = FakeClock()
    book = QuotaBook(_config({"rpm": 10}), clock=clock, wall_ms=lambda: 0.0)
    book.submit([_ask(1)])
    saved = book.checkpoint()
    revived = QuotaBook(_config({"rpm": 20}), clock=clock, wall_ms=lambda: 0.0)
    revived.restore(saved)
    dep = revived.deployments["d0"]
    assert dep.rpm is not None
    assert dep.rpm.remaining(clock.now) == 0
    clock.now += 61.0
    assert dep.rpm.remaining(clock.now) == 20


def test_an_ask_sent_twice_is_queued_once() -> None:
    book = QuotaBook(_config({"rpm": 1}), wall_ms=lambda: 0.0)
    book.submit([_ask(1)])
    assert isinstance(book.submit([_ask(2)])[0], Queued)
    assert isinstance(book.submit([_ask(2)])[0], Queued)
    assert book.queue_depth == 1


def test_quantized_grants_are_paced_and_recorded_when_sent() -> None:
    clock = FakeClock()
    wall = [5_000.0]
    book = QuotaBook(
        _config({"rpm": 60, "quantize_per_second": True}, pace_ms=100),
        clock=clock,
        wall_ms=lambda: wall[0],
    )
    g = book.submit([_ask(1)])[0]
    assert isinstance(g, Grant)
    assert g.not_before_ms == 5_100.0
    book.sent_late([(g.lease, g.not_before_ms)])  # left on time
    # The first call leaves at +0.1 s. A grant at +0.85 s would leave at +0.95 s, inside
    # that call's second: it waits. At +1.05 s it leaves at +1.15 s: a second apart.
    clock.now += 0.85
    assert isinstance(book.submit([_ask(2)])[0], Queued)
    clock.now += 0.1  # +0.95 s: would leave at +1.05 s, 0.95 s after the first
    assert book.admit_waiting() == 0
    clock.now += 0.1  # +1.05 s
    assert book.admit_waiting() == 1
    plain = QuotaBook(_config({"rpm": 60}, pace_ms=100), wall_ms=lambda: 0.0)
    g2 = plain.submit([_ask(3)])[0]
    assert isinstance(g2, Grant)
    assert g2.not_before_ms is None  # no quantization, no pacing


def test_a_late_send_moves_its_entries_to_when_it_really_left() -> None:
    clock = FakeClock()
    wall = [5_000.0]
    book = QuotaBook(
        _config({"rpm": 60, "quantize_per_second": True}, pace_ms=100),
        clock=clock,
        wall_ms=lambda: wall[0],
    )
    g = book.submit([_ask(1)])[0]
    assert isinstance(g, Grant)
    assert g.not_before_ms is not None
    book.sent_late([(g.lease, g.not_before_ms + 300.0)])  # a cold caller sent it 300 ms late
    clock.now += 1.15  # on time it would have expired by now (recorded at +0.1, span 1 s)
    assert isinstance(book.submit([_ask(2)])[0], Queued)
    clock.now += 0.3
    assert book.admit_waiting() == 1


def test_a_grant_whose_send_is_unreported_holds_its_second_until_the_report() -> None:
    clock = FakeClock()
    wall = [0.0]

    def now_ms() -> float:
        return wall[0]

    cfg = _config({"rpm": 60, "quantize_per_second": True})
    book = QuotaBook(cfg, clock=clock, wall_ms=now_ms)
    a = book.submit([_ask(1)])[0]
    assert isinstance(a, Grant)
    # A second later the call has still not left (a busy caller): it counts as leaving
    # now, so the next call may not take the provider's next second yet.
    clock.now += 1.1
    wall[0] += 1100.0
    assert isinstance(book.submit([_ask(2)])[0], Queued)
    # It really left at 1.15 s: the next one may go a second after that, not before.
    book.sent_late([(a.lease, 1150.0)])
    clock.now += 0.9
    wall[0] += 900.0
    assert book.admit_waiting() == 0
    clock.now += 0.2
    wall[0] += 200.0
    assert book.admit_waiting() == 1
    assert [d.ticket for d in book.take("o") if isinstance(d, Grant)] == [2]
