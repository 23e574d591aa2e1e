"""The Prometheus endpoint (issue 7, item 2): histogram and tally logic, the collector over
fake snapshots, the HTTP server, and figures that move with real load through the stack."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from actors._histogram import LATENCY_BOUNDS_MS, Histogram, LatencySet, Tally, merge_histograms
from pipeline.client import Answer, QuotaflowClient
from pipeline.gateway import GatewayStats
from pipeline.metrics import (
    ActorSnapshots,
    GatewayCollector,
    IngressFigures,
    MetricsServer,
    families,
)
from tests._metrics_stack import METRICS_DEPLOYMENT, METRICS_LIMITS, METRICS_MODEL
from tests.conftest import Stack
from topics.config import MetricsConfig
from topics.errors import QuotaflowError
from topics.wire import DoneReply

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by (sample name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 for a series not exposed yet (a counter never incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def _buckets(samples: Samples, name: str, **labels: str) -> dict[float, float]:
    """A histogram's cumulative buckets: le -> count (le +Inf as inf)."""
    out: dict[float, float] = {}
    for (sample, lbls), v in samples.items():
        d = dict(lbls)
        if sample == f"{name}_bucket" and all(d.get(k) == x for k, x in labels.items()):
            out[float(d["le"])] = v
    return out


def _render(ingress: IngressFigures, actors: ActorSnapshots) -> Samples:
    class _Fixed:
        def collect(self) -> Any:
            return families(ingress, actors)

    registry = CollectorRegistry()
    registry.register(_Fixed())
    return _parse(generate_latest(registry).decode())


# -- the plain structures the processes keep ---------------------------------------------


def test_histogram_buckets_are_inclusive_upper_bounds_and_cumulative() -> None:
    h = Histogram()
    bounds = LATENCY_BOUNDS_MS
    # On a bound, just above one, and past the last one (only +Inf holds it).
    values = [bounds[0], bounds[0] + 0.001, bounds[3], bounds[-1] * 2]
    for v in values:
        h.observe(v)
    snap = h.snapshot()
    assert snap["bounds_ms"] == list(bounds)
    assert snap["cumulative"] == [sum(v <= b for v in values) for b in bounds] + [len(values)]
    assert snap["count"] == len(values)
    assert snap["sum_ms"] == pytest.approx(sum(values))


def test_histogram_bounds_must_increase() -> None:
    with pytest.raises(QuotaflowError, match="increase strictly"):
        Histogram((1.0, 1.0, 2.0))
    with pytest.raises(QuotaflowError, match="increase strictly"):
        Histogram(())


def test_merged_histograms_sum_their_buckets() -> None:
    a, b = Histogram(), Histogram()
    for v in (3.0, 40.0):
        a.observe(v)
    b.observe(700.0)
    merged = merge_histograms([a.snapshot(), b.snapshot()])
    assert merged is not None
    assert merged["cumulative"] == [
        x + y for x, y in zip(a.snapshot()["cumulative"], b.snapshot()["cumulative"], strict=True)
    ]
    assert merged["count"] == a.count + b.count
    assert merged["sum_ms"] == pytest.approx(a.sum_ms + b.sum_ms)
    assert merge_histograms([]) is None
    with pytest.raises(QuotaflowError, match="bounds_ms"):
        merge_histograms([a.snapshot(), Histogram((1.0, 2.0)).snapshot()])


def test_latency_set_overhead_is_our_ttft_minus_upstreams() -> None:
    s = LatencySet()
    s.observe(queued_ms=2.0, ttft_ms=30.0, total_ms=80.0, upstream_ttft_ms=18.0)
    s.observe(queued_ms=0.0, ttft_ms=None, total_ms=50.0, upstream_ttft_ms=None)
    # Skewed clocks: a negative difference counts as 0.
    s.observe(queued_ms=0.0, ttft_ms=10.0, total_ms=20.0, upstream_ttft_ms=12.0)
    snap = s.snapshot()
    assert snap["queued"]["count"] == snap["total"]["count"] == 3
    assert snap["ttft"]["count"] == snap["overhead"]["count"] == 2
    assert snap["overhead"]["sum_ms"] == pytest.approx((30.0 - 18.0) + 0.0)
    assert snap["ttft"]["sum_ms"] == pytest.approx(30.0 + 10.0)


