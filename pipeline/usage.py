"""`quotaflow usage`: spend, tokens and cache savings per tenant and model, from `llm.usage`.

Reads the usage topic from the first record at or after `--since` (else its start) up to
its end as of the start of the run, as a consumer without a group (it commits nothing and
disturbs no one), and sums the records per group. Covers what the topic retains
(`topics.retention_ms`, 7 days by default): keep longer history in your own store.

Cache hits cost 0 (`cost_usd` 0, `deployment` null); their **savings** are their tokens
priced at the cheapest deployment of their model, so they are never overstated.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TextIO

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.table import Table

from topics.config import Config
from topics.errors import QuotaflowError
from topics.specs import USAGE_DECODER
from topics.wire import Usage

__all__ = [
    "GROUP_KEYS",
    "UsageReport",
    "UsageRow",
    "parse_when",
    "read_usage",
    "render_table",
    "run_usage",
    "write_csv",
]

GROUP_KEYS: Final = ("tenant", "model", "deployment")
_NONE = "-"
_RELATIVE = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>[smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_POLL_MS = 500


def parse_when(text: str, *, now_ms: float | None = None) -> int:
    """Epoch ms of `text`: a duration back from now (`90m`, `24h`, `7d`) or ISO 8601
    (`2026-11-01`, `2026-11-01T12:00`; without a zone, UTC)."""
    now = time.time() * 1000 if now_ms is None else now_ms
    m = _RELATIVE.match(text.strip())
    if m:
        return int(now - float(m["n"]) * _UNIT_S[m["unit"]] * 1000)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise QuotaflowError(
            f"--since/--until {text!r}: expected a duration (90m, 24h, 7d) or an ISO 8601 "
            "date/time such as 2026-11-01 or 2026-11-01T12:00"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


@dataclass
class UsageRow:
    """Sums over the usage records of one group (or of all: the total)."""

    tenant: str = _NONE
    model: str = _NONE
    deployment: str = _NONE
    requests: int = 0
    done: int = 0
    errors: int = 0
    cache_hits: int = 0
    # Tokens the upstream charged for (cache hits excluded).
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Tokens answered from the cache (not charged).
    cached_tokens: int = 0
    cost_usd: float = 0.0
    saved_usd: float = 0.0


def _labelled(labels: dict[str, str]) -> UsageRow:
    row = UsageRow()
    for key, value in labels.items():
        setattr(row, key, value)
    return row


class UsageReport:
    """Aggregates `Usage` records per group of `by` (any of tenant, model, deployment)."""

    def __init__(self, config: Config, by: Sequence[str] = ("tenant", "model")) -> None:
        for key in by:
            if key not in GROUP_KEYS:
                raise QuotaflowError(f"--by {key!r}: expected some of {', '.join(GROUP_KEYS)}")
        self.by = tuple(by)
        prices = {d.name: d.price for d in config.deployments}
        # USD per prompt and per completion token at each model's cheapest deployment.
        self._hit_price: dict[str, tuple[float, float]] = {}
        for m in config.models:
            cheapest = min(
                (prices[d] for d in m.deployments),
                key=lambda p: p.input_per_mtok + p.output_per_mtok,
            )
            unit = (cheapest.input_per_mtok / 1e6, cheapest.output_per_mtok / 1e6)
            for name in (m.name, *m.aliases):
                self._hit_price[name] = unit
        self._rows: dict[tuple[str, ...], UsageRow] = {}
        self.records = 0
        # Cache hits of models the config does not know: no price, no savings counted.
        self.unpriced_hits = 0

    def add(self, u: Usage) -> None:
        self.records += 1
        values = {
            "tenant": u.tenant,
            "model": u.model or _NONE,
            "deployment": u.deployment or _NONE,
        }
        key = tuple(values[k] for k in self.by)
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = _labelled({k: values[k] for k in self.by})
        row.requests += 1
        if u.status != "done":
            row.errors += 1
            return
        row.done += 1
        if u.cache != "miss":
            row.cache_hits += 1
            row.cached_tokens += u.prompt_tokens + u.completion_tokens
            unit = self._hit_price.get(u.model or "")
            if unit is None:
                self.unpriced_hits += 1
            else:
                row.saved_usd += u.prompt_tokens * unit[0] + u.completion_tokens * unit[1]
            return
        row.prompt_tokens += u.prompt_tokens
        row.completion_tokens += u.completion_tokens
        row.cost_usd += u.cost_usd

    def rows(self) -> list[UsageRow]:
        """Groups, dearest first (then by name)."""
        return sorted(
            self._rows.values(),
            key=lambda r: (-r.cost_usd, *(getattr(r, k) for k in self.by)),
        )

    def total(self) -> UsageRow:
        t = _labelled({k: "total" if i == 0 else "" for i, k in enumerate(self.by)})
        for r in self._rows.values():
            for f in fields(UsageRow):
                if f.name not in GROUP_KEYS:
                    setattr(t, f.name, getattr(t, f.name) + getattr(r, f.name))
        return t


_COUNT_COLUMNS: Final = (
    ("requests", "requests"),
    ("done", "done"),
    ("errors", "errors"),
    ("cache_hits", "cache hits"),
    ("prompt_tokens", "prompt tok"),
    ("completion_tokens", "completion tok"),
    ("cached_tokens", "cached tok"),
)


def render_table(report: UsageReport, console: Console, *, title: str) -> None:
    """The report as a rich table, with a total row."""
    table = Table(title=title, title_justify="left")
    for key in report.by:
        table.add_column(key)
    for _, label in _COUNT_COLUMNS:
        table.add_column(label, justify="right")
    table.add_column("cost $", justify="right")
    table.add_column("saved $ (cache)", justify="right")
    rows = report.rows()
    for i, r in enumerate([*rows, report.total()]):
        table.add_row(
            *(getattr(r, k) for k in report.by),
            *(f"{getattr(r, k):,}" for k, _ in _COUNT_COLUMNS),
            f"{r.cost_usd:.6f}",
            f"{r.saved_usd:.6f}",
            end_section=i == len(rows) - 1,
        )
    console.print(table)
    if report.unpriced_hits:
        console.print(
            f"{report.unpriced_hits} cache hits of models not in this config: no savings counted"
        )


def write_csv(report: UsageReport, out: TextIO) -> None:
    """One CSV line per group (no total line), header first; costs unrounded."""
    columns = [*report.by, *(f.name for f in fields(UsageRow) if f.name not in GROUP_KEYS)]
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in report.rows():
        writer.writerow({c: getattr(r, c) for c in columns})


async def _partitions(config: Config) -> list[int]:
    """The usage topic's partitions (an error naming it when it does not exist)."""
    topic = config.topics.usage
    admin = AIOKafkaAdminClient(
        bootstrap_servers=config.kafka.bootstrap_servers,
        client_id=f"{config.kafka.client_id}-usage-admin",
    )
    try:
        await admin.start()
    except KafkaError as exc:
        raise QuotaflowError(
            f"cannot reach Kafka at {config.kafka.bootstrap_servers!r}: {exc}"
        ) from None
    try:
        # Listed first: a metadata request for a missing topic could auto-create it.
        if topic not in set(await admin.list_topics()):
            raise QuotaflowError(
                f"topic {topic!r} (topics.usage) does not exist at "
                f"{config.kafka.bootstrap_servers!r}: no usage recorded yet"
            )
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return sorted(int(p["partition"]) for t in described for p in t["partitions"])


