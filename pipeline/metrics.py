"""The Prometheus endpoint of `quotaflow run` (`metrics` in the config; README, "Metrics").

Every process keeps its own figures in plain structures (`actors._histogram`); on a
scrape this collector reads the ingress's live and, at most once per `refresh_s`, asks
each actor for its snapshot (one Ray call each, all in flight at once, bounded by
`ACTOR_TIMEOUT_S`). The HTTP server is `prometheus_client`'s own, on a daemon thread:
the blocking Ray calls of a scrape then never run on the gateway's event loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, get_args
from wsgiref.simple_server import WSGIServer

import ray
import structlog
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from actors._breaker import BreakerState
from actors._histogram import merge_histograms
from topics.config import MetricsConfig
from topics.errors import QuotaflowError

if TYPE_CHECKING:
    from pipeline.gateway import Actors, Gateway, GatewayStats

__all__ = [
    "ACTOR_TIMEOUT_S",
    "ActorSnapshots",
    "GatewayCollector",
    "IngressFigures",
    "MetricsServer",
    "families",
    "start_metrics",
]

log = structlog.get_logger("quotaflow.gateway")

# One scrape waits at most this long for all actor snapshots together (well under
# Prometheus' default scrape_timeout of 10 s); a late actor reports `actor_up 0`.
ACTOR_TIMEOUT_S: Final = 5.0
# The latency histograms the callers keep: caller key -> (metric name, what it measures).
_LATENCY: Final = (
    (
        "queued",
        "quotaflow_request_queued_seconds",
        "Time a successful upstream request waited in the quota queue for its grant.",
    ),
    (
        "ttft",
        "quotaflow_request_ttft_seconds",
        "Time from the ingress receiving a successful upstream request to its first "
        "token reply (the completion for non-streamed requests).",
    ),
    (
        "total",
        "quotaflow_request_duration_seconds",
        "Time from the ingress receiving a successful upstream request to its done reply.",
    ),
    (
        "overhead",
        "quotaflow_gateway_overhead_seconds",
        "Gateway time to first token minus the upstream's own (from sending the call to "
        "its first chunk): quota wait, retries and the Kafka hops included.",
    ),
)
# The same for cache hits, where the cache shards keep them (`stats()["latency"]`).
_CACHE_LATENCY: Final = (
    (
        "ttft",
        "quotaflow_cache_hit_ttft_seconds",
        "Time from the ingress receiving a request answered from the cache to its first "
        "token reply.",
    ),
    (
        "total",
        "quotaflow_cache_hit_duration_seconds",
        "Time from the ingress receiving a request answered from the cache to its done reply.",
    ),
)
_BREAKER_STATES: Final[tuple[str, ...]] = get_args(BreakerState)


@dataclass(frozen=True)
class IngressFigures:
    """The ingress's own counters at one moment (`GatewayStats` plus live gauges)."""

    consumed: int = 0
    dead_lettered: int = 0
    attached: int = 0
    replayed: int = 0
    retries: int = 0
    crash_reruns: int = 0
    pauses: int = 0
    aborted_at_shutdown: int = 0
    in_flight: int = 0
    # ((source, status, model), n): what the ingress or the cache answered.
    outcomes: tuple[tuple[tuple[str, ...], int], ...] = ()

    @classmethod
    def of(cls, stats: GatewayStats, in_flight: int) -> IngressFigures:
        return cls(
            consumed=stats.consumed,
            dead_lettered=stats.invalid,
            attached=stats.attached,
            replayed=stats.replayed,
            retries=stats.retries,
            crash_reruns=stats.crash_reruns,
            pauses=stats.paused,
            aborted_at_shutdown=stats.aborted_at_shutdown,
            in_flight=in_flight,
            outcomes=tuple(stats.outcomes.rows()),
        )


