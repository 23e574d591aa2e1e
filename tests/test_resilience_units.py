"""Breakers, retry policy, fallback routing and the book's breaker use (no Ray, fake clocks)."""

from __future__ import annotations

import random
from typing import Any

from actors._breaker import CircuitBreaker
from actors._messages import Ask, DeploymentState, Grant, Queued, RouteAsk, Settlement
from actors._quota_book import QuotaBook
from actors._retry import backoff_ms, retry_delay_ms, retryable_status
from actors._routing import Router
from pipeline._resume import ResetFilter
from topics.config import BreakerConfig, Config, RetryConfig, parse_config
from topics.wire import ChunkReply, DoneReply, ErrorBody, ErrorReply, ResetReply, TokenUsage


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- circuit breaker --------------------------------------------------------------------


def _breaker(**kw: Any) -> CircuitBreaker:
    defaults: dict[str, Any] = {
        "window_s": 10.0,
        "consecutive_failures": 3,
        "failure_ratio": 0.5,
        "min_calls": 6,
        "open_s": 5.0,
        "half_open_probes": 2,
    }
    return CircuitBreaker(BreakerConfig(**{**defaults, **kw}))


def test_breaker_opens_after_consecutive_failures_and_refuses_until_open_s() -> None:
    b = _breaker()
    for t in (0.0, 1.0):
        assert b.record(True, t, probe=False) == "closed"
    assert b.record(True, 2.0, probe=False) == "open"
    assert not b.allows(2.0)
    assert not b.allows(6.9)
    assert b.open_until() == 7.0
    assert b.state(7.0) == "half_open"


def test_breaker_opens_on_failure_ratio_only_with_min_calls() -> None:
    b = _breaker(consecutive_failures=100)
    pattern = [True, False, True, False, True]  # 3 of 5 failed, but only 5 < min_calls calls
    for i, failed in enumerate(pattern):
        assert b.record(failed, float(i), probe=False) == "closed"
    assert b.record(False, 5.0, probe=False) == "open"  # 3 of 6 = 0.5 >= ratio


def test_breaker_forgets_outcomes_older_than_its_window() -> None:
    b = _breaker(consecutive_failures=100, min_calls=4)
    for i in range(3):
        b.record(True, float(i), probe=False)
    # 20 s later the three failures are out of the 10 s window: 1 failure of 4 is not 0.5.
    for t in (20.0, 21.0, 22.0):
        b.record(False, t, probe=False)
    assert b.record(True, 23.0, probe=False) == "closed"


def test_half_open_lets_a_bounded_number_of_probes_and_closes_on_their_success() -> None:
    b = _breaker()
    for t in (0.0, 0.1, 0.2):
        b.record(True, t, probe=False)
    now = 10.0
    assert b.allows(now)
    b.started(now)
    b.started(now)
    assert not b.allows(now)  # both probe slots taken
    assert b.record(False, now, probe=False) == "half_open"  # an old call says nothing
    assert b.record(False, now, probe=True) == "half_open"
    assert b.record(False, now, probe=True) == "closed"
    assert b.allows(now)


def test_a_failed_probe_opens_again_and_a_released_probe_frees_its_slot() -> None:
    b = _breaker(half_open_probes=1)
    for t in (0.0, 0.1, 0.2):
        b.record(True, t, probe=False)
    b.started(10.0)
    assert not b.allows(10.0)
    b.release(10.0, probe=True)
    assert b.allows(10.0)
    b.started(10.0)
    assert b.record(True, 10.5, probe=True) == "open"
    assert b.opened_total == 2
    assert not b.allows(15.4)
    assert b.allows(15.5)