def test_tally_counts_by_label_tuple() -> None:
    t = Tally()
    t.add("done", "fast")
    t.add("done", "fast", n=2)
    t.add("upstream_error", "fast")
    assert t.get("done", "fast") == 3
    assert t.get("done", "other") == 0
    assert sorted(t.rows()) == [(("done", "fast"), 3), (("upstream_error", "fast"), 1)]
    assert t.__structlog__() == {"done/fast": 3, "upstream_error/fast": 1}


# -- the collector over fake snapshots ------------------------------------------------------


def _caller_stats(
    outcomes: list[tuple[str, str]], latencies: dict[str, list[tuple[float, float, float, float]]]
) -> dict[str, Any]:
    """What `Caller.stats()` returns, built with the callers' own structures."""
    tally, tokens = Tally(), Tally()
    cost: dict[str, float] = {}
    for status, model in outcomes:
        tally.add(status, model)
        if status == "done":
            cost[model] = cost.get(model, 0.0) + 0.25
            tokens.add(model, "prompt", n=10)
            tokens.add(model, "completion", n=4)
    sets: dict[str, LatencySet] = {}
    for model, obs in latencies.items():
        for queued, ttft, total, up in obs:
            sets.setdefault(model, LatencySet()).observe(
                queued_ms=queued, ttft_ms=ttft, total_ms=total, upstream_ttft_ms=up
            )
    return {
        "requests": tally.rows(),
        "cost_usd": cost,
        "tokens": tokens.rows(),
        "latency": {m: s.snapshot() for m, s in sets.items()},
    }


def _quota_snapshot() -> dict[str, Any]:
    return {
        "deployments": {
            "dep-a": {
                "rpm": {"used": 30, "limit": 120, "reset_s": 1.0},
                "tpm": {"used": 5_000, "limit": 20_000, "reset_s": 1.0},
                "in_flight": 3,
                "max_concurrency": 4,
                "frozen_s": 0.0,
                "exhausted": False,
                "upstream_429s": 2,
                "breaker": {"state": "half_open", "opened_total": 1},
                "ttft_ewma_ms": 250.0,
            },
            "dep-b": {
                "in_flight": 0,
                "frozen_s": 1.5,
                "exhausted": True,
                "upstream_429s": 0,
                "breaker": {"state": "closed", "opened_total": 0},
                "ttft_ewma_ms": None,
            },
        },
        "queue_depth": 7,
        "leases": 3,
        "grants_total": 40,
        "refusals_total": 2,
        "upstream_429s": 2,
    }