@dataclass(frozen=True)
class ActorSnapshots:
    """The actors' snapshots of one collection; None where an actor did not answer."""

    quota: dict[str, Any] | None = None
    callers: list[dict[str, Any] | None] = field(default_factory=list)
    caches: list[dict[str, Any] | None] = field(default_factory=list)
    idempotency: list[dict[str, Any] | None] = field(default_factory=list)
    collect_seconds: float = 0.0

    @classmethod
    def fetch(cls, actors: Actors, timeout_s: float = ACTOR_TIMEOUT_S) -> ActorSnapshots:
        """One Ray call per actor, all sent at once; blocking (not for an event loop)."""
        t0 = time.monotonic()
        refs = {
            "quota": [actors.quota.snapshot.remote()],
            "callers": [c.stats.remote() for c in actors.callers],
            "caches": [c.stats.remote() for c in actors.caches],
            "idempotency": [s.stats.remote() for s in actors.idempotency],
        }
        deadline = t0 + timeout_s
        got: dict[str, list[dict[str, Any] | None]] = {}
        for kind, kind_refs in refs.items():
            got[kind] = []
            for ref in kind_refs:
                try:
                    value = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                except ray.exceptions.RayError as exc:  # dead, restarting or late
                    log.warning("metrics_actor_failed", actor=kind, error=type(exc).__name__)
                    value = None
                got[kind].append(value)
        return cls(
            quota=got["quota"][0],
            callers=got["callers"],
            caches=got["caches"],
            idempotency=got["idempotency"],
            collect_seconds=time.monotonic() - t0,
        )


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _ingress(ing: IngressFigures) -> Iterator[Metric]:
    yield _counter(
        "quotaflow_records_consumed_total",
        "Records read from the requests topic by this ingress.",
        ing.consumed,
    )
    yield _counter(
        "quotaflow_dead_lettered_total",
        "Records that were not a valid Request, sent to the DLQ.",
        ing.dead_lettered,
    )
    yield _counter(
        "quotaflow_requests_attached_total",
        "Resent ids attached to the same id still running (answered by its run).",
        ing.attached,
    )
    yield _counter(
        "quotaflow_requests_replayed_total",
        "Resent ids answered from the idempotency store (no upstream call).",
        ing.replayed,
    )
    yield _counter(
        "quotaflow_retries_total",
        "Failed upstream attempts routed and queued again.",
        ing.retries,
    )
    yield _counter(
        "quotaflow_crash_reruns_total",
        "Requests run again because the caller actor running them died.",
        ing.crash_reruns,
    )
    yield _counter(
        "quotaflow_ingress_pauses_total",
        "Times the ingress paused consuming (in-flight bound or full quota queue).",
        ing.pauses,
    )
    yield _counter(
        "quotaflow_aborted_at_shutdown_total",
        "Requests ended with an error because the drain timeout passed at shutdown.",
        ing.aborted_at_shutdown,
    )
    yield _gauge(
        "quotaflow_in_flight_requests",
        "Accepted requests of this ingress without an acknowledged terminal reply.",
        ing.in_flight,
    )


def _requests(ing: IngressFigures, callers: list[dict[str, Any] | None]) -> Iterator[Metric]:
    """Terminal answers by who gave them, status and public model; cost and tokens."""
    counts: dict[tuple[str, str, str], float] = {}
    for (source, status, model), n in ing.outcomes:
        key = (source, status, model)
        counts[key] = counts.get(key, 0) + n
    cost: dict[str, float] = {}
    tokens: dict[tuple[str, str], float] = {}
    for c in callers:
        if c is None:
            continue
        for (status, model), n in c.get("requests", ()):
            key = ("upstream", status, model)
            counts[key] = counts.get(key, 0) + n
        for model, usd in c.get("cost_usd", {}).items():
            cost[model] = cost.get(model, 0.0) + usd
        for (model, kind), n in c.get("tokens", ()):
            tokens[(model, kind)] = tokens.get((model, kind), 0) + n
    req = CounterMetricFamily(
        "quotaflow_requests_total",
        "Terminal answers (done or an error code) by who gave them: upstream (a caller), "
        "cache (a hit) or ingress (refused, invalid, ...); model is the public model "
        "served, empty where none was resolved.",
        labels=["source", "status", "model"],
    )
    for labels, count in sorted(counts.items()):
        req.add_metric(list(labels), count)
    yield req
    usd = CounterMetricFamily(
        "quotaflow_cost_usd_total",
        "Cost of the successful upstream requests (the done replies' cost_usd).",
        labels=["model"],
    )
    for model, value in sorted(cost.items()):
        usd.add_metric([model], value)
    yield usd
    tok = CounterMetricFamily(
        "quotaflow_tokens_total",
        "Tokens of the successful upstream requests, by kind (prompt or completion).",
        labels=["model", "kind"],
    )
    for (model, kind), count in sorted(tokens.items()):
        tok.add_metric([model, kind], count)
    yield tok