# -- retry policy -----------------------------------------------------------------------


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    cfg = RetryConfig(base_backoff_ms=100, max_backoff_ms=1000, max_attempts=10)
    rng = random.Random(1)
    for attempt, cap in ((1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (9, 1000)):
        draws = [backoff_ms(attempt, cfg, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in draws)
        assert max(draws) > cap * 0.8  # jitter spans the range, not a fixed wait
        assert min(draws) < cap * 0.2


def test_retry_delay_honours_retry_after_and_the_attempt_budget() -> None:
    cfg = RetryConfig(base_backoff_ms=100, max_backoff_ms=1000, max_attempts=3)
    rng = random.Random(2)
    assert retry_delay_ms(3, cfg, retry_after_ms=None, rng=rng) is None  # budget spent
    delay = retry_delay_ms(1, cfg, retry_after_ms=750, rng=rng)
    assert delay is not None
    assert delay >= 750
    too_long = cfg.max_retry_after_ms + 1
    assert retry_delay_ms(1, cfg, retry_after_ms=too_long, rng=rng) is None


def test_only_failures_that_can_succeed_are_retryable() -> None:
    assert all(retryable_status(s) for s in (408, 409, 429, 500, 502, 503, 504, 529))
    assert not any(retryable_status(s) for s in (400, 401, 403, 404, 413, 422))


# -- fallback routing -------------------------------------------------------------------

ROUTED: dict[str, Any] = {
    "deployments": [
        {"name": n, "base_url": "http://127.0.0.1:1/v1", "api_key_env": "K", "model": "m"}
        for n in ("a1", "a2", "b1", "c1")
    ],
    "models": [
        {"name": "primary", "deployments": ["a1", "a2"], "fallbacks": ["second", "third"]},
        {"name": "second", "deployments": ["b1"]},
        {"name": "third", "deployments": ["c1"]},
    ],
}


def _state(**kw: DeploymentState) -> dict[str, DeploymentState]:
    base = {d: DeploymentState(headroom=1.0) for d in ("a1", "a2", "b1", "c1")}
    base.update(kw)
    return base


def test_fallbacks_are_used_only_when_the_model_has_no_healthy_deployment() -> None:
    router = Router(parse_config(ROUTED))
    router.update_state(_state())
    r = router.route([RouteAsk(1, "primary", "t")])[0]
    assert (r.model, r.candidates) == ("primary", ("a1", "a2"))
    # The rest of the chain rides along for the quota actor, which knows breakers first.
    assert r.fallback == ("b1", "c1")
    assert r.served == ("primary", "primary", "second", "third")
    assert r.model_for("c1") == "third"
    router.update_state(_state(a1=DeploymentState(headroom=0.0, breaker="open")))
    assert router.route([RouteAsk(2, "primary", "t")])[0].candidates == ("a2",)
    router.update_state(
        _state(
            a1=DeploymentState(headroom=0.0, breaker="open"),
            a2=DeploymentState(headroom=0.0, exhausted=True),
        )
    )
    r = router.route([RouteAsk(3, "primary", "t")])[0]
    assert (r.model, r.candidates) == ("second", ("b1",))
    assert r.model_for("b1") == "second"


def test_avoided_deployments_fall_through_the_chain() -> None:
    router = Router(parse_config(ROUTED))
    router.update_state(_state(b1=DeploymentState(headroom=0.5, breaker="open")))
    r = router.route([RouteAsk(1, "primary", "t", avoid=("a1", "a2"))])[0]
    assert (r.model, r.candidates) == ("third", ("c1",))


def test_with_nothing_healthy_every_deployment_stays_a_candidate_healthy_first() -> None:
    router = Router(parse_config(ROUTED))
    opened = DeploymentState(headroom=0.0, breaker="open")
    router.update_state(_state(a1=opened, b1=opened, c1=opened))
    r = router.route([RouteAsk(1, "primary", "t", avoid=("a2",))])[0]
    assert r.model == "primary"
    assert r.candidates[0] == "a2"  # healthy, only avoided
    assert set(r.candidates) == {"a1", "a2", "b1", "c1"}
    assert dict(zip(r.candidates, r.served, strict=True))["c1"] == "third"


# -- the book and its breakers ----------------------------------------------------------


def _book_config() -> Config:
    return parse_config(
        {
            "deployments": [
                {
                    "name": n,
                    "base_url": "http://127.0.0.1:1/v1",
                    "api_key_env": "K",
                    "model": "m",
                    "limits": {"rpm": 1000, "quantize_per_second": False},
                }
                for n in ("d0", "d1")
            ],
            "models": [{"name": "fast", "deployments": ["d0", "d1"]}],
            "resilience": {
                "breaker": {"consecutive_failures": 2, "open_s": 5.0, "half_open_probes": 1}
            },
        }
    )


def _ask(ticket: int, candidates: tuple[str, ...] = ("d0",)) -> Ask:
    return Ask(ticket, "o", "t", 5, None, candidates, prompt_tokens=5, max_tokens=5)


def _grant(book: QuotaBook, ticket: int, candidates: tuple[str, ...] = ("d0",)) -> Grant:
    decision = book.submit([_ask(ticket, candidates)])[0]
    if isinstance(decision, Queued):
        ready = book.take("o")
        assert len(ready) == 1, ready
        decision = ready[0]
    assert isinstance(decision, Grant), decision
    return decision


def test_failures_open_the_breaker_which_stops_grants_until_a_probe_succeeds() -> None:
    clock = FakeClock()
    book = QuotaBook(_book_config(), clock=clock)
    for t in (1, 2):
        g = _grant(book, t)
        book.settle([Settlement(g.lease, 10, deployment="d0", outcome="failed")])
    assert book.routing_state()["d0"].breaker == "open"
    assert [e["event"] for e in book.drain_events()] == ["breaker_open"]
    # Open: an ask with d1 as second choice goes there; one only for d0 waits.
    assert _grant(book, 3, ("d0", "d1")).deployment == "d1"
    assert isinstance(book.submit([_ask(4)])[0], Queued)
    clock.now += 5.0
    book.admit_waiting()
    probe = book.take("o")
    assert [type(d).__name__ for d in probe] == ["Grant"]
    assert book.routing_state()["d0"].breaker == "half_open"
    assert isinstance(book.submit([_ask(5)])[0], Queued)  # the one probe slot is taken
    assert isinstance(probe[0], Grant)
    book.settle([Settlement(probe[0].lease, 10, deployment="d0", outcome="ok", ttft_ms=40.0)])
    assert book.routing_state()["d0"].breaker == "closed"
    assert book.routing_state()["d0"].ttft_ewma_ms == 40.0
    assert [e["event"] for e in book.drain_events()] == ["breaker_half_open", "breaker_closed"]


def test_rate_limits_and_client_errors_do_not_move_the_breaker() -> None:
    book = QuotaBook(_book_config(), clock=FakeClock())
    for t, outcome in enumerate(["rate_limited", "client_error", "unused", "exhausted"]):
        g = _grant(book, t)
        book.settle([Settlement(g.lease, 10, deployment="d0", outcome=outcome)])
    assert book.snapshot()["deployments"]["d0"]["breaker"]["calls_in_window"] == 0


def test_cancel_withdraws_waiting_asks_and_gives_back_untaken_grants() -> None:
    book = QuotaBook(_book_config(), clock=FakeClock())
    book.deployments["d0"].frozen_until = 10**9
    assert book.submit([_ask(1), _ask(2)]) == [Queued(1), Queued(2)]
    assert book.queue_depth == 2
    assert book.cancel("o", [1]) == 1  # still waiting: leaves the queue
    assert book.queue_depth == 1
    book.deployments["d0"].frozen_until = 0.0
    assert book.admit_waiting() == 1  # ask 2 is granted, its owner has not taken it yet
    assert book.snapshot()["leases"] == 1
    assert book.cancel("o", [2]) == 1  # the untaken grant goes back unused
    assert book.snapshot()["leases"] == 0
    assert book.deployments["d0"].in_flight == 0
    assert book.take("o") == []


# -- the client's coherent stream ---------------------------------------------------------


def _chunk(seq: int, text: str | None, finish: str | None = None) -> ChunkReply:
    delta = {} if text is None else {"content": text}
    return ChunkReply(
        id="r",
        seq=seq,
        chunk={
            "object": "chat.completion.chunk",
            "choices": [{"delta": delta, "finish_reason": finish}],
        },
    )


def _done(seq: int) -> DoneReply:
    return DoneReply(
        id="r", seq=seq, finish_reason="stop", usage=TokenUsage(), model="m", deployment="d"
    )


def _text(replies: list[Any]) -> str:
    return "".join(
        (c.get("delta") or {}).get("content") or ""
        for r in replies
        if isinstance(r, ChunkReply)
        for c in r.chunk["choices"]
    )


def _run(replies: list[Any]) -> list[Any]:
    f = ResetFilter()
    return [out for r in replies for out in f.feed(r)]


def test_a_retry_that_repeats_the_answer_is_invisible_to_the_reader() -> None:
    stream = [
        _chunk(0, ""),
        _chunk(1, "Hel"),
        _chunk(2, "lo "),
        ResetReply(id="r", seq=3, reason="cut"),
        _chunk(4, ""),
        _chunk(5, "Hel"),
        _chunk(6, "lo wo"),
        _chunk(7, "rld"),
        _chunk(8, None, "stop"),
        _done(9),
    ]
    out = _run(stream)
    assert not any(isinstance(r, ResetReply) for r in out)
    assert _text(out) == "Hello world"
    assert [r.seq for r in out] == sorted(r.seq for r in out)
    assert isinstance(out[-1], DoneReply)
    assert out[-2].chunk["choices"][0]["finish_reason"] == "stop"


def test_a_retry_that_says_something_else_passes_the_reset_then_its_text() -> None:
    stream = [
        _chunk(0, "Hello "),
        _chunk(1, "there"),
        ResetReply(id="r", seq=2, reason="cut"),
        _chunk(3, "Hello "),
        _chunk(4, "world"),
        _chunk(5, "!"),
        _done(6),
    ]
    out = _run(stream)
    resets = [i for i, r in enumerate(out) if isinstance(r, ResetReply)]
    assert len(resets) == 1
    assert _text(out[resets[0] + 1 :]) == "Hello world!"  # nothing of the new answer lost


def test_a_retry_that_ends_shorter_or_fails_resets_the_reader() -> None:
    shorter = _run(
        [_chunk(0, "abc"), ResetReply(id="r", seq=1, reason="x"), _chunk(2, "ab"), _done(3)]
    )
    assert [type(r).__name__ for r in shorter] == [
        "ChunkReply",
        "ResetReply",
        "ChunkReply",
        "DoneReply",
    ]
    assert _text(shorter[2:]) == "ab"
    failed = _run([_chunk(0, "abc"), ResetReply(id="r", seq=1, reason="x"), _err(2)])
    assert [type(r).__name__ for r in failed] == ["ChunkReply", "ResetReply", "ErrorReply"]
    # A reset before anything was shown undoes nothing: it is not passed on.
    early = _run([ResetReply(id="r", seq=0, reason="x"), _chunk(1, "ok"), _done(2)])
    assert [type(r).__name__ for r in early] == ["ChunkReply", "DoneReply"]


def _err(seq: int) -> ErrorReply:
    return ErrorReply(id="r", seq=seq, error=ErrorBody(code="upstream_unavailable", message="x"))


def test_a_429_without_retry_after_freezes_until_the_exhausted_limit_resets() -> None:
    from actors._messages import Observation
    from actors._quota_book import _freeze_s

    assert _freeze_s(Observation(retry_after_ms=750), 1.0) == 0.75
    tokens_out = Observation(
        remaining_requests=10, reset_requests_s=0.2, remaining_tokens=0, reset_tokens_s=3.5
    )
    assert _freeze_s(tokens_out, 1.0) == 3.5
    assert _freeze_s(Observation(remaining_requests=5, reset_requests_s=9.0), 1.0) == 1.0


def test_an_exhausted_deployment_is_tried_again_after_exhausted_retry_s() -> None:
    from actors._messages import Observation

    clock = FakeClock()
    book = QuotaBook(_book_config(), clock=clock)
    g = _grant(book, 1)
    book.settle(
        [
            Settlement(
                g.lease,
                10,
                deployment="d0",
                outcome="exhausted",
                observed=Observation(refused="exhausted"),
            )
        ]
    )
    assert book.routing_state()["d0"].exhausted
    clock.now += _book_config().quota.exhausted_retry_s
    assert _grant(book, 2).deployment == "d0"  # credit may have been added: try it again
    assert not book.routing_state()["d0"].exhausted
