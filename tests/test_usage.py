"""`quotaflow usage` aggregation without Kafka: sums, savings from cache hits, CSV, time bounds."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Any

import pytest
from rich.console import Console

from pipeline.usage import UsageReport, parse_when, render_table, write_csv
from topics.config import parse_config
from topics.errors import QuotaflowError
from topics.wire import Usage

CONFIG = parse_config(
    {
        "deployments": [
            {
                "name": name,
                "base_url": "http://127.0.0.1:1/v1",
                "api_key_env": "K",
                "model": "m",
                "price": {"input_per_mtok": inp, "output_per_mtok": out},
            }
            for name, inp, out in (("a1", 1.0, 4.0), ("a2", 0.5, 2.0), ("b1", 10.0, 40.0))
        ],
        "models": [
            {"name": "small", "deployments": ["a1", "a2"], "aliases": ["s"]},
            {"name": "big", "deployments": ["b1"]},
        ],
    }
)


def _u(tenant: str, model: str | None, **kw: Any) -> Usage:
    base: dict[str, Any] = {
        "id": "x",
        "tenant": tenant,
        "model": model,
        "deployment": None,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost_usd": 0.0,
        "cache": "miss",
        "status": "done",
        "ts_ms": 0,
    }
    base.update(kw)
    return Usage(**base)


RECORDS = [
    _u("t1", "small", deployment="a1", prompt_tokens=100, completion_tokens=20, cost_usd=0.01),
    _u("t1", "small", deployment="a2", prompt_tokens=50, completion_tokens=10, cost_usd=0.02),
    _u("t1", "small", cache="exact", prompt_tokens=1000, completion_tokens=500),
    _u("t1", "big", deployment="b1", prompt_tokens=10, completion_tokens=5, cost_usd=0.5),
    _u("t2", "big", status="quota_exceeded"),
    _u("t2", None, status="unknown_model"),
    _u("t2", "retired-model", cache="exact", prompt_tokens=7, completion_tokens=7),
]


def _report(by: tuple[str, ...] = ("tenant", "model")) -> UsageReport:
    report = UsageReport(CONFIG, by)
    for r in RECORDS:
        report.add(r)
    return report


def test_groups_sum_cost_tokens_and_count_errors_and_hits() -> None:
    rows = {(r.tenant, r.model): r for r in _report().rows()}
    small = rows[("t1", "small")]
    assert (small.requests, small.done, small.errors, small.cache_hits) == (3, 3, 0, 1)
    assert (small.prompt_tokens, small.completion_tokens) == (150, 30)  # hits not charged
    assert small.cached_tokens == 1500
    assert small.cost_usd == pytest.approx(0.03)
    assert rows[("t2", "big")].errors == 1
    assert rows[("t2", "-")].errors == 1  # an error before a model was known


def test_cache_hits_are_saved_at_the_cheapest_deployment_of_their_model() -> None:
    report = _report()
    rows = {(r.tenant, r.model): r for r in report.rows()}
    # small's cheapest deployment is a2 (0.5 / 2.0 per Mtok).
    assert rows[("t1", "small")].saved_usd == pytest.approx((1000 * 0.5 + 500 * 2.0) / 1e6)
    # A model the config no longer has: counted as a hit, not priced.
    assert rows[("t2", "retired-model")].saved_usd == 0.0
    assert report.unpriced_hits == 1


def test_total_and_grouping_by_deployment() -> None:
    report = _report(("deployment",))
    total = report.total()
    assert total.requests == len(RECORDS)
    assert total.cost_usd == pytest.approx(sum(r.cost_usd for r in RECORDS))
    by_dep = {r.deployment: r for r in report.rows()}
    assert by_dep["b1"].cost_usd == pytest.approx(0.5)
    assert by_dep["-"].cache_hits == 2
    with pytest.raises(QuotaflowError, match="--by 'colour'"):
        UsageReport(CONFIG, ("colour",))


def test_csv_has_a_line_per_group_with_unrounded_figures() -> None:
    report = _report()
    out = io.StringIO()
    write_csv(report, out)
    lines = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(lines) == len(report.rows())
    first = lines[0]  # dearest first
    assert (first["tenant"], first["model"]) == ("t1", "big")
    assert float(first["cost_usd"]) == 0.5
    assert {"prompt_tokens", "completion_tokens", "cached_tokens", "saved_usd"} <= set(first)


def test_table_renders_every_group_and_the_total() -> None:
    console = Console(record=True, width=200)
    render_table(_report(), console, title="usage")
    text = console.export_text()
    assert "retired-model" in text
    assert "total" in text
    assert f"{sum(r.cost_usd for r in RECORDS):.6f}" in text  # the total row's cost


def test_when_accepts_durations_and_iso_dates() -> None:
    now = 1_800_000_000_000
    assert parse_when("24h", now_ms=now) == now - 24 * 3600 * 1000
    assert parse_when("90m", now_ms=now) == now - 90 * 60 * 1000
    midnight = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp() * 1000)
    assert parse_when("2026-11-01") == midnight  # no zone: UTC
    assert parse_when("2026-11-01T01:00+01:00") == midnight
    with pytest.raises(QuotaflowError, match="'yesterday'"):
        parse_when("yesterday")