async def read_usage(
    config: Config,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    idle_timeout_s: float = 30.0,
) -> AsyncIterator[Usage]:
    """The usage records with `since_ms <= ts_ms < until_ms`, up to the topic's end as of
    the call. Records that are not Usage JSON are skipped."""
    topic = config.topics.usage
    consumer = AIOKafkaConsumer(
        bootstrap_servers=config.kafka.bootstrap_servers,
        client_id=f"{config.kafka.client_id}-usage",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        raise QuotaflowError(
            f"cannot reach Kafka at {config.kafka.bootstrap_servers!r}: {exc}"
        ) from None
    try:
        tps = [TopicPartition(topic, p) for p in await _partitions(config)]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        if since_ms is not None:
            starts = await consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
            for tp in tps:
                at = starts.get(tp)
                consumer.seek(tp, at.offset if at is not None else end[tp])
        else:
            await consumer.seek_to_beginning(*tps)
        pending = {tp for tp in tps if end[tp] > 0}
        for tp in list(pending):
            if await consumer.position(tp) >= end[tp]:
                pending.discard(tp)
        idle_since = time.monotonic()
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=_POLL_MS)
            if batches:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > idle_timeout_s:
                raise QuotaflowError(
                    f"no records from {topic!r} for {idle_timeout_s:g} s before its end"
                )
            for records in batches.values():
                for rec in records:
                    if rec.offset >= end[TopicPartition(rec.topic, rec.partition)]:
                        continue
                    try:
                        u = USAGE_DECODER.decode(rec.value or b"")
                    except msgspec.DecodeError:
                        continue
                    if since_ms is not None and u.ts_ms < since_ms:
                        continue
                    if until_ms is not None and u.ts_ms >= until_ms:
                        continue
                    yield u
            for tp in list(pending):
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()


async def _collect(
    config: Config,
    report: UsageReport,
    *,
    since_ms: int | None,
    until_ms: int | None,
    tenants: Iterable[str],
) -> None:
    wanted = set(tenants)
    async for u in read_usage(config, since_ms=since_ms, until_ms=until_ms):
        if not wanted or u.tenant in wanted:
            report.add(u)


def _period(since_ms: int | None, until_ms: int | None) -> str:
    def fmt(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")

    start = fmt(since_ms) if since_ms is not None else "the topic's start"
    end = fmt(until_ms) if until_ms is not None else "now"
    return f"{start} to {end}"


def run_usage(
    config: Config,
    *,
    since: str | None = None,
    until: str | None = None,
    tenants: Sequence[str] = (),
    by: Sequence[str] = ("tenant", "model"),
    csv_path: str | None = None,
) -> int:
    """The whole command: read, aggregate, print the table and/or write the CSV."""
    since_ms = parse_when(since) if since else None
    until_ms = parse_when(until) if until else None
    report = UsageReport(config, by)
    asyncio.run(_collect(config, report, since_ms=since_ms, until_ms=until_ms, tenants=tenants))
    if csv_path == "-":
        write_csv(report, sys.stdout)
        return 0
    if csv_path is not None:
        buf = io.StringIO()
        write_csv(report, buf)
        Path(csv_path).write_text(buf.getvalue())
    render_table(
        report,
        Console(),
        title=f"usage from {config.topics.usage!r}, {_period(since_ms, until_ms)} "
        f"({report.records} records)",
    )
    if csv_path is not None:
        print(f"csv written to {csv_path}", file=sys.stderr)
    return 0