def test_collector_sums_callers_and_ingress_into_prometheus_families() -> None:
    obs_1 = [(1.0, 20.0, 90.0, 15.0), (0.0, 400.0, 900.0, 380.0)]
    obs_2 = [(5.0, 30.0, 60.0, 10.0)]
    c1 = _caller_stats(
        [("done", "fast"), ("done", "fast"), ("upstream_error", "fast")], {"fast": obs_1}
    )
    c2 = _caller_stats([("done", "fast")], {"fast": obs_2})
    ingress = IngressFigures(
        consumed=9,
        dead_lettered=1,
        replayed=2,
        in_flight=4,
        outcomes=(
            (("ingress", "quota_exceeded", "fast"), 1),
            (("ingress", "invalid_request", ""), 1),
            (("cache", "done", "fast"), 2),
        ),
    )
    caches = [{"lookups": 7, "exact_hits": 2, "semantic_hits": 1, "entries": 4, "bytes": 100}] * 2
    actors = ActorSnapshots(
        quota=_quota_snapshot(),
        callers=[c1, c2, None],
        caches=caches,
        idempotency=[{"claims": 6, "hits": 2, "replayed_replies": 4, "entries": 3, "bytes": 9}],
        collect_seconds=0.01,
    )
    m = _render(ingress, actors)

    req = "quotaflow_requests_total"
    assert _value(m, req, source="upstream", status="done", model="fast") == 3
    assert _value(m, req, source="upstream", status="upstream_error", model="fast") == 1
    assert _value(m, req, source="cache", status="done", model="fast") == 2
    assert _value(m, req, source="ingress", status="quota_exceeded", model="fast") == 1
    assert _value(m, req, source="ingress", status="invalid_request", model="") == 1
    assert _value(m, "quotaflow_cost_usd_total", model="fast") == pytest.approx(3 * 0.25)
    assert _value(m, "quotaflow_tokens_total", model="fast", kind="prompt") == 3 * 10
    assert _value(m, "quotaflow_records_consumed_total") == ingress.consumed
    assert _value(m, "quotaflow_requests_replayed_total") == ingress.replayed
    assert _value(m, "quotaflow_in_flight_requests") == ingress.in_flight

    every = obs_1 + obs_2
    for metric, pick in (
        ("quotaflow_request_queued_seconds", lambda o: o[0]),
        ("quotaflow_request_ttft_seconds", lambda o: o[1]),
        ("quotaflow_request_duration_seconds", lambda o: o[2]),
        ("quotaflow_gateway_overhead_seconds", lambda o: o[1] - o[3]),
    ):
        values_ms = [pick(o) for o in every]
        buckets = _buckets(m, metric, model="fast")
        finite = sorted(le for le in buckets if le != float("inf"))
        assert len(finite) == len(LATENCY_BOUNDS_MS)
        for le, bound_ms in zip(finite, LATENCY_BOUNDS_MS, strict=True):
            assert le == pytest.approx(bound_ms / 1000.0)
            assert buckets[le] == sum(v <= bound_ms for v in values_ms), (metric, le)
        assert buckets[float("inf")] == len(every)
        assert _value(m, f"{metric}_count", model="fast") == len(every)
        assert _value(m, f"{metric}_sum", model="fast") == pytest.approx(sum(values_ms) / 1000)

    r429 = "quotaflow_upstream_429s_total"
    assert _value(m, r429, deployment="dep-a") == 2
    assert _value(m, r429, deployment="dep-b") == 0
    for bucket in ("rpm", "tpm"):
        d = _quota_snapshot()["deployments"]["dep-a"][bucket]
        labels = {"deployment": "dep-a", "bucket": bucket}
        assert _value(m, "quotaflow_quota_used", **labels) == d["used"]
        assert _value(m, "quotaflow_quota_limit", **labels) == d["limit"]
        assert _value(m, "quotaflow_quota_utilization_ratio", **labels) == pytest.approx(
            d["used"] / d["limit"]
        )
    conc = {"deployment": "dep-a", "bucket": "concurrency"}
    assert _value(m, "quotaflow_quota_utilization_ratio", **conc) == pytest.approx(3 / 4)
    # dep-b has no limits: no bucket series for it.
    assert not [k for k in m if k[0] == "quotaflow_quota_used" and ("deployment", "dep-b") in k[1]]
    state = "quotaflow_breaker_state"
    assert _value(m, state, deployment="dep-a", state="half_open") == 1
    assert _value(m, state, deployment="dep-a", state="closed") == 0
    assert _value(m, state, deployment="dep-b", state="closed") == 1
    assert _value(m, "quotaflow_deployment_exhausted", deployment="dep-b") == 1
    assert _value(m, "quotaflow_deployment_ttft_ewma_seconds", deployment="dep-a") == 0.25
    assert ("quotaflow_deployment_ttft_ewma_seconds", frozenset({("deployment", "dep-b")})) not in m
    hit_kinds = {"exact": "exact_hits", "semantic": "semantic_hits"}
    for kind, key in hit_kinds.items():
        assert _value(m, "quotaflow_cache_hits_total", kind=kind) == sum(c[key] for c in caches)
    assert _value(m, "quotaflow_cache_lookups_total") == sum(c["lookups"] for c in caches)
    assert _value(m, "quotaflow_cache_misses_total") == sum(
        c["lookups"] - c["exact_hits"] - c["semantic_hits"] for c in caches
    )
    assert _value(m, "quotaflow_idempotency_hits_total") == 2
    assert _value(m, "quotaflow_actor_up", actor="caller.0") == 1
    assert _value(m, "quotaflow_actor_up", actor="caller.2") == 0
    assert _value(m, "quotaflow_actor_up", actor="quota") == 1


