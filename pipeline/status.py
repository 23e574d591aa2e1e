"""`quotaflow status`: what the running gateway's actors are doing, for people and scripts.

Joins the Ray cluster the gateway runs on (`RAY_ADDRESS`, else the local one) as a
short-lived driver and asks the named actors for snapshots; it changes nothing.
"""

from __future__ import annotations

import json
import time
from typing import Any

import ray
from rich.console import Console
from rich.table import Table

from actors._ray import actor_by_name
from actors.cache import cache_actor_name
from actors.idempotency import idempotency_actor_name
from actors.quota import QUOTA_ACTOR_NAME
from pipeline.runtime import init_ray
from topics.config import Config
from topics.errors import QuotaflowError

__all__ = ["collect_status", "print_status"]

_CALL_TIMEOUT_S = 10.0


def collect_status(config: Config) -> dict[str, Any]:
    """Snapshots of the quota actor, the callers and the cache shards, as one dict."""
    init_ray(config, join_only=True)
    try:
        quota = actor_by_name(config, QUOTA_ACTOR_NAME)
    except ValueError:
        raise QuotaflowError(
            f"no quota actor {QUOTA_ACTOR_NAME!r} in namespace {config.gateway.ray_namespace!r}: "
            "the gateway is not running on this cluster"
        ) from None
    out: dict[str, Any] = {"ts_ms": int(time.time() * 1000)}
    out["quota"] = ray.get(quota.snapshot.remote(), timeout=_CALL_TIMEOUT_S)
    callers = []
    for i in range(config.gateway.caller_actors):
        try:
            handle = actor_by_name(config, f"quotaflow.caller.{i}")
            callers.append(ray.get(handle.stats.remote(), timeout=_CALL_TIMEOUT_S))
        except (ValueError, ray.exceptions.RayError) as exc:
            callers.append({"caller": i, "error": type(exc).__name__})
    out["callers"] = callers
    caches = []
    if config.cache.enabled:
        for i in range(config.cache.shards):
            try:
                handle = actor_by_name(config, cache_actor_name(i))
                caches.append(ray.get(handle.stats.remote(), timeout=_CALL_TIMEOUT_S))
            except (ValueError, ray.exceptions.RayError) as exc:
                caches.append({"shard": i, "error": type(exc).__name__})
    out["caches"] = caches
    shards = []
    idem = config.resilience.idempotency
    for i in range(idem.shards if idem.enabled else 0):
        try:
            handle = actor_by_name(config, idempotency_actor_name(i))
            shards.append(ray.get(handle.stats.remote(), timeout=_CALL_TIMEOUT_S))
        except (ValueError, ray.exceptions.RayError) as exc:
            shards.append({"shard": i, "error": type(exc).__name__})
    out["idempotency"] = shards
    return out


def _render(status: dict[str, Any], console: Console) -> None:
    q = status["quota"]
    buckets = Table(title="deployments", title_justify="left")
    columns = ("deployment", "bucket", "used", "limit", "reset s", "in flight", "state", "breaker")
    for col in (*columns, "ttft ms", "429s"):
        buckets.add_column(col)
    for name, d in q["deployments"].items():
        state = (
            "exhausted"
            if d["exhausted"]
            else (f"frozen {d['frozen_s']}s" if d["frozen_s"] else "ok")
        )
        rows = [(k, d[k]) for k in ("rpm", "tpm") if k in d] or [("-", None)]
        for label, b in rows:
            buckets.add_row(
                name,
                label,
                str(b["used"]) if b else "-",
                str(b["limit"]) if b else "unlimited",
                str(b["reset_s"]) if b else "-",
                str(d["in_flight"]),
                state,
                str(d.get("breaker", {}).get("state", "-")),
                str(d.get("ttft_ewma_ms") or "-"),
                str(d["upstream_429s"]),
            )
    console.print(buckets)
    queue = Table(title="waiting for quota", title_justify="left")
    for col in ("tenant", "by priority", "total"):
        queue.add_column(col)
    for tenant, by_prio in q["queue_by_tenant_priority"].items():
        queue.add_row(
            tenant,
            ", ".join(f"p{p}: {n}" for p, n in sorted(by_prio.items())),
            str(sum(by_prio.values())),
        )
    console.print(queue)
    tenants = Table(title="tenants", title_justify="left")
    for col in (
        "tenant",
        "tokens today",
        "daily budget",
        "spent today $",
        "daily budget $",
        "spent this month $",
        "monthly budget $",
    ):
        tenants.add_column(col)
    for name, t in q["tenants"].items():
        tenants.add_row(
            name,
            str(t["day_used_tokens"]),
            str(t["daily_tokens"] or "-"),
            f"{t.get('day_used_usd', 0.0):.6f}",
            str(t.get("daily_budget_usd") or "-"),
            f"{t['month_used_usd']:.6f}",
            str(t["monthly_budget_usd"] or "-"),
        )
    console.print(tenants)
    _render_caches(status.get("caches") or [], console)
    console.print(
        f"grants/s {q['grants_per_s']}  grants {q['grants_total']}  "
        f"refusals {q['refusals_total']}  queue {q['queue_depth']}  leases {q['leases']}  "
        f"upstream 429s {q['upstream_429s']}  "
        f"in flight {sum(c.get('in_flight', 0) for c in status['callers'])}"
    )


def _render_caches(caches: list[dict[str, Any]], console: Console) -> None:
    """One row per cache shard: size, hit rates, lookup latency, single flight."""
    if not caches:
        return
    table = Table(title="cache shards", title_justify="left")
    columns = ("shard", "entries", "MiB", "lookups", "exact hit %", "semantic hit %")
    for col in (*columns, "lookup ms p50/p99", "in flight / waiting", "evicted", "pid"):
        table.add_column(col)

    def pct(rate: float | None) -> str:
        return "-" if rate is None else f"{100 * rate:.1f}"

    def dash(value: float | None) -> str:
        return "-" if value is None else str(value)

    for c in caches:
        if "error" in c:
            table.add_row(str(c["shard"]), f"unavailable ({c['error']})", *[""] * 8)
            continue
        table.add_row(
            str(c["shard"]),
            str(c["entries"]),
            f"{c['bytes'] / 2**20:.2f}",
            str(c["lookups"]),
            pct(c["hit_rate_exact"]),
            pct(c["hit_rate_semantic"]) if "semantic" in c else "off",
            f"{dash(c['lookup_ms_p50'])} / {dash(c['lookup_ms_p99'])}",
            f"{c['flights']} / {c['followers_waiting']}",
            str(c["evictions"]),
            str(c["pid"]),
        )
    console.print(table)


def print_status(config: Config, *, as_json: bool, watch_s: float | None) -> int:
    """Print one snapshot (table or JSON), or refresh every `watch_s` until Ctrl-C."""
    console = Console()
    try:
        while True:
            status = collect_status(config)
            if as_json:
                print(json.dumps(status, sort_keys=True))
            else:
                if watch_s is not None:
                    console.clear()
                _render(status, console)
            if watch_s is None:
                return 0
            time.sleep(watch_s)
    finally:
        if ray.is_initialized():
            ray.shutdown()