def _latency(
    snaps: list[dict[str, Any] | None], which: tuple[tuple[str, str, str], ...]
) -> Iterator[Metric]:
    """`LatencySet` snapshots (`snap["latency"][model]`), summed per model, in seconds."""
    per_model: dict[str, list[dict[str, Any]]] = {}
    for snap in snaps:
        if snap is None:
            continue
        for model, sets in snap.get("latency", {}).items():
            per_model.setdefault(model, []).append(sets)
    for key, name, doc in which:
        fam = HistogramMetricFamily(name, doc, labels=["model"])
        for model in sorted(per_model):
            merged = merge_histograms(s[key] for s in per_model[model] if key in s)
            if merged is None:
                continue
            buckets = [
                (repr(bound / 1000.0), float(n))
                for bound, n in zip(merged["bounds_ms"], merged["cumulative"], strict=False)
            ]
            buckets.append(("+Inf", float(merged["count"])))
            fam.add_metric([model], buckets, merged["sum_ms"] / 1000.0)
        yield fam


def _quota(quota: dict[str, Any]) -> Iterator[Metric]:
    deps: dict[str, dict[str, Any]] = quota.get("deployments", {})
    r429 = CounterMetricFamily(
        "quotaflow_upstream_429s_total",
        "HTTP 429 answers from upstream (the quota windows should keep this at 0).",
        labels=["deployment"],
    )
    used = GaugeMetricFamily(
        "quotaflow_quota_used",
        "Used (and reserved) in the deployment's window: requests (rpm), tokens (tpm), "
        "calls in flight (concurrency).",
        labels=["deployment", "bucket"],
    )
    limit = GaugeMetricFamily(
        "quotaflow_quota_limit", "The bucket's limit.", labels=["deployment", "bucket"]
    )
    ratio = GaugeMetricFamily(
        "quotaflow_quota_utilization_ratio",
        "used / limit of the bucket (0..1; above 1 only while a provider tightened it).",
        labels=["deployment", "bucket"],
    )
    in_flight = GaugeMetricFamily(
        "quotaflow_deployment_in_flight", "Granted calls not settled yet.", labels=["deployment"]
    )
    frozen = GaugeMetricFamily(
        "quotaflow_deployment_frozen_seconds",
        "Seconds the deployment stays frozen after a 429 (0: not frozen).",
        labels=["deployment"],
    )
    exhausted = GaugeMetricFamily(
        "quotaflow_deployment_exhausted",
        "1 when upstream said insufficient_quota for the deployment.",
        labels=["deployment"],
    )
    ttft = GaugeMetricFamily(
        "quotaflow_deployment_ttft_ewma_seconds",
        "Moving average of the deployment's upstream time to first token.",
        labels=["deployment"],
    )
    breaker = GaugeMetricFamily(
        "quotaflow_breaker_state",
        "1 for the circuit breaker's current state, 0 for the others.",
        labels=["deployment", "state"],
    )
    opened = CounterMetricFamily(
        "quotaflow_breaker_opened_total",
        "Times the deployment's breaker opened.",
        labels=["deployment"],
    )
    for name in sorted(deps):
        d = deps[name]
        r429.add_metric([name], d.get("upstream_429s", 0))
        buckets: list[tuple[str, float, float]] = [
            (b, d[b]["used"], d[b]["limit"]) for b in ("rpm", "tpm") if b in d
        ]
        if d.get("max_concurrency") is not None:
            buckets.append(("concurrency", d.get("in_flight", 0), d["max_concurrency"]))
        for bucket, u, lim in buckets:
            used.add_metric([name, bucket], u)
            limit.add_metric([name, bucket], lim)
            if lim:
                ratio.add_metric([name, bucket], u / lim)
        in_flight.add_metric([name], d.get("in_flight", 0))
        frozen.add_metric([name], d.get("frozen_s", 0.0))
        exhausted.add_metric([name], 1.0 if d.get("exhausted") else 0.0)
        if d.get("ttft_ewma_ms") is not None:
            ttft.add_metric([name], d["ttft_ewma_ms"] / 1000.0)
        b = d.get("breaker") or {}
        for state in _BREAKER_STATES:
            breaker.add_metric([name, state], 1.0 if b.get("state") == state else 0.0)
        opened.add_metric([name], b.get("opened_total", 0))
    yield from (r429, used, limit, ratio, in_flight, frozen, exhausted, ttft, breaker, opened)
    yield _gauge(
        "quotaflow_quota_queue_depth",
        "Requests waiting in the quota queue.",
        quota.get("queue_depth", 0),
    )
    yield _gauge("quotaflow_quota_leases", "Grants not settled yet.", quota.get("leases", 0))
    yield _counter(
        "quotaflow_quota_grants_total",
        "Grants the quota actor gave (this incarnation).",
        quota.get("grants_total", 0),
    )
    yield _counter(
        "quotaflow_quota_refusals_total",
        "Asks the quota actor refused (budgets, daily quotas, deadlines).",
        quota.get("refusals_total", 0),
    )