def test_cache_hit_histograms_come_from_shards_that_keep_them() -> None:
    hits = LatencySet()
    timings = [(4.0, 9.0), (6.0, 30.0)]  # (ttft_ms, total_ms) of two replays
    for ttft, total in timings:
        hits.observe(queued_ms=0.0, ttft_ms=ttft, total_ms=total, upstream_ttft_ms=None)
    shards = [{"latency": {"fast": hits.snapshot()}}, {"lookups": 1}]
    m = _render(IngressFigures(), ActorSnapshots(caches=shards))
    for metric, pick in (
        ("quotaflow_cache_hit_ttft_seconds", 0),
        ("quotaflow_cache_hit_duration_seconds", 1),
    ):
        assert _value(m, f"{metric}_count", model="fast") == len(timings)
        assert _value(m, f"{metric}_sum", model="fast") == pytest.approx(
            sum(t[pick] for t in timings) / 1000
        )
    # Upstream histograms are the callers' alone.
    assert not [k for k in m if k[0].startswith("quotaflow_request_ttft_seconds")]


def test_collector_without_a_quota_snapshot_says_the_actor_is_down() -> None:
    m = _render(IngressFigures(), ActorSnapshots(quota=None))
    assert _value(m, "quotaflow_actor_up", actor="quota") == 0
    assert not [k for k in m if k[0] == "quotaflow_upstream_429s_total"]
    # No caller answered: the request families are there, with no series.
    assert not [k for k in m if k[0] == "quotaflow_requests_total"]


def test_ingress_figures_come_from_gateway_stats() -> None:
    stats = GatewayStats(consumed=5, invalid=1, attached=2, replayed=3, retries=4, paused=1)
    stats.outcomes.add("ingress", "unauthorized", "")
    fig = IngressFigures.of(stats, in_flight=7)
    assert (fig.consumed, fig.dead_lettered, fig.attached, fig.replayed) == (5, 1, 2, 3)
    assert (fig.retries, fig.pauses, fig.in_flight) == (4, 1, 7)
    assert fig.outcomes == ((("ingress", "unauthorized", ""), 1),)


@dataclass
class _FakeGateway:
    stats: GatewayStats = field(default_factory=GatewayStats)
    in_flight: int = 0
    actors: Any = None


@dataclass
class _CountingFetch:
    calls: int = 0

    def __call__(self, _actors: Any) -> ActorSnapshots:
        self.calls += 1
        return ActorSnapshots(quota=_quota_snapshot())


@pytest.mark.parametrize(("refresh_s", "fetches"), [(3600.0, 1), (0.0, 3)])
def test_collector_asks_the_actors_at_most_once_per_refresh(refresh_s: float, fetches: int) -> None:
    fetch = _CountingFetch()
    gw = _FakeGateway()
    collector = GatewayCollector(gw, refresh_s, fetch)  # type: ignore[arg-type]
    for consumed in range(3):
        gw.stats.consumed = consumed
        values = {s.name: s.value for f in collector.collect() for s in f.samples if not s.labels}
        # The ingress's own figures are read live on every scrape.
        assert values["quotaflow_records_consumed_total"] == consumed
    assert fetch.calls == fetches