def _sum(snaps: Iterable[dict[str, Any] | None], key: str) -> float:
    return float(sum(s.get(key, 0) for s in snaps if s is not None))


def _caches(caches: list[dict[str, Any] | None]) -> Iterator[Metric]:
    lookups = _sum(caches, "lookups")
    hits = {"exact": _sum(caches, "exact_hits"), "semantic": _sum(caches, "semantic_hits")}
    yield _counter(
        "quotaflow_cache_lookups_total", "Requests looked up in the cache shards.", lookups
    )
    fam = CounterMetricFamily(
        "quotaflow_cache_hits_total",
        "Lookups answered from the cache, by kind (exact or semantic).",
        labels=["kind"],
    )
    for kind, n in hits.items():
        fam.add_metric([kind], n)
    yield fam
    yield _counter(
        "quotaflow_cache_misses_total",
        "Lookups not answered from the cache (they run upstream, or wait for an identical "
        "request in flight).",
        lookups - sum(hits.values()),
    )
    yield _counter(
        "quotaflow_cache_evictions_total",
        "Cache entries evicted (size bounds).",
        _sum(caches, "evictions"),
    )
    yield _gauge("quotaflow_cache_entries", "Entries in the cache.", _sum(caches, "entries"))
    yield _gauge("quotaflow_cache_bytes", "Bytes held by the cache.", _sum(caches, "bytes"))


def _idempotency(shards: list[dict[str, Any] | None]) -> Iterator[Metric]:
    yield _counter(
        "quotaflow_idempotency_claims_total",
        "Request ids checked against the idempotency store.",
        _sum(shards, "claims"),
    )
    yield _counter(
        "quotaflow_idempotency_hits_total",
        "Claims answered by replaying a stored result.",
        _sum(shards, "hits"),
    )
    yield _counter(
        "quotaflow_idempotency_replayed_replies_total",
        "Reply records resent by replays.",
        _sum(shards, "replayed_replies"),
    )
    yield _counter(
        "quotaflow_idempotency_evictions_total",
        "Stored results evicted (size bounds).",
        _sum(shards, "evictions"),
    )
    yield _counter(
        "quotaflow_idempotency_expired_total",
        "Stored results dropped past the window.",
        _sum(shards, "expired"),
    )
    yield _gauge("quotaflow_idempotency_entries", "Entries in the store.", _sum(shards, "entries"))
    yield _gauge("quotaflow_idempotency_bytes", "Bytes held by the store.", _sum(shards, "bytes"))


def _health(snaps: ActorSnapshots) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        "quotaflow_actor_up",
        "1 when the actor answered the last collection in time, else 0.",
        labels=["actor"],
    )
    up.add_metric(["quota"], 0.0 if snaps.quota is None else 1.0)
    for kind, items in (
        ("caller", snaps.callers),
        ("cache", snaps.caches),
        ("idempotency", snaps.idempotency),
    ):
        for i, s in enumerate(items):
            up.add_metric([f"{kind}.{i}"], 0.0 if s is None else 1.0)
    yield up
    yield _gauge(
        "quotaflow_metrics_collect_seconds",
        "How long the last collection of actor snapshots took.",
        snaps.collect_seconds,
    )


def families(ingress: IngressFigures, actors: ActorSnapshots) -> list[Metric]:
    """Every metric, from the ingress's figures and the actors' snapshots (pure)."""
    out: list[Metric] = [*_ingress(ingress), *_requests(ingress, actors.callers)]
    out.extend(_latency(actors.callers, _LATENCY))
    out.extend(_latency(actors.caches, _CACHE_LATENCY))
    if actors.quota is not None:
        out.extend(_quota(actors.quota))
    out.extend(_caches(actors.caches))
    out.extend(_idempotency(actors.idempotency))
    out.extend(_health(actors))
    return out


class GatewayCollector(Collector):
    """A `prometheus_client` collector over one gateway; actor snapshots cached."""

    def __init__(
        self,
        gateway: Gateway,
        refresh_s: float,
        fetch: Callable[[Actors], ActorSnapshots] = ActorSnapshots.fetch,
    ) -> None:
        self._gateway = gateway
        self._refresh_s = refresh_s
        self._fetch = fetch
        self._lock = threading.Lock()
        self._snapshots: ActorSnapshots | None = None
        self._fetched_at = 0.0

    def collect(self) -> Iterable[Metric]:
        with self._lock:  # concurrent scrapes wait for one fetch instead of repeating it
            now = time.monotonic()
            if self._snapshots is None or now - self._fetched_at >= self._refresh_s:
                self._snapshots = self._fetch(self._gateway.actors)
                self._fetched_at = time.monotonic()
            snaps = self._snapshots
        gw = self._gateway
        return families(IngressFigures.of(gw.stats, gw.in_flight), snaps)


class MetricsServer:
    """`prometheus_client`'s HTTP server on a daemon thread, serving one registry."""

    def __init__(
        self,
        config: MetricsConfig,
        gateway: Gateway,
        fetch: Callable[[Actors], ActorSnapshots] = ActorSnapshots.fetch,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(GatewayCollector(gateway, config.refresh_s, fetch))
        try:
            server, self._thread = start_http_server(
                config.port, addr=config.host, registry=self.registry
            )
        except OSError as exc:
            raise QuotaflowError(
                f"metrics.port {config.port}: cannot listen on {config.host}:{config.port} "
                f"({exc.strerror or exc}); choose a free port (0 picks one) or set "
                "metrics.enabled: false"
            ) from None
        self._server: WSGIServer = server
        host = f"[{config.host}]" if ":" in config.host else config.host
        self.port: int = server.server_port
        self.url = f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def start_metrics(config: MetricsConfig, gateway: Gateway) -> MetricsServer | None:
    """Serve `/metrics` for a started gateway (None when `metrics.enabled` is false)."""
    if not config.enabled:
        return None
    server = MetricsServer(config, gateway)
    log.info("metrics_listening", url=server.url)
    return server