def test_server_serves_the_registry_and_names_a_busy_port() -> None:
    fetch = _CountingFetch()
    gw = _FakeGateway(in_flight=3)
    server = MetricsServer(MetricsConfig(port=0), gw, fetch)  # type: ignore[arg-type]
    try:
        assert server.port > 0
        with urllib.request.urlopen(server.url, timeout=30) as resp:
            m = _parse(resp.read().decode())
        assert _value(m, "quotaflow_in_flight_requests") == gw.in_flight
        with pytest.raises(QuotaflowError, match=f"metrics.port {server.port}"):
            MetricsServer(MetricsConfig(port=server.port), gw, fetch)  # type: ignore[arg-type]
    finally:
        server.close()


# -- the real stack ------------------------------------------------------------------------

ANSWER_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 60.0
LOAD = 50


async def _scrape(stack: Stack) -> Samples:
    url = f"http://127.0.0.1:{stack.config.metrics.port}/metrics"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=30) as resp:
            text: str = resp.read().decode()
            return text

    return _parse(await asyncio.to_thread(get))


async def _scrape_until(stack: Stack, done: Any, what: str) -> Samples:
    """Scrape until `done(samples)` holds (actor snapshots lag by up to `refresh_s`)."""
    give_up = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        m = await _scrape(stack)
        if done(m):
            return m
        assert time.monotonic() < give_up, f"metrics: {what} not reached in {SETTLE_TIMEOUT_S}s"
        await asyncio.sleep(stack.config.metrics.refresh_s / 4)


def _done(a: Answer) -> DoneReply:
    assert isinstance(a.terminal, DoneReply), a.terminal
    return a.terminal


@pytest.mark.integration
async def test_figures_move_by_exactly_the_load_sent(stack: Stack, client: QuotaflowClient) -> None:
    model = {"model": METRICS_MODEL}
    run = uuid.uuid4().hex[:8]
    before = await _scrape(stack)

    # Distinct deterministic prompts: each is a cache miss that runs upstream.
    bodies = [
        {
            **model,
            "messages": [{"role": "user", "content": f"metrics {run} question {i}"}],
            "temperature": 0,
            "stream": i % 2 == 0,
            "max_tokens": 4 + i % 5,
        }
        for i in range(LOAD)
    ]
    answers = list(
        await asyncio.gather(*(client.ask(b, timeout_s=ANSWER_TIMEOUT_S) for b in bodies))
    )
    # The first body again until its answer comes from the cache (the callers store
    # answers with their next flush).
    give_up = time.monotonic() + ANSWER_TIMEOUT_S
    while True:
        again = await client.ask(bodies[0], timeout_s=ANSWER_TIMEOUT_S)
        answers.append(again)
        if _done(again).cache == "exact":
            break
        assert time.monotonic() < give_up, "no cache hit for a repeated deterministic request"
    dones = [_done(a) for a in answers]
    upstream = [d for d in dones if d.cache == "miss"]
    cached = [d for d in dones if d.cache == "exact"]
    assert len(upstream) + len(cached) == len(dones)

    req = "quotaflow_requests_total"

    def delta(m: Samples, name: str, **labels: str) -> float:
        return _value(m, name, **labels) - _value(before, name, **labels)

    # Every ticket finished (idempotency records stored), every caller figure collected.
    mid = await _scrape_until(
        stack,
        lambda m: (
            _value(m, "quotaflow_in_flight_requests") == 0
            and delta(m, req, source="upstream", status="done", model=METRICS_MODEL)
            >= len(upstream)
        ),
        "the load's terminal answers",
    )
    # A resent id is replayed from the idempotency store, without an upstream call.
    resent = await client.ask(bodies[1], id=answers[1].id, timeout_s=ANSWER_TIMEOUT_S)
    assert resent.text == answers[1].text
    after = await _scrape_until(
        stack,
        # The ingress counts live; the store's count comes with the next actor snapshot.
        lambda m: (
            delta(m, "quotaflow_requests_replayed_total") >= 1
            and delta(m, "quotaflow_idempotency_hits_total") >= 1
        ),
        "the replay",
    )
    assert _value(after, "quotaflow_requests_replayed_total") == (
        _value(mid, "quotaflow_requests_replayed_total") + 1
    )
    assert delta(after, "quotaflow_idempotency_hits_total") == 1
    assert delta(after, "quotaflow_records_consumed_total") == len(answers) + 1

    # Requests by status: all done, from upstream or the cache, none of them an error.
    assert delta(after, req, source="upstream", status="done", model=METRICS_MODEL) == len(upstream)
    assert delta(after, req, source="cache", status="done", model=METRICS_MODEL) == len(cached)
    others = {
        k
        for k in after
        if k[0] == req and ("model", METRICS_MODEL) in k[1] and ("status", "done") not in k[1]
    }
    assert not others, others

    # Latency histograms: counts, sums and buckets from the done replies' own timing.
    timings = [d.timing for d in upstream]
    first_token = [t.ttft_ms for t in timings if t.ttft_ms is not None]
    for metric, values_ms in (
        ("quotaflow_request_queued_seconds", [t.queued_ms for t in timings]),
        ("quotaflow_request_ttft_seconds", first_token),
        ("quotaflow_request_duration_seconds", [t.total_ms for t in timings]),
    ):
        assert delta(after, f"{metric}_count", model=METRICS_MODEL) == len(values_ms), metric
        assert delta(after, f"{metric}_sum", model=METRICS_MODEL) == pytest.approx(
            sum(values_ms) / 1000.0, rel=1e-9, abs=1e-9
        )
        b_after = _buckets(after, metric, model=METRICS_MODEL)
        b_before = _buckets(before, metric, model=METRICS_MODEL)
        finite = sorted(le for le in b_after if le != float("inf"))
        for le, bound_ms in zip(finite, LATENCY_BOUNDS_MS, strict=True):
            moved = b_after[le] - b_before.get(le, 0.0)
            assert moved == sum(v <= bound_ms for v in values_ms), (metric, le)
    overhead = "quotaflow_gateway_overhead_seconds"
    assert delta(after, f"{overhead}_count", model=METRICS_MODEL) == len(first_token)
    # Our time to first token minus the upstream's own: within [0, our time to first token].
    assert 0 <= delta(after, f"{overhead}_sum", model=METRICS_MODEL) <= sum(first_token) / 1000

    # Cost and tokens: what the done replies said.
    assert delta(after, "quotaflow_cost_usd_total", model=METRICS_MODEL) == pytest.approx(
        sum(d.cost_usd for d in upstream), abs=1e-9 * len(upstream)
    )
    assert delta(after, "quotaflow_cost_usd_total", model=METRICS_MODEL) > 0
    for kind, got in (
        ("prompt", sum(d.usage.prompt_tokens for d in upstream)),
        ("completion", sum(d.usage.completion_tokens for d in upstream)),
    ):
        assert delta(after, "quotaflow_tokens_total", model=METRICS_MODEL, kind=kind) == got

    # The exact cache saw each upstream run as a miss and the repeat as a hit.
    assert delta(after, "quotaflow_cache_misses_total") == len(upstream)
    assert delta(after, "quotaflow_cache_hits_total", kind="exact") == len(cached)
    assert delta(after, "quotaflow_cache_lookups_total") == len(upstream) + len(cached)

    # The quota windows kept the provider from refusing anything.
    r429 = "quotaflow_upstream_429s_total"
    assert _value(after, r429, deployment=METRICS_DEPLOYMENT) == 0
    assert sum(v for k, v in after.items() if k[0] == r429) == sum(
        v for k, v in before.items() if k[0] == r429
    )
    for bucket, limit in METRICS_LIMITS.items():
        labels = {"deployment": METRICS_DEPLOYMENT, "bucket": bucket}
        assert _value(after, "quotaflow_quota_limit", **labels) == limit
        used = _value(after, "quotaflow_quota_used", **labels)
        assert used >= 0
        assert _value(after, "quotaflow_quota_utilization_ratio", **labels) == pytest.approx(
            used / limit
        )
    state = "quotaflow_breaker_state"
    assert _value(after, state, deployment=METRICS_DEPLOYMENT, state="closed") == 1
    assert _value(after, "quotaflow_actor_up", actor="quota") == 1
